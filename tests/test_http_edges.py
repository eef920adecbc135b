"""The HTTP layer's edges, in-process: what reaches the log, clients that go away, work
kept off the event loop, and refusals at the door. A small task stands in for the model."""

import asyncio
import gc
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import ClassVar

import httpx
import pytest
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from api.json_pieces import loads_in_pieces
from api.protocol import WAKE_STEP_S, AdmissionProtocol
from main import create_app
from settings import Settings
from tests.helpers import Spy, serve
from tests.tasks import Square

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


@pytest.fixture
async def app() -> AsyncIterator[FastAPI]:
    app = create_app(Settings(tasks="tests.tasks:Square"), exit_on_failure=False)
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(app.state.engine.warmed_up.wait(), timeout=60)
        yield app


def client_of(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app")


async def test_a_percent_encoded_line_break_cannot_forge_an_access_log_line(
    app: FastAPI, caplog: pytest.LogCaptureFixture
) -> None:
    forged = "/x%0D%0A2026-01-01 INFO 1 access: GET /admin 200 1.0ms request_id=forged"
    with caplog.at_level(logging.INFO, logger="access"):
        async with client_of(app) as client:
            assert (await client.get(forged)).status_code == 404
    [line] = [r.getMessage() for r in caplog.records if r.name == "access"]
    assert "\n" not in line
    assert "\r" not in line
    assert line.startswith("GET /x%0D%0A2026-01-01%20INFO")


MULTIPART = b"--b\r\ncontent-disposition: form-data; name=file; filename=a.jpg\r\n\r\n"


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (b"application/json", b'{"x": 12' + b" " * 10_000),
        (b"multipart/form-data; boundary=b", MULTIPART + b"\xff" * 10_000),
    ],
)
async def test_a_client_that_leaves_mid_upload_is_no_server_error(
    app: FastAPI, caplog: pytest.LogCaptureFixture, content_type: bytes, body: bytes
) -> None:
    messages = iter(
        [
            {"type": "http.request", "body": body[:100], "more_body": True},
            {"type": "http.disconnect"},
        ]
    )
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return next(messages)

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/square",
        "raw_path": b"/square",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"app"),
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    with caplog.at_level(logging.INFO):
        await app(scope, receive, send)
    [start] = [m for m in sent if m["type"] == "http.response.start"]
    assert start["status"] == 499
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "POST /square 499" in caplog.text


async def test_a_large_json_job_does_not_stall_the_event_loop(app: FastAPI) -> None:
    # 240 inputs of 270 KB each, about 65 MB: the shape of a job of base64 images.
    body = json.dumps({"inputs": ["QUJD" * 67_500] * 240}).encode()
    # What json.loads on the loop would stall it for: the median of three, as one
    # measurement on a busy machine can come out at half the others.
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        json.loads(body)
        timings.append(time.perf_counter() - started)
    whole_document = sorted(timings)[1]

    lags: list[float] = []
    posted = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not posted.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            lags.append(now - last)
            last = now

    async def upload() -> AsyncIterator[bytes]:
        # In 1 MiB pieces, as from a socket: the client and the server share this loop,
        # and handing over the 65 MB at once would stall it in the client's own code.
        for start in range(0, len(body), 1 << 20):
            yield body[start : start + (1 << 20)]
            await asyncio.sleep(0)  # a socket's wait: the loop runs between pieces

    # The earlier tests' objects would make a full collection in this process a 40-50 ms
    # pause of its own: set them aside while measuring the server's.
    gc.collect()
    gc.freeze()
    try:
        async with client_of(app) as client:
            ticking = asyncio.create_task(ticker())
            response = await client.post(
                "/square/jobs", content=upload(), headers={"content-type": "application/json"}
            )
            posted.set()
            await ticking
    finally:
        gc.unfreeze()
    assert response.status_code == 202, response.text
    assert response.json()["total"] == 240
    # Gathered as it arrives and parsed in pieces off the loop: no pause as long as
    # json.loads on the loop would cost. What is left is decoding the text, one call that
    # holds the GIL (measured with this file's other tests: 33-42 ms against 107-115 ms
    # for the whole document; joining the body at the end added 40 ms).
    assert max(lags) < 0.9 * whole_document, (max(lags), whole_document)


@pytest.mark.parametrize(
    "document",
    [
        {"inputs": [1, 2.5, "three", None, True, {"x": [1, {"y": 2}]}, []], "k": {}},
        [{"image": "QUJD"}, "QUJD", [[1]]],
        {"a": {"b": {"c": [1, 2]}}, "": "", "\u00e9": "\\u0000"},
        "just a string",
        42,
        [],
        {},
    ],
)
def test_pieces_parse_as_json_loads_does(document: object) -> None:
    for text in (json.dumps(document), json.dumps(document, indent=2)):
        assert loads_in_pieces(text.encode()) == json.loads(text)


@pytest.mark.parametrize(
    "text",
    [b"", b"{", b'{"a" 1}', b'{"a": 1,}', b"[1 2]", b"[1,]", b'{"a": 1} x', b"{1: 2}", b"\xff"],
)
def test_pieces_refuse_what_json_loads_refuses(text: bytes) -> None:
    with pytest.raises((json.JSONDecodeError, UnicodeDecodeError)):
        json.loads(text)
    with pytest.raises((json.JSONDecodeError, UnicodeDecodeError)):
        loads_in_pieces(text)


async def test_a_client_that_retries_before_retry_after_is_held_for_the_rest_of_it() -> None:
    # TIMEOUT far below one batch: admission refuses every request up front.
    app = create_app(Settings(tasks="tests.tasks:Square", timeout=1e-6), exit_on_failure=False)
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(app.state.engine.warmed_up.wait(), timeout=60)

        async def timed_post(port: int) -> tuple[httpx.Response, float]:
            transport = httpx.ASGITransport(app=app, client=("127.0.0.1", port))
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                started = time.perf_counter()
                response = await client.post("/square", json={"x": 2})
                return response, time.perf_counter() - started

        first, fast = await timed_post(40001)
        assert first.status_code == 503
        retry_after = float(first.headers["retry-after"])
        assert fast < retry_after / 2
        # Back at once on the same connection: answered when its Retry-After is over.
        again, held = await timed_post(40001)
        assert again.status_code == 503
        assert held > 0.8 * retry_after
        # Another connection, or one that waited, is answered at once.
        other, quick = await timed_post(40002)
        assert other.status_code == 503
        assert quick < retry_after / 2


async def test_a_refusal_is_answered_before_any_of_fastapis_layers() -> None:
    app = create_app(Settings(tasks="tests.tasks:Square", timeout=1e-6), exit_on_failure=False)
    stack = app.build_middleware_stack()
    reached: list[str] = []

    async def spy(scope: Scope, receive: Receive, send: Send) -> None:
        reached.append(scope["path"])
        await stack(scope, receive, send)

    app.middleware_stack = spy
    async with app.router.lifespan_context(app), client_of(app) as client:
        await asyncio.wait_for(app.state.engine.warmed_up.wait(), timeout=60)
        refused = await client.post("/square", json={"x": 2})
        assert refused.status_code == 503
        assert refused.json()["detail"]
        assert (await client.get("/health/live")).status_code == 200
    assert reached == ["/health/live"]


async def test_the_server_refuses_and_paces_before_the_app_is_called() -> None:
    # TIMEOUT far below one batch: admission refuses every request up front.
    spy = Spy(create_app(Settings(tasks="tests.tasks:Square", timeout=1e-6)))
    async with serve(spy) as url:
        async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=1)) as one:
            started = time.perf_counter()
            first = await one.post("/square", json={"x": 2})
            fast = time.perf_counter() - started
            assert first.status_code == 503
            assert "retry after" in first.json()["detail"]
            retry_after = float(first.headers["retry-after"])
            assert fast < retry_after / 2
            # Back at once on the same connection: answered when its Retry-After is over,
            # and still on that connection.
            started = time.perf_counter()
            again = await one.post("/square", json={"x": 2})
            assert again.status_code == 503
            assert time.perf_counter() - started > 0.8 * retry_after
            assert (await one.get("/health/live")).status_code == 200
        async with httpx.AsyncClient(base_url=url) as other:
            started = time.perf_counter()
            assert (await other.post("/square", json={"x": 2})).status_code == 503
            assert time.perf_counter() - started < retry_after / 2
            # A connection that closes after the request is refused by the app's door,
            # which reads the body first (for clients that write it all before reading).
            closing = await other.post("/square", json={"x": 2}, headers={"Connection": "close"})
            assert closing.status_code == 503
    assert spy.paths == ["/health/live", "/square"]


def post(body: bytes) -> bytes:
    head = "POST /square HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


GET_LIVE = b"GET /health/live HTTP/1.1\r\nHost: test\r\n\r\n"


async def connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection to the server ``serve`` yields at ``url``."""
    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], float]:
    """The next response on a connection: status, headers, and when it came."""
    status = int((await reader.readline()).split()[1])
    headers = {}
    while (line := await reader.readline()) != b"\r\n":
        name, _, value = line.decode().partition(":")
        headers[name.lower()] = value.strip()
    await reader.readexactly(int(headers["content-length"]))
    return status, headers, time.perf_counter()


class Counting(AdmissionProtocol):
    """Counts the bytes the event loop hands to the protocol, on every connection."""

    received = 0

    def data_received(self, data: bytes) -> None:
        Counting.received += len(data)
        super().data_received(data)


def padded(size: int) -> bytes:
    """A JSON body of ``size`` bytes."""
    return b'{"x": 2, "pad": "' + b"a" * (size - 18) + b'"}'


async def test_a_client_back_before_retry_after_is_refused_without_reading_its_body() -> None:
    spy = Spy(create_app(Settings(tasks="tests.tasks:Square", timeout=1e-6)))
    async with serve(spy, http=Counting) as url:
        reader, writer = await connect(url)
        writer.write(post(b'{"x": 2}'))
        status, headers, refused_at = await answer(reader)
        assert status == 503
        retry_after = float(headers["retry-after"])
        before = Counting.received
        # Back at once with a large body: answered once the Retry-After is over, from
        # the request's head; its body is dropped in the kernel, never read.
        big = padded(100_000)
        writer.write(post(big))
        status, _, again_at = await answer(reader)
        assert status == 503
        assert again_at - refused_at > 0.8 * retry_after
        assert Counting.received - before < len(big) / 2
        # Half a body, then the refusal, then the other half: the rest is dropped as it
        # arrives, and the connection reads the next request from its first byte.
        writer.write(post(big)[: len(big) // 2])
        status, _, _ = await answer(reader)
        assert status == 503
        writer.write(post(big)[len(big) // 2 :] + GET_LIVE)
        status, _, _ = await answer(reader)
        assert status == 200
        # Two requests in one write: both answered in order, the second paced as well.
        writer.write(post(b'{"x": 2}') * 2 + GET_LIVE)
        assert [(await answer(reader))[0] for _ in range(3)] == [503, 503, 200]
        writer.close()
    assert spy.paths == ["/health/live", "/health/live"]


@pytest.mark.parametrize("length", [b"1" + b"0" * 18, b"9" * 5000])
@pytest.mark.parametrize("stopping", [False, True])
async def test_a_parked_connection_declaring_a_huge_body_is_answered_without_error(
    caplog: pytest.LogCaptureFixture, length: bytes, stopping: bool
) -> None:
    spy = Spy(create_app(Settings(tasks="tests.tasks:Square", timeout=1e-6)))
    head = b"POST /square HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
    huge = head + b"Content-Length: " + length + b"\r\n\r\n" + b'{"x": 2}'
    with caplog.at_level(logging.INFO):
        async with serve(spy) as url:
            reader, writer = await connect(url)
            writer.write(post(b'{"x": 2}'))
            assert (await answer(reader))[0] == 503
            writer.write(huge)  # back at once: it waits, parked, for its hold to end
            await writer.drain()
            if not stopping:
                status, _, _ = await answer(reader)
                assert status in (400, 413, 503)  # 400: httptools refuses the length
                writer.close()
        if stopping:  # the server stopped while it waited: answered or closed, cleanly
            rest = await reader.read()
            assert rest == b"" or rest.split(b" ")[1] in (b"400", b"413", b"503"), rest[:100]
            writer.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


class Backlogged(Square):
    """Square, with a warm-up that reports 1.5 s per batch of one: with TIMEOUT=1, every
    request is refused, with a Retry-After of 2 s."""

    def warm_up(self, max_batch_size: int, tune: bool) -> dict[str, float]:
        return {"seconds_per_item": 1.5}


async def test_a_refused_connection_is_held_a_second_at_most_whatever_its_retry_after() -> None:
    settings = Settings(tasks="tests.test_http_edges:Backlogged", timeout=1.0, max_batch_size=1)
    async with serve(Spy(create_app(settings))) as url:
        reader, writer = await connect(url)
        writer.write(post(b'{"x": 2}'))
        status, headers, refused_at = await answer(reader)
        assert status == 503
        assert float(headers["retry-after"]) >= 2
        writer.write(post(b'{"x": 2}'))  # back at once
        status, _, again_at = await answer(reader)
        assert status == 503
        assert 0.8 < again_at - refused_at < 1.5
        writer.close()


class Waking(AdmissionProtocol):
    """Records when each parked connection's wake-up is due, on the loop's clock."""

    wakes: ClassVar[list[float]] = []

    def _park(self) -> None:
        super()._park()
        assert self._park_timer is not None
        Waking.wakes.append(self._park_timer.when())


async def test_connections_whose_holds_end_close_together_are_answered_together() -> None:
    spy = Spy(create_app(Settings(tasks="tests.tasks:Square", timeout=1e-6)))
    Waking.wakes = []
    async with serve(spy, http=Waking) as url:
        connections = [await connect(url) for _ in range(3)]
        # Just past a step of the wake grid (the server runs on this loop), so that the
        # three holds, 20 ms apart, end within one step.
        loop = asyncio.get_running_loop()
        await asyncio.sleep(WAKE_STEP_S - loop.time() % WAKE_STEP_S + 0.005)
        refused = []
        for reader, writer in connections:
            writer.write(post(b'{"x": 2}'))
            refused.append((await answer(reader))[2])
            writer.write(post(b'{"x": 2}'))  # back at once
            await asyncio.sleep(0.02)
        answered = [await answer(reader) for reader, _ in connections]
        assert [status for status, _, _ in answered] == [503] * 3
        times = [at for _, _, at in answered]
        assert refused[-1] - refused[0] > 0.035
        # Refused 20 ms apart, they are woken by timers due at one instant of the wake
        # grid: in one pass of the loop. (Each parks again after its second refusal.)
        first_parks = Waking.wakes[:3]
        assert len(set(first_parks)) == 1, Waking.wakes
        assert min(times) - refused[0] > 0.8
        for _, writer in connections:
            writer.close()


async def test_a_request_waiting_out_its_retry_after_at_shutdown_is_answered() -> None:
    spy = Spy(create_app(Settings(tasks="tests.tasks:Square", timeout=1e-6)))
    async with serve(spy) as url:
        reader, writer = await connect(url)
        writer.write(post(b'{"x": 2}'))
        assert (await answer(reader))[0] == 503
        writer.write(post(padded(50_000)))  # back at once, and the server stops meanwhile
        await writer.drain()
    status, headers, _ = await answer(reader)
    assert status == 503
    assert headers["connection"] == "close"
    assert await reader.read() == b""  # closed, not reset
    writer.close()


async def test_the_protocol_hands_admitted_requests_to_the_app() -> None:
    spy = Spy(create_app(Settings(tasks="tests.tasks:Square")))
    async with serve(spy) as url, httpx.AsyncClient(base_url=url) as client:
        response = await client.post("/square", json={"x": 3})
        assert response.status_code == 200, response.text
        assert response.json()["square"] == 9
    assert spy.paths == ["/square"]


async def test_what_lives_as_long_as_the_process_is_kept_out_of_garbage_collection(
    app: FastAPI,
) -> None:
    # The app fixture has warmed up: the models and libraries are frozen.
    assert gc.get_freeze_count() > 0
    async with client_of(app) as client:
        assert (await client.post("/square", json={"x": 3})).status_code == 200


async def test_requests_set_off_few_garbage_collections(app: FastAPI) -> None:
    # What a request allocates goes when it ends, by reference counting: collections
    # under load walked the live connections' objects for nothing. With Python's
    # defaults these 200 requests set off about 70 young collections and 6 middle ones.
    before = [generation["collections"] for generation in gc.get_stats()]
    async with client_of(app) as client:
        answers = await asyncio.gather(*(client.post("/square", json={"x": 3}) for _ in range(200)))
    assert {answer.status_code for answer in answers} == {200}
    young, middle, _ = (g["collections"] - b for g, b in zip(gc.get_stats(), before, strict=True))
    assert young <= 5
    assert middle == 0
