"""Live reload under load: 8 clients send without pause while a version is added (poll)
and while one is swapped for another on request (explicit). Every request is answered
200 by one version or the other, with that version's numbers; none fails."""

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from harness.server import GUNICORN, Server, running_server
from tests.repository_models import TwoByTwo, export_onnx, onnx_model

pytestmark = pytest.mark.e2e

CLIENTS = 8
SCALES = {"1": 1.0, "2": 2.0}
A = np.arange(4, dtype=np.float32).reshape(1, 4) / 4
B = np.ones((1, 4), dtype=np.float32)
REQUEST = {
    "inputs": [
        {"name": "a", "datatype": "FP32", "shape": [1, 4], "data": A.ravel().tolist()},
        {"name": "b", "datatype": "FP32", "shape": [1, 4], "data": B.ravel().tolist()},
    ]
}


class Clients:
    """Threads that each send one request after another until stopped, recording each
    answer: (the time it was sent, its status, the version that answered, whether the
    numbers are that version's)."""

    def __init__(self, server: Server) -> None:
        self.url = f"{server.url}/v2/models/twobytwo/infer"
        self.answers: list[tuple[float, int, str, bool]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send) for _ in range(CLIENTS)]

    def _send(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                sent = time.monotonic()
                answer = client.post(self.url, json=REQUEST)
                version, right = "", False
                if answer.status_code == 200:
                    body = answer.json()
                    version = body["model_version"]
                    mixed = next(o["data"] for o in body["outputs"] if o["name"] == "mixed")
                    expected = TwoByTwo(SCALES.get(version, 0.0)).expected(A, B)[1]
                    right = bool(np.allclose(mixed, expected.ravel(), rtol=1e-4, atol=1e-5))
                self.answers.append((sent, answer.status_code, version, right))

    def versions_since(self, moment: float) -> set[str]:
        return {version for sent, _, version, _ in self.answers if sent >= moment}

    def wait_for(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.answers) < count:
            assert time.monotonic() < deadline, f"only {len(self.answers)} answers"
            time.sleep(0.05)

    @contextmanager
    def sending(self) -> Iterator["Clients"]:
        for thread in self._threads:
            thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            for thread in self._threads:
                thread.join(60)


def statistics(server: Server, version: str) -> dict[str, Any]:
    answer = httpx.get(f"{server.url}/v2/models/twobytwo/versions/{version}/stats")
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()["model_stats"][0]
    return result


def until(condition: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not {what} after {timeout} s"
        time.sleep(0.1)


def add_version(root: Path, version: int, scale: float, *, corrupt: bool = False) -> None:
    """A version folder made aside and renamed into place, as a rollout would copy it."""
    staging = root.parent / f"staging-{version}"
    export_onnx(TwoByTwo(scale), staging / "model.onnx")
    if corrupt:
        (staging / "model.onnx").write_bytes(b"half a file")
    os.rename(staging, root / "twobytwo" / str(version))


def served_versions(server: Server) -> list[str]:
    answer = httpx.get(f"{server.url}/v2/models/twobytwo")
    return list(answer.json().get("versions", [])) if answer.status_code == 200 else []


def test_a_version_added_under_load_takes_the_traffic_and_nothing_fails(tmp_path: Path) -> None:
    root = tmp_path / "models"
    onnx_model(root, "twobytwo", config=True, versions={1: 1.0})
    env = {
        "MODEL_REPOSITORY": str(root),
        "MODEL_CONTROL": "poll",
        "MODEL_POLL_S": "0.2",
        "TASKS": "",
    }
    with (
        running_server(env, tmp_path / "server.log") as server,
        Clients(server).sending() as clients,
    ):
        clients.wait_for(50)
        add_version(root, 2, SCALES["2"])
        until(lambda: served_versions(server) == ["2"], "serving version 2 alone")
        moved = time.monotonic()
        clients.wait_for(len(clients.answers) + 50)
        # A third version whose file is broken: version 2 goes on serving.
        add_version(root, 3, 3.0, corrupt=True)
        until(lambda: "twobytwo" in str(index(server, "UNAVAILABLE")), "version 3 set aside")
        clients.wait_for(len(clients.answers) + 50)
        v2_stats = statistics(server, "2")
        unavailable = index(server, "UNAVAILABLE")
    assert {status for _, status, _, _ in clients.answers} == {200}
    assert all(right for *_, right in clients.answers)
    assert {version for _, _, version, _ in clients.answers} == {"1", "2"}
    assert clients.versions_since(moved) == {"2"}
    assert v2_stats["inference_stats"]["success"]["count"] >= 100
    [broken] = [e for e in unavailable if e["name"] == "twobytwo"]
    assert broken["version"] == "3"
    assert f"ONNX Runtime cannot load {root}/twobytwo/3/model.onnx" in broken["reason"]


def index(server: Server, state: str) -> list[dict[str, Any]]:
    answer = httpx.post(f"{server.url}/v2/repository/index", json={})
    return [entry for entry in answer.json() if entry["state"] == state]


def test_an_explicit_load_swaps_versions_under_load_and_unload_drains(tmp_path: Path) -> None:
    root = tmp_path / "models"
    onnx_model(root, "twobytwo", config=True, versions={1: 1.0, 2: 2.0})
    config = root / "twobytwo" / "config.pbtxt"
    text = config.read_text()
    config.write_text(text + "version_policy: { specific: { versions: [1] } }\n")
    env = {"MODEL_REPOSITORY": str(root), "MODEL_CONTROL": "explicit", "TASKS": ""}
    with running_server(env, tmp_path / "server.log") as server:
        client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
        with Clients(server).sending() as clients:
            clients.wait_for(50)
            v1_before = statistics(server, "1")["inference_stats"]["success"]["count"]
            config.write_text(text + "version_policy: { specific: { versions: [2] } }\n")
            client.load_model("twobytwo")
            loaded = time.monotonic()
            assert served_versions(server) == ["2"]
            clients.wait_for(len(clients.answers) + 100)
        assert {status for _, status, _, _ in clients.answers} == {200}
        assert all(right for *_, right in clients.answers)
        assert clients.versions_since(loaded) == {"2"}
        assert {version for _, _, version, _ in clients.answers} == {"1", "2"}
        assert v1_before > 0
        assert statistics(server, "2")["inference_stats"]["success"]["count"] >= 100
        # Unloaded, the model answers 404 naming itself; loaded again, it serves.
        client.unload_model("twobytwo")
        gone = httpx.post(f"{server.url}/v2/models/twobytwo/infer", json=REQUEST)
        assert gone.status_code == 404
        assert "unknown model 'twobytwo'" in gone.json()["error"]
        # The index still lists it, with what loads it again.
        [entry] = [e for e in client.get_model_repository_index() if e["name"] == "twobytwo"]
        assert entry["state"] == "UNAVAILABLE"
        assert "POST /v2/repository/models/twobytwo/load" in entry["reason"]
        client.load_model("twobytwo")
        assert httpx.post(f"{server.url}/v2/models/twobytwo/infer", json=REQUEST).status_code == 200
        # The same over gRPC.
        over_grpc = grpcclient.InferenceServerClient(server.grpc_target)
        over_grpc.unload_model("twobytwo")
        assert served_versions(server) == []
        [listed] = over_grpc.get_model_repository_index().models
        assert (listed.name, listed.state) == ("twobytwo", "UNAVAILABLE")
        assert listed.reason.startswith("not loaded")
        over_grpc.load_model("twobytwo")
        assert over_grpc.is_model_ready("twobytwo")
        over_grpc.close()
        # A load may give a config in place of config.pbtxt, as tritonclient's config=.
        effective = client.get_model_config("twobytwo")
        assert effective["version_policy"] == {"specific": {"versions": [2]}}
        effective["version_policy"] = {"specific": {"versions": [1]}}
        client.load_model("twobytwo", config=json.dumps(effective))
        assert served_versions(server) == ["1"]
        assert client.get_model_config("twobytwo")["version_policy"]["specific"]["versions"] == [1]
        with pytest.raises(InferenceServerException, match="did you mean 'max_batch_size'"):
            client.load_model("twobytwo", config='{"max_batch_sze": 4}')
        with pytest.raises(InferenceServerException, match="cannot choose files"):
            client.load_model("twobytwo", config='{"default_model_filename": "../x.onnx"}')
        with pytest.raises(
            InferenceServerException, match=r"'file:1/model\.onnx' is not supported"
        ):
            client.load_model("twobytwo", files={"file:1/model.onnx": b"not a model"})
        assert served_versions(server) == ["1"]
        over_grpc = grpcclient.InferenceServerClient(server.grpc_target)
        with pytest.raises(InferenceServerException, match="did you mean 'max_batch_size'"):
            over_grpc.load_model("twobytwo", config='{"max_batch_sze": 4}')
        effective["max_batch_size"] = 8
        over_grpc.load_model("twobytwo", config=json.dumps(effective))
        assert over_grpc.get_model_config("twobytwo").config.max_batch_size == 8
        over_grpc.close()
        client.load_model("twobytwo")  # config.pbtxt again
        assert served_versions(server) == ["2"]
        assert client.get_model_config("twobytwo")["max_batch_size"] == 16
        # A load that cannot be served says why, and what was served goes on.
        (root / "twobytwo" / "2" / "model.onnx").write_bytes(b"broken")
        with pytest.raises(InferenceServerException, match="ONNX Runtime cannot load"):
            client.load_model("twobytwo")
        assert httpx.post(f"{server.url}/v2/models/twobytwo/infer", json=REQUEST).status_code == 200
        client.close()


def test_every_gunicorn_worker_follows_the_repository(tmp_path: Path) -> None:
    root = tmp_path / "models"
    onnx_model(root, "twobytwo", config=True, versions={1: 1.0})
    env = {
        "MODEL_REPOSITORY": str(root),
        "MODEL_CONTROL": "poll",
        "MODEL_POLL_S": "0.2",
        "TASKS": "",
        "WORKERS": "2",
    }
    log = tmp_path / "server.log"
    with running_server(env, log, GUNICORN) as server, Clients(server).sending() as clients:
        clients.wait_for(50)
        add_version(root, 2, SCALES["2"])

        def all_moved() -> bool:
            recent = clients.answers[-60:]
            return len(recent) == 60 and {version for _, _, version, _ in recent} == {"2"}

        until(all_moved, "every worker answering with version 2")
    assert {status for _, status, _, _ in clients.answers} == {200}
    assert all(right for *_, right in clients.answers)
    pids = {
        line.split()[3] for line in log.read_text().splitlines() if "version 2 is served" in line
    }
    assert len(pids) == 2, pids  # each worker loaded it
