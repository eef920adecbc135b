"""Whether a request may in: the engine's answer (serving/admission.py) and the door that
asks it (api/door.py), on a real engine serving a small task in this process."""

import asyncio
from collections.abc import AsyncIterator

import pytest

from api.door import ADMITTED
from batching import QueueFull
from main import ServingApp, create_app
from serving import NotReady
from serving.admission import MAX_HOLD_S, RETRY_AFTER_S, Admitted, Refusal
from settings import Settings

pytestmark = pytest.mark.anyio


async def started(timeout_s: float) -> AsyncIterator[ServingApp]:
    settings = Settings(tasks="tests.tasks:Square", timeout=timeout_s)
    app = create_app(settings, exit_on_failure=False)
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(app.state.engine.warmed_up.wait(), timeout=60)
        yield app


@pytest.fixture
async def app() -> AsyncIterator[ServingApp]:
    async for app in started(timeout_s=2.0):
        yield app


@pytest.fixture
async def hopeless() -> AsyncIterator[ServingApp]:
    """TIMEOUT far below one batch: every request is refused as late."""
    async for app in started(timeout_s=1e-6):
        yield app


def now() -> float:
    return asyncio.get_running_loop().time()


async def test_a_request_the_task_can_serve_in_time_is_admitted(app: ServingApp) -> None:
    assert app.state.engine.admit("square", now()) is None


async def test_a_request_that_cannot_be_served_in_time_is_refused(hopeless: ServingApp) -> None:
    refusal = hopeless.state.engine.admit("square", now())
    assert isinstance(refusal, Refusal)
    assert isinstance(refusal.error, QueueFull)
    assert "behind" in str(refusal.error)
    assert refusal.retry_after >= 1.0


async def test_an_engine_that_failed_refuses_as_not_ready(app: ServingApp) -> None:
    engine = app.state.engine
    engine.failure = "the model's batch loop crashed"
    refusal = engine.admit("square", now())
    assert isinstance(refusal, Refusal)
    assert isinstance(refusal.error, NotReady)
    assert "crashed" in str(refusal.error)
    assert refusal.retry_after == RETRY_AFTER_S


def test_a_hold_is_the_retry_after_of_at_most_a_second() -> None:
    assert Refusal(QueueFull("behind", retry_after=3)).hold_s == MAX_HOLD_S == 1.0
    assert Refusal(NotReady("warming up")).hold_s == RETRY_AFTER_S


async def test_the_door_marks_what_it_admits_and_counts_what_it_refuses(
    app: ServingApp, hopeless: ServingApp
) -> None:
    scope = {"type": "http", "method": "POST", "path": "/square", "state": {}}
    assert app.door.guards(scope)
    arrived_at = now()
    assert app.door.judge(scope, arrived_at) is None
    assert scope["state"][ADMITTED] == Admitted("square", arrived_at)
    refused = {"type": "http", "method": "POST", "path": "/square", "state": {}}
    assert isinstance(hopeless.door.judge(refused, now()), Refusal)
    assert ADMITTED not in refused["state"]
