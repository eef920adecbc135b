import os
from collections.abc import Iterator

import pytest

from harness.server import Server, running_server

# Apps run in this process serve no gRPC: the default port would be shared by every app
# and every run at once. Servers in subprocesses get a free port each (harness/server.py).
os.environ.setdefault("GRPC_PORT", "0")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real server with the default model, batches of up to 8 (rather than the size
    timed at warm-up, which may be 1 on a CPU) and a 2 MB upload limit."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {"MAX_UPLOAD_BYTES": str(2_000_000), "MAX_BATCH_SIZE": "8"}
    with running_server(env, log) as server:
        yield server
