"""uvicorn's HTTP protocol with the admission door in it.

A refusal through the ASGI app costs a task, the ASGI cycle's messages and a response
object's trip through uvicorn's header checks. Here the door judges a task request the
moment its headers are parsed, in the protocol's own callback, and writes a refusal
straight to the socket; only admitted requests (and every other route) become ASGI tasks.

A connection refused here is parked: it stops reading until its hold is over (the
Retry-After it was given, at most a second, ending on a tenth-of-a-second grid), so what
an impolite client sends meanwhile waits in the kernel (and TCP slows the client down
once the buffer is full). Then the waiting request is judged from its head alone; when
the door refuses it again, its body is dropped in the kernel without being copied,
parsed or handed to Python, and the connection parks again. Under a retry storm most
refusals take this path. Whatever else waits (a request the door admits or does not
judge, an unusual head) is read the normal way, as if the transport had read it.

    uvicorn.run(app, **server_options(settings))           (main.run does this)
    UvicornWorker.CONFIG_KWARGS.update(server_options(settings))  (worker.py does this)

It subclasses uvicorn's private ``HttpToolsProtocol``, so it runs only under the uvicorn
releases it was tested with (``TESTED_UVICORN``; tests/test_uvicorn_contract.py lists what
it takes from uvicorn). Under any other release, and under another protocol or server,
``EarlyAdmission`` in front of the app does the same work later in the request.
"""

import asyncio
import logging
import os
import socket
from typing import Any, cast

import uvicorn
from starlette.types import Scope
from uvicorn._types import ASGI3Application
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from api.door import Door
from api.errors import ErrorAnswer
from api.read_limits import CLOSED, OPEN, SWEEP_S, ReadLimits, Sweep
from api.waiting import drop, parse_waiting, peek
from serving.admission import Refusal
from settings import Settings

logger = logging.getLogger(__name__)

# The uvicorn releases this protocol was tested with: tests/test_uvicorn_contract.py and
# tests/test_http_edges.py pass under them. The README's development section says how to
# add one.
TESTED_UVICORN = frozenset({"0.54.0"})

# Parked connections wake on this grid of the loop's clock, up to one step before their
# hold ends: those parked around the same time are judged in one pass of the loop, where
# waking each alone would cost a pass (and cold caches) per refusal.
WAKE_STEP_S = 0.1


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
        self._held_until = 0.0  # loop time the hold of its last refusal ends
        self._held: tuple[RequestResponseCycle, ASGI3Application, float] | None = None
        self._hold_timer: asyncio.TimerHandle | None = None
        # Parked: reading paused after a refusal until its hold ends.
        self._park_after: RequestResponseCycle | None = None
        self._park_timer: asyncio.TimerHandle | None = None
        self._parked_since: float | None = None
        self._waiting_since: float | None = None  # for the first request read after
        self._discard = 0  # bytes of a refused request's body still to drop
        self._sock: socket.socket | None = None
        self._parkable = False
        # Read limits (api/read_limits.py): when the connection began waiting for a head
        # or a body, and the bytes read so far.
        settings = getattr(self.door.state, "settings", None) if self.door else None
        self._limits = ReadLimits.of(settings) if settings is not None else None
        self._head_since: float | None = None
        self._body_since: float | None = None
        self._body_from = 0
        self._bytes_in = 0
        self._counted = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if (limits := self._limits) is not None:
            if len(self.connections) > limits.max_connections:
                CLOSED.labels("over_max_connections").inc()
                refusal = limits.answer("over_max_connections")
                transport.write(self._render(refusal, keep_alive=False))
                transport.close()
                return
            OPEN.inc()
            self._counted = True
            self._head_since = self.loop.time()
            sweep = getattr(self.server_state, "read_sweep", None)
            if sweep is None:
                sweep = Sweep(self.loop, self.connections)
                self.server_state.read_sweep = sweep  # type: ignore[attr-defined]
            sweep.start()
        # What waits in the socket is read past the transport only on plain TCP: not
        # under TLS, whose bytes the transport decrypts, nor on a Unix socket.
        raw = transport.get_extra_info("socket")
        self._parkable = (
            self.scheme == "http"
            and raw is not None
            and raw.family in (socket.AF_INET, socket.AF_INET6)
        )

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        # A connection that closes after this request (HTTP/1.0, Connection: close) goes
        # the ASGI way, which reads the body before refusing: a client that writes all of
        # it before reading the answer would otherwise see a reset.
        door = self.door
        now = self.loop.time()
        arrived_at, self._waiting_since = self._waiting_since or now, None
        if (
            door is None
            or app is not self.app
            or not cycle.keep_alive
            or not door.guards(scope_of(cycle))
        ):
            super()._start_asgi_task(cycle, app)
            return
        if self._held_until > now:  # back before its hold was over
            # Pipelined behind a refused request (or on a connection that cannot park):
            # held by a timer, with reading paused.
            self.flow.pause_reading()
            self._held = (cycle, app, arrived_at)
            self._hold_timer = self.loop.call_later(self._held_until - now, self._judge_held)
        else:
            self._judge(cycle, app, arrived_at)

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
        cycle.response_started = cycle.response_complete = True
        self._refuse(self.door.answer(scope_of(cycle)["path"], refusal), refusal, cycle.keep_alive)
        cycle.message_event.set()
        if not cycle.keep_alive:
            self.transport.close()
        elif self._parkable:
            self._park_after = cycle  # once its body is read
        cycle.on_response()

    def _refuse(self, answer: ErrorAnswer, refusal: Refusal, keep_alive: bool) -> None:
        """Writes ``refusal``'s answer and starts this connection's hold (its
        Retry-After, at most MAX_HOLD_S)."""
        self._held_until = self.loop.time() + refusal.hold_s
        self.transport.write(self._render(answer, keep_alive))

    def _render(self, answer: ErrorAnswer, keep_alive: bool) -> bytes:
        """``answer`` as the bytes of a whole response, server headers included."""
        head = [STATUS_LINE[answer.status]]
        for raw_name, raw_value in self.server_state.default_headers:
            head += [raw_name, b": ", raw_value, b"\r\n"]
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(answer.body))
        for name, value in answer.headers.items():
            head += [name.lower().encode("latin-1"), b": ", value.encode("latin-1"), b"\r\n"]
        if not keep_alive:
            head.append(b"connection: close\r\n")
        head += [b"\r\n", answer.body]
        return b"".join(head)

    # Read limits (see api/read_limits.py).

    def on_headers_complete(self) -> None:
        self._head_since = None
        self._body_since, self._body_from = self.loop.time(), self._bytes_in
        super().on_headers_complete()

    def check_reads(self, now: float) -> None:
        """Closes the connection with a 408 if its head or body arrives too slowly."""
        limits = self._limits
        if limits is None or self.transport.is_closing():
            return
        if self._head_since is not None:
            if not self.flow.read_paused and limits.head_too_slow(now - self._head_since):
                self._close_for("header_timeout")
        elif self._body_since is not None:
            if self.flow.read_paused:  # the app has not taken what came: not the client
                self._body_since += min(SWEEP_S, now - self._body_since)
            elif limits.body_too_slow(now - self._body_since, self._bytes_in - self._body_from):
                self._close_for("body_timeout")

    def _close_for(self, reason: str) -> None:
        assert self._limits is not None
        CLOSED.labels(reason).inc()
        self.logger.info("Closing a connection: %s", self._limits.explain(reason))
        cycle = self.cycle
        if reason == "header_timeout":  # the last request's answer, if any, is complete
            answer = cycle is None or cycle.response_complete
        else:  # the body's request is still unanswered
            answer = cycle is not None and not cycle.response_started
        if answer:
            self.transport.write(self._render(self._limits.answer(reason), keep_alive=False))
        if cycle is not None and not cycle.response_complete:
            # The app waiting for the body hears a disconnect, and what it sends is
            # dropped, as for a client that went away.
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()

    # Parking (see the module's docstring).

    def on_message_complete(self) -> None:
        self._body_since = None
        super().on_message_complete()
        if self._park_after is not None and self._park_after is self.cycle:
            self._park_after = None
            self._park()

    def on_message_begin(self) -> None:
        # A request pipelined behind the refused one was read with it: it goes the
        # normal way (held in _start_asgi_task), and the connection does not park.
        self._park_after = None
        if self._head_since is None:
            self._head_since = self.loop.time()
        if self._park_timer is not None:
            self._unpark(resume=True)
        super().on_message_begin()

    def _park(self) -> None:
        self.flow.pause_reading()
        self._unset_keepalive_if_required()  # parked connections do not time out
        now = self.loop.time()
        self._parked_since = now
        wake_at = self._held_until // WAKE_STEP_S * WAKE_STEP_S
        self._park_timer = self.loop.call_at(max(wake_at, now), self._wake)

    def _unpark(self, *, resume: bool) -> None:
        if self._park_timer is not None:
            self._park_timer.cancel()
            self._park_timer = None
        if resume:
            self.flow.resume_reading()

    def _wake(self) -> None:
        self._park_timer = None
        self._held_until = min(self._held_until, self.loop.time())  # its hold ends now
        try:
            self._refuse_waiting(closing=False)
        except Exception:  # a bug here would leave the connection unread for good
            self.logger.exception("A parked connection failed; closing it.")
            self.transport.close()

    def _refuse_waiting(self, *, closing: bool) -> None:
        """Judges the request waiting in the socket, if any, from its head; parks again
        after refusing it, else reads on as usual. ``closing``: the server is shutting
        down, and the connection closes after the refusal."""
        since = self._parked_since or self.loop.time()
        waiting = peek(self._socket())
        if waiting is None:  # it sent nothing during the hold: an idle connection
            if closing:
                self.transport.close()
            else:
                self.flow.resume_reading()
                self._arm_keep_alive()
            return
        spans = self._judge_head(waiting, since, closing) if waiting else None
        if closing:
            if spans is not None:
                drop(self._socket(), spans - len(waiting))  # so that the close is not a reset
            self.transport.close()
        elif spans is None:
            # Read and judged the normal way, as waiting since the hold began: it came
            # back early, and its wait counts against its TIMEOUT.
            self._waiting_since = since
            self.flow.resume_reading()
            self.data_received(waiting)  # what the transport would have read
        else:
            self.server_state.total_requests += 1
            self._discard = drop(self._socket(), spans - len(waiting))
            if self._discard:
                # The rest of its body is dropped as it arrives, within the keep-alive
                # timeout.
                self.flow.resume_reading()
                self._arm_keep_alive()
            elif spans < len(waiting):  # the next request came with it
                self.flow.resume_reading()
                self.data_received(waiting[spans:])
            else:
                self._park()

    def _arm_keep_alive(self) -> None:
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def _socket(self) -> socket.socket:
        """The connection's socket, for reads the transport does not make: a duplicate
        of its descriptor, closed with the connection (closing it closes nothing else)."""
        if self._sock is None:
            fileno = self.transport.get_extra_info("socket").fileno()
            self._sock = socket.socket(fileno=os.dup(fileno))
        return self._sock

    def _judge_head(self, waiting: bytes, arrived_at: float, closing: bool) -> int | None:
        """Writes the door's refusal for the request whose head starts ``waiting`` and
        returns how many bytes it spans, head and body; None when it is to be read the
        normal way, from ``waiting`` on."""
        request = parse_waiting(waiting)
        if request is None or self.door is None:
            return None
        scope = {"method": request.method, "path": self.root_path + request.path}
        if not self.door.guards(scope):
            return None
        refusal = self.door.judge(scope, arrived_at)
        if refusal is None:
            return None
        self._refuse(self.door.answer(scope["path"], refusal), refusal, keep_alive=not closing)
        return request.spans

    def data_received(self, data: bytes) -> None:
        self._bytes_in += len(data)
        if self._discard:
            dropped = min(self._discard, len(data))
            self._discard -= dropped
            if self._discard:
                return
            data = data[dropped:]
            if not data:
                self._park()
                return
        super().data_received(data)

    def shutdown(self) -> None:
        # A held request is judged now, on its way out, rather than when its hold ends.
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            assert self._held is not None
            self._held[0].keep_alive = False
            self._judge_held()
        if self._park_timer is not None:
            self._unpark(resume=False)
            try:
                self._refuse_waiting(closing=True)
            except Exception:  # one connection must not stop the server's shutdown
                self.logger.exception("A parked connection failed at shutdown; closing it.")
                self.transport.close()
            return
        super().shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._hold_timer, self._park_timer):
            if timer is not None:
                timer.cancel()
        self._held = self._hold_timer = self._park_timer = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._counted:
            self._counted = False
            OPEN.dec()
        super().connection_lost(exc)


def server_options(settings: Settings, version: str = uvicorn.__version__) -> dict[str, Any]:
    """uvicorn's HTTP options: AdmissionProtocol under a tested uvicorn release. Under any
    other, uvicorn's own protocol, MAX_CONNECTIONS as its ``limit_concurrency``, and one
    warning that says what is lost."""
    if version in TESTED_UVICORN:
        return {"http": AdmissionProtocol}
    logger.warning(
        "uvicorn %s is not a release this server was tested with (%s): serving with"
        " uvicorn's own HTTP protocol. Admission now refuses inside the app (slower under a"
        " retry storm), HEADER_TIMEOUT_S, BODY_TIMEOUT_S and MIN_BODY_RATE are not enforced,"
        " and MAX_CONNECTIONS counts connections and requests together. Install the uvicorn"
        " in requirements.txt, or see the README's development section to upgrade.",
        version,
        ", ".join(sorted(TESTED_UVICORN)),
    )
    return {"http": "httptools", "limit_concurrency": settings.max_connections}
