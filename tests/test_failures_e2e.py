"""How a server copes when its model does: a failed warm-up, a slow load under gunicorn,
a dead batch loop."""

import asyncio
from pathlib import Path

import httpx
import pytest

from harness.server import GUNICORN, launch, stop, wait_ready
from main import create_app
from settings import Settings

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

FAULTY = "tests.tasks"


def test_a_failed_warm_up_stops_the_process_for_its_supervisor(tmp_path: Path) -> None:
    server = launch({"TASKS": f"{FAULTY}:FailingWarmUp"}, tmp_path / "server.log")
    try:
        # Not a live process that is never ready: it exits, so that it gets restarted.
        assert server.process.wait(60) != 0, server.output()
    finally:
        stop(server)
    assert "warm-up failed (RuntimeError: out of memory during warm-up)" in server.output()


def test_a_load_longer_than_the_worker_timeout_does_not_get_the_worker_killed(
    tmp_path: Path,
) -> None:
    env = {"TASKS": f"{FAULTY}:SlowLoad", "SLOW_LOAD_S": "10", "WORKER_TIMEOUT": "4"}
    server = launch(env, tmp_path / "server.log", command=GUNICORN)
    try:
        wait_ready(server, timeout=60)
        response = httpx.post(f"{server.url}/square", json={"x": 3}, timeout=10)
        assert response.json() == {"square": 9}
    finally:
        stop(server)
    assert "WORKER TIMEOUT" not in server.output()
    assert server.output().count("Booting worker") == 1, server.output()


async def test_a_dead_batch_loop_fails_liveness_and_readiness() -> None:
    stopped: list[str] = []
    app = create_app(Settings(tasks="tests.tasks:Square"), exit_on_failure=False)
    async with app.router.lifespan_context(app):
        engine = app.state.engine
        engine._on_failure = stopped.append
        await asyncio.wait_for(engine.warmed_up.wait(), timeout=60)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            assert (await client.get("/health/live")).status_code == 200

            def bug(*args: object) -> None:
                raise AssertionError("a bug in the batch loop")

            engine.services["square"].batcher.queues.fill = bug
            response = await client.post("/square", json={"x": 2})
            assert response.status_code == 503
            assert "crashed" in response.json()["detail"]
            for probe in ("/health/live", "/health/ready"):
                response = await client.get(probe)
                assert response.status_code == 503, probe
                assert "a batch loop crashed" in response.json()["detail"]
    [reason] = stopped
    assert "AssertionError" in reason
