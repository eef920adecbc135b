"""A task defined only in this module, served by a real server process through TASKS=,
beside the image tasks; and what TASKS refuses at startup."""

import ast
import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime
import pytest

from harness.server import Server, launch, running_server, stop
from serving import LoadContext, Task
from serving.registry import load_tasks
from tests.helpers import console_commands, metric, poll_until_finished, read_events
from tests.images import TOP1, photo_bytes
from tests.tasks import UNLUCKY, Square

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


class NotATask:
    name = "nope"


class Incomplete(Task[int, int]):
    name = "incomplete"

    def load(self, context: LoadContext) -> None:
        pass


class ClashesWithCls(Square):
    name = "cls"


HERE = "tests.test_tasks_e2e"
ROOT = Path(__file__).resolve().parent.parent
TASKS = "classification.task:ImageClassification,tests.tasks:Square"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    log = tmp_path_factory.mktemp("tasks") / "server.log"
    with running_server({"TASKS": TASKS, "MAX_BATCH_SIZE": "8"}, log) as server:
        yield server


async def test_the_task_is_batched_and_each_item_fails_alone(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        xs = list(range(1, 25))
        responses = await asyncio.gather(*(client.post("/square", json={"x": x}) for x in xs))
        histogram = (await client.get("/metadata")).json()["tasks"]["square"]["stats"]
    for x, response in zip(xs, responses, strict=True):
        if x == UNLUCKY:
            assert response.status_code == 500
            assert "unlucky" in response.json()["detail"]
        else:
            assert response.status_code == 200, response.text
            assert response.json() == {"square": x * x}
    assert max(int(size) for size in histogram["batch_size_histogram"]) > 1, histogram


def test_options_input_errors_and_the_other_task(server: Server) -> None:
    url = server.url
    assert httpx.post(f"{url}/square?offset=1", json={"x": 3}).json() == {"square": 16}
    assert httpx.post(f"{url}/square?offset=101", json={"x": 3}).status_code == 422
    missing = httpx.post(f"{url}/square", json={"y": 3})
    assert missing.status_code == 422
    assert missing.json()["detail"] == 'send {"x": <an integer>}'
    assert httpx.post(f"{url}/square", json={"x": 10**7}).status_code == 413
    # A file part arrives as bytes, which this task does not take.
    assert httpx.post(f"{url}/square", files={"file": ("x", b"3")}).status_code == 422
    # Advice on sending names no image.
    broken = httpx.post(
        f"{url}/square", content=b"{x", headers={"content-type": "application/json"}
    )
    assert broken.status_code == 400
    assert "/docs shows what each route takes" in broken.json()["detail"]
    assert "cat.jpg" not in broken.json()["detail"]
    cat = httpx.post(f"{url}/cls", files={"file": ("cat.jpg", photo_bytes("chelsea"))})
    assert cat.json()["prediction"]["label"] in TOP1["chelsea"]


def test_an_idempotency_key_names_one_job_of_one_task_and_its_items(server: Server) -> None:
    key = {"Idempotency-Key": "nightly-42"}
    first = httpx.post(f"{server.url}/square/jobs", json={"inputs": [2, 3]}, headers=key)
    again = httpx.post(f"{server.url}/square/jobs", json={"inputs": [2, 3]}, headers=key)
    assert first.status_code == again.status_code == 202, (first.text, again.text)
    assert again.json()["job_id"] == first.json()["job_id"]
    assert again.headers["idempotent-replayed"] == "true"
    # The same key on another task's route is that task's own job.
    files = [("files", ("coffee.jpg", photo_bytes("coffee")))]
    other = httpx.post(f"{server.url}/cls/jobs", files=files, headers=key)
    assert other.status_code == 202
    assert "idempotent-replayed" not in other.headers
    assert other.json()["job_id"] != first.json()["job_id"]
    # Other items under the same key are a mistake, answered as one.
    changed = httpx.post(f"{server.url}/square/jobs", json={"inputs": [2, 4]}, headers=key)
    assert changed.status_code == 422
    assert first.json()["job_id"] in changed.json()["detail"]
    assert "new Idempotency-Key" in changed.json()["detail"]


def test_a_job_of_the_task_completes(server: Server) -> None:
    response = httpx.post(f"{server.url}/square/jobs", json={"inputs": [2, UNLUCKY, "x", 4]})
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    final = poll_until_finished(server, job_id)[-1]
    assert final["task"] == "square"
    assert final["status"] == "succeeded"
    assert final["progress"] == {"done": 4, "failed": 2, "total": 4}
    assert final["results"][0] == {"square": 4}
    assert final["results"][1]["error"]["status"] == 500
    assert final["results"][2]["error"]["status"] == 422
    assert final["results"][3] == {"square": 16}
    assert read_events(server, job_id)[-1][1] == "done"
    # POST /jobs is the first task's.
    cls_job = httpx.post(f"{server.url}/jobs", files=[("files", ("c.jpg", photo_bytes("coffee")))])
    assert poll_until_finished(server, cls_job.json()["job_id"])[-1]["task"] == "cls"


def test_metrics_metadata_and_openapi_carry_the_task(server: Server) -> None:
    text = httpx.get(f"{server.url}/metrics").text
    assert metric(text, "batcher_batch_size_count", task="square") > 0
    assert metric(text, "batcher_batch_size_count", task="cls") > 0
    meta = httpx.get(f"{server.url}/metadata").json()
    assert set(meta["tasks"]) == {"cls", "square"}
    assert meta["tasks"]["square"]["model"]["name"] == "square"
    # Two tasks share the worker's model threads.
    assert meta["tasks"]["square"]["model"]["threads"] == 1
    assert meta["model"]["name"] == "efficientnet_lite0"  # the first task, as before
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert {"/cls", "/cls/jobs", "/square", "/square/jobs"} <= set(paths)
    assert "offset" in str(paths["/square"]["post"]["parameters"])


def test_a_task_without_a_tensor_form_is_listed_in_v2_as_unavailable(server: Server) -> None:
    models = {m["name"]: m for m in httpx.get(f"{server.url}/v2").json()["models"]}
    assert models["cls"]["available"]
    assert not models["square"]["available"]
    assert "tensor_form" in models["square"]["reason"]
    body = {"inputs": [{"name": "x", "datatype": "INT64", "shape": [1, 1], "data": [3]}]}
    answer = httpx.post(f"{server.url}/v2/models/square/infer", json=body)
    assert answer.status_code == 400
    assert "POST /square" in answer.json()["error"]


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        (f"{HERE}:NotATask", "not a subclass of serving.Task"),
        (f"{HERE}:Incomplete", "does not implement decode, predict_batch, encode"),
        ("tests.tasks:Square,tests.tasks:Square", "names 'square' twice"),
        (f"classification.task:ImageClassification,{HERE}:ClashesWithCls", "twice"),
        (f"{HERE}:Nowhere", "has no Nowhere; its tasks are tests.test_tasks_e2e:ClashesWithCls,"),
        ("tests.tasks:Sqare", "has no Sqare; its tasks are tests.tasks:FailingWarmUp,"),
        ("no_such_package.module:Task", "cannot import no_such_package.module"),
        ("classification.task", "must look like package.module:Class"),
    ],
)
def test_tasks_that_cannot_be_served_are_refused_naming_tasks(tasks: str, message: str) -> None:
    with pytest.raises(ValueError, match="TASKS") as raised:
        load_tasks(tasks)
    assert message in str(raised.value)


def test_a_bad_tasks_setting_stops_startup_with_its_message(tmp_path: Path) -> None:
    server = launch({"TASKS": f"{HERE}:Incomplete"}, tmp_path / "bad.log")
    try:
        assert server.process.wait(timeout=60) != 0
    finally:
        stop(server)
    assert "TASKS entry" in server.output()
    assert "does not implement" in server.output()


class RefusesToLoad(Square):
    name = "refuses"

    def load(self, context: LoadContext) -> None:
        raise ValueError("MODEL_PATH=/nowhere/model.onnx does not exist: set MODEL_PATH")


def test_a_task_that_cannot_load_says_why_in_one_line(tmp_path: Path) -> None:
    server = launch({"TASKS": f"{HERE}:RefusesToLoad"}, tmp_path / "refuses.log")
    try:
        assert server.process.wait(timeout=60) == 3  # uvicorn's startup failure
    finally:
        stop(server)
    output = server.output()
    assert "cannot start: MODEL_PATH=/nowhere/model.onnx does not exist" in output
    assert "Traceback" not in output


def test_the_ready_line_comes_when_the_server_serves(tmp_path: Path) -> None:
    """The quick start says to wait for the line that begins "Ready:"."""
    with running_server({"TASKS": "tests.tasks:Square"}, tmp_path / "ready.log") as server:
        # running_server waits for /health/ready; the line is logged as it turns ready.
        lines = server.output().splitlines()
        [ready] = [line for line in lines if "Ready: " in line]
        assert f"Ready: {server.url}/ serves POST /square" in ready
        startup = next(i for i, line in enumerate(lines) if "Application startup complete" in line)
        assert startup < lines.index(ready)
        assert httpx.post(f"{server.url}/square", json={"x": 3}).json() == {"square": 9}


def test_the_example_walkthrough(tmp_path: Path) -> None:
    """The commands of examples/README.md, run as written there."""
    env = {"TASKS": "examples.sentiment:Sentiment"}
    with running_server(env, tmp_path / "example.log") as server:
        curl = subprocess.run(
            [
                "curl", "-s", f"{server.url}/sentiment",
                "-H", "content-type: application/json",
                "-d", '{"text": "What a wonderful, friendly place"}',
            ],
            capture_output=True, text=True, check=True, timeout=30,
        )  # fmt: skip
        assert '"label":"positive"' in curl.stdout, curl.stdout
        texts = ["I loved it", "rude and slow", "not good at all", "a table"]
        job = httpx.post(f"{server.url}/sentiment/jobs", json={"texts": texts}).json()
        final = poll_until_finished(server, job["job_id"])[-1]
        labels = [result["label"] for result in final["results"]]
        assert labels == ["positive", "negative", "negative", "neutral"]


def test_the_image_example_walkthrough(tmp_path: Path) -> None:
    """The commands of examples/README.md's image task, run as written there."""
    walkthrough = ROOT / "examples" / "README.md"
    commands = console_commands(walkthrough, "## 5. Serve it, call it, see it batch")
    env = {"TASKS": "examples.brightness:Brightness", "DARK_BELOW": "0.3"}
    with running_server(env, tmp_path / "brightness.log") as server:
        outputs = []
        for command, shown in commands:
            command = command.replace("localhost:5001", server.url)
            done = subprocess.run(
                ["bash", "-c", command], capture_output=True, text=True, timeout=60, cwd=ROOT
            )
            assert done.returncode == 0, (command, done.stderr)
            outputs.append(done.stdout)
            if shown and "..." not in shown[0]:
                assert json.loads(done.stdout) == json.loads(shown[0]), command
        histogram = ast.literal_eval(outputs[3])
        # Batches by size: one image, then 32 at once, and no more before the job.
        assert sum(int(size) * count for size, count in histogram.items()) == 33
        job = json.loads(outputs[4])
        final = poll_until_finished(server, job["job_id"])[-1]
        assert [len(result["grid"]) for result in final["results"]] == [2, 2]
        settings = httpx.get(f"{server.url}/metadata").json()["tasks"]["brightness"]["settings"]
        assert settings["dark_below"] == 0.3
    # A bad value of the task's setting stops startup with the message the walkthrough shows.
    text = walkthrough.read_text()
    message = re.search(r"`(invalid configuration for task 'brightness': [^`]*)`", text)
    assert message, "the walkthrough shows the message of a bad DARK_BELOW"
    server = launch({**env, "DARK_BELOW": "2"}, tmp_path / "bad.log")
    try:
        assert server.process.wait(timeout=60) != 0
    finally:
        stop(server)
    assert message.group(1) in server.output()


def test_the_onnx_export_runs_as_written(tmp_path: Path) -> None:
    """examples/README.md's export, as written there, in a fresh interpreter."""
    text = (ROOT / "examples" / "README.md").read_text()
    section = text.split("# Your own model as an ONNX file", 1)[1]
    export = section.split("```python\n", 1)[1].split("```", 1)[0]
    done = subprocess.run(
        [sys.executable, "-c", export], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    [logits] = session.run(None, {"images": np.zeros((3, 3, 224, 224), dtype=np.float32)})
    assert logits.shape == (3, 1000)
