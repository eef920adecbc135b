"""Real services for the tests and the benchmark: a redis-server of their own, on a free
port in a temporary directory, bound to 127.0.0.1. Never a system service."""

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

from harness.server import free_port

INSTALL_HINT = (
    "run `make services` (Debian: apt-get install redis-server haproxy chromium chromium-driver"
    " qemu-user)"
)


class MissingProgram(Exception):
    """A service's program is not installed."""


def find_program(program: str) -> str:
    """The program's path, or MissingProgram saying how to install it."""
    path = shutil.which(program)
    if path is None:
        raise MissingProgram(f"{program} is not installed: {INSTALL_HINT}")
    return path


@dataclass
class RedisServer:
    port: int
    directory: Path
    # always: a test that kills Redis loses nothing; deployments use everysec.
    fsync: str = "always"
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> "redis.Redis":
        """A client for checks; close it when done."""
        return redis.Redis(port=self.port, socket_timeout=5)

    def start(self) -> None:
        """Starts (or restarts) the server on the same port and data directory, with the
        append-only file on, and waits until it answers and has loaded its data."""
        command = [
            find_program("redis-server"),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", self.fsync,
            "--save", "",
            "--maxmemory-policy", "noeviction",
        ]  # fmt: skip
        with (self.directory / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                with self.client() as client:
                    if client.ping():
                        return
            except redis.exceptions.BusyLoadingError:
                pass
            except redis.exceptions.ConnectionError:
                if self.process.poll() is not None:
                    raise RuntimeError((self.directory / "redis.log").read_text()) from None
            if time.monotonic() > deadline:
                raise TimeoutError("redis-server did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@contextmanager
def redis_server(directory: Path, fsync: str = "always") -> Iterator[RedisServer]:
    server = RedisServer(free_port(), directory, fsync)
    server.start()
    try:
        yield server
    finally:
        server.kill()
