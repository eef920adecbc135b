"""POST /cls end to end: a real uvicorn process, the real model, real files."""

import asyncio
import base64
import io
import json
import random
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from api.limits import DISCARD_IDLE_SECONDS
from classification.building import INT8_MIN_SPEEDUP
from classification.quantize import int8_recipe
from harness.server import Server
from settings import Settings
from tests.helpers import console_commands
from tests.images import (
    CAT_IDS,
    PHOTOS,
    TOP1,
    convertible_variants,
    encode,
    photo_bytes,
    png_claiming,
    truncated_jpeg,
)

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


def post_file(
    server: Server, data: bytes, name: str = "image.jpg", **params: object
) -> httpx.Response:
    return httpx.post(f"{server.url}/cls", files={"file": (name, data)}, params=params, timeout=30)


def assert_error(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    detail = response.json()["detail"]
    for word in words:
        assert word in str(detail), detail


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_real_photos_are_classified_correctly(server: Server, name: str) -> None:
    response = post_file(server, photo_bytes(name), f"{name}.jpg")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["prediction"]["label"] in TOP1[name]
    assert body["prediction"] == body["top_k"][0]
    assert len(body["top_k"]) == 5
    scores = [entry["score"] for entry in body["top_k"]]
    assert scores == sorted(scores, reverse=True)
    assert 0 < scores[0] <= 1


def test_top_k_parameter(server: Server) -> None:
    response = post_file(server, photo_bytes("chelsea"), top_k=12)
    assert response.status_code == 200
    assert len(response.json()["top_k"]) == 12
    assert {e["class_id"] for e in response.json()["top_k"][:3]} <= CAT_IDS


def test_base64_json_with_and_without_data_uri(server: Server) -> None:
    encoded = base64.b64encode(photo_bytes("coffee")).decode()
    for image in (encoded, f"data:image/jpeg;base64,{encoded}"):
        response = httpx.post(f"{server.url}/cls", json={"image": image}, timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["prediction"]["label"] == "espresso"


def test_the_readme_base64_command_works_for_a_photo_of_any_size(
    server: Server, tmp_path: Path
) -> None:
    image = Image.open(io.BytesIO(photo_bytes("coffee")))
    big = tmp_path / "coffee.jpg"
    big.write_bytes(encode(image.resize((image.width * 2, image.height * 2)), "JPEG", quality=95))
    assert big.stat().st_size > 200_000  # twice what a command line holds
    commands = console_commands(ROOT / "README.md", "## Quick start")
    [command] = [command for command, _ in commands if command.startswith("(printf")]
    command = command.replace("tests/data/coffee.jpg", str(big))
    command = command.replace("localhost:5001", server.url)
    answer = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout)["prediction"]["label"] == "espresso"


def test_the_readme_shows_batching_at_work(server: Server) -> None:
    commands = console_commands(ROOT / "README.md", "## How batching works")
    assert len(commands) == 3
    outputs = []
    for command, _ in commands:
        command = command.replace("localhost:5001", server.url)
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (command, done.stderr)
        outputs.append(done.stdout)
    histogram = json.loads(outputs[-1].replace("'", '"'))
    assert any(int(size) > 1 for size in histogram), histogram


@pytest.mark.anyio
async def test_different_images_sent_concurrently_get_their_own_answers(server: Server) -> None:
    names = [name for name in PHOTOS for _ in range(8)]
    random.Random(7).shuffle(names)
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        before = (await client.get("/metadata")).json()["stats"]["batch_size_histogram"]
        responses = await asyncio.gather(
            *(client.post("/cls", files={"file": (n, photo_bytes(n))}) for n in names)
        )
        after = (await client.get("/metadata")).json()["stats"]["batch_size_histogram"]
    for name, response in zip(names, responses, strict=True):
        assert response.status_code == 200, response.text
        assert response.json()["prediction"]["label"] in TOP1[name]
    grew = {size for size, count in after.items() if count > before.get(size, 0)}
    assert any(int(size) > 1 for size in grew), after


@pytest.mark.parametrize("variant", sorted(convertible_variants()))
def test_accepted_formats_and_pixel_modes_are_classified(server: Server, variant: str) -> None:
    response = post_file(server, convertible_variants()[variant], variant)
    assert response.status_code == 200, response.text
    assert response.json()["prediction"]["class_id"] in CAT_IDS


def chunks(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


class TestBadInput:
    def test_truncated_jpeg_is_400(self, server: Server) -> None:
        assert_error(post_file(server, truncated_jpeg()), 400, "truncated")

    def test_zero_bytes_is_400(self, server: Server) -> None:
        assert_error(post_file(server, b""), 400, "empty")

    def test_png_claiming_50000_squared_pixels_is_413(self, server: Server) -> None:
        assert_error(post_file(server, png_claiming(50000, 50000), "bomb.png"), 413, "50000x50000")

    def test_text_file_is_415(self, server: Server) -> None:
        assert_error(post_file(server, b"just some text\n" * 20, "notes.txt"), 415, "JPEG")

    def test_upload_over_limit_with_content_length_is_413(self, server: Server) -> None:
        response = post_file(server, b"\xff" * 3_000_000)
        assert_error(response, 413, "MAX_UPLOAD_BYTES")

    @pytest.mark.parametrize(
        ("mode", "size"),
        [("content-length", 6_000_000), ("chunked", 6_000_000), ("content-length", 65 << 20)],
    )
    def test_upload_over_limit_reaches_a_client_that_sends_everything_first(
        self, server: Server, mode: str, size: int
    ) -> None:
        """urllib writes the whole body before it reads, and says Connection: close: a
        server that answers and closes early resets it before it sees the answer. However
        large the body: the server reads for a time, not a number of bytes."""
        body = b"\xff" * size
        data: bytes | Iterator[bytes] = body if mode == "content-length" else chunks(body)
        request = urllib.request.Request(
            f"{server.url}/cls", data=data, headers={"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 413
        assert "MAX_UPLOAD_BYTES" in json.loads(refused.value.read())["detail"]

    def test_a_stalled_oversized_upload_is_answered_within_the_discard_time(
        self, server: Server
    ) -> None:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(
                b"POST /cls HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 5000000\r\n\r\n" + b"\xff" * 1000
            )
            started = time.monotonic()
            # The stalled sender holds no worker: others are served meanwhile.
            assert httpx.get(f"{server.url}/health/live", timeout=2).status_code == 200
            answer = sock.recv(4096)
            waited = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 413"), answer
        assert waited < DISCARD_IDLE_SECONDS + 5

    def test_upload_over_limit_without_content_length_is_413(self, server: Server) -> None:
        body = b"\xff" * 3_000_000
        response = httpx.post(
            f"{server.url}/cls",
            content=chunks(body),
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert "content-length" not in response.request.headers
        assert_error(response, 413, "MAX_UPLOAD_BYTES")

    def test_multipart_over_limit_without_content_length_is_413(self, server: Server) -> None:
        boundary = "b0undary"
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n".encode()
            + b"\xff" * 3_000_000
            + f"\r\n--{boundary}--\r\n".encode()
        )
        response = httpx.post(
            f"{server.url}/cls",
            content=chunks(body),
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
            timeout=30,
        )
        assert_error(response, 413, "MAX_UPLOAD_BYTES")

    def test_bad_base64_is_400(self, server: Server) -> None:
        response = httpx.post(f"{server.url}/cls", json={"image": "not base64 !!"}, timeout=30)
        assert_error(response, 400, "base64")

    def test_invalid_json_is_400(self, server: Server) -> None:
        response = httpx.post(
            f"{server.url}/cls",
            content=b"{not json",
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert_error(response, 400, "JSON")

    def test_missing_file_field_is_422(self, server: Server) -> None:
        response = httpx.post(
            f"{server.url}/cls", files={"image": ("a.jpg", photo_bytes("chelsea"))}, timeout=30
        )
        assert_error(response, 422, "'file'")

    def test_missing_json_field_is_422(self, server: Server) -> None:
        response = httpx.post(f"{server.url}/cls", json={"picture": "abc"}, timeout=30)
        assert_error(response, 422, "'image'")

    def test_two_files_are_refused(self, server: Server) -> None:
        data = photo_bytes("chelsea")
        response = httpx.post(
            f"{server.url}/cls",
            files=[("file", ("a.jpg", data)), ("file", ("b.jpg", data))],
            timeout=30,
        )
        assert_error(response, 400, "files")

    def test_other_content_type_is_415(self, server: Server) -> None:
        response = httpx.post(
            f"{server.url}/cls",
            content=photo_bytes("chelsea"),
            headers={"content-type": "image/jpeg"},
            timeout=30,
        )
        assert_error(response, 415, "multipart/form-data")

    @pytest.mark.parametrize("top_k", [0, 21, "x"])
    def test_top_k_out_of_range_is_422(self, server: Server, top_k: object) -> None:
        response = post_file(server, photo_bytes("chelsea"), top_k=top_k)
        assert response.status_code == 422

    def test_server_still_serves_after_bad_input(self, server: Server) -> None:
        response = post_file(server, photo_bytes("rocket"))
        assert response.status_code == 200
        assert response.json()["prediction"]["label"] == "missile"


def test_health_and_metadata(server: Server) -> None:
    assert httpx.get(f"{server.url}/health/live").json() == {"status": "alive"}
    assert httpx.get(f"{server.url}/health/ready").status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200
    meta = httpx.get(f"{server.url}/metadata").json()
    assert meta["model"]["name"] == "efficientnet_lite0"
    assert meta["model"]["device"] == "cpu"
    assert meta["model"]["backend"] == "onnxruntime"
    assert meta["model"]["backend_fallback_reason"] is None
    # PRECISION=auto: int8, in this CPU's recipe, where it runs fast enough here.
    assert meta["model"]["int8_recipe"] == int8_recipe().name
    faster = meta["model"]["int8_speedup"] >= INT8_MIN_SPEEDUP
    assert meta["model"]["precision"] == ("int8" if faster else "float32")
    assert meta["model"]["precision_reason"].startswith("PRECISION=auto")
    # Decoding gets every core beside int8 (a light model), half of them beside float32.
    cores = Settings().cores_per_worker
    assert meta["decode"]["workers"] == (cores if faster else max(1, cores // 2))
    assert meta["model"]["num_labels"] == 1000
    assert meta["batching"] == {
        "max_batch_size": 8,
        "max_batch_size_setting": 8,
        "max_batch_delay_ms": 5.0,
        "max_queue_size": 256,
        "timeout": 2.0,
    }
    stats = meta["stats"]
    for counter in (
        "requests",
        "batches",
        "items",
        "dropped_expired",
        "dropped_cancelled",
        "rejected_full",
        "queue_depth",
        "batch_size_histogram",
    ):
        assert counter in stats
