"""The two ways of classifying many images, with retries and a progress bar."""

import argparse
import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx
from tqdm import tqdm

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
Failure = tuple[Path, str]


def classify_all(files: list[Path], args: argparse.Namespace, out: IO[str]) -> list[Failure]:
    """Classifies ``files``, writes one JSON line each to ``out``, returns the failures."""
    with tqdm(total=len(files), unit="img", dynamic_ncols=True) as bar:
        if args.mode == "cls":
            return asyncio.run(_classify_with_cls(files, args, out, bar))
        return _classify_with_jobs(files, args, out, bar)


def _record(path: Path, result: dict[str, Any], out: IO[str]) -> str | None:
    """Writes one JSONL line; returns the error text if the item failed."""
    if "error" in result:
        line = {"path": str(path), "error": result["error"]}
        out.write(json.dumps(line) + "\n")
        return str(result["error"].get("detail", result["error"]))
    best = result["prediction"]
    line = {"path": str(path), "label": best["label"], "score": best["score"]}
    line["top_k"] = result["top_k"]
    out.write(json.dumps(line) + "\n")
    return None


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0


def _error_of(response: httpx.Response) -> dict[str, Any]:
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    return {"status": response.status_code, "detail": detail}


async def _classify_with_cls(
    files: list[Path], args: argparse.Namespace, out: IO[str], bar: tqdm
) -> list[Failure]:
    failures: list[Failure] = []
    slots = asyncio.Semaphore(args.concurrency)
    limits = httpx.Limits(max_connections=args.concurrency)

    async def one(client: httpx.AsyncClient, path: Path) -> None:
        async with slots:
            data = await asyncio.to_thread(path.read_bytes)
            result: dict[str, Any] = {}
            for attempt in range(args.retries + 1):
                response = await client.post(
                    "/cls", params={"top_k": args.top_k}, files={"file": (path.name, data)}
                )
                if response.status_code == 503 and attempt < args.retries:
                    await asyncio.sleep(_retry_after(response))
                    continue
                result = (
                    response.json()
                    if response.status_code == 200
                    else {"error": _error_of(response)}
                )
                break
        if (error := _record(path, result, out)) is not None:
            failures.append((path, error))
        bar.update()

    async with httpx.AsyncClient(base_url=args.url, timeout=120, limits=limits) as client:
        await asyncio.gather(*(one(client, path) for path in files))
    return failures


def _chunks(files: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(files), size):
        yield files[start : start + size]


def _classify_with_jobs(
    files: list[Path], args: argparse.Namespace, out: IO[str], bar: tqdm
) -> list[Failure]:
    failures: list[Failure] = []
    with httpx.Client(base_url=args.url, timeout=httpx.Timeout(120, read=60)) as client:
        for chunk in _chunks(files, args.job_size):
            job_id = _submit_job(client, chunk, args.retries)
            _follow_events(client, job_id, bar)
            job = client.get(f"/jobs/{job_id}").raise_for_status().json()
            for path, result in zip(chunk, job["results"], strict=True):
                result = result or {"error": {"status": None, "detail": f"job {job['status']}"}}
                if (error := _record(path, result, out)) is not None:
                    failures.append((path, error))
    return failures


def _submit_job(client: httpx.Client, chunk: list[Path], retries: int) -> str:
    for attempt in range(retries + 1):
        files = [("files", (path.name, path.read_bytes())) for path in chunk]
        response = client.post("/jobs", files=files)
        if response.status_code == 503 and attempt < retries:
            time.sleep(_retry_after(response))
            continue
        if response.status_code != 202:
            raise SystemExit(f"POST /jobs failed: {_error_of(response)}")
        job_id: str = response.json()["job_id"]
        return job_id
    raise AssertionError("unreachable")


def _follow_events(client: httpx.Client, job_id: str, bar: tqdm) -> None:
    """Advances the bar per progress event until the job ends, resuming after drops."""
    last_id = ""
    seen = 0
    for _ in range(60):
        headers = {"Last-Event-ID": last_id} if last_id else {}
        try:
            with client.stream("GET", f"/jobs/{job_id}/events", headers=headers) as stream:
                kind = ""
                for line in stream.iter_lines():
                    if line.startswith("id: "):
                        last_id = line[4:]
                    elif line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: ") and kind == "progress":
                        done = json.loads(line[6:])["done"]
                        bar.update(done - seen)
                        seen = done
                    elif line.startswith("data: ") and kind in ("done", "failed", "cancelled"):
                        bar.update(json.loads(line[6:])["total"] - seen)
                        return
        except httpx.TransportError:
            time.sleep(1)
    raise SystemExit(f"lost the event stream of job {job_id}; see GET /jobs/{job_id}")
