"""uvicorn's HTTP protocol with the admission door in it.

A refusal through the ASGI app costs a task, the ASGI cycle's messages and a response
object's trip through uvicorn's header checks. Here the door judges a task request the
moment its headers are parsed, in the protocol's own callback, and writes a refusal
straight to the socket; only admitted requests (and every other route) become ASGI tasks.
A connection refused here is remembered on the protocol object, one per connection, so a
client that comes back before its Retry-After is held by a timer instead of a task.

    uvicorn.run(app, http=AdmissionProtocol)           (main.run does this)
    UvicornWorker.CONFIG_KWARGS["http"] = AdmissionProtocol  (worker.py does this)

Under another protocol or server, ``EarlyAdmission`` in front of the app does the same
work later in the request.
"""

import asyncio
from typing import Any, cast

from starlette.responses import Response
from starlette.types import Scope
from uvicorn._types import ASGI3Application
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from api.admission import Door, retry_after


def find_door(app: object) -> Door | None:
    """The door of the app uvicorn serves, through uvicorn's own wrappers (proxy
    headers, message logging), each of which keeps the app it wraps as ``app``."""
    for _ in range(8):
        door = getattr(app, "door", None)
        if isinstance(door, Door):
            return door
        app = getattr(app, "app", None)
    return None


def scope_of(cycle: RequestResponseCycle) -> Scope:
    return cast(Scope, cycle.scope)  # uvicorn's TypedDict, as the plain mapping it is


class AdmissionProtocol(HttpToolsProtocol):
    """Judges POSTs to task routes before they become ASGI tasks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.door = find_door(self.app)
        self._held_until = 0.0  # loop time this connection's last Retry-After ends
        self._held: tuple[RequestResponseCycle, ASGI3Application, float] | None = None
        self._hold_timer: asyncio.TimerHandle | None = None

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        # A connection that closes after this request (HTTP/1.0, Connection: close) goes
        # the ASGI way, which reads the body before refusing: a client that writes all of
        # it before reading the answer would otherwise see a reset.
        door = self.door
        if (
            door is None
            or app is not self.app
            or not cycle.keep_alive
            or not door.guards(scope_of(cycle))
        ):
            super()._start_asgi_task(cycle, app)
            return
        now = self.loop.time()
        if self._held_until > now:  # back before its Retry-After was over
            # Its body waits in the socket until it is judged: read now, it would be
            # copied into the cycle only to be dropped if refused.
            self.flow.pause_reading()
            self._held = (cycle, app, now)
            self._hold_timer = self.loop.call_later(self._held_until - now, self._judge_held)
        else:
            self._judge(cycle, app, now)

    def _judge_held(self) -> None:
        assert self._held is not None
        held, self._held, self._hold_timer = self._held, None, None
        self._judge(*held)

    def _judge(self, cycle: RequestResponseCycle, app: ASGI3Application, arrived_at: float) -> None:
        if cycle.disconnected:
            return
        assert self.door is not None
        refusal = self.door.judge(scope_of(cycle), arrived_at)
        if refusal is None:
            super()._start_asgi_task(cycle, app)
            return
        self._held_until = self.loop.time() + retry_after(refusal)
        self._answer(cycle, refusal)

    def _answer(self, cycle: RequestResponseCycle, response: Response) -> None:
        """Writes ``response`` (whole, with its Content-Length) and ends the cycle as
        uvicorn's own last send does. The unread body is dropped as it arrives."""
        head = [STATUS_LINE[response.status_code]]
        for name, value in [*self.server_state.default_headers, *response.raw_headers]:
            head += [name, b": ", value, b"\r\n"]
        if not cycle.keep_alive:
            head.append(b"connection: close\r\n")
        head += [b"\r\n", bytes(response.body)]
        cycle.response_started = cycle.response_complete = True
        self.transport.write(b"".join(head))
        cycle.message_event.set()
        if not cycle.keep_alive:
            self.transport.close()
        cycle.on_response()

    def shutdown(self) -> None:
        # A held request is judged now, on its way out, rather than when its hold ends.
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            assert self._held is not None
            self._held[0].keep_alive = False
            self._judge_held()
        super().shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._held = self._hold_timer = None
        super().connection_lost(exc)
