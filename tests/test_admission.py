"""Whether a request may in: the engine's answer (serving/admission.py) and the door that
asks it (api/door.py), on a real engine serving a small task in this process."""

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.door import ADMITTED
from batching import QueueFull
from main import ServingApp, create_app
from serving import NotReady
from serving.admission import MAX_HOLD_S, RETRY_AFTER_S, Admitted, Refusal
from settings import Settings
from tests.repository_models import onnx_model

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


@pytest.fixture
async def repository_app(tmp_path: Path) -> AsyncIterator[ServingApp]:
    """A repository of one model at versions 1 and 2, both served, under explicit
    control (models may be loaded after startup)."""
    onnx_model(tmp_path, "twobytwo", config=True, versions={1: 1.0, 2: 2.0})
    config = tmp_path / "twobytwo" / "config.pbtxt"
    config.write_text(config.read_text() + "version_policy: { all: {} }\n")
    settings = Settings(
        tasks="", model_repository=tmp_path, model_control="explicit", max_upload_bytes=2000
    )
    app = create_app(settings, exit_on_failure=False)
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(app.state.engine.warmed_up.wait(), timeout=60)
        yield app


def post(path: str) -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": path, "state": {}}


async def test_the_door_judges_a_versioned_request_by_its_own_version(
    repository_app: ServingApp,
) -> None:
    door, engine = repository_app.door, repository_app.state.engine
    engine.service("twobytwo", "2").warmed_up.clear()  # the newest cannot serve
    for path in ("/twobytwo", "/v2/models/twobytwo/infer", "/v2/models/twobytwo/versions/2/infer"):
        refusal = door.judge(post(path), now())
        assert isinstance(refusal, Refusal), path
        assert isinstance(refusal.error, NotReady), path
    assert door.judge(post("/v2/models/twobytwo/versions/1/infer"), now()) is None


async def test_the_door_judges_a_model_loaded_after_startup(
    repository_app: ServingApp, tmp_path: Path
) -> None:
    door, engine = repository_app.door, repository_app.state.engine
    late = ["/late", "/v2/models/late/infer", "/v2/models/late/versions/1/infer"]
    assert not any(door.guards(post(path)) for path in late)  # not served yet
    onnx_model(tmp_path, "late", config=False, versions={1: 1.0})
    await engine.repository.load("late")
    assert all(door.guards(post(path)) for path in late)
    assert not door.guards(post("/late/jobs"))
    assert not door.guards(post("/v2/models/late"))
    assert door.judge(post("/late"), now()) is None
    engine.service("late").warmed_up.clear()
    refusal = door.judge(post("/v2/models/late/infer"), now())
    assert isinstance(refusal, Refusal)
    assert "error" in json.loads(door.answer("/v2/models/late/infer", refusal).body)
    assert "detail" in json.loads(door.answer("/late", refusal).body)


async def test_a_model_loaded_after_startup_takes_jobs_up_to_max_job_bytes(
    repository_app: ServingApp, tmp_path: Path
) -> None:
    onnx_model(tmp_path, "late", config=False, versions={1: 1.0})
    await repository_app.state.engine.repository.load("late")
    transport = httpx.ASGITransport(app=repository_app)
    body = json.dumps({"inputs": [{"a": [0.5] * 4, "b": [1.0] * 4}] * 50}).encode()
    assert 2000 < len(body) < Settings().max_job_bytes
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        headers = {"Content-Type": "application/json"}
        one = await client.post("/late", content=body, headers=headers)
        assert one.status_code == 413
        assert "MAX_UPLOAD_BYTES" in one.json()["detail"]
        job = await client.post("/late/jobs", content=body, headers=headers)
        assert job.status_code == 202, job.text
