"""The OpenAPI document against the real server: schemathesis generates requests from
/openapi.json, with every check, and any answer the document does not describe fails."""

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from harness.server import ROOT, Server, running_server

pytestmark = pytest.mark.e2e

CONFIG = ROOT / "tests" / "schemathesis.toml"


def test_the_server_answers_as_its_openapi_document_says(tmp_path: Path) -> None:
    env = {"MAX_UPLOAD_BYTES": "2000000", "MAX_BATCH_SIZE": "8"}
    with running_server(env, tmp_path / "server.log") as server:
        run = subprocess.run(
            [
                str(Path(sys.executable).parent / "st"),
                "--config-file",
                str(CONFIG),
                "run",
                f"{server.url}/openapi.json",
                "--checks",
                "all",
                "--max-examples",
                "20",
                "--generation-deterministic",  # the same cases on every run
                "--request-timeout",
                "30",
                "--no-color",
            ],
            cwd=tmp_path,  # its case cache (.schemathesis/) is written here, not in the repo
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert server.process.poll() is None
    report = run.stdout[run.stdout.find("SUMMARY") :]
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    assert "generated" in report
    assert "failed" not in report.split("Test cases:")[1]


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/jobs/0123", "DELETE, GET"),
        ("GET", "/cls", "POST"),
        ("POST", "/health/live", "GET"),
    ],
)
def test_a_405_names_every_method_the_path_takes(
    server: Server, method: str, path: str, allow: str
) -> None:
    response = httpx.request(method, f"{server.url}{path}", timeout=10)
    assert response.status_code == 405
    assert response.headers["allow"] == allow
    assert allow in response.json()["detail"]
