"""The jobs section of the benchmark: images per second through /jobs with each store,
the Redis store's own cost per item, and /cls latency while a job runs.

    python bench/job_store_bench.py          (make bench runs it too)
"""

import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.server import Server, free_port, launch, stop, wait_ready  # noqa: E402
from harness.services import RedisServer, redis_server  # noqa: E402
from jobs import JobRunner, JobStore, MemoryJobStore, RedisJobStore, StoreLimits  # noqa: E402

PHOTOS = sorted((ROOT / "tests" / "data").glob("*.jpg"))
JOB_IMAGES = 300


def job_rate(entry: Server, images: list[bytes]) -> float:
    """Images per second from submission to the job's end, polled every 20 ms."""
    files = [("files", (f"{i}.jpg", data)) for i, data in enumerate(images)]
    started = time.perf_counter()
    job_id = httpx.post(f"{entry.url}/jobs", files=files, timeout=120).json()["job_id"]
    while httpx.get(f"{entry.url}/jobs/{job_id}", timeout=10).json()["status"] in (
        "queued",
        "running",
    ):
        time.sleep(0.02)
    return len(images) / (time.perf_counter() - started)


def cls_p95_ms(server: Server, count: int) -> float:
    photo = PHOTOS[0].read_bytes()
    latencies = []
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for _ in range(count):
            started = time.perf_counter()
            assert client.post("/cls", files={"file": ("p.jpg", photo)}).status_code == 200
            latencies.append(time.perf_counter() - started)
    return statistics.quantiles(latencies, n=20)[-1] * 1000


def cls_while_job(server: Server, images: list[bytes]) -> dict[str, float]:
    idle = cls_p95_ms(server, 40)
    files = [("files", (f"{i}.jpg", data)) for i, data in enumerate(images * 2)]
    job_id = httpx.post(f"{server.url}/jobs", files=files, timeout=120).json()["job_id"]
    busy = cls_p95_ms(server, 40)
    state = httpx.get(f"{server.url}/jobs/{job_id}").json()
    httpx.delete(f"{server.url}/jobs/{job_id}")
    return {
        "idle_p95_ms": round(idle, 1),
        "busy_p95_ms": round(busy, 1),
        "factor": round(busy / idle, 2),
        "job_done_meanwhile": state["progress"]["done"],
    }


async def seconds_per_job(store: JobStore, items: int) -> float:
    """A job of ``items`` 50 kB images from submission to its end through a JobRunner with
    the CPU's default concurrency and a model that answers at once."""

    async def instant(data: bytes) -> dict[str, Any]:
        return {"prediction": {"class_id": 1, "label": "x", "score": 0.5}}

    runner = JobRunner(
        store, instant, lambda exc: {}, concurrency=4, max_deliveries=3, keep_alive_s=20
    )
    await store.start()
    runner.start()
    try:
        started = time.perf_counter()
        job_id = (await store.create([b"x" * 50_000] * items))[0]["job_id"]
        seen = 0
        while True:
            watch = store.feed.watch(job_id)
            try:
                for event in await store.events(job_id, seen) or []:
                    if event.final:
                        return time.perf_counter() - started
                    seen = event.id
                await store.feed.wait(watch, 1.0)
            finally:
                store.feed.forget(job_id, watch)
    finally:
        await runner.stop(1.0)
        await store.close()


def store_cost_ms(redis: RedisServer, items: int = 2000) -> dict[str, float]:
    """What the Redis store adds to each job item over the memory store."""
    limits = StoreLimits(10, 100_000, 10**9)
    memory = asyncio.run(seconds_per_job(MemoryJobStore(limits=limits, ttl_s=60), items))
    shared = RedisJobStore(
        redis.url,
        prefix=f"cost-{uuid.uuid4().hex[:6]}",
        limits=limits,
        ttl_s=60,
        timeout_s=5,
        claim_idle_s=60,
    )
    in_redis = asyncio.run(seconds_per_job(shared, items))
    return {
        "memory_ms_per_item": round(memory * 1000 / items, 3),
        "redis_ms_per_item": round(in_redis * 1000 / items, 3),
        "added_ms_per_item": round((in_redis - memory) * 1000 / items, 3),
    }


def run(directory: Path) -> dict[str, Any]:
    images = [path.read_bytes() for path in PHOTOS] * (JOB_IMAGES // len(PHOTOS))
    report: dict[str, Any] = {"job_images": len(images)}
    with redis_server(directory, fsync="everysec") as redis:  # as docker-compose.scale.yml
        report["store_cost"] = store_cost_ms(redis)
        print(f"  store cost per item: {report['store_cost']}", flush=True)
        setups = {
            "memory, 1 replica": ({}, 1),
            "redis, 1 replica": ({"JOB_STORE": "redis", "REDIS_URL": redis.url}, 1),
            "redis, 2 replicas": ({"JOB_STORE": "redis", "REDIS_URL": redis.url}, 2),
        }
        report["images_per_second"] = {}
        for name, (env, count) in setups.items():
            env = {**env, "LOG_LEVEL": "warning", "REDIS_PREFIX": uuid.uuid4().hex[:8]}
            servers = [
                launch(env, directory / f"{name[:5]}-{i}.log", port=free_port())
                for i in range(count)
            ]
            try:
                for server in servers:
                    wait_ready(server, timeout=180)
                job_rate(servers[0], images[:30])  # warm the path
                rate = job_rate(servers[0], images)
                report["images_per_second"][name] = round(rate, 1)
                print(f"  /jobs {name:18} {rate:6.1f} img/s", flush=True)
                if count == 1:
                    report.setdefault("cls_while_job", {})[name] = row = cls_while_job(
                        servers[0], images
                    )
                    print(f"  /cls while a job runs, {name}: {row}", flush=True)
            finally:
                for server in servers:
                    stop(server)
    return report


def markdown(report: dict[str, Any]) -> str:
    rows = "\n".join(f"| {name} | {rate} |" for name, rate in report["images_per_second"].items())
    cost = report["store_cost"]
    cls = "\n".join(
        f"| {name} | {row['idle_p95_ms']} ms | {row['busy_p95_ms']} ms | x{row['factor']} |"
        for name, row in report["cls_while_job"].items()
    )
    return (
        f"## Jobs\n\nOne job of {report['job_images']} JPEGs through `/jobs`, submission to"
        " end:\n\n| Store | img/s |\n|---|---|\n"
        f"{rows}\n\n- What the Redis store adds per item, through the job runner with a model"
        f" that answers at once (50 kB images): {cost['added_ms_per_item']} ms"
        f" ({cost['redis_ms_per_item']} ms against {cost['memory_ms_per_item']} ms in"
        " memory).\n"
        "\n`/cls` p95, one client, idle and while a 600-image job runs:\n\n"
        "| Store | idle | during the job | factor |\n|---|---|---|---|\n"
        f"{cls}\n"
    )


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp:
        result = run(Path(tmp))
    print(markdown(result))
