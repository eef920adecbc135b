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
second at most: ``Refusal.hold_s`` in serving/admission.py), and is a 200 only if the
server can still answer within TIMEOUT of the request's arrival. A polite client, which
waits, is never held; an impolite one is paced to one refusal per hold per connection,
instead of as many as the event loop can write. Under our protocol the held connection
does not even read until then (``api/protocol.py``).
"""

import asyncio
import json
import logging

from prometheus_client import Counter, Histogram
from starlette.datastructures import State
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import ErrorAnswer, as_response, error_answer
from api.limits import refuse
from api.metrics import REQUEST_SECONDS, REQUESTS
from serving import Engine
from serving.admission import Admitted, Pacing, Refusal

logger = logging.getLogger("access")

# Where an admitted request's ``Admitted`` is kept in its scope's state.
ADMITTED = "admitted"
SUMMARY_INTERVAL_S = 1.0


class Door:
    """Judges each POST to a task route as it arrives. ``routes`` maps each such path to
    the task and version it reaches ("": the newest); the engine is the one in ``state``
    (the app's), once the lifespan has started it. A refusal's message is under "detail",
    or under "error" on the Open Inference Protocol's paths.
    With ``late_models``, the routes of repository models loaded after startup
    (MODEL_CONTROL) are judged too: ``POST /{name}`` and the protocol's infer paths, for
    a name the engine serves at the time."""

    def __init__(
        self,
        state: State,
        routes: dict[str, tuple[str, str]],
        *,
        late_models: bool = False,
    ) -> None:
        self.state = state
        self.routes = routes
        self.late_models = late_models
        self._refusals = 0
        self._summary: asyncio.TimerHandle | None = None
        self._metrics: dict[str, tuple[Counter, Histogram]] = {}

    def route(self, scope: Scope) -> tuple[str, str] | None:
        """The task and version a request is for, if it is one for the door to judge."""
        if scope["method"] != "POST" or getattr(self.state, "engine", None) is None:
            return None
        path: str = scope["path"]
        route = self.routes.get(path)
        if route is None and self.late_models:
            route = _late_route(path)
            if route is not None and route[0] not in self.state.engine.versions:
                return None
        return route

    def guards(self, scope: Scope) -> bool:
        """Whether this request is one for the door to judge."""
        return self.route(scope) is not None

    def judge(self, scope: Scope, arrived_at: float) -> Refusal | None:
        """The engine's refusal for a request that arrived at ``arrived_at`` (the loop's
        clock), or None when it is admitted: it is then marked ``Admitted`` in the
        scope's state, so that no edge further in judges it again. The request is one
        the door ``guards``."""
        route = self.route(scope)
        assert route is not None, "judge() is for a request the door guards"
        task, version = route
        engine: Engine = self.state.engine
        refusal = engine.admit(task, arrived_at, version)
        if refusal is not None:
            self._count(scope["path"], asyncio.get_running_loop().time() - arrived_at)
            return refusal
        scope.setdefault("state", {})[ADMITTED] = Admitted(task, arrived_at)
        return None

    def answer(self, path: str, refusal: Refusal) -> ErrorAnswer:
        """The refusal's answer, as the route at ``path`` words its errors."""
        return error_answer(refusal.error, "error" if path.startswith(V2_MODELS) else "detail")

    def _count(self, route: str, seconds: float) -> None:
        if (metrics := self._metrics.get(route)) is None:
            # One pair per path judged: the task routes, and the models served.
            metrics = REQUESTS.labels("POST", route, "503"), REQUEST_SECONDS.labels("POST", route)
            self._metrics[route] = metrics
        counter, latency = metrics
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


V2_MODELS = "/v2/models/"


def _late_route(path: str) -> tuple[str, str] | None:
    """The model and version of ``POST /{name}``, ``/v2/models/{name}/infer`` or
    ``/v2/models/{name}/versions/{v}/infer``; None for any other path."""
    if path.startswith(V2_MODELS):
        parts = path[len(V2_MODELS) :].split("/")
        if len(parts) == 2 and parts[1] == "infer":
            return parts[0], ""
        if len(parts) == 4 and parts[1] == "versions" and parts[3] == "infer":
            return parts[0], parts[2]
        return None
    name = path[1:]
    return (name, "") if name and "/" not in name else None


class EarlyAdmission:
    """The door as ASGI middleware: answers 503 for what ``door`` refuses, and hands
    every other request to ``app``. It paces by the client address in the scope."""

    def __init__(self, app: ASGIApp, door: Door) -> None:
        self.app = app
        self.door = door
        self._pacing = Pacing()  # by (client host, client port)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or ADMITTED in scope.get("state", {})  # judged by the protocol already
            or not self.door.guards(scope)
        ):
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        connection = scope.get("client")
        key = (connection[0], connection[1]) if connection else None
        arrived_at = loop.time()
        if key is not None and (wait := self._pacing.wait(key, arrived_at)):
            await asyncio.sleep(wait)  # it did not wait as asked
        refusal = self.door.judge(scope, arrived_at)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        if key is not None:
            now = loop.time()
            self._pacing.refused(key, now + refusal.hold_s, now)
        await refuse(scope, receive, send, as_response(self.door.answer(scope["path"], refusal)))
