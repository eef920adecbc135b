"""docker-compose.scale.yml's topology as local processes: Redis, two replicas and
HAProxy running deploy/haproxy/haproxy.cfg, with a job pushed through the balancer."""

import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from harness.server import ROOT, Server, free_port, stop
from tests.helpers import NAMES, replica_env, replicas, wait_for
from tests.images import photo_bytes, photo_of
from tests.services import redis_server, require

pytestmark = pytest.mark.e2e

CONFIG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"


def local_config(port: int, grpc_port: int, replicas: list[Server]) -> str:
    """The deployed config with local ports and replicas in place of Docker's names."""
    text = CONFIG.read_text()
    for deployed, local in (("5001", port), ("5002", grpc_port)):
        assert f"    bind :{deployed}" in text
        text = text.replace(f"    bind :{deployed}", f"    bind 127.0.0.1:{local}")
    templates = [line for line in text.splitlines() if "server-template" in line]
    [http] = [line for line in templates if "classifier:5001" in line]
    [grpc] = [line for line in templates if "classifier:5002" in line]
    assert "proto h2" in grpc
    addresses = [server.url.removeprefix("http://") for server in replicas]
    http_servers = [f"    server replica{i} {a} check" for i, a in enumerate(addresses)]
    grpc_servers = [
        f"    server replica{i} {server.grpc_target} check port {a.rpartition(':')[2]} proto h2"
        for i, (server, a) in enumerate(zip(replicas, addresses, strict=True))
    ]
    text = text.replace(http, "\n".join(http_servers))
    return text.replace(grpc, "\n".join(grpc_servers))


@contextmanager
def haproxy(config: Path, port: int) -> Iterator[str]:
    program = require("haproxy")
    check = subprocess.run([program, "-c", "-f", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    log = config.with_suffix(".log")
    with log.open("wb") as out:
        process = subprocess.Popen([program, "-db", "-f", str(config)], stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:  # up, with both replicas passing their health checks
            try:
                if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(10)


def test_a_job_goes_through_the_load_balancer(tmp_path: Path) -> None:
    with redis_server(tmp_path) as redis:
        env = replica_env(redis, f"lb-{uuid.uuid4().hex[:6]}")
        with replicas(env, tmp_path, 2) as servers:
            port, grpc_port = free_port(), free_port()
            config = tmp_path / "haproxy.cfg"
            config.write_text(local_config(port, grpc_port, servers))
            with haproxy(config, port) as url:
                lb = Server(servers[0].process, url, config.with_suffix(".log"))
                names = NAMES * 10
                files = [("files", (f"{n}.jpg", photo_bytes(n))) for n in names]
                created = httpx.post(f"{url}/jobs", files=files, timeout=60).json()
                events = []
                with httpx.stream("GET", f"{url}/jobs/{created['job_id']}/events") as stream:
                    for line in stream.iter_lines():
                        if line.startswith("event: "):
                            events.append(line[7:])
                assert events == ["progress"] * len(names) + ["done"]
                final = wait_for(lb, created["job_id"], "finished")
                assert final["status"] == "succeeded"
                labels = [r["prediction"]["label"] for r in final["results"]]
                assert [photo_of(label) for label in labels] == names
                # gRPC through the balancer, over h2c, to both replicas.
                client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
                image = grpcclient.InferInput("image", [1, 1], "BYTES")
                image.set_data_from_numpy(np.array([[photo_bytes("coffee")]], dtype=object))
                for _ in range(4):
                    answer = client.infer("cls", [image], parameters={"top_k": 1})
                    assert photo_of(answer.as_numpy("label")[0, 0].decode()) == "coffee"
                client.close()
                # One replica drains: the balancer's health check takes it out, and every
                # request still succeeds on the other.
                stop(servers[1])
                statuses = {
                    httpx.post(
                        f"{url}/cls", files={"file": ("c.jpg", photo_bytes("coffee"))}
                    ).status_code
                    for _ in range(20)
                }
                assert statuses == {200}
