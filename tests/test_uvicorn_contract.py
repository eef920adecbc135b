"""What api/protocol.py takes from uvicorn, whose HTTP protocol it subclasses, and the guard
that keeps it to the uvicorn releases it was tested with.

After a uvicorn upgrade, this module says what moved: run it (and tests/test_http_edges.py)
before adding the new release to TESTED_UVICORN."""

import asyncio
import inspect
import logging
import re
import socket

import httpx
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from api.protocol import TESTED_UVICORN, AdmissionProtocol, server_options
from harness.server import ROOT
from main import create_app
from settings import Settings
from tests.helpers import Spy, serve

pytestmark = pytest.mark.anyio

# The methods AdmissionProtocol overrides or calls on uvicorn's protocol, with the
# parameters it relies on.
METHODS = {
    "connection_made": ["self", "transport"],
    "connection_lost": ["self", "exc"],
    "data_received": ["self", "data"],
    "shutdown": ["self"],
    "on_message_begin": ["self"],
    "on_headers_complete": ["self"],
    "on_message_complete": ["self"],
    "_start_asgi_task": ["self", "cycle", "app"],
    "_unset_keepalive_if_required": ["self"],
    "timeout_keep_alive_handler": ["self"],
}
# What it reads or sets on a connected protocol.
ATTRIBUTES = [
    "app", "loop", "logger", "transport", "flow", "cycle", "server_state", "connections",
    "root_path", "scheme", "timeout_keep_alive", "timeout_keep_alive_task",
]  # fmt: skip
# What it uses of the flow control, the request cycle and the server state.
FLOW = ["pause_reading", "resume_reading", "read_paused"]
CYCLE = [
    "scope", "keep_alive", "disconnected", "response_started", "response_complete",
    "message_event", "on_response",
]  # fmt: skip
SERVER_STATE = ["connections", "tasks", "default_headers", "total_requests"]


def test_the_pinned_uvicorn_is_a_tested_release() -> None:
    pinned = re.search(
        r"^uvicorn\[standard\]==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M
    )
    assert pinned, "requirements.txt pins no uvicorn[standard]"
    assert pinned.group(1) in TESTED_UVICORN
    assert uvicorn.__version__ in TESTED_UVICORN


def test_a_tested_release_takes_the_fast_path(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        options = server_options(Settings(), sorted(TESTED_UVICORN)[-1])
    assert options == {"http": AdmissionProtocol}
    assert not caplog.records


def test_another_release_takes_the_door_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        options = server_options(Settings(max_connections=50), "9.9.9")
    assert options == {"http": "httptools", "limit_concurrency": 50}
    [warning] = caplog.records
    assert warning.levelno == logging.WARNING
    message = warning.getMessage()
    assert "uvicorn 9.9.9" in message
    assert "HEADER_TIMEOUT_S" in message
    assert "requirements.txt" in message


@pytest.mark.e2e
async def test_under_another_release_the_door_in_the_app_still_refuses() -> None:
    # TIMEOUT far below one batch: admission refuses every task request up front.
    spy = Spy(create_app(Settings(tasks="tests.tasks:Square", timeout=1e-6)))
    options = server_options(Settings(), "9.9.9")
    async with serve(spy, **options) as url, httpx.AsyncClient(base_url=url) as client:
        refused = await client.post("/square", json={"x": 2})
        assert (await client.get("/health/live")).status_code == 200
    assert refused.status_code == 503
    assert "retry after" in refused.json()["detail"]
    assert float(refused.headers["retry-after"]) > 0
    # The request reached the app: its door answered, not the protocol.
    assert spy.paths == ["/square", "/health/live"]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_methods_the_protocol_relies_on_are_there(name: str) -> None:
    method = getattr(HttpToolsProtocol, name, None)
    assert callable(method), f"uvicorn's HttpToolsProtocol has no {name} any more"
    assert list(inspect.signature(method).parameters) == METHODS[name]


async def test_a_connected_protocol_has_what_the_protocol_uses() -> None:
    async def ok(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    config = uvicorn.Config(ok)
    protocol = HttpToolsProtocol(config, ServerState(), {})
    ours, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    try:
        await loop.connect_accepted_socket(lambda: protocol, ours)
        missing = [name for name in ATTRIBUTES if not hasattr(protocol, name)]
        missing += [f"flow.{n}" for n in FLOW if not hasattr(protocol.flow, n)]
        missing += [f"server_state.{n}" for n in SERVER_STATE if not hasattr(ServerState(), n)]
        assert not missing, f"uvicorn's protocol no longer has {missing}"
        theirs.setblocking(False)
        await loop.sock_sendall(theirs, b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        answer = await asyncio.wait_for(loop.sock_recv(theirs, 4096), timeout=10)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        cycle = protocol.cycle  # the answered request's, kept until the next begins
        missing = [f"cycle.{n}" for n in CYCLE if not hasattr(cycle, n)]
        assert not missing, f"uvicorn's request cycle no longer has {missing}"
    finally:
        protocol.transport.close()
        theirs.close()
    assert STATUS_LINE[503].startswith(b"HTTP/1.1 503 ")


def test_the_readme_says_how_to_upgrade_uvicorn() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "TESTED_UVICORN" in readme
