"""gunicorn with the real model: graceful SIGTERM, a killed worker, /metrics, logs."""

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from harness.server import GUNICORN, ROOT, Server, launch, running_server, stop, wait_ready
from tests.helpers import metric
from tests.images import TOP1, photo_bytes

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

CAT = photo_bytes("chelsea")


async def post_cat(client: httpx.AsyncClient) -> int | str:
    try:
        response = await client.post("/cls", files={"file": ("cat.jpg", CAT)})
    except httpx.TransportError as exc:
        return type(exc).__name__
    return response.status_code


def worker_pids(server: Server) -> list[int]:
    return [int(p) for p in re.findall(r"Booting worker with pid: (\d+)", server.output())]


async def readiness_once_signalled(client: httpx.AsyncClient) -> int | None:
    """/health/ready once the worker has the signal the master forwards: 503, or None when
    the connection is refused because the worker stopped accepting."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            status = (await client.get("/health/ready")).status_code
        except httpx.TransportError:
            return None
        if status != 200:
            return status
        await asyncio.sleep(0.01)
    return 200


async def test_sigterm_to_master_answers_every_accepted_request_and_exits_0(
    tmp_path: Path,
) -> None:
    env = {"MAX_BATCH_SIZE": "8", "MAX_QUEUE_SIZE": "512", "TIMEOUT": "30"}
    server = launch({**env, "GRACEFUL_TIMEOUT": "60"}, tmp_path / "g.log", command=GUNICORN)
    try:
        wait_ready(server)
        limits = httpx.Limits(max_connections=48)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            tasks = [asyncio.create_task(post_cat(client)) for _ in range(48)]
            # Another process: its counters say when a batch is computing.
            while (await client.get("/metadata")).json()["stats"]["batches"] < 1:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            assert not all(task.done() for task in tasks)
            server.process.send_signal(signal.SIGTERM)
            ready_after_signal = await readiness_once_signalled(client)
            statuses = await asyncio.gather(*tasks)
        assert statuses == [200] * 48, statuses
        assert ready_after_signal in (None, 503)
        assert server.process.wait(60) == 0, server.output()
        assert "Application shutdown complete" in server.output()
    finally:
        stop(server)


async def test_killed_worker_is_replaced_and_serves_again(tmp_path: Path) -> None:
    env = {"MAX_BATCH_SIZE": "8", "TIMEOUT": "30", "GRACEFUL_TIMEOUT": "60"}
    with running_server(env, tmp_path / "g.log", command=GUNICORN) as server:
        [first] = worker_pids(server)
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            tasks = [asyncio.create_task(post_cat(client)) for _ in range(16)]
            while (await client.get("/metadata")).json()["stats"]["batches"] < 1:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            os.kill(first, signal.SIGKILL)
            in_flight = await asyncio.gather(*tasks)
        # In-flight callers of a killed worker see their connection drop, never a hang.
        assert all(s == 200 or s in ("RemoteProtocolError", "ReadError") for s in in_flight)
        assert any(s != 200 for s in in_flight), in_flight
        wait_ready(server, timeout=120)
        assert len(worker_pids(server)) == 2
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            response = await client.post("/cls", files={"file": ("c.jpg", CAT)})
        assert response.status_code == 200
        assert response.json()["prediction"]["label"] in TOP1["chelsea"]


def serving_workers(server: Server) -> set[str]:
    """The workers (by pid) whose access log shows a 200 to POST /cls."""
    return set(re.findall(r"INFO (\d+) access: POST /cls 200", server.output()))


@pytest.mark.parametrize("workers", [1, 2])
async def test_metrics_count_every_request_across_workers(tmp_path: Path, workers: int) -> None:
    env = {"WORKERS": str(workers), "MAX_BATCH_SIZE": "4"}
    with running_server(env, tmp_path / "g.log", command=GUNICORN) as server:
        if workers == 2:
            deadline = time.monotonic() + 120
            while server.output().count("warm-up done") < 2:
                assert time.monotonic() < deadline, server.output()
                await asyncio.sleep(0.1)
        # A new connection per request, so that both workers take some. Which worker
        # accepts is the kernel's choice: rounds of 24 go on until both have served.
        limits = httpx.Limits(max_connections=4)
        headers = {"Connection": "close"}
        sent = 0
        async with httpx.AsyncClient(
            base_url=server.url, timeout=60, limits=limits, headers=headers
        ) as client:
            while sent == 0 or len(serving_workers(server)) < workers:
                assert sent < 240, f"one worker took all {sent} connections"
                statuses = await asyncio.gather(*(post_cat(client) for _ in range(24)))
                assert statuses == [200] * 24
                sent += 24
            bad = await client.post("/cls", files={"file": ("x.txt", b"not an image")})
            assert bad.status_code == 415
            text = (await client.get("/metrics")).text
        assert metric(text, "http_requests_total", route="/cls", status="200") == sent
        assert metric(text, "http_requests_total", route="/cls", status="415") == 1
        assert metric(text, "http_request_duration_seconds_count", route="/cls") == sent + 1
        assert metric(text, "batcher_batch_size_sum") == sent
        assert metric(text, "batcher_queue_wait_seconds_count") == sent
        assert metric(text, "batcher_inference_seconds_count") >= sent / 4
        assert "batcher_queue_depth" in text
        labels = 'task="cls",version="1"'
        for reason in ("expired", "cancelled"):
            assert f'batcher_items_dropped_total{{reason="{reason}",{labels}}} 0.0' in text
        for reason in ("queue_full", "closed"):
            assert f'batcher_items_rejected_total{{reason="{reason}",{labels}}} 0.0' in text
        if workers == 2:
            # Jobs in one worker's memory would answer 404 on the other: refused instead.
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                response = await client.post("/jobs", files=[("files", ("c.jpg", CAT))])
            assert response.status_code == 503
            assert "WORKERS=2" in response.json()["detail"]
            assert "JOB_STORE=redis" in response.json()["detail"]


def test_one_log_line_per_request_with_the_request_id_echoed(tmp_path: Path) -> None:
    log_file = tmp_path / "api.log"
    env = {"LOG_FILE": str(log_file)}
    with running_server(env, tmp_path / "g.log", command=GUNICORN) as server:
        response = httpx.post(
            f"{server.url}/cls",
            files={"file": ("c.jpg", CAT)},
            headers={"X-Request-ID": "trace-abc.123"},
            timeout=30,
        )
        generated = httpx.get(f"{server.url}/health/live")
    assert response.headers["x-request-id"] == "trace-abc.123"
    assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["x-request-id"])
    lines = [line for line in server.output().splitlines() if "trace-abc.123" in line]
    assert len(lines) == 1, server.output()
    assert re.search(r"POST /cls 200 \d+\.\dms request_id=trace-abc\.123", lines[0])
    assert "trace-abc.123" in log_file.read_text()


def test_an_operators_metrics_directory_loses_only_stale_metric_files(tmp_path: Path) -> None:
    chosen = tmp_path / "metrics"
    (chosen / "archive").mkdir(parents=True)
    (chosen / "README").write_text("the operator's own notes")
    (chosen / "counter_4242.db").write_bytes(b"stale samples of a dead worker")
    (chosen / "gauge_livesum_4242.db").write_bytes(b"stale")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(chosen)}
    loaded = subprocess.run(
        [sys.executable, "-c", "import gunicorn_config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert loaded.returncode == 0, loaded.stderr
    assert sorted(p.name for p in chosen.iterdir()) == ["README", "archive"]
