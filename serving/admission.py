"""May a request in? The question every edge asks before it reads a body: the door in
front of FastAPI, the server's own uvicorn protocol, and the next edges (gRPC). The
engine answers it (``Engine.admit``) in these terms, whatever the transport."""

from collections.abc import Hashable
from dataclasses import dataclass

from batching import QueueFull
from serving.errors import NotReady

# The wait a refusal asks for when it names none of its own (a model still warming up).
RETRY_AFTER_S = 1
# The longest an edge holds a refused connection before it reads from it again: a client
# that comes back before its Retry-After is paced to one refusal per hold. A longer hold
# would pace a client that retries at once more slowly still, but a client that sends at
# a rate of its own opens a new connection for each request it sends meanwhile, and a new
# connection's first refusal costs the server about four held ones (0.4 ms of CPU
# against 0.1).
MAX_HOLD_S = 1.0


class Refusal:
    """A request the server would not answer in time: ``error`` says why, ``retry_after``
    is when to come back, in seconds, and ``hold_s`` how long the edge holds the refused
    connection before it reads from it again (the Retry-After, at most MAX_HOLD_S). Made
    once per refusal, under a retry storm thousands of times a second: kept plain."""

    __slots__ = ("error", "hold_s", "retry_after")

    def __init__(self, error: NotReady | QueueFull) -> None:
        self.error = error
        self.retry_after = float(getattr(error, "retry_after", RETRY_AFTER_S))
        self.hold_s = min(self.retry_after, MAX_HOLD_S)


@dataclass(frozen=True, slots=True)
class Admitted:
    """A request let in for ``task`` at its edge, which it reached at ``arrived_at`` (the
    event loop's clock). An edge further in takes it as judged."""

    task: str
    arrived_at: float


# Connections remembered as refused, at most; past it the expired ones are forgotten.
MAX_REMEMBERED = 10_000


class Pacing:
    """Until when each refused connection was asked to stay away. A request that comes
    back on it sooner (an impolite client) waits out the rest before it is judged, so
    that a client retrying at once gets one refusal per hold, not as many as the server
    can write. Keys are connections; times are the event loop's clock."""

    def __init__(self) -> None:
        self._until: dict[Hashable, float] = {}

    def wait(self, connection: Hashable, now: float) -> float:
        """Seconds a request arriving on ``connection`` at ``now`` should wait, and
        forgets the connection's hold."""
        return max(0.0, self._until.pop(connection, 0.0) - now)

    def refused(self, connection: Hashable, until: float, now: float) -> None:
        """Remembers that ``connection`` was asked to stay away until ``until``."""
        held = self._until
        if len(held) >= MAX_REMEMBERED:
            for stale in [key for key, end in held.items() if end <= now]:
                del held[stale]
            if len(held) >= MAX_REMEMBERED:
                held.clear()  # a flood of connections: pacing restarts rather than grows
        held[connection] = until
