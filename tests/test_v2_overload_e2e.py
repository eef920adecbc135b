"""Overload over gRPC, with bench/loadgen.py's impolite clients: an open loop at twice the
peak and a storm of clients that retry at once get only OK or UNAVAILABLE, and the
server keeps most of its peak. The exact shares are the benchmark's (make bench-overload
with OVERLOAD_PROTOCOL=grpc); the bounds here leave room for a shared 2-core host."""

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.server import ROOT, Server, running_server
from tests.images import TOP1, photo_bytes

pytestmark = pytest.mark.e2e

SECONDS = 4.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("v2-overload") / "server.log"
    with running_server({"TIMEOUT": "2"}, log) as server:
        yield server


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for name in TOP1:
        (folder / f"{name}.jpg").write_bytes(photo_bytes(name))
    return folder


def load(server: Server, photos: Path, *options: str) -> tuple[Counter[int], float]:
    """The statuses of a loadgen run over gRPC, and its answers 200 per second."""
    port = server.grpc_target.rpartition(":")[2]
    command = [sys.executable, str(ROOT / "bench" / "loadgen.py"), "--protocol", "grpc"]
    command += ["--port", port, "--images", str(photos), "--duration", str(SECONDS), *options]
    ran = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    result: dict[str, Any] = json.loads(ran.stdout)
    statuses = Counter(result["statuses"])
    return statuses, statuses[200] / SECONDS


def test_impolite_grpc_clients_get_only_ok_or_unavailable(server: Server, photos: Path) -> None:
    statuses, peak = load(server, photos, "--concurrency", "32")
    assert set(statuses) == {200}, statuses
    assert peak > 0
    statuses, goodput = load(server, photos, "--rate", str(2 * peak))
    assert set(statuses) <= {200, 503}, statuses
    assert goodput >= 0.6 * peak, (goodput, peak, statuses)
    statuses, goodput = load(server, photos, "--concurrency", "256", "--impolite")
    assert set(statuses) <= {200, 503}, statuses
    assert goodput >= 0.5 * peak, (goodput, peak, statuses)
