"""How long a connection may take to send a request, and how many a worker keeps open.

uvicorn has no read timeout: a connection that sends nothing, or a head and never its
body, is held for good, and a few thousand such sockets use up a worker's file
descriptors. AdmissionProtocol (api/protocol.py) records when each connection began to
wait for a head or a body and how many bytes it has read; once a second, one sweep per
server closes those that are too slow, with a 408 that says which limit they missed:

- HEADER_TIMEOUT_S: a request's head (from its first byte, or from the connection's
  start for its first request) must be whole within this many seconds;
- MIN_BODY_RATE and BODY_TIMEOUT_S: after its head, a body must keep arriving at
  MIN_BODY_RATE bytes per second on average, BODY_TIMEOUT_S seconds of slack included
  (a 10 MB photo over a 100 kB/s link passes; a sender of a byte a minute does not).
  While the server itself has paused reading (its app has not taken what came), the
  clock stops.

MAX_CONNECTIONS caps a worker's open connections: one past it is answered 503 and
closed at once. Each of these closes is counted in /metrics.
"""

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge

from api.errors import ErrorAnswer
from settings import Settings

SWEEP_S = 1.0

CLOSED = Counter(
    "http_connections_closed_total",
    "Connections the server closed for reading too slowly, or over MAX_CONNECTIONS.",
    ["reason"],
)
OPEN = Gauge(
    "http_connections_open", "Open HTTP connections, all workers.", multiprocess_mode="livesum"
)
REASONS = ("header_timeout", "body_timeout", "over_max_connections")
for _reason in REASONS:
    CLOSED.labels(_reason)  # exported from the start, as 0


@dataclass(frozen=True)
class ReadLimits:
    header_timeout_s: float
    body_timeout_s: float
    min_body_rate: int
    max_connections: int

    @classmethod
    def of(cls, settings: Settings) -> "ReadLimits":
        return cls(
            settings.header_timeout_s,
            settings.body_timeout_s,
            settings.min_body_rate,
            settings.max_connections,
        )

    def head_too_slow(self, waited: float) -> bool:
        return waited > self.header_timeout_s

    def body_too_slow(self, waited: float, received: int) -> bool:
        return waited > self.body_timeout_s and received < self.min_body_rate * (
            waited - self.body_timeout_s
        )

    def explain(self, reason: str) -> str:
        if reason == "header_timeout":
            return (
                f"the request's headers did not arrive within HEADER_TIMEOUT_S="
                f"{self.header_timeout_s:g} s; send the whole head at once"
            )
        if reason == "body_timeout":
            return (
                f"the request's body arrived slower than MIN_BODY_RATE={self.min_body_rate} "
                f"bytes/s (after BODY_TIMEOUT_S={self.body_timeout_s:g} s); send it faster, "
                "or a smaller file"
            )
        return (
            f"this worker has MAX_CONNECTIONS={self.max_connections} connections open; "
            "retry later, or reuse a connection (keep-alive)"
        )

    def answer(self, reason: str) -> ErrorAnswer:
        """The answer that closes a connection for ``reason``: 408, or 503 with
        Retry-After past MAX_CONNECTIONS."""
        detail = json.dumps({"detail": self.explain(reason)}, separators=(",", ":"))
        if reason == "over_max_connections":
            return ErrorAnswer(503, {"Retry-After": "1"}, detail.encode())
        return ErrorAnswer(408, {}, detail.encode())


class Sweep:
    """Once a second while any connection is open, asks each whether it reads too
    slowly. One per uvicorn server; ``connections`` is its set of open protocols (HTTP
    ones answer ``check_reads``; WebSocket ones are in it too)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, connections: set[Any]) -> None:
        self.loop = loop
        self.connections = connections
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self._timer is None:
            self._timer = self.loop.call_later(SWEEP_S, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        now = self.loop.time()
        for connection in list(self.connections):
            check = getattr(connection, "check_reads", None)
            if check is not None:
                check(now)
        if self.connections:
            self.start()
