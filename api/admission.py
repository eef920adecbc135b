"""Refusing overload at the door, before FastAPI's layers, routing and the body.

Under a retry storm the event loop spends itself on refusals, and every cycle it spends
there is one the decode threads and the model wait for (they share its GIL). So a task
request the engine would refuse anyway (not ready, or too far behind to answer within
TIMEOUT) is answered at the door, without the per-request access-log line: refusals are
counted, and logged once a second.

There are two doors around one judge (``Door``). Under our uvicorn and gunicorn setups
the server's own HTTP protocol asks it before any ASGI work (``api/protocol.py``);
``EarlyAdmission`` asks it in front of FastAPI under any other ASGI server, and passes
through what the protocol already admitted.

A client that comes back on the same connection before the Retry-After it was given
is not answered at once: its next answer waits out the rest of that Retry-After (of one
second at most, MAX_HOLD_S), and is a 200 only if the server can still answer within
TIMEOUT of the request's arrival. A polite client, which waits, is never held; an
impolite one is paced to one refusal per hold per connection, instead of as many as the
event loop can write. Under our protocol the held connection does not even read until
then (``api/protocol.py``).
"""

import asyncio
import json
import logging

from starlette.datastructures import State
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import ErrorAnswer, as_response, error_answer
from api.limits import refuse
from api.metrics import REQUEST_SECONDS, REQUESTS
from batching import QueueFull
from serving import NotReady

logger = logging.getLogger("access")

# Connections remembered as refused, at most; past it the expired ones are forgotten.
MAX_REMEMBERED = 10_000
SUMMARY_INTERVAL_S = 1.0
# The longest a refused connection is held. A longer hold would pace a client that
# retries at once more slowly still, but a client that sends at a rate of its own opens
# a new connection for each request it sends meanwhile, and a new connection's first
# refusal costs the server about four parked ones (0.4 ms of CPU against 0.1).
MAX_HOLD_S = 1.0


class Door:
    """Judges each POST to a task route as it arrives. ``routes`` maps each such path to
    its task name; the engine is the one in ``state`` (the app's), once the lifespan has
    started it."""

    def __init__(self, state: State, routes: dict[str, str]) -> None:
        self.state = state
        self.routes = routes
        self._refusals = 0
        self._summary: asyncio.TimerHandle | None = None
        self._metrics = {
            route: (REQUESTS.labels("POST", route, "503"), REQUEST_SECONDS.labels("POST", route))
            for route in routes
        }

    def guards(self, scope: Scope) -> bool:
        """Whether this request is one for the door to judge."""
        return (
            scope["method"] == "POST"
            and scope["path"] in self.routes
            and getattr(self.state, "engine", None) is not None
        )

    def judge(self, scope: Scope, arrived_at: float) -> ErrorAnswer | None:
        """The refusal for a request that arrived at ``arrived_at`` (the loop's clock), or
        None when it is admitted; its route then counts TIMEOUT from that arrival."""
        engine = self.state.engine
        try:
            if (reason := engine.liveness()) is not None:
                raise NotReady(reason)
            engine.services[self.routes[scope["path"]]].admit(arrived_at)
        except (NotReady, QueueFull) as exc:
            self._count(scope["path"], asyncio.get_running_loop().time() - arrived_at)
            return error_answer(exc)
        scope.setdefault("state", {})["arrived_at"] = arrived_at
        return None

    def _count(self, route: str, seconds: float) -> None:
        counter, latency = self._metrics[route]
        counter.inc()
        latency.observe(seconds)
        self._refusals += 1
        if self._summary is None:
            loop = asyncio.get_running_loop()
            self._summary = loop.call_later(SUMMARY_INTERVAL_S, self._log_summary)

    def _log_summary(self) -> None:
        self._summary = None
        count, self._refusals = self._refusals, 0
        logger.info(
            "%s",
            json.dumps({"refused_up_front": count, "status": 503, "seconds": SUMMARY_INTERVAL_S}),
        )


def hold_for(refusal: ErrorAnswer) -> float:
    """How long the connection given ``refusal`` is held: its Retry-After, at most
    MAX_HOLD_S."""
    return min(float(refusal.headers["Retry-After"]), MAX_HOLD_S)


class EarlyAdmission:
    """The door as ASGI middleware: answers 503 for what ``door`` refuses, and hands
    every other request to ``app``. It paces by the client address in the scope."""

    def __init__(self, app: ASGIApp, door: Door) -> None:
        self.app = app
        self.door = door
        # (client host, client port) of a connection -> loop time its hold ends.
        self._refused_until: dict[tuple[str, int], float] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or "arrived_at" in scope.get("state", {})  # judged by the protocol already
            or not self.door.guards(scope)
        ):
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        connection = scope.get("client")
        key = (connection[0], connection[1]) if connection else None
        arrived_at = loop.time()
        held_until = self._refused_until.pop(key, 0.0) if key else 0.0
        if held_until > arrived_at:
            await asyncio.sleep(held_until - arrived_at)  # it did not wait as asked
        refusal = self.door.judge(scope, arrived_at)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        if key is not None:
            self._remember(key, loop.time() + hold_for(refusal))
        await refuse(scope, receive, send, as_response(refusal))

    def _remember(self, key: tuple[str, int], until: float) -> None:
        refused = self._refused_until
        if len(refused) >= MAX_REMEMBERED:
            now = asyncio.get_running_loop().time()
            for stale in [k for k, t in refused.items() if t <= now]:
                del refused[stale]
            if len(refused) >= MAX_REMEMBERED:
                refused.clear()  # a flood of connections: pacing restarts rather than grows
        refused[key] = until
