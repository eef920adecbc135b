"""The bulk client's retry logic, against a scripted transport (no server)."""

import argparse
import io
import json
from pathlib import Path

import httpx
import pytest
from tqdm import tqdm

from client import bulk

ANSWER = {"prediction": {"label": "tabby", "score": 0.9}, "top_k": []}


def arguments(transport: httpx.BaseTransport | httpx.AsyncBaseTransport, mode: str) -> object:
    return argparse.Namespace(
        url="http://server",
        mode=mode,
        concurrency=4,
        job_size=100,
        top_k=5,
        retries=3,
        transport=transport,
    )


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    paths = [tmp_path / f"{name}.jpg" for name in ("ok", "flaky", "unreachable")]
    for path in paths:
        path.write_bytes(b"\xff\xd8\xff" + path.stem.encode())
    return paths


@pytest.fixture
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Records each pause the client asks for instead of taking it."""
    pauses: list[float] = []

    async def asleep(seconds: float) -> None:
        pauses.append(seconds)

    monkeypatch.setattr(bulk.asyncio, "sleep", asleep)
    monkeypatch.setattr(bulk.time, "sleep", pauses.append)
    return pauses


def test_one_unreachable_item_is_recorded_and_the_run_goes_on(
    images: list[Path], no_waiting: list[float]
) -> None:
    attempts: dict[bytes, int] = {}

    def server(request: httpx.Request) -> httpx.Response:
        body = request.read()
        name = next(n for n in (b"ok", b"flaky", b"unreachable") if b"\xff\xd8\xff" + n in body)
        attempts[name] = attempts.get(name, 0) + 1
        if name == b"unreachable" or (name == b"flaky" and attempts[name] == 1):
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json=ANSWER)

    out = io.StringIO()
    with tqdm(disable=True) as bar:
        failures = bulk.asyncio.run(
            bulk._classify_with_cls(images, arguments(httpx.MockTransport(server), "cls"), out, bar)
        )
    lines = {Path(line["path"]).stem: line for line in map(json.loads, out.getvalue().splitlines())}
    assert lines["ok"]["label"] == lines["flaky"]["label"] == "tabby"
    assert "ConnectError" in lines["unreachable"]["error"]["detail"]
    assert [path.stem for path, _ in failures] == ["unreachable"]
    assert attempts[b"unreachable"] == 4  # the first try and three retries
    assert all(pause > 0 for pause in no_waiting)


def test_retries_after_a_503_are_spread_out() -> None:
    refused = httpx.Response(503, headers={"Retry-After": "1"})
    delays = [bulk.retry_delay(0, refused) for _ in range(200)]
    assert all(1 <= delay <= 2 for delay in delays)
    # Clients refused together must not all come back together.
    assert max(delays) - min(delays) > 0.5


def test_an_event_stream_that_ends_early_is_resumed_after_a_pause(
    images: list[Path], no_waiting: list[float]
) -> None:
    job_id = "a" * 32
    streams = iter(
        [
            f"id: 1\nevent: progress\ndata: {json.dumps({'done': 1, 'total': 3})}\n\n",
            "",  # the server restarted: the stream ends with no terminal event
            f"id: 2\nevent: done\ndata: {json.dumps({'done': 3, 'total': 3})}\n\n",
        ]
    )
    resumed_from: list[str | None] = []

    def server(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metadata":
            return httpx.Response(200, json={"jobs": {}})
        if request.method == "POST":
            return httpx.Response(202, json={"job_id": job_id})
        if request.url.path.endswith("/events"):
            resumed_from.append(request.headers.get("last-event-id"))
            return httpx.Response(200, text=next(streams))
        return httpx.Response(200, json={"status": "done", "results": [ANSWER] * 3})

    out = io.StringIO()
    with tqdm(disable=True) as bar:
        failures = bulk._classify_with_jobs(
            images, arguments(httpx.MockTransport(server), "jobs"), out, bar
        )
    assert failures == []
    assert resumed_from == [None, "1", "1"]
    assert len(no_waiting) == 2
    assert all(pause > 0 for pause in no_waiting)


def test_jobs_are_cut_to_the_servers_byte_limit(tmp_path: Path) -> None:
    sizes = [40_000, 40_000, 40_000, 150_000, 10]
    paths = []
    for i, size in enumerate(sizes):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(b"x" * size)
    chunks = list(bulk.job_chunks(paths, max_files=100, max_bytes=100_000))
    assert [[p.name for p in chunk] for chunk in chunks] == [
        ["0.jpg", "1.jpg"],
        ["2.jpg"],
        ["3.jpg"],  # too large for any job: alone, for the server to refuse with its 413
        ["4.jpg"],
    ]
