"""The Open Inference Protocol (KServe V2) against the real server, with Triton's own
clients: tritonclient's HTTP and gRPC clients, sync and asyncio."""

import queue
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc as grpc_module
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from harness.server import GUNICORN, ROOT, Server, running_server
from tests.helpers import metric, python_blocks
from tests.images import TOP1, chelsea, encode, photo_bytes, truncated_jpeg

pytestmark = pytest.mark.e2e

TASKS = ",".join(
    [
        "classification.task:ImageClassification",
        "classification.task:ImageEmbedding",
        "examples.sentiment:Sentiment",
    ]
)
PHOTOS = ["chelsea", "coffee", "rocket"]
MAX_UPLOAD_BYTES = 2_000_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("v2") / "server.log"
    env = {"TASKS": TASKS, "MAX_BATCH_SIZE": "8", "MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES)}
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


def images(module: Any, names: list[str], data: dict[int, bytes] | None = None) -> Any:
    """The ``image`` input of ``module`` (tritonclient.http or .grpc): one photo per row,
    and ``data``'s bytes in place of some rows."""
    rows = [photo_bytes(name) for name in names]
    for row, value in (data or {}).items():
        rows[row] = value
    tensor = module.InferInput("image", [len(rows), 1], "BYTES")
    if module is httpclient or module is httpaio:
        tensor.set_data_from_numpy(np.array(rows, dtype=object).reshape(-1, 1), binary_data=True)
    else:
        tensor.set_data_from_numpy(np.array(rows, dtype=object).reshape(-1, 1))
    return tensor


def top1(result: Any) -> list[str]:
    return [row[0].decode() for row in result.as_numpy("label")]


def cls_top1(server: Server, name: str) -> str:
    answer = httpx.post(f"{server.url}/cls", files={"file": ("p.jpg", photo_bytes(name))})
    assert answer.status_code == 200, answer.text
    label: str = answer.json()["prediction"]["label"]
    return label


def statistics(client: httpclient.InferenceServerClient, model: str) -> dict[str, Any]:
    stats: dict[str, Any] = client.get_inference_statistics(model)["model_stats"][0]
    return stats


def test_the_server_and_its_models_describe_themselves(
    http: httpclient.InferenceServerClient, grpc: grpcclient.InferenceServerClient
) -> None:
    assert http.is_server_live()
    assert http.is_server_ready()
    assert grpc.is_server_live()
    assert grpc.is_server_ready()
    metadata = http.get_server_metadata()
    assert {"binary_tensor_data", "model_configuration", "statistics"} <= set(
        metadata["extensions"]
    )
    assert [m["name"] for m in metadata["models"]] == ["cls", "embed", "sentiment"]
    assert set(grpc.get_server_metadata().extensions) == set(metadata["extensions"])
    for model in ("cls", "embed", "sentiment"):
        assert http.is_model_ready(model)
        assert grpc.is_model_ready(model)
        assert http.is_model_ready(model, "1")
    cls = http.get_model_metadata("cls")
    assert cls["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1, 1]}]
    assert [o["name"] for o in cls["outputs"]] == ["label", "class_id", "score"]
    embed = grpc.get_model_metadata("embed", as_json=True)
    assert embed["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": ["-1", "1280"]}]
    config = http.get_model_config("cls")
    assert config["max_batch_size"] == 8
    assert config["input"] == [{"name": "image", "data_type": "TYPE_STRING", "dims": [1]}]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 5000
    grpc_config = grpc.get_model_config("embed").config
    assert grpc_config.max_batch_size == 8
    assert list(grpc_config.output[0].dims) == [1280]


def test_http_infer_gives_the_top_class_of_cls(
    server: Server, http: httpclient.InferenceServerClient
) -> None:
    for name in PHOTOS:
        result = http.infer("cls", [images(httpclient, [name])])
        assert top1(result) == [cls_top1(server, name)]
        assert top1(result)[0] in TOP1[name]


def test_a_batch_of_eight_in_one_request_over_both_protocols(
    http: httpclient.InferenceServerClient, grpc: grpcclient.InferenceServerClient
) -> None:
    names = (PHOTOS * 3)[:8]
    for client, module in ((http, httpclient), (grpc, grpcclient)):
        result = client.infer("cls", [images(module, names)], parameters={"top_k": 3})
        labels = result.as_numpy("label")
        assert labels.shape == (8, 3)
        assert [row[0].decode() in TOP1[name] for row, name in zip(labels, names, strict=True)] == [
            True
        ] * 8
        scores = result.as_numpy("score")
        assert scores.dtype == np.float32
        assert (np.diff(scores, axis=1) <= 0).all()  # best first
        assert result.as_numpy("class_id").dtype == np.int64


def test_json_and_binary_outputs_carry_the_same_answer(
    http: httpclient.InferenceServerClient,
) -> None:
    answers = []
    for binary in (True, False):
        outputs = [
            httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("label", "score")
        ]
        result = http.infer("cls", [images(httpclient, PHOTOS)], outputs=outputs)
        answers.append((result.as_numpy("label").astype(str), result.as_numpy("score")))
        output = result.get_output("score")
        assert ("binary_data_size" in output.get("parameters", {})) == binary
    (binary_labels, binary_scores), (json_labels, json_scores) = answers
    assert (binary_labels == json_labels).all()
    assert np.allclose(binary_scores, json_scores, atol=1e-6)


def test_the_classification_extension(grpc: grpcclient.InferenceServerClient) -> None:
    wanted = [grpcclient.InferRequestedOutput("score", class_count=2)]
    result = grpc.infer("cls", [images(grpcclient, ["coffee"])], outputs=wanted)
    [[best, second]] = result.as_numpy("score")
    score, class_id, label = best.decode().split(":", 2)
    assert label == "espresso"
    assert int(class_id) == 967
    assert 0 < float(score) <= 1
    assert second.decode().count(":") >= 2


def test_embed_and_a_text_task(
    server: Server, http: httpclient.InferenceServerClient, grpc: grpcclient.InferenceServerClient
) -> None:
    result = grpc.infer("embed", [images(grpcclient, ["chelsea", "coffee"])])
    vectors = result.as_numpy("embedding")
    assert vectors.shape == (2, 1280)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    direct = httpx.post(f"{server.url}/embed", files={"file": ("c.jpg", photo_bytes("chelsea"))})
    assert np.allclose(vectors[0], direct.json()["embedding"], atol=1e-5)
    text = httpclient.InferInput("text", [2, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"a lovely, friendly place"], [b"rude and slow"]]))
    answer = http.infer("sentiment", [text])
    assert [row[0] for row in answer.as_numpy("label")] == [b"positive", b"negative"]
    assert answer.as_numpy("words").tolist() == [[2], [2]]


def test_bad_requests_answer_as_the_protocol_says(
    http: httpclient.InferenceServerClient, grpc: grpcclient.InferenceServerClient
) -> None:
    corrupt = {3: truncated_jpeg()[:200]}
    with pytest.raises(InferenceServerException) as raised:
        http.infer("cls", [images(httpclient, [*PHOTOS, "coffee"], corrupt)])
    assert raised.value.status() == "400"
    assert "row 3" in raised.value.message()
    with pytest.raises(InferenceServerException) as raised:
        grpc.infer("cls", [images(grpcclient, [*PHOTOS, "coffee"], corrupt)])
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "row 3" in raised.value.message()
    for client, module, status in (
        (http, httpclient, "404"),
        (grpc, grpcclient, "StatusCode.NOT_FOUND"),
    ):
        with pytest.raises(InferenceServerException) as raised:
            client.infer("nope", [images(module, ["coffee"])])
        assert raised.value.status() == status
        assert "cls" in raised.value.message()  # it names the models served
    wrong = grpcclient.InferInput("pixels", [1, 3], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3), np.float32))
    with pytest.raises(InferenceServerException) as raised:
        grpc.infer("cls", [wrong])
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'image' is missing" in raised.value.message()


def test_a_message_over_the_upload_limit_is_refused(
    server: Server, http: httpclient.InferenceServerClient, grpc: grpcclient.InferenceServerClient
) -> None:
    big = {0: b"\xff" * (MAX_UPLOAD_BYTES + 1)}
    with pytest.raises(InferenceServerException) as raised:
        grpc.infer("cls", [images(grpcclient, ["coffee"], big)])
    assert raised.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    with pytest.raises(InferenceServerException) as raised:
        http.infer("cls", [images(httpclient, ["coffee"], big)])
    assert raised.value.status() == "413"
    assert http.is_server_ready()


def test_the_error_body_of_http_is_the_protocols(server: Server) -> None:
    answer = httpx.post(f"{server.url}/v2/models/cls/infer", content=b"{not json")
    assert answer.status_code == 400
    assert set(answer.json()) == {"error"}
    answer = httpx.get(f"{server.url}/v2/models/cls/versions/2")
    assert answer.status_code == 404
    assert "version 1" in answer.json()["error"]


def test_a_stream_of_100_images_is_answered_in_full(grpc: grpcclient.InferenceServerClient) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    grpc.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        names = (PHOTOS * 34)[:100]
        for i, name in enumerate(names):
            grpc.async_stream_infer("cls", [images(grpcclient, [name])], request_id=str(i))
        got = [answers.get(timeout=60) for _ in names]
    finally:
        grpc.stop_stream()
    assert [error for _, error in got if error is not None] == []
    by_id = {int(result.get_response().id): top1(result)[0] for result, _ in got}
    assert sorted(by_id) == list(range(100))
    assert all(by_id[i] in TOP1[name] for i, name in enumerate(names))


def test_the_statistics_count_the_requests_sent(
    http: httpclient.InferenceServerClient, grpc: grpcclient.InferenceServerClient
) -> None:
    before = statistics(http, "embed")
    for _ in range(3):
        http.infer("embed", [images(httpclient, ["coffee", "rocket"])])
        grpc.infer("embed", [images(grpcclient, ["chelsea"])])
    after = statistics(http, "embed")
    success = (
        after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"]
    )
    assert success == 6
    assert after["inference_count"] - before["inference_count"] == 9
    assert after["inference_stats"]["fail"] == before["inference_stats"]["fail"]
    for stage in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert after["inference_stats"][stage]["ns"] > before["inference_stats"][stage]["ns"]
    assert (
        sum(b["compute_infer"]["count"] for b in after["batch_stats"]) == after["execution_count"]
    )
    grpc_stats = grpc.get_inference_statistics("embed").model_stats[0]
    assert grpc_stats.inference_stats.success.count == after["inference_stats"]["success"]["count"]


def test_grpc_calls_are_in_the_prometheus_metrics(
    server: Server, grpc: grpcclient.InferenceServerClient
) -> None:
    grpc.infer("cls", [images(grpcclient, ["coffee"])])
    with pytest.raises(InferenceServerException):
        grpc.infer("nope", [images(grpcclient, ["coffee"])])
    text = httpx.get(f"{server.url}/metrics").text
    assert metric(text, "grpc_requests_total", method="ModelInfer", code="OK") >= 1
    assert metric(text, "grpc_requests_total", method="ModelInfer", code="NOT_FOUND") >= 1
    assert metric(text, "grpc_request_duration_seconds_count", method="ModelInfer") >= 2


def wait_idle(server: Server, model: str) -> None:
    """Returns once nothing of ``model`` is queued or decoding."""
    deadline = time.monotonic() + 60
    while backlog(server, model) > 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def backlog(server: Server, model: str) -> int:
    """Items of ``model`` decoding or queued now."""
    task = httpx.get(f"{server.url}/metadata").json()["tasks"][model]
    return int(task["stats"]["queue_depth"] + task["decode"]["in_flight"])


def send_backlog(
    server: Server, grpc: grpcclient.InferenceServerClient, rows: int
) -> tuple[Any, "queue.Queue[Any]"]:
    """Sends ``rows`` small photos in one call, and returns once they are a backlog: the
    call, and where its answer will be."""
    small = encode(chelsea().resize((240, 160)), "JPEG", quality=80)
    tensor = grpcclient.InferInput("image", [rows, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[small]] * rows, dtype=object))
    answer: queue.Queue[Any] = queue.Queue()
    call = grpc.async_infer("cls", [tensor], callback=lambda result, error: answer.put(error))
    deadline = time.monotonic() + 30
    while backlog(server, "cls") < rows // 2:
        assert time.monotonic() < deadline, "the backlog never formed"
    return call, answer


def test_a_deadline_too_short_for_the_backlog_is_never_computed(
    server: Server, http: httpclient.InferenceServerClient, grpc: grpcclient.InferenceServerClient
) -> None:
    wait_idle(server, "cls")
    before = statistics(http, "cls")["inference_count"]
    _, answer = send_backlog(server, grpc, 128)
    with pytest.raises(InferenceServerException) as raised:
        grpc.infer("cls", [images(grpcclient, ["coffee"])], client_timeout=0.05)
    assert raised.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert answer.get(timeout=30) is None  # the backlog itself was answered
    wait_idle(server, "cls")
    assert statistics(http, "cls")["inference_count"] - before == 128


def test_a_cancelled_call_drops_its_items(
    server: Server, http: httpclient.InferenceServerClient, grpc: grpcclient.InferenceServerClient
) -> None:
    wait_idle(server, "cls")
    before = statistics(http, "cls")["inference_count"]
    call, _ = send_backlog(server, grpc, 128)
    call.cancel()
    wait_idle(server, "cls")
    assert statistics(http, "cls")["inference_count"] - before < 128
    assert http.is_server_ready()


@pytest.mark.anyio
async def test_the_asyncio_clients(server: Server) -> None:
    http = httpaio.InferenceServerClient(server.url.removeprefix("http://"))
    grpc = grpcaio.InferenceServerClient(server.grpc_target)
    try:
        assert await http.is_model_ready("cls")
        assert await grpc.is_model_ready("cls")
        by_http = await http.infer("cls", [images(httpaio, ["rocket"])])
        by_grpc = await grpc.infer("cls", [images(grpcaio, ["rocket"])])
        assert top1(by_http) == top1(by_grpc)
        assert top1(by_http)[0] in TOP1["rocket"]
    finally:
        await http.close()
        await grpc.close()


def test_the_readmes_examples_run_as_written(server: Server, tmp_path: Path) -> None:
    blocks = python_blocks(ROOT / "README.md", "## The Open Inference Protocol (KServe V2)")
    assert len(blocks) == 2
    (tmp_path / "cat.jpg").write_bytes(photo_bytes("chelsea"))
    for block in blocks:
        code = block.replace("localhost:5001", server.url.removeprefix("http://"))
        code = code.replace("localhost:5002", server.grpc_target)
        ran = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert ran.returncode == 0, ran.stderr
        assert "cat" in ran.stdout


def test_stopping_leaves_no_grpc_listener(tmp_path: Path) -> None:
    with running_server({"MAX_BATCH_SIZE": "4"}, tmp_path / "server.log") as server:
        client = grpcclient.InferenceServerClient(server.grpc_target)
        assert client.is_server_ready()
        client.close()
    client = grpcclient.InferenceServerClient(server.grpc_target)
    with pytest.raises(InferenceServerException):
        client.is_server_live(client_timeout=2)
    client.close()


def test_every_gunicorn_worker_serves_grpc_on_the_one_port(tmp_path: Path) -> None:
    env = {"WORKERS": "2", "MAX_BATCH_SIZE": "4"}
    with running_server(env, tmp_path / "g.log", command=GUNICORN) as server:
        deadline = time.monotonic() + 60
        while len(listening := re.findall(r" (\d+) v2.grpc_server: gRPC", server.output())) < 2:
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.1)
        assert len(set(listening)) == 2  # two processes, one port
        for _ in range(8):  # a connection each, spread by the kernel
            client = grpcclient.InferenceServerClient(server.grpc_target)
            assert top1(client.infer("cls", [images(grpcclient, ["coffee"])])) == ["espresso"]
            client.close()


def test_an_impolite_grpc_client_is_paced_by_its_retry_hint(tmp_path: Path) -> None:
    # TIMEOUT far below one batch: every request is refused up front.
    with running_server({"TIMEOUT": "0.001"}, tmp_path / "server.log") as server:
        request = service_pb2.ModelInferRequest(model_name="cls")
        request.inputs.add(name="image", datatype="BYTES", shape=[1, 1])
        image = photo_bytes("coffee")
        request.raw_input_contents.append(len(image).to_bytes(4, "little") + image)

        def refused_in(channel: grpc_module.Channel) -> float:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            started = time.monotonic()
            with pytest.raises(grpc_module.RpcError) as raised:
                stub.ModelInfer(request, timeout=30)
            seconds = time.monotonic() - started
            assert raised.value.code() == grpc_module.StatusCode.UNAVAILABLE
            trailers = dict(raised.value.trailing_metadata())
            assert int(trailers["grpc-retry-pushback-ms"]) >= 1000
            return seconds

        options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own
        with grpc_module.insecure_channel(server.grpc_target, options=options) as impolite:
            first, second, third = (refused_in(impolite) for _ in range(3))
            with grpc_module.insecure_channel(server.grpc_target, options=options) as other:
                elsewhere = refused_in(other)
        # Retrying at once, it waits out the rest of its hint (1 s) before each answer;
        # another connection is answered at once.
        assert first < 0.5
        assert second >= 0.8
        assert third >= 0.8
        assert elsewhere < 0.5


def test_the_timeout_and_priority_parameters(
    http: httpclient.InferenceServerClient, grpc: grpcclient.InferenceServerClient
) -> None:
    # A generous timeout (microseconds) and a background priority are served as any request.
    answer = grpc.infer("cls", [images(grpcclient, ["coffee"])], priority=2, timeout=5_000_000)
    assert top1(answer) == ["espresso"]
    answer = http.infer("cls", [images(httpclient, ["rocket"])], priority=2, timeout=5_000_000)
    assert top1(answer)[0] in TOP1["rocket"]
    with pytest.raises(InferenceServerException) as raised:
        http.infer("cls", [images(httpclient, ["coffee"])], timeout=-5)
    assert raised.value.status() == "400"
    assert "timeout" in raised.value.message()
    with pytest.raises(InferenceServerException) as raised:
        grpc.infer("cls", [images(grpcclient, ["coffee"])], parameters={"top_k": 500})
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "top_k" in raised.value.message()
