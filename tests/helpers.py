"""What the end-to-end tests share: talking to a real server about jobs, reading its
metrics, raw sockets, a set of replicas on one Redis, and an app served in-process."""

import asyncio
import contextlib
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from api.protocol import AdmissionProtocol
from classification.settings import ClassificationSettings
from harness.server import Server, free_port, launch, stop, wait_ready
from settings import Settings
from tests.images import photo_bytes
from tests.services import RedisServer

EVERY_SETTING = {
    name.upper() for name in [*Settings.model_fields, *ClassificationSettings.model_fields]
}
"""Every environment variable the server reads: its own, and the built-in tasks'."""


def submit(server: Server, parts: list[tuple[str, bytes]]) -> dict[str, Any]:
    files = [("files", (name, data)) for name, data in parts]
    response = httpx.post(f"{server.url}/jobs", files=files, timeout=60)
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["location"] == f"/jobs/{body['job_id']}"
    assert body["status"] == "queued"
    assert body["total"] == len(parts)
    return body


def photos(names: list[str]) -> list[tuple[str, bytes]]:
    return [(f"{name}.jpg", photo_bytes(name)) for name in names]


def poll_until_finished(server: Server, job_id: str, timeout: float = 120) -> list[dict[str, Any]]:
    """Every distinct state seen while polling another process; there is nothing to await."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{server.url}/jobs/{job_id}", timeout=10).json()
        if (
            not seen
            or job["progress"] != seen[-1]["progress"]
            or job["status"] != seen[-1]["status"]
        ):
            seen.append(job)
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return seen
        time.sleep(0.02)
    raise TimeoutError(seen[-1] if seen else job_id)


def read_events(
    server: Server, job_id: str, last_event_id: str | None = None, stop_after: int | None = None
) -> list[tuple[str | None, str, dict[str, Any]]]:
    """(id, event, data) of each event until the stream closes or ``stop_after`` events."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events: list[tuple[str | None, str, dict[str, Any]]] = []
    with httpx.stream(
        "GET", f"{server.url}/jobs/{job_id}/events", headers=headers, timeout=60
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        event_id, kind = None, "message"
        for line in response.iter_lines():
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((event_id, kind, json.loads(line[6:])))
                event_id, kind = None, "message"
                if stop_after is not None and len(events) >= stop_after:
                    break
    return events


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def connect(server: Server) -> socket.socket:
    port = int(server.url.rsplit(":", 1)[1])
    return socket.create_connection(("127.0.0.1", port), timeout=15)


def read_to_end(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    started, answer = time.monotonic(), b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer, time.monotonic() - started


NAMES = ["chelsea", "coffee", "rocket"]


def replica_env(redis: RedisServer, prefix: str, **extra: str) -> dict[str, str]:
    return {
        "JOB_STORE": "redis",
        "REDIS_URL": redis.url,
        "REDIS_PREFIX": prefix,
        "MAX_BATCH_SIZE": "8",
        "SSE_HEARTBEAT_S": "0.5",
        "JOB_CLAIM_IDLE_S": "2",
        "JOB_TTL_S": "30",
        **extra,
    }


@contextmanager
def replicas(env: dict[str, str], directory: Path, count: int) -> Iterator[list[Server]]:
    servers = [launch(env, directory / f"replica-{i}.log") for i in range(count)]
    try:
        for server in servers:
            wait_ready(server)
        yield servers
    finally:
        for server in servers:
            stop(server)


def job(server: Server, job_id: str) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/jobs/{job_id}", timeout=10)
    assert response.status_code == 200, response.text
    return dict(response.json())


def wait_for(server: Server, job_id: str, condition: str, timeout: float = 120) -> dict[str, Any]:
    """Polls another process until ``condition`` ("done >= N" or "finished") holds."""
    deadline = time.monotonic() + timeout
    while True:
        state = job(server, job_id)
        if condition == "finished":
            if state["status"] in ("succeeded", "failed", "cancelled"):
                return state
        elif state["progress"]["done"] >= int(condition.removeprefix("done >= ")):
            return state
        assert time.monotonic() < deadline, state["progress"]
        time.sleep(0.05)


class Spy:
    """Wraps an app and records the path of every HTTP request that reaches it."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.paths: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.paths.append(scope["path"])
        await self.app(scope, receive, send)


@contextlib.asynccontextmanager
async def serve(app: Spy, **options: Any) -> AsyncIterator[str]:
    """``app`` behind uvicorn in this process, on a free port, with the protocol main.run
    and the worker use unless ``options`` say otherwise; yields its base URL once the
    models are warm."""
    port = free_port()
    options = {"http": AdmissionProtocol, "log_level": "warning", **options}
    config = uvicorn.Config(app, host="127.0.0.1", port=port, **options)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 60
    while not server.started:  # uvicorn offers no event for this
        assert not serving.done(), "uvicorn stopped while starting"
        assert time.monotonic() < deadline, "uvicorn did not start within a minute"
        await asyncio.sleep(0.02)
    await asyncio.wait_for(app.app.state.engine.warmed_up.wait(), timeout=60)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await serving


def console_commands(markdown: Path, heading: str) -> list[tuple[str, list[str]]]:
    """The ``$ `` commands of the console blocks under ``heading`` (a line of
    ``markdown``, up to the next heading; blocks indented in a list too), each with its
    continuation lines joined and the output lines shown under it."""
    lines = markdown.read_text().splitlines()
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("#")), len(lines))
    commands: list[tuple[str, list[str]]] = []
    in_console = continued = False
    for line in (raw.strip() for raw in lines[start:end]):
        if line.startswith("```"):
            in_console = line == "```console"
            continued = False
        elif in_console and (line.startswith("$ ") or continued):
            if continued:
                commands[-1] = (commands[-1][0] + "\n" + line, [])
            else:
                commands.append((line.removeprefix("$ "), []))
            continued = line.endswith("\\")
        elif in_console and commands:
            commands[-1][1].append(line)
    return commands


def python_blocks(markdown: Path, heading: str) -> list[str]:
    """The ``python`` code blocks under ``heading`` (a line of ``markdown``), up to the
    next heading of the same or a higher level."""
    lines = markdown.read_text().splitlines()
    start = lines.index(heading) + 1
    level = heading.split(" ", 1)[0]
    end = next(
        (
            i
            for i in range(start, len(lines))
            if lines[i].split(" ", 1)[0] in {"#" * n for n in range(1, len(level) + 1)}
        ),
        len(lines),
    )
    blocks: list[str] = []
    current: list[str] | None = None
    for line in lines[start:end]:
        if line.startswith("```"):
            if current is not None:
                blocks.append("\n".join(current) + "\n")
                current = None
            elif line == "```python":
                current = []
        elif current is not None:
            current.append(line)
    return blocks
