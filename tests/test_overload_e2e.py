"""Timeouts, a full queue, a long batch, warm-up and shutdown, against real processes."""

import asyncio
import re
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from harness.server import Server, launch, running_server, stop, wait_ready
from tests.images import photo_bytes

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

CAT = photo_bytes("chelsea")


async def timed_post(client: httpx.AsyncClient) -> tuple[int, float, httpx.Response]:
    started = time.monotonic()
    response = await client.post("/cls", files={"file": ("cat.jpg", CAT)})
    return response.status_code, time.monotonic() - started, response


async def flood(server: Server, n: int) -> list[tuple[int, float, httpx.Response]]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
        return await asyncio.gather(*(timed_post(client) for _ in range(n)))


def stats(server: Server) -> dict[str, int]:
    meta = httpx.get(f"{server.url}/metadata", timeout=10).json()
    return {**meta["stats"], "decode_rejected_full": meta["decode"]["rejected_full"]}


async def test_late_requests_get_504_near_the_timeout_and_are_not_computed(
    tmp_path: Path,
) -> None:
    # Load shedding off: this test is about what happens to requests that wait too long.
    env = {"TIMEOUT": "0.2", "MAX_QUEUE_SIZE": "1000", "SHED_LATE_REQUESTS": "false"}
    with running_server(env, tmp_path / "server.log") as server:
        before = stats(server)
        results = await flood(server, 96)
        after = stats(server)
        statuses = [status for status, _, _ in results]
        assert set(statuses) <= {200, 504}, statuses
        timed_out = sorted(latency for status, latency, _ in results if status == 504)
        assert len(timed_out) >= 24, statuses
        # 504s come close to TIMEOUT=0.2 s; the bound leaves room for a loaded 2-core host.
        assert timed_out[len(timed_out) // 2] < 1.0, timed_out
        assert timed_out[-1] < 3.0, timed_out
        assert "TIMEOUT" in next(r for s, _, r in results if s == 504).json()["detail"]
        assert after["dropped_expired"] > before["dropped_expired"]
        assert after["items"] - before["items"] < 96
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            status, latency, _ = await timed_post(client)
        assert status == 200
        assert latency < 2.0


async def test_overload_sheds_requests_it_could_not_answer_in_time(tmp_path: Path) -> None:
    env = {"TIMEOUT": "1", "MAX_QUEUE_SIZE": "1000", "MAX_BATCH_SIZE": "4"}
    with running_server(env, tmp_path / "server.log") as server:
        # No request before the flood: the pace timed at warm-up is enough to shed.
        # 512 images are well over a second of work for 2 cores, also for the int8 model
        # (256 were not, always: warm-up times the model alone, which a flood slows down).
        results = await flood(server, 512)
        statuses = [status for status, _, _ in results]
        assert set(statuses) <= {200, 503, 504}, statuses
        assert statuses.count(504) <= 16, statuses
        shed = [r for status, _, r in results if status == 503]
        assert shed, statuses
        assert "behind" in shed[0].json()["detail"]
        # Retry-After grows with the backlog, so clients back off in proportion.
        assert all(int(r.headers["retry-after"]) >= 1 for r in shed)
        assert statuses.count(200) >= 8
        # Shed requests are refused up front rather than after waiting out TIMEOUT=1.
        # Timed by the server, from its first look at the request: on the client's clock
        # 256 uploads from one process onto 2 cores queue long before that. The time
        # includes receiving the body (slow here: one client process sends all 512), as
        # TIMEOUT counts from its end (a median of 0.63 s in one run, on 2 cores).
        shed_ms = sorted(map(float, re.findall(r"POST /cls 503 ([\d.]+)ms", server.output())))
        assert len(shed_ms) == len(shed)
        assert shed_ms[len(shed_ms) // 2] < 1000, shed_ms
        assert shed_ms[-1] < 1500, shed_ms
        assert stats(server)["rejected_late"] == len(shed)


async def test_full_queue_gives_503_with_retry_after_and_recovers(tmp_path: Path) -> None:
    env = {"MAX_QUEUE_SIZE": "2", "TIMEOUT": "10"}
    with running_server(env, tmp_path / "server.log") as server:
        results = await flood(server, 64)
        statuses = [status for status, _, _ in results]
        assert set(statuses) <= {200, 503}, statuses
        rejected = [response for status, _, response in results if status == 503]
        assert rejected, statuses
        assert all(r.headers["retry-after"] == "1" for r in rejected)
        assert "capacity" in rejected[0].json()["detail"]
        counters = stats(server)
        assert counters["rejected_full"] + counters["decode_rejected_full"] == len(rejected)
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            assert (await timed_post(client))[0] == 200


async def probe_during_warm_up(
    server: Server,
) -> tuple[httpx.Response | None, httpx.Response | None]:
    """Polls readiness from the first moment the server listens; returns the first 503
    and a /cls answer sent right after it, or Nones if the server was already ready."""
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert server.process.poll() is None, server.output()
            try:
                ready = await client.get("/health/ready")
            except httpx.TransportError:
                await asyncio.sleep(0.02)
                continue
            if ready.status_code == 200:
                return None, None
            return ready, await client.post("/cls", files={"file": ("c.jpg", CAT)})
    raise TimeoutError(server.output())


async def test_ready_is_503_during_warm_up_and_live_answers_during_a_long_batch(
    tmp_path: Path,
) -> None:
    env = {
        "MAX_BATCH_SIZE": "32",
        "MAX_BATCH_DELAY_MS": "500",
        "TIMEOUT": "60",
        "GRACEFUL_TIMEOUT": "120",
    }
    server = launch(env, tmp_path / "server.log")
    try:
        seen_unready, early = await probe_during_warm_up(server)
        assert seen_unready is not None, "warm-up finished before the first probe"
        assert seen_unready.status_code == 503
        assert "warming up" in seen_unready.json()["detail"]
        assert early is not None
        assert early.status_code == 503
        assert early.headers["retry-after"] == "1"
        wait_ready(server)

        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            batch = [asyncio.create_task(timed_post(client)) for _ in range(32)]
            # Another process: nothing to await but its counters. Wait for the 32-image
            # batch to be dispatched.
            while stats(server)["items"] < 32:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            live_latencies = []
            for _ in range(5):
                started = time.monotonic()
                assert (await client.get("/health/live")).status_code == 200
                live_latencies.append(time.monotonic() - started)
            still_computing = not any(task.done() for task in batch)
            results = await asyncio.gather(*batch)
        assert all(status == 200 for status, _, _ in results)
        assert still_computing, "the batch finished before /health/live was probed"
        assert max(live_latencies) < 0.3, live_latencies
        assert stats(server)["batch_size_histogram"].get("32") == 1  # type: ignore[attr-defined]
    finally:
        stop(server)


async def test_sigterm_answers_every_accepted_request_then_exits(tmp_path: Path) -> None:
    server = launch({"TIMEOUT": "30", "GRACEFUL_TIMEOUT": "60"}, tmp_path / "server.log")
    try:
        wait_ready(server)
        async with httpx.AsyncClient(
            base_url=server.url, timeout=60, limits=httpx.Limits(max_connections=24)
        ) as client:
            tasks = [asyncio.create_task(timed_post(client)) for _ in range(24)]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            server.process.send_signal(signal.SIGTERM)
            results = await asyncio.gather(*tasks)
        assert [status for status, _, _ in results] == [200] * 24
        # After a clean shutdown uvicorn re-raises the signal it caught, so the parent
        # sees the conventional "terminated by SIGTERM" status rather than 0.
        assert server.process.wait(30) in (0, -signal.SIGTERM), server.output()
        assert "Application shutdown complete" in server.output()
    finally:
        stop(server)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MAX_BATCH_SIZE": "0"}, "MAX_BATCH_SIZE='0'"),
        ({"TIMEOUT": "soon"}, "TIMEOUT='soon'"),
        ({"MODEL": "no_such_net"}, "MODEL='no_such_net'"),
        ({"DEVICE": "cuda"}, "DEVICE='cuda'"),
        ({"WEIGHTS": "/nonexistent/weights.pt"}, "WEIGHTS='/nonexistent/weights.pt'"),
    ],
)
def test_invalid_setting_stops_startup_naming_the_variable(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    server = launch(env, tmp_path / "server.log")
    try:
        assert server.process.wait(60) != 0
    finally:
        stop(server)
    assert message in server.output(), server.output()


def raw_cls_request(image: bytes) -> bytes:
    boundary = "x1b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="c.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n".encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        "POST /cls HTTP/1.1\r\nHost: test\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def test_requests_of_disconnected_clients_are_dropped_before_compute(tmp_path: Path) -> None:
    env = {
        "MAX_BATCH_SIZE": "1",
        "MAX_QUEUE_SIZE": "1000",
        "TIMEOUT": "60",
        "GRACEFUL_TIMEOUT": "120",
    }
    with running_server(env, tmp_path / "server.log") as server:
        port = int(server.url.rsplit(":", 1)[1])
        before = stats(server)
        request = raw_cls_request(CAT)
        sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
        for sock in sockets:
            sock.sendall(request)
        # Another process: wait, via its counters, until every request is queued.
        deadline = time.monotonic() + 30
        while stats(server)["requests"] - before["requests"] < 40:
            assert time.monotonic() < deadline, stats(server)
            time.sleep(0.01)
        kept, abandoned = sockets[:5], sockets[5:]
        for sock in abandoned:
            sock.close()
        for sock in kept:
            sock.settimeout(60)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
            sock.close()
            assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        after = stats(server)
        assert after["dropped_cancelled"] > before["dropped_cancelled"]
        assert after["items"] - before["items"] < 40
