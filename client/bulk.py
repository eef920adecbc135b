"""The two ways of classifying many images, with retries and a progress bar.

One item's trouble stays that item's: a refused or failed request is retried with
jittered backoff, and what still fails is recorded in the output, never the end of the run.
"""

import argparse
import asyncio
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx
from tqdm import tqdm

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
Failure = tuple[Path, str]
Result = dict[str, Any]

# Room for each multipart part's headers when a job's size is reckoned.
PART_OVERHEAD_BYTES = 512
# Used when the server's /metadata does not say (the server's defaults).
DEFAULT_MAX_JOB_FILES = 1000
DEFAULT_MAX_JOB_BYTES = 256 * 1024 * 1024
# How long the event stream of one job may stay lost before the client gives up on it.
EVENTS_PATIENCE_S = 300.0


def classify_all(files: list[Path], args: argparse.Namespace, out: IO[str]) -> list[Failure]:
    """Classifies ``files``, writes one JSON line each to ``out``, returns the failures."""
    with tqdm(total=len(files), unit="img", dynamic_ncols=True) as bar:
        if args.mode == "cls":
            return asyncio.run(_classify_with_cls(files, args, out, bar))
        return _classify_with_jobs(files, args, out, bar)


def _record(path: Path, result: Result, out: IO[str]) -> str | None:
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


def retry_delay(attempt: int, response: httpx.Response | None = None) -> float:
    """Seconds to wait before retry ``attempt`` (0 first). After a 503, its Retry-After
    stretched by a random factor of 1 to 2, so that clients refused together do not all
    return together; after a transport error, exponential backoff with the same jitter."""
    base = min(30.0, 0.5 * 2.0**attempt)
    if response is not None:
        try:
            base = max(0.0, float(response.headers.get("retry-after", "1")))
        except ValueError:
            base = 1.0
    return base * (1 + random.random())


Outcome = httpx.Response | httpx.TransportError


def _wait_before_retry(outcome: Outcome, attempt: int, retries: int) -> float | None:
    """Seconds to wait before trying again after ``outcome`` (a transport error or a 503),
    or None when it is the answer to keep."""
    if attempt == retries:
        return None
    if isinstance(outcome, httpx.TransportError):
        return retry_delay(attempt)
    return retry_delay(attempt, outcome) if outcome.status_code == 503 else None


def _error_of(response: httpx.Response) -> Result:
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    return {"status": response.status_code, "detail": detail}


def _transport_error(exc: httpx.TransportError) -> Result:
    return {"status": None, "detail": f"{type(exc).__name__}: {exc}"}


async def _classify_with_cls(
    files: list[Path], args: argparse.Namespace, out: IO[str], bar: tqdm
) -> list[Failure]:
    failures: list[Failure] = []
    slots = asyncio.Semaphore(args.concurrency)
    limits = httpx.Limits(max_connections=args.concurrency)

    async def attempt(client: httpx.AsyncClient, path: Path, data: bytes) -> Result:
        for attempt in range(args.retries + 1):
            outcome: Outcome
            try:
                outcome = await client.post(
                    "/cls", params={"top_k": args.top_k}, files={"file": (path.name, data)}
                )
            except httpx.TransportError as exc:
                outcome = exc
            if (wait := _wait_before_retry(outcome, attempt, args.retries)) is not None:
                await asyncio.sleep(wait)
                continue
            if isinstance(outcome, httpx.TransportError):
                return {"error": _transport_error(outcome)}
            if outcome.status_code == 200:
                result: Result = outcome.json()
                return result
            return {"error": _error_of(outcome)}
        raise AssertionError("unreachable")

    async def one(client: httpx.AsyncClient, path: Path) -> None:
        async with slots:
            data = await asyncio.to_thread(path.read_bytes)
            result = await attempt(client, path, data)
        if (error := _record(path, result, out)) is not None:
            failures.append((path, error))
        bar.update()

    async with httpx.AsyncClient(
        base_url=args.url, timeout=120, limits=limits, transport=getattr(args, "transport", None)
    ) as client:
        await asyncio.gather(*(one(client, path) for path in files))
    return failures


def job_chunks(files: list[Path], max_files: int, max_bytes: int) -> Iterator[list[Path]]:
    """Consecutive runs of ``files`` that each fit one job: at most ``max_files`` files
    and ``max_bytes`` of body. A file too large for any job is a run of its own."""
    chunk: list[Path] = []
    size = 0
    for path in files:
        cost = path.stat().st_size + PART_OVERHEAD_BYTES
        if chunk and (len(chunk) == max_files or size + cost > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(path)
        size += cost
    if chunk:
        yield chunk


def _job_limits(client: httpx.Client) -> tuple[int, int]:
    """MAX_JOB_FILES and MAX_JOB_BYTES as the server reports them."""
    try:
        jobs = client.get("/metadata").raise_for_status().json().get("jobs", {})
    except (httpx.HTTPError, ValueError):
        jobs = {}
    return (
        int(jobs.get("max_job_files", DEFAULT_MAX_JOB_FILES)),
        int(jobs.get("max_job_bytes", DEFAULT_MAX_JOB_BYTES)),
    )


def _classify_with_jobs(
    files: list[Path], args: argparse.Namespace, out: IO[str], bar: tqdm
) -> list[Failure]:
    failures: list[Failure] = []
    timeout = httpx.Timeout(120, read=60)
    transport = getattr(args, "transport", None)
    with httpx.Client(base_url=args.url, timeout=timeout, transport=transport) as client:
        max_files, max_bytes = _job_limits(client)
        for chunk in job_chunks(files, min(args.job_size, max_files), max_bytes):
            results = _run_job(client, chunk, args.retries, bar)
            for path, result in zip(chunk, results, strict=True):
                if (error := _record(path, result, out)) is not None:
                    failures.append((path, error))
    return failures


def _run_job(client: httpx.Client, chunk: list[Path], retries: int, bar: tqdm) -> list[Result]:
    """One result per file of ``chunk``: the job's, or the error that kept it from running."""
    submitted = _submit_job(client, chunk, retries)
    if "error" in submitted:
        bar.update(len(chunk))
        return [submitted] * len(chunk)
    job_id = submitted["job_id"]
    _follow_events(client, job_id, bar)
    for attempt in range(retries + 1):
        try:
            job = client.get(f"/jobs/{job_id}").raise_for_status().json()
            break
        except httpx.HTTPError as exc:
            if attempt == retries:
                detail = f"job {job_id}: {type(exc).__name__}: {exc}"
                return [{"error": {"status": None, "detail": detail}}] * len(chunk)
            time.sleep(retry_delay(attempt))
    missing = {"error": {"status": None, "detail": f"job {job['status']}"}}
    return [result or missing for result in job["results"]]


def _submit_job(client: httpx.Client, chunk: list[Path], retries: int) -> Result:
    """The created job, or ``{"error": ...}``."""
    files = [("files", (path.name, path.read_bytes())) for path in chunk]
    for attempt in range(retries + 1):
        outcome: Outcome
        try:
            outcome = client.post("/jobs", files=files)
        except httpx.TransportError as exc:
            outcome = exc
        if (wait := _wait_before_retry(outcome, attempt, retries)) is not None:
            time.sleep(wait)
            continue
        if isinstance(outcome, httpx.TransportError):
            return {"error": _transport_error(outcome)}
        if outcome.status_code != 202:
            return {"error": _error_of(outcome)}
        job: Result = outcome.json()
        return job
    raise AssertionError("unreachable")


def _follow_events(client: httpx.Client, job_id: str, bar: tqdm) -> None:
    """Advances the bar per progress event until the job ends. A stream that drops or
    ends early is resumed from its last event id, after a growing, jittered pause."""
    last_id = ""
    seen = 0
    attempt = 0
    give_up_at = time.monotonic() + EVENTS_PATIENCE_S
    while time.monotonic() < give_up_at:
        headers = {"Last-Event-ID": last_id} if last_id else {}
        try:
            with client.stream("GET", f"/jobs/{job_id}/events", headers=headers) as stream:
                kind = ""
                for line in stream.iter_lines():
                    if line.startswith("id: "):
                        last_id = line[4:]
                        attempt = 0  # it progresses: the next drop starts the backoff anew
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
            pass
        time.sleep(retry_delay(attempt))
        attempt += 1
    # The job's own results still follow; items it has not finished are reported as such.
    tqdm.write(f"lost the event stream of job {job_id}; see GET /jobs/{job_id}")
