"""A model repository served by the real server, beside /cls: an image model with its
preprocessing and labels declared (answers as /cls's), tensor models as ONNX (with and
without a config, two versions) and TorchScript, checked against the modules, and broken
models that stop only themselves. Reached with tritonclient over HTTP and gRPC."""

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from harness.server import ROOT, Server, running_server
from tests.helpers import console_commands, metric
from tests.images import photo_bytes
from tests.repository_models import TwoByTwo, image_model, onnx_model, torchscript_model

pytestmark = pytest.mark.e2e

PHOTOS = ["chelsea", "coffee", "rocket"]
IMAGE_MODEL = "efficientnet_lite0"
WALKTHROUGH = "### Model files with no code: a model repository"


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repository")
    image_model(root, Path(".model-cache"))
    onnx_model(root, "twobytwo", config=True, versions={1: 1.0, 2: 2.0})
    config = root / "twobytwo" / "config.pbtxt"
    config.write_text(config.read_text() + "version_policy: { all: {} }\n")
    onnx_model(root, "derived", config=False, versions={1: 1.0})
    torchscript_model(root, "scripted")
    # Broken, each in its own way.
    onnx_model(root, "corrupt", config=True, versions={1: 1.0})
    (root / "corrupt" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    onnx_model(root, "typo", config=True, versions={1: 1.0})
    typo = root / "typo" / "config.pbtxt"
    typo.write_text(typo.read_text().replace("dynamic_batching", "dynamic_batchng"))
    onnx_model(root, "wrongshape", config=True, versions={1: 1.0})
    wrong = root / "wrongshape" / "config.pbtxt"
    wrong.write_text(wrong.read_text().replace("dims: [ 3 ]", "dims: [ 5 ]"))
    (root / "noversion").mkdir()
    return root


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("repository-server") / "server.log"
    env = {
        "MODEL_REPOSITORY": str(repository),
        "PRECISION": "float32",  # /cls as the repository's float32 file computes
        "MAX_BATCH_SIZE": "8",
    }
    with running_server(env, log) as server:
        yield server


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc(server: Server) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(server.grpc_target)
    yield client
    client.close()


def tensor_inputs(module: Any, a: np.ndarray, b: np.ndarray) -> list[Any]:
    inputs = []
    for name, value in (("a", a), ("b", b)):
        tensor = module.InferInput(name, list(value.shape), "FP32")
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


def sample(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    generator = np.random.default_rng(seed)
    return (
        generator.standard_normal((rows, 4), dtype=np.float32),
        generator.standard_normal((rows, 4), dtype=np.float32),
    )


def test_the_image_model_answers_as_cls_does_on_the_photos(server: Server) -> None:
    for name in PHOTOS:
        files = {"file": (f"{name}.jpg", photo_bytes(name), "image/jpeg")}
        ours = httpx.post(f"{server.url}/{IMAGE_MODEL}", files=files, timeout=30)
        builtin = httpx.post(f"{server.url}/cls", files=files, timeout=30)
        assert ours.status_code == builtin.status_code == 200, ours.text
        mine, theirs = ours.json()["top_k"], builtin.json()["top_k"]
        assert [c["class_id"] for c in mine] == [c["class_id"] for c in theirs]
        assert [c["label"] for c in mine] == [c["label"] for c in theirs]
        for a, b in zip(mine, theirs, strict=True):
            assert abs(a["score"] - b["score"]) < 1e-3


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_the_image_model_takes_encoded_images_over_v2_and_classifies(
    transport: str, http: Any, grpc: Any, server: Server
) -> None:
    module, client = (httpclient, http) if transport == "http" else (grpcclient, grpc)
    images = np.array([photo_bytes(name) for name in PHOTOS], dtype=object).reshape(-1, 1)
    tensor = module.InferInput("input", [len(PHOTOS), 1], "BYTES")
    if module is httpclient:
        tensor.set_data_from_numpy(images, binary_data=True)
    else:
        tensor.set_data_from_numpy(images)
    output = module.InferRequestedOutput("output", class_count=1)
    result = client.infer(IMAGE_MODEL, [tensor], outputs=[output])
    labels = [row[0].decode().split(":", 2)[2] for row in result.as_numpy("output")]
    expected = [
        httpx.post(f"{server.url}/cls", files={"file": photo_bytes(n)}, timeout=30).json()[
            "prediction"
        ]["label"]
        for n in PHOTOS
    ]
    assert labels == expected
    assert client.get_model_metadata(IMAGE_MODEL) is not None


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_a_tensor_model_computes_what_the_module_computes(
    transport: str, http: Any, grpc: Any
) -> None:
    module, client = (httpclient, http) if transport == "http" else (grpcclient, grpc)
    a, b = sample(6, seed=1)
    for model, version, scale in [
        ("twobytwo", "", 2.0),  # the newest version
        ("twobytwo", "1", 1.0),
        ("twobytwo", "2", 2.0),
        ("derived", "", 1.0),
        ("scripted", "", 1.0),
    ]:
        result = client.infer(model, tensor_inputs(module, a, b), model_version=version)
        total, mixed = TwoByTwo(scale).expected(a, b)
        np.testing.assert_allclose(result.as_numpy("sum"), total, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.as_numpy("mixed"), mixed, rtol=1e-4, atol=1e-5)
        answered = result.get_response()
        got = answered["model_version"] if module is httpclient else answered.model_version
        assert got == (version or "2" if model == "twobytwo" else "1")


def test_versions_metadata_and_a_derived_config(http: Any) -> None:
    assert http.get_model_metadata("twobytwo")["versions"] == ["1", "2"]
    assert http.get_model_metadata("scripted")["platform"] == "pytorch_libtorch"
    config = http.get_model_config("derived")
    assert (config["name"], config["platform"]) == ("derived", "onnxruntime_onnx")
    assert [(i["name"], i["dims"]) for i in config["input"]] == [("a", [4]), ("b", [4])]
    assert config["max_batch_size"] >= 1  # the batcher's, as no config set it
    assert http.get_model_config("twobytwo")["max_batch_size"] == 16
    with pytest.raises(InferenceServerException, match="no version '3'"):
        http.get_model_metadata("twobytwo", "3")


def test_a_tensor_model_over_post_takes_one_row_as_json(server: Server) -> None:
    a, b = sample(1, seed=2)
    answer = httpx.post(
        f"{server.url}/twobytwo", json={"a": a[0].tolist(), "b": b[0].tolist()}, timeout=30
    )
    assert answer.status_code == 200, answer.text
    total, mixed = TwoByTwo(2.0).expected(a, b)
    np.testing.assert_allclose(answer.json()["sum"], total[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(answer.json()["mixed"], mixed[0], rtol=1e-4, atol=1e-5)
    bad = httpx.post(f"{server.url}/twobytwo", json={"a": [1, 2], "b": b[0].tolist()}, timeout=30)
    assert bad.status_code == 400
    assert "input 'a' has shape [2] in one row; the model takes [4]" in bad.json()["detail"]


def test_broken_models_stop_only_themselves_with_the_file_and_field_named(
    server: Server, http: Any, grpc: Any, repository: Path
) -> None:
    index = {(m["name"], m.get("version", "")): m for m in http.get_model_repository_index()}
    for name in (IMAGE_MODEL, "derived", "scripted"):
        assert index[(name, "1")]["state"] == "READY"
    assert index[("twobytwo", "1")]["state"] == index[("twobytwo", "2")]["state"] == "READY"
    reasons = {
        "corrupt": f"ONNX Runtime cannot load {repository}/corrupt/1/model.onnx",
        "typo": f"{repository}/typo/config.pbtxt:13: unknown field 'dynamic_batchng'",
        "wrongshape": f"{repository}/wrongshape/config.pbtxt: output 'mixed' field 'dims' is [5]",
        "noversion": f"{repository}/noversion: no version folder",
    }
    for name, reason in reasons.items():
        [entry] = [m for key, m in index.items() if key[0] == name]
        assert entry["state"] == "UNAVAILABLE"
        assert reason in entry["reason"]
        answer = httpx.post(f"{server.url}/v2/models/{name}/infer", json={"inputs": []})
        assert answer.status_code == 404
        assert f"model {name!r} is not available: {reason}" in answer.json()["error"]
    over_grpc = {m.name: m for m in grpc.get_model_repository_index().models}
    assert over_grpc["typo"].state == "UNAVAILABLE"
    assert "dynamic_batchng" in over_grpc["typo"].reason
    listed = {m["name"]: m for m in httpx.get(f"{server.url}/v2").json()["models"]}
    assert listed["corrupt"]["available"] is False
    assert listed["twobytwo"]["available"] is True
    unavailable = httpx.get(f"{server.url}/metadata").json()["unavailable"]
    assert reasons["corrupt"] in unavailable["corrupt"]["1"]
    assert reasons["typo"] in unavailable["typo"][""]  # the whole model: its config
    # The route of a model whose file broke names why, too.
    answer = httpx.post(f"{server.url}/corrupt", json={"a": [0] * 4, "b": [0] * 4})
    assert answer.status_code == 404
    assert "is not available" in answer.json()["detail"]


def test_the_statistics_count_each_version_apart(http: Any, server: Server) -> None:
    def computed(version: str) -> float:
        text = httpx.get(f"{server.url}/metrics").text
        return metric(text, "batcher_queue_wait_seconds_count", task="twobytwo", version=version)

    before = http.get_inference_statistics("twobytwo", "1")["model_stats"][0]
    before_metrics = computed("1"), computed("2")
    a, b = sample(3, seed=3)
    for _ in range(4):
        http.infer("twobytwo", tensor_inputs(httpclient, a, b), model_version="1")
    # Prometheus too: each version's batcher has series of its own.
    assert computed("1") - before_metrics[0] == 12
    assert computed("2") == before_metrics[1]
    after = http.get_inference_statistics("twobytwo", "1")["model_stats"][0]
    assert after["version"] == "1"
    assert (
        after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"]
        == 4
    )
    assert after["inference_count"] - before["inference_count"] == 12


def test_the_readme_walkthrough_runs_as_written(tmp_path: Path) -> None:
    """README's "model files with no code": the example's files made, the server started
    with the environment it shows, and the photo sent as written."""
    commands = console_commands(ROOT / "README.md", WALKTHROUGH)
    [make, run, curl] = [command for command, _ in commands]
    made = subprocess.run(
        ["bash", "-c", make], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip() == commands[0][1][0]
    assert run == "MODEL_REPOSITORY=examples/model_repository TASKS= make run"
    env = {"MODEL_REPOSITORY": "examples/model_repository", "TASKS": ""}
    with running_server(env, tmp_path / "walkthrough.log") as server:
        curl = curl.replace("localhost:5001", server.url)
        answer = subprocess.run(
            ["bash", "-c", curl], capture_output=True, text=True, cwd=ROOT, timeout=60
        )
        assert answer.returncode == 0, answer.stderr
        prediction = json.loads(answer.stdout)["prediction"]
        shown = commands[2][1][0]
        assert f'"label":"{prediction["label"]}"' in shown
        assert f'"class_id":{prediction["class_id"]}' in shown
        assert shown.split('"score":')[1].startswith(f"{prediction['score']:.3f}")
        routes = httpx.get(f"{server.url}/v2").json()["models"]
        assert [m["name"] for m in routes] == [IMAGE_MODEL]


def test_a_v2_input_that_contradicts_the_config_is_refused_naming_it(server: Server) -> None:
    wrong = {
        "inputs": [
            {"name": "a", "datatype": "FP32", "shape": [1, 5], "data": [0.0] * 5},
            {"name": "b", "datatype": "FP32", "shape": [1, 4], "data": [0.0] * 4},
        ]
    }
    answer = httpx.post(f"{server.url}/v2/models/twobytwo/infer", json=wrong, timeout=30)
    assert answer.status_code == 400
    assert "input 'a' has shape [1, 5]; the model takes [-1, 4]" in answer.json()["error"]
    wrong["inputs"][0] = {"name": "a", "datatype": "INT64", "shape": [1, 4], "data": [0] * 4}
    answer = httpx.post(f"{server.url}/v2/models/twobytwo/infer", json=wrong, timeout=30)
    assert answer.status_code == 400
    assert "input 'a' has datatype INT64; the model takes FP32" in answer.json()["error"]
