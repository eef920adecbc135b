"""The bulk client against a real server."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from harness.server import ROOT, Server, running_server
from tests.images import PHOTOS, TOP1, photo_of, truncated_jpeg

pytestmark = pytest.mark.e2e


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    (images / "nested").mkdir(parents=True)
    for name, path in PHOTOS.items():
        shutil.copy(path, images / f"{name}.jpg")
        shutil.copy(path, images / "nested" / f"{name}-copy.JPG")
    (images / "README.txt").write_text("not an image, and not picked up by its suffix")
    return images


def run_client(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "client", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def read_jsonl(path: Path) -> dict[str, dict]:  # type: ignore[type-arg]
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return {Path(line["path"]).name: line for line in lines}


@pytest.mark.parametrize("mode", ["jobs", "cls"])
def test_client_classifies_a_folder_into_jsonl(
    server: Server, folder: Path, tmp_path: Path, mode: str
) -> None:
    out = tmp_path / "results.jsonl"
    result = run_client(
        str(folder), "--url", server.url, "--mode", mode, "--out", str(out), "--job-size", "4"
    )
    assert result.returncode == 0, result.stderr
    lines = read_jsonl(out)
    assert len(lines) == 6
    for name, line in lines.items():
        assert line["label"] in TOP1[name.split("-")[0].split(".")[0]]
        assert 0 < line["score"] <= 1
        assert len(line["top_k"]) == 5
    # The progress bar rendered, with its rate.
    assert "6/6" in result.stderr
    assert "img/s" in result.stderr
    assert "all 6 images classified" in result.stderr


@pytest.mark.parametrize("mode", ["jobs", "cls"])
def test_client_exits_non_zero_and_summarises_a_corrupt_file(
    server: Server, folder: Path, mode: str
) -> None:
    (folder / "broken.jpg").write_bytes(truncated_jpeg())
    result = run_client(str(folder), "--url", server.url, "--mode", mode)
    assert result.returncode == 1
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 7
    [broken] = [line for line in lines if line["path"].endswith("broken.jpg")]
    assert broken["error"]["status"] == 400
    assert "1 of 7 images failed" in result.stderr
    assert "broken.jpg" in result.stderr


def test_client_retries_503_after_retry_after(folder: Path, tmp_path: Path) -> None:
    env = {"MAX_QUEUE_SIZE": "1", "MAX_BATCH_SIZE": "1"}
    with running_server(env, tmp_path / "server.log") as server:
        out = tmp_path / "results.jsonl"
        result = run_client(
            str(folder),
            "--url",
            server.url,
            "--mode",
            "cls",
            "--concurrency",
            "6",
            "--out",
            str(out),
        )
        meta = httpx.get(f"{server.url}/metadata").json()
    assert result.returncode == 0, result.stderr
    assert len(read_jsonl(out)) == 6
    refused = meta["stats"]["rejected_full"] + meta["decode"]["rejected_full"]
    assert refused > 0, "no 503 was provoked, so no retry was tested"


def test_client_keeps_each_job_within_the_servers_max_job_bytes(
    folder: Path, tmp_path: Path
) -> None:
    # The six photos (35-72 KB) would be one job of about 320 KB.
    with running_server({"MAX_JOB_BYTES": "150000"}, tmp_path / "server.log") as server:
        out = tmp_path / "results.jsonl"
        result = run_client(str(folder), "--url", server.url, "--out", str(out))
        log = server.output()
    assert result.returncode == 0, result.stderr
    lines = read_jsonl(out)
    assert {name: photo_of(line["label"]) for name, line in lines.items()} == {
        name: name.split("-")[0].split(".")[0] for name in lines
    }
    assert len(lines) == 6
    assert log.count("POST /jobs 202") >= 3
    assert "POST /jobs 413" not in log
