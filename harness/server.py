"""Starts the real server in a subprocess on a free port, for end-to-end tests."""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` different ports free now: each socket is held until all are chosen."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log: Path
    grpc_target: str = ""  # host:port of its gRPC service, "" when off

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def wait_ready(server: Server, timeout: float = 120, path: str = "/health/ready") -> None:
    """Polls ``path`` until it answers 200: there is no event to await across the
    process boundary.

    One client for every poll: ``httpx.get`` builds a client, TLS context included, each
    time, which took 30 ms of CPU per poll, a quarter of a core beside a warm-up that
    times the model to choose its batch size."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2) as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(
                    f"server exited with {server.process.returncode}:\n{server.output()}"
                )
            try:
                if client.get(server.url + path).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"server not ready after {timeout}s:\n{server.output()}")


UVICORN = [sys.executable, "main.py"]
GUNICORN = [sys.executable, "-m", "gunicorn", "main:app", "-c", "gunicorn_config.py"]


def launch(
    env: dict[str, str], log: Path, port: int | None = None, command: list[str] = UVICORN
) -> Server:
    chosen, grpc_port = free_ports(2)
    port = port or chosen
    full_env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "GRPC_PORT": str(grpc_port),  # never the default: servers side by side
        **env,
    }
    full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT
        )
    served = full_env["GRPC_PORT"]
    grpc_target = f"127.0.0.1:{served}" if served != "0" else ""
    return Server(process, f"http://127.0.0.1:{port}", log, grpc_target)


def stop(server: Server, timeout: float = 30) -> int:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    return server.process.returncode


@contextmanager
def running_server(
    env: dict[str, str], log: Path, command: list[str] = UVICORN
) -> Iterator[Server]:
    server = launch(env, log, command=command)
    try:
        wait_ready(server)
        yield server
    finally:
        stop(server)
