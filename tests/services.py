"""The services of harness/services.py for tests: a missing program skips the test
locally and fails it under CI (CI=true)."""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from harness.services import MissingProgram, RedisServer, find_program
from harness.services import redis_server as _redis_server

__all__ = ["RedisServer", "redis_server", "require"]


def require(program: str) -> str:
    """The program's path; skips the test when it is missing, except under CI."""
    try:
        return find_program(program)
    except MissingProgram as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{exc} (on this CI machine)")
        pytest.skip(str(exc))


@contextmanager
def redis_server(directory: Path, fsync: str = "always") -> Iterator[RedisServer]:
    require("redis-server")
    with _redis_server(directory, fsync) as server:
        yield server
