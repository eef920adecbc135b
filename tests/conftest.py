from collections.abc import Iterator

import pytest

from tests.server import Server, running_server


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real server with the default model and a 2 MB upload limit."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    with running_server({"MAX_UPLOAD_BYTES": str(2_000_000)}, log) as server:
        yield server
