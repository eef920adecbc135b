"""Refusing overload at the door: in front of FastAPI, before its layers, routing and the
body.

Under a retry storm the event loop spends itself on refusals, and every cycle it spends
there is one the decode threads and the model wait for (they share its GIL). So a task
request the engine would refuse anyway (not ready, or too far behind to answer within
TIMEOUT) is answered here, with a response built from a few bytes, and without the
per-request access-log line: refusals are counted, and logged once a second.

A client that comes back on the same connection before the Retry-After it was given is
not answered at once: its next answer waits out the rest of that Retry-After, and is a
200 only if the server can still answer within TIMEOUT of the request's arrival. A polite
client, which waits, is never held; an
impolite one is paced to one refusal per Retry-After per connection, instead of as many
as the event loop can write.
"""

import asyncio
import json
import logging
import time

from starlette.datastructures import State
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import error_response
from api.limits import refuse
from api.metrics import REQUEST_SECONDS, REQUESTS
from batching import QueueFull
from serving import NotReady

logger = logging.getLogger("access")

# Connections remembered as refused, at most; past it the expired ones are forgotten.
MAX_REMEMBERED = 10_000
SUMMARY_INTERVAL_S = 1.0


class EarlyAdmission:
    """Answers 503 for a POST to a task route the engine cannot take now, and hands every
    other request to ``app``. ``routes`` maps each such path to its task name; the engine
    is the one in ``state`` (the app's), once the lifespan has started it."""

    def __init__(self, app: ASGIApp, state: State, routes: dict[str, str]) -> None:
        self.app = app
        self.state = state
        self.routes = routes
        # (client host, client port) of a connection -> loop time its Retry-After ends.
        self._refused_until: dict[tuple[str, int], float] = {}
        self._refusals = 0
        self._summary: asyncio.TimerHandle | None = None
        self._metrics = {
            route: (REQUESTS.labels("POST", route, "503"), REQUEST_SECONDS.labels("POST", route))
            for route in routes
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        name = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        engine = getattr(self.state, "engine", None) if name else None
        if name is None or engine is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        service = engine.services[name]
        loop = asyncio.get_running_loop()
        connection = scope.get("client")
        key = (connection[0], connection[1]) if connection else None
        arrived_at = loop.time()
        held_until = self._refused_until.pop(key, 0.0) if key else 0.0
        if held_until > arrived_at:
            await asyncio.sleep(held_until - arrived_at)  # it did not wait as asked
            scope.setdefault("state", {})["arrived_at"] = arrived_at
        try:
            if (reason := engine.liveness()) is not None:
                raise NotReady(reason)
            service.admit(arrived_at)
        except (NotReady, QueueFull) as exc:
            response = error_response(exc)
            if key is not None:
                self._remember(key, loop.time() + float(response.headers["retry-after"]))
            await refuse(scope, receive, send, response)
            self._count(scope["path"], time.perf_counter() - started)
            return
        await self.app(scope, receive, send)

    def _remember(self, key: tuple[str, int], until: float) -> None:
        refused = self._refused_until
        if len(refused) >= MAX_REMEMBERED:
            now = asyncio.get_running_loop().time()
            for stale in [k for k, t in refused.items() if t <= now]:
                del refused[stale]
            if len(refused) >= MAX_REMEMBERED:
                refused.clear()  # a flood of connections: pacing restarts rather than grows
        refused[key] = until

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
