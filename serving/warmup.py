"""Warm-up: run each batch shape the batcher forms once, and time them to choose the
batch size when MAX_BATCH_SIZE=auto."""

import json
import math
import os
import statistics
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

Key = TypeVar("Key", bound=Hashable)

# Batch sizes that score within 10% of the best serve alike: on a 2-core VM one size's
# score moves by up to 5% between starts.
TUNE_SHARE = 0.9
TUNE_ROUNDS = 3
# What serving a batch costs beyond computing it: a worker that finishes a batch waits
# for the event loop to take its results and hand it the next one, which on 2 busy cores
# took 2.5-4 ms per batch (batches of 4 served 4-7% fewer images per second than batches
# of 8, which time alike offline).
BATCH_OVERHEAD_S = 0.003
# Calls in a row per thread when calls are timed side by side, so that the threads'
# calls overlap as they do under load rather than only starting together.
STREAM_CALLS = 2
# Among sizes that serve alike, the one preferred: batches of 8 on a CPU take tens of
# milliseconds, so they answer sooner than larger ones, and each hand-off is shared by
# enough images that it costs little.
PREFERRED_BATCH_SIZE = 8


def batch_shapes(max_batch_size: int) -> list[int]:
    """The sizes warmed up: powers of two up to the maximum, and the maximum."""
    return sorted({*(2**i for i in range(max_batch_size.bit_length())), max_batch_size})


def choose_batch_size(
    scores: dict[int, float], share: float = TUNE_SHARE, previous: int | None = None
) -> int:
    """The batch size to serve with, from each size's score (see ``serving_scores``).

    Sizes that reach ``share`` of the best score serve alike: on a busy machine their
    order changes from one measurement to the next (on a 2-core AVX2 EPYC, sizes 4 to 32
    scored within 5-10% of each other, and the best of them moved between 4, 8, 16 and
    32 over five starts). So among them the choice follows a fixed preference, not the noise:
    ``previous``, the size an earlier start chose, if it is among them; else the one
    nearest PREFERRED_BATCH_SIZE (in powers of two; the better score breaks a tie)."""
    best = max(scores.values())
    good = [size for size, score in scores.items() if score >= share * best]
    if previous in good:
        return previous
    return min(
        good,
        key=lambda size: (abs(math.log2(size / PREFERRED_BATCH_SIZE)), -scores[size], size),
    )


def time_rounds(
    run: Callable[[Key], Any],
    batch_sizes: Sequence[Key],
    rounds: int = 5,
    concurrency: int = 1,
) -> list[dict[Key, float]]:
    """The wall time of one call of ``run(n)`` per batch size (or per any other key), in
    each of ``rounds`` rounds, after one untimed call per size (which also warms up that
    shape). Each round times every size once, so a burst of load from elsewhere slows
    all sizes of a round alike.

    With ``concurrency`` above 1 the calls are made as the batcher makes them under load:
    that many threads call side by side, STREAM_CALLS times in a row each, and the time
    is that of one call among them."""
    for n in batch_sizes:
        run(n)
    table = []
    with ThreadPoolExecutor(concurrency, thread_name_prefix="warmup") as pool:
        for _ in range(rounds):
            row = {}
            for n in batch_sizes:
                started = time.perf_counter()
                if concurrency == 1:
                    run(n)
                    calls = 1
                else:
                    streams = [pool.submit(_stream, run, n) for _ in range(concurrency)]
                    for stream in streams:
                        stream.result()
                    calls = STREAM_CALLS
                row[n] = (time.perf_counter() - started) / calls
            table.append(row)
    return table


def _stream(run: Callable[[Key], Any], n: Key) -> None:
    for _ in range(STREAM_CALLS):
        run(n)


def time_batches(
    run: Callable[[Key], Any],
    batch_sizes: Sequence[Key],
    rounds: int = 5,
    concurrency: int = 1,
) -> dict[Key, float]:
    """The best of ``time_rounds`` for each size: what the machine can do, which other
    work only ever slows down."""
    table = time_rounds(run, batch_sizes, rounds, concurrency)
    return {n: min(row[n] for row in table) for n in batch_sizes}


def serving_scores(table: list[dict[int, float]]) -> dict[int, float]:
    """How fast each batch size serves, relative to the fastest: per round, items per
    second with BATCH_OVERHEAD_S added to each batch, over that round's best; then the
    median over rounds. Comparing sizes within a round cancels the machine's drift from
    one round to the next."""
    relative: dict[int, list[float]] = {n: [] for n in table[0]}
    for row in table:
        rates = {n: n / (seconds + BATCH_OVERHEAD_S) for n, seconds in row.items()}
        best = max(rates.values())
        for n, rate in rates.items():
            relative[n].append(rate / best)
    return {n: round(statistics.median(shares), 3) for n, shares in relative.items()}


def fastest(call: Callable[[], Any], rounds: int = 3) -> float:
    """The best time of ``rounds`` calls of ``call``, in seconds, rounded to the µs."""
    best = math.inf
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return round(best, 6)


def tune_batch_size(
    run: Callable[[int], Any],
    max_batch_size: int,
    *,
    tune: bool,
    unit: str = "items",
    concurrency: int = 1,
    remember: Path | None = None,
) -> dict[str, Any]:
    """Warms up every batch shape with ``run(n)`` and reports ``batch_size`` (chosen from
    ``serving_scores`` when ``tune``, else ``max_batch_size``) and ``seconds_per_item``,
    the pace of one call at that size. ``concurrency`` calls run side by side, as the
    batcher makes them; ``{unit}_per_second`` is their throughput together.

    ``remember`` is a file that keeps the choice for the next start of the same model on
    the same machine (see ``choose_batch_size``)."""
    shapes = batch_shapes(max_batch_size)
    report: dict[str, Any] = {}
    if tune:
        table = time_rounds(run, shapes, TUNE_ROUNDS, concurrency)
        best = {n: min(row[n] for row in table) for n in shapes}
        report[f"{unit}_per_second"] = {n: round(concurrency * n / best[n], 1) for n in shapes}
        # Decided on the rounded table, so the choice always follows from what is shown.
        report["serving_scores"] = scores = serving_scores(table)
        previous = _recall(remember)
        report["batch_size"] = size = choose_batch_size(scores, previous=previous)
        report["batch_size_kept"] = size == previous
        _remember(remember, size)
        seconds = statistics.median(row[size] for row in table)
    else:
        for size in shapes[:-1]:
            run(size)
        report["batch_size"] = size = max_batch_size
        # Warms up the largest shape as well, before timing it.
        seconds = time_batches(run, [size], rounds=1, concurrency=concurrency)[size]
    report["seconds_per_item"] = round(seconds / size, 6)
    return report


def _recall(path: Path | None) -> int | None:
    if path is None:
        return None
    try:
        size = json.loads(path.read_text())["batch_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return size if isinstance(size, int) else None


def _remember(path: Path | None, size: int) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps({"batch_size": size}) + "\n")
        partial.replace(path)
    except OSError:
        pass  # a read-only cache: the next start measures afresh
