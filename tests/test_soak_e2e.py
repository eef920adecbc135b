"""A soak: bad and unlucky input of every kind the hardening tests name, interleaved with
good /cls requests and jobs, for minutes against one real server. Every good request
succeeds, every bad one gets its status with a JSON detail, the server's resident
memory stays flat, and it logs no ERROR.

SOAK_SECONDS sets the length (120 s by default).
"""

import itertools
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from harness.server import Server, running_server
from tests.helpers import connect, photos, poll_until_finished, read_to_end, submit
from tests.images import TOP1, encode, photo_bytes, png_claiming, truncated_jpeg

pytestmark = pytest.mark.e2e

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "120"))
MB = 1024 * 1024


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise KeyError("VmRSS")


class Soak:
    """The actions, each asserting what a client must see."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.url = server.url
        self.big_gray = encode(Image.fromarray(np.zeros((4000, 4000), dtype=np.uint16)), "PNG")
        self.finished_job: str | None = None

    def upload(self, data: bytes, expected: int) -> httpx.Response:
        files = {"file": ("upload.bin", data)}
        response = httpx.post(f"{self.url}/cls", files=files, timeout=60)
        assert response.status_code == expected, (expected, response.text[:300])
        if expected != 200:
            assert response.json()["detail"]
        return response

    def good_cls(self) -> None:
        response = self.upload(photo_bytes("coffee"), 200)
        assert response.json()["prediction"]["label"] in TOP1["coffee"]

    def good_job(self) -> None:
        job = submit(self.server, photos(["chelsea", "coffee"]))
        states = poll_until_finished(self.server, job["job_id"])
        assert states[-1]["status"] == "succeeded", states[-1]
        self.finished_job = job["job_id"]

    def truncated(self) -> None:
        self.upload(truncated_jpeg(), 400)

    def not_an_image(self) -> None:
        self.upload(b"hello, this is text", 415)

    def empty(self) -> None:
        self.upload(b"", 400)

    def too_many_pixels(self) -> None:
        self.upload(png_claiming(100_000, 100_000), 413)

    def sixteen_bit(self) -> None:
        self.upload(self.big_gray, 200)

    def too_large(self) -> None:
        self.upload(bytes(11 * MB), 413)

    def post_json(self, body: bytes, expected: int) -> None:
        headers = {"content-type": "application/json"}
        response = httpx.post(f"{self.url}/cls", content=body, headers=headers, timeout=60)
        assert response.status_code == expected, response.text[:300]
        assert response.json()["detail"]

    def nested_json(self) -> None:
        self.post_json(b'{"image": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400)

    def tiny_values(self) -> None:
        self.post_json(b'{"image": [' + b"{}," * 300_000 + b"{}]}", 413)

    def huge_content_length(self) -> None:
        with connect(self.server) as sock:
            sock.sendall(
                b"POST /cls HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                b"boundary=b\r\nContent-Length: 1000000000000000000\r\n\r\n--b\r\n"
            )
            answer, _ = read_to_end(sock)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]

    def half_a_head(self) -> None:
        with connect(self.server) as sock:
            sock.sendall(b"POST /cls HTTP/1.1\r\nHost: x\r\n")
            answer, _ = read_to_end(sock)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]

    def stalled_body(self) -> None:
        with connect(self.server) as sock:
            sock.sendall(
                b"POST /cls HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                b"boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n"
                b'Content-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
            )
            answer, _ = read_to_end(sock)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]

    def events_past_the_end(self) -> None:
        if self.finished_job is None:
            return
        url = f"{self.url}/jobs/{self.finished_job}/events"
        headers = {"Last-Event-ID": "1000000"}
        with httpx.stream("GET", url, headers=headers, timeout=10) as response:
            assert response.status_code == 200
            text = "".join(response.iter_text())  # it closes after the final event
        assert "event: done" in text or "succeeded" in text, text[:300]

    def idempotency_conflict(self) -> None:
        key = f"soak-{threading.get_ident()}-{time.monotonic_ns()}"
        files = [("files", ("a.jpg", photo_bytes("rocket")))]
        first = httpx.post(
            f"{self.url}/jobs", files=files, headers={"Idempotency-Key": key}, timeout=60
        )
        assert first.status_code == 202, first.text
        other = [("files", ("b.jpg", photo_bytes("coffee")))]
        again = httpx.post(
            f"{self.url}/jobs", files=other, headers={"Idempotency-Key": key}, timeout=60
        )
        assert again.status_code == 422, again.text
        assert again.json()["detail"]


def test_mixed_bad_input_for_minutes_leaves_the_server_serving_and_flat(tmp_path: Path) -> None:
    env = {
        "TIMEOUT": "10",
        "HEADER_TIMEOUT_S": "1",
        "BODY_TIMEOUT_S": "1",
        "MIN_BODY_RATE": "50000",
        "MAX_BATCH_SIZE": "8",
    }
    with running_server(env, tmp_path / "server.log") as server:
        soak = Soak(server)
        actions: list[Callable[[], None]] = [
            soak.good_cls,
            soak.truncated,
            soak.good_cls,
            soak.not_an_image,
            soak.empty,
            soak.good_job,
            soak.too_many_pixels,
            soak.sixteen_bit,
            soak.good_cls,
            soak.too_large,
            soak.nested_json,
            soak.tiny_values,
            soak.good_cls,
            soak.huge_content_length,
            soak.half_a_head,
            soak.stalled_body,
            soak.events_past_the_end,
            soak.idempotency_conflict,
        ]
        done: Counter[str] = Counter()
        failures: list[str] = []
        lock = threading.Lock()
        cycle = itertools.cycle(actions)
        started = time.monotonic()
        deadline = started + SOAK_SECONDS
        samples: list[tuple[float, int]] = []

        def client() -> None:
            while time.monotonic() < deadline:
                with lock:
                    action = next(cycle)
                try:
                    action()
                except Exception as exc:  # recorded, so one failure does not end the soak
                    with lock:
                        failures.append(f"{action.__name__}: {type(exc).__name__}: {exc}")
                with lock:
                    done[action.__name__] += 1
                    samples.append((time.monotonic() - started, rss(server.process.pid)))

        with ThreadPoolExecutor(4) as pool:
            for future in [pool.submit(client) for _ in range(4)]:
                future.result()
        assert not failures, failures[:10]
        assert set(done) == {action.__name__ for action in actions}, done
        assert done["good_cls"] >= 20, done
        # Flat: the last third of the soak peaks within 100 MB of the second third's peak
        # (the first third is when the allocator's arenas first fill).
        third = SOAK_SECONDS / 3
        middle = max(value for at, value in samples if third <= at < 2 * third)
        last = max(value for at, value in samples if at >= 2 * third)
        assert last < middle + 100 * MB, (middle / MB, last / MB)
        print(
            f"soak: {sum(done.values())} requests, {dict(done)}; RSS peak {middle / MB:.0f} MB "
            f"in the second third, {last / MB:.0f} MB in the last"
        )
        errors = [line for line in server.output().splitlines() if " ERROR " in line]
        assert not errors, errors[:10]
