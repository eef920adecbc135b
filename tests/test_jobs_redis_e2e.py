"""Jobs across replicas: real server processes sharing a real redis-server.

The same topology as docker-compose.scale.yml, without Docker: Redis with its
append-only file, replicas on their own ports, and the faults a deployment meets (a
replica killed or stopped mid-job, Redis paused or killed and restarted)."""

import asyncio
import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.server import GUNICORN, Server, running_server
from jobs import RedisJobStore, StoreLimits
from serving.service import pack_job_item
from tests.helpers import NAMES, job, read_events, replica_env, replicas, wait_for
from tests.images import TOP1, photo_bytes, photo_of
from tests.services import RedisServer, redis_server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def redis_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def cluster(
    redis_service: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, list[Server]]]:
    """Replicas A and B on one Redis, with a key prefix of their own."""
    prefix = f"e2e-{uuid.uuid4().hex[:6]}"
    env = replica_env(redis_service, prefix, MAX_JOBS="3", JOB_TTL_S="4")
    with replicas(env, tmp_path_factory.mktemp("cluster"), 2) as servers:
        yield prefix, servers


def submit(server: Server, names: list[str], **headers: str) -> dict[str, Any]:
    files = [("files", (f"{name}.jpg", photo_bytes(name))) for name in names]
    response = httpx.post(f"{server.url}/jobs", files=files, headers=headers, timeout=60)
    assert response.status_code == 202, response.text
    return dict(response.json())


def assert_every_item_once_and_correct(
    server: Server, job_id: str, names: list[str]
) -> dict[str, Any]:
    final = wait_for(server, job_id, "finished")
    assert final["status"] == "succeeded", final["progress"]
    assert final["progress"] == {"done": len(names), "failed": 0, "total": len(names)}
    labels = [result["prediction"]["label"] for result in final["results"]]
    assert [photo_of(label) for label in labels] == names
    events = read_events(server, job_id)
    indexes = [data["index"] for _, kind, data in events if kind == "progress"]
    assert sorted(indexes) == list(range(len(names))), "an item was recorded twice or never"
    assert [int(event_id or 0) for event_id, _, _ in events] == list(range(1, len(names) + 2))
    return final


def test_a_job_submitted_on_one_replica_is_read_and_resumed_on_the_other(
    cluster: tuple[str, list[Server]],
) -> None:
    _, (a, b) = cluster
    names = NAMES * 4
    created = submit(a, names)
    first = read_events(b, created["job_id"], stop_after=3)
    assert [int(event_id or 0) for event_id, _, _ in first] == [1, 2, 3]
    rest = read_events(a, created["job_id"], last_event_id="3")
    assert [int(event_id or 0) for event_id, _, _ in rest] == list(range(4, len(names) + 2))
    assert rest[-1][1] == "done"
    for _, kind, data in first + rest[:-1]:
        assert kind == "progress"
        assert data["result"]["prediction"]["label"] in TOP1[names[data["index"]]]
    assert_every_item_once_and_correct(b, created["job_id"], names)
    # Both replicas computed items of the job.
    computed = [httpx.get(f"{s.url}/metadata").json()["stats"]["items"] for s in (a, b)]
    assert all(count > 0 for count in computed), computed


def test_a_jobs_options_reach_the_replica_that_computes_each_item(
    cluster: tuple[str, list[Server]],
) -> None:
    _, (a, b) = cluster
    names = NAMES * 4
    files = [("files", (f"{name}.jpg", photo_bytes(name))) for name in names]
    response = httpx.post(f"{a.url}/cls/jobs?top_k=3", files=files, timeout=60)
    assert response.status_code == 202, response.text
    final = assert_every_item_once_and_correct(b, response.json()["job_id"], names)
    assert [len(result["top_k"]) for result in final["results"]] == [3] * len(names)


def test_cancel_on_one_replica_stops_items_in_flight_on_the_other(
    cluster: tuple[str, list[Server]],
) -> None:
    _, (a, b) = cluster
    created = submit(a, ["chelsea"] * 300)
    wait_for(b, created["job_id"], "done >= 20")
    response = httpx.post(f"{b.url}/jobs/{created['job_id']}/cancel", timeout=10)
    assert response.status_code == 202
    assert response.json()["status"] == "cancelled"
    done_at_cancel = response.json()["progress"]["done"]

    def computed() -> list[int]:
        return [httpx.get(f"{s.url}/metadata").json()["stats"]["items"] for s in (a, b)]

    deadline = time.monotonic() + 5
    while any(httpx.get(f"{s.url}/metadata").json()["jobs"]["in_flight"] for s in (a, b)):
        assert time.monotonic() < deadline, "items of the cancelled job are still in flight"
        time.sleep(0.05)
    settled = computed()
    time.sleep(1.0)  # time in which a job still running would compute tens of items
    assert computed() == settled
    final = job(a, created["job_id"])
    assert final["status"] == "cancelled"
    assert final["progress"]["done"] == done_at_cancel < 300


def test_max_jobs_holds_across_replicas_and_keys_expire(
    cluster: tuple[str, list[Server]], redis_service: RedisServer
) -> None:
    prefix, (a, b) = cluster
    # Three jobs of 300 images: about 9 s of work for the two replicas, so all three
    # are still live when the fourth is refused.
    jobs = [submit((a, b)[i % 2], ["chelsea"] * 300)["job_id"] for i in range(3)]
    for server in (a, b):
        response = httpx.post(f"{server.url}/jobs", files=[("files", ("x.jpg", b"x"))])
        assert response.status_code == 503
        assert "MAX_JOBS" in response.json()["detail"]
        assert response.headers["retry-after"] == "1"
    for job_id in jobs:
        assert httpx.delete(f"{a.url}/jobs/{job_id}").status_code == 202, job(a, job_id)
    # A retried submission with the same Idempotency-Key is the same job, on any replica.
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = submit(a, ["rocket"], **key)
    again = httpx.post(
        f"{b.url}/jobs", files=[("files", ("r.jpg", photo_bytes("rocket")))], headers=key
    )
    assert again.status_code == 202
    assert again.json()["job_id"] == first["job_id"]
    assert again.headers["idempotent-replayed"] == "true"
    wait_for(b, first["job_id"], "finished")
    deadline = time.monotonic() + 20
    with redis_service.client() as client:
        while client.keys(f"{prefix}:job:*") or client.keys(f"{prefix}:idempotency:*"):
            assert time.monotonic() < deadline, client.keys(f"{prefix}:*")
            time.sleep(0.2)
        # The shared counters, work stream and finished-jobs index stay.
        shared = ["finished", "finished_bytes", "finished_sizes", "queued_bytes", "queued_items"]
        assert sorted(key.decode() for key in client.keys(f"{prefix}:*")) == [
            f"{prefix}:{name}" for name in [*shared, "work"]
        ]
        assert int(client.get(f"{prefix}:queued_items") or 0) == 0
        assert int(client.get(f"{prefix}:queued_bytes") or 0) == 0
    assert httpx.get(f"{a.url}/jobs/{jobs[0]}").status_code == 404


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_a_job_survives_a_replica_that_dies_or_stops_mid_way(
    redis_service: RedisServer, tmp_path: Path, how: signal.Signals
) -> None:
    env = replica_env(redis_service, f"die-{uuid.uuid4().hex[:6]}")
    with replicas(env, tmp_path, 2) as (survivor, victim):
        # Enough that the job is still running when the victim goes (with int8 on 2 cores,
        # 210 items took about a second).
        names = NAMES * 200
        created = submit(victim, names)
        wait_for(survivor, created["job_id"], "done >= 30")
        assert httpx.get(f"{victim.url}/metadata").json()["jobs"]["in_flight"] > 0
        os.kill(victim.process.pid, how)
        assert victim.process.wait(30) in (0, -how)
        final = assert_every_item_once_and_correct(survivor, created["job_id"], names)
        assert final["status"] == "succeeded"  # a deploy never cancels a job
        if how == signal.SIGKILL:
            assert "took over" in survivor.output()


def test_a_poison_item_ends_as_its_own_error(redis_service: RedisServer, tmp_path: Path) -> None:
    """An image that every replica died on: staged in Redis as a delivery to a replica
    that is gone, already delivered JOB_MAX_DELIVERIES times."""
    prefix = f"poison-{uuid.uuid4().hex[:6]}"
    store = RedisJobStore(
        redis_service.url,
        prefix=prefix,
        limits=StoreLimits(10, 100, 10_000_000),
        ttl_s=60,
        timeout_s=2,
        claim_idle_s=2,
    )

    async def stage() -> tuple[str, str]:
        await store.start()
        try:
            images = [photo_bytes("coffee"), b"poison", photo_bytes("rocket")]
            summary, _ = await store.create([pack_job_item(i) for i in images], task="cls")
            items = await store.take(3, 1)
            poison = next(item for item in items if item.index == 1)
            await store.release([item for item in items if item.index != 1])
            return str(summary["job_id"]), poison.handle
        finally:
            await store.close()

    job_id, handle = asyncio.run(stage())
    with redis_service.client() as client:
        client.execute_command(
            "XCLAIM", store.work_key, "replicas", "gone", 0, handle,
            "IDLE", 60_000, "RETRYCOUNT", 2,
        )  # fmt: skip
    env = replica_env(redis_service, prefix, JOB_MAX_DELIVERIES="2")
    with replicas(env, tmp_path, 1) as (server,):
        final = wait_for(server, job_id, "finished", timeout=60)
    assert final["status"] == "succeeded"
    assert final["progress"] == {"done": 3, "failed": 1, "total": 3}
    assert final["results"][0]["prediction"]["label"] == "espresso"
    assert final["results"][2]["prediction"]["label"] == "missile"
    assert "JOB_MAX_DELIVERIES" in final["results"][1]["error"]["detail"]


def test_redis_paused_then_killed_and_restarted(tmp_path: Path) -> None:
    """Redis hangs for 10 s, then dies and comes back from its append-only file: /cls
    answers throughout, /jobs answers 503 fast, and the job completes, each item once."""
    with ExitStack() as stack:
        redis = stack.enter_context(redis_server(tmp_path))
        env = replica_env(redis, "outage")
        (server,) = stack.enter_context(replicas(env, tmp_path, 1))
        names = NAMES * 100
        created = submit(server, names)
        wait_for(server, created["job_id"], "done >= 20")
        assert redis.process is not None
        redis.process.send_signal(signal.SIGSTOP)
        try:
            paused_until = time.monotonic() + 10
            slowest_jobs = 0.0
            with httpx.Client(base_url=server.url, timeout=30) as client:
                while time.monotonic() < paused_until:
                    response = client.post("/cls", files={"file": ("c.jpg", photo_bytes("coffee"))})
                    assert response.status_code == 200
                    assert client.get("/health/ready").status_code == 200
                    started = time.monotonic()
                    response = client.get(f"/jobs/{created['job_id']}")
                    slowest_jobs = max(slowest_jobs, time.monotonic() - started)
                    assert response.status_code == 503
                    assert "retry-after" in response.headers
                    assert "Redis" in response.json()["detail"]
        finally:
            redis.process.send_signal(signal.SIGCONT)
        assert slowest_jobs < 2.5, f"a /jobs call took {slowest_jobs:.1f} s with Redis paused"
        wait_for(server, created["job_id"], "done >= 60")
        redis.kill()
        time.sleep(1)
        redis.start()
        assert_every_item_once_and_correct(server, created["job_id"], names)
        with redis.client() as client:
            assert client.config_get("appendonly") == {"appendonly": "yes"}


def test_gunicorn_with_two_workers_answers_every_poll(
    redis_service: RedisServer, tmp_path: Path
) -> None:
    env = replica_env(redis_service, f"gunicorn-{uuid.uuid4().hex[:6]}", WORKERS="2")
    with running_server(env, tmp_path / "gunicorn.log", command=GUNICORN) as server:
        deadline = time.monotonic() + 120
        while server.output().count("warm-up done") < 2:
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.1)
        names = NAMES * 14
        created = submit(server, names[:40])
        statuses = []
        for _ in range(20):
            # A fresh connection each time, as a new user's curl would make.
            response = httpx.get(
                f"{server.url}/jobs/{created['job_id']}", headers={"Connection": "close"}
            )
            statuses.append(response.status_code)
        assert statuses == [200] * 20
        assert_every_item_once_and_correct(server, created["job_id"], names[:40])
        pollers = set(re.findall(r"INFO (\d+) access: GET /jobs/\S+ 200", server.output()))
        assert len(pollers) == 2, "one worker answered every poll; that proves nothing"
