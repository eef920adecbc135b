"""Warm-up: run each batch shape the batcher forms once, and time them to choose the
batch size when MAX_BATCH_SIZE=auto."""

import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

Key = TypeVar("Key", bound=Hashable)

TUNE_SHARE = 0.95


def batch_shapes(max_batch_size: int) -> list[int]:
    """The sizes warmed up: powers of two up to the maximum, and the maximum."""
    return sorted({*(2**i for i in range(max_batch_size.bit_length())), max_batch_size})


def choose_batch_size(items_per_second: dict[int, float], share: float = TUNE_SHARE) -> int:
    """The smallest batch size reaching ``share`` of the best measured throughput: a
    bigger batch would add latency for almost no throughput."""
    best = max(items_per_second.values())
    return min(size for size, rate in items_per_second.items() if rate >= share * best)


def time_batches(
    run: Callable[[Key], Any], batch_sizes: Sequence[Key], rounds: int = 5
) -> dict[Key, float]:
    """Best-of-``rounds`` wall time of ``run(n)`` per batch size (or per any other key),
    after one untimed call per size (which also warms up that shape). Each round times
    every size once, so a burst of load from elsewhere slows all sizes alike rather than
    skewing the choice."""
    for n in batch_sizes:
        run(n)
    best = dict.fromkeys(batch_sizes, float("inf"))
    for _ in range(rounds):
        for n in batch_sizes:
            started = time.perf_counter()
            run(n)
            best[n] = min(best[n], time.perf_counter() - started)
    return best


def tune_batch_size(
    run: Callable[[int], Any], max_batch_size: int, *, tune: bool, unit: str = "items"
) -> dict[str, Any]:
    """Warms up every batch shape with ``run(n)`` and reports ``batch_size`` (timed and
    chosen when ``tune``, else ``max_batch_size``) and ``seconds_per_item`` at that size,
    with the table behind the choice as ``{unit}_per_second``."""
    shapes = batch_shapes(max_batch_size)
    report: dict[str, Any] = {}
    if tune:
        seconds = time_batches(run, shapes)
        # Decided on the rounded table, so the choice always follows from what is shown.
        rates = {size: round(size / seconds[size], 1) for size in shapes}
        report[f"{unit}_per_second"] = rates
        report["batch_size"] = choose_batch_size(rates)
    else:
        for size in shapes[:-1]:
            run(size)
        report["batch_size"] = max_batch_size
        # Warms up the largest shape as well, before timing it.
        seconds = time_batches(run, [max_batch_size], rounds=1)
    report["seconds_per_item"] = round(seconds[report["batch_size"]] / report["batch_size"], 6)
    return report
