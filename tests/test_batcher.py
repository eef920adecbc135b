"""Unit tests of the micro-batcher with a fake batch function (no model)."""

import asyncio
import threading
from collections.abc import Sequence

import pytest

from batching import (
    BatcherClosed,
    BatcherObserver,
    BatchSizeMismatch,
    DeadlineExceeded,
    MicroBatcher,
    QueueFull,
)
from tests.virtual_time import VirtualTimeLoop, advance, settle

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    """Each test runs on a loop whose clock it drives (see tests/virtual_time.py)."""
    return ("asyncio", {"loop_factory": VirtualTimeLoop})


class FakeModel:
    """Doubles each input. Can be held mid-batch with ``hold()`` / ``release()``."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self._gate = threading.Event()
        self._gate.set()
        self._entered = threading.Event()

    def __call__(self, items: list[int]) -> Sequence[int | BaseException]:
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(items))
        self._entered.set()
        self._gate.wait(timeout=30)
        return [item * 2 for item in items]

    def hold(self) -> None:
        self._entered.clear()
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self._entered.wait, 10), "batch never started"

    @property
    def seen(self) -> list[int]:
        return [item for batch in self.batches for item in batch]


def make_batcher(
    fn: object,
    *,
    max_batch_size: int = 4,
    delay_s: float = 0.05,
    queue: int = 64,
    priorities: int = 1,
    concurrency: int = 1,
) -> MicroBatcher[int, int]:
    batcher: MicroBatcher[int, int] = MicroBatcher(
        fn,  # type: ignore[arg-type]
        max_batch_size=max_batch_size,
        max_batch_delay_s=delay_s,
        max_queue_size=queue,
        name="test-batcher",
        priorities=priorities,
        concurrency=concurrency,
    )
    batcher.start()
    return batcher


async def computing(
    model: FakeModel, batcher: MicroBatcher[int, int], item: int = 1
) -> "asyncio.Task[int]":
    """Submits ``item`` and returns once the model is busy with it, holding it there."""
    model.hold()
    task = later(batcher, item)
    await model.wait_entered()
    return task


async def submit_all(batcher: MicroBatcher[int, int], items: list[int]) -> list[int]:
    return await asyncio.gather(*(batcher.submit(i) for i in items))


async def alive() -> str:
    return "alive"


def later(batcher: MicroBatcher[int, int], item: int, **kwargs: float) -> "asyncio.Task[int]":
    return asyncio.create_task(batcher.submit(item, **kwargs))


async def test_full_batch_runs_without_waiting_for_the_delay() -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=4, delay_s=30)
    results = await asyncio.wait_for(submit_all(batcher, [1, 2, 3, 4]), timeout=5)
    assert results == [2, 4, 6, 8]
    assert model.batches == [[1, 2, 3, 4]]
    await batcher.stop(drain_timeout=1)


async def test_results_go_to_their_own_callers() -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=8)
    items = list(range(50))
    assert await submit_all(batcher, items) == [i * 2 for i in items]
    assert max(len(b) for b in model.batches) > 1
    await batcher.stop(drain_timeout=1)


async def test_partial_batch_is_held_until_the_delay() -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=8, delay_s=0.5)
    first = later(batcher, 1)
    await advance(0.49)
    assert not first.done(), "a partial batch ran before its delay"
    await advance(0.01)
    assert first.done()
    assert await first == 2
    await batcher.stop(drain_timeout=1)


async def test_delay_counts_from_the_first_item_of_the_batch() -> None:
    model = FakeModel()
    loop = asyncio.get_running_loop()
    batcher = make_batcher(model, max_batch_size=8, delay_s=1.0)
    started = loop.time()
    tasks = [later(batcher, 1)]
    await advance(0.5)
    tasks.append(later(batcher, 2))
    await advance(0.3)
    tasks.append(later(batcher, 3))
    assert await asyncio.gather(*tasks) == [2, 4, 6]
    # A per-item delay would close the batch at 0.8 + 1.0 = 1.8 s.
    assert loop.time() - started == pytest.approx(1.0)
    assert model.batches == [[1, 2, 3]]
    await batcher.stop(drain_timeout=1)


async def test_batch_fn_runs_off_the_event_loop_and_next_batch_forms_meanwhile() -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=4, delay_s=0.01)
    first = await computing(model, batcher)
    # The loop is free while the batch computes: other coroutines run.
    assert await asyncio.create_task(alive()) == "alive"
    waiting = [later(batcher, i) for i in (2, 3, 4)]
    await advance(0.1)  # past the batch delay: the next batch waits for the worker
    assert model.batches == [[1]]
    model.release()
    assert await asyncio.gather(first, *waiting) == [2, 4, 6, 8]
    assert model.batches == [[1], [2, 3, 4]]
    assert threading.main_thread().name not in model.threads
    assert all(name.startswith("test-batcher-worker") for name in model.threads)
    await batcher.stop(drain_timeout=1)


async def test_expired_item_is_dropped_before_compute() -> None:
    model = FakeModel()
    loop = asyncio.get_running_loop()
    batcher = make_batcher(model, max_batch_size=1, delay_s=0)
    blocker = await computing(model, batcher)
    expiring = later(batcher, 2, deadline=loop.time() + 0.1)
    await advance(0.1)
    with pytest.raises(DeadlineExceeded):
        await expiring
    model.release()
    assert await blocker == 2
    assert await batcher.submit(3) == 6
    assert 2 not in model.seen
    assert batcher.stats.dropped_expired == 1
    await batcher.stop(drain_timeout=1)


async def test_cancelled_caller_is_dropped_before_compute() -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=1, delay_s=0)
    blocker = await computing(model, batcher)
    gone = later(batcher, 2)
    await settle()
    gone.cancel()
    model.release()
    assert await blocker == 2
    assert await batcher.submit(3) == 6
    assert gone.cancelled()
    assert 2 not in model.seen
    assert batcher.stats.dropped_cancelled == 1
    await batcher.stop(drain_timeout=1)


async def test_per_item_error_reaches_only_its_caller() -> None:
    def fn(items: list[int]) -> list[int | BaseException]:
        return [ValueError(f"bad {i}") if i == 13 else i * 2 for i in items]

    batcher = make_batcher(fn, max_batch_size=4, delay_s=0.05)
    calls = (batcher.submit(i) for i in (12, 13, 14))
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert results[0] == 24
    assert results[2] == 28
    assert isinstance(results[1], ValueError)
    assert str(results[1]) == "bad 13"
    assert batcher.stats.failed_items == 1
    await batcher.stop(drain_timeout=1)


async def test_raising_batch_fails_exactly_its_callers() -> None:
    def fn(items: list[int]) -> list[int]:
        if 0 in items:
            raise RuntimeError("model exploded")
        return [i * 2 for i in items]

    batcher = make_batcher(fn, max_batch_size=2, delay_s=0.05)
    results = await asyncio.gather(*(batcher.submit(i) for i in (0, 1)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert await submit_all(batcher, [2, 3]) == [4, 6]
    await batcher.stop(drain_timeout=1)


async def test_wrong_number_of_results_is_an_error_for_every_caller() -> None:
    batcher = make_batcher(lambda items: [1], max_batch_size=2, delay_s=0.05)
    results = await asyncio.gather(*(batcher.submit(i) for i in (5, 6)), return_exceptions=True)
    assert all(isinstance(r, BatchSizeMismatch) for r in results)
    await batcher.stop(drain_timeout=1)


async def test_full_queue_rejects_at_once() -> None:
    model = FakeModel()
    loop = asyncio.get_running_loop()
    batcher = make_batcher(model, max_batch_size=1, delay_s=0, queue=2)
    blocker = await computing(model, batcher)
    # The next batch (one item) forms and waits for the worker; two more fill the queue.
    queued = [later(batcher, 2)]
    await settle()
    queued += [later(batcher, i) for i in (3, 4)]
    await settle()
    assert batcher.queue_depth == 2
    started = loop.time()
    with pytest.raises(QueueFull):
        await batcher.submit(5)
    assert loop.time() == started  # at once: no timer was waited for
    assert batcher.stats.rejected_full == 1
    model.release()
    assert await asyncio.gather(blocker, *queued) == [2, 4, 6, 8]
    await batcher.stop(drain_timeout=1)


async def test_stop_drains_queued_and_running_items() -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=2, delay_s=0.01)
    model.hold()
    tasks = [later(batcher, i) for i in range(6)]
    await model.wait_entered()
    stopping = asyncio.create_task(batcher.stop(drain_timeout=10))
    await settle()
    with pytest.raises(BatcherClosed):
        await batcher.submit(99)
    model.release()
    await stopping
    assert await asyncio.gather(*tasks) == [i * 2 for i in range(6)]
    assert batcher.stats.rejected_closed == 1


async def stop_while_held(
    model: "FakeModel | SideBySideModel",
    batcher: MicroBatcher[int, int],
    tasks: list["asyncio.Task[int]"],
) -> None:
    """Stops ``batcher`` with a short drain while ``model`` holds its batches, and checks
    that every caller then has BatcherClosed."""
    try:
        stopping = asyncio.create_task(batcher.stop(drain_timeout=0.2))
        await advance(0.2)
        await stopping
        results = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        model.release()
    assert all(isinstance(r, BatcherClosed) for r in results), results


async def test_stop_after_drain_timeout_leaves_no_future_pending() -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=2, delay_s=0.01)
    model.hold()
    tasks = [later(batcher, i) for i in range(5)]
    await model.wait_entered()
    await stop_while_held(model, batcher, tasks)


async def test_loop_crash_fails_pending_items_and_refuses_new_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=1, delay_s=0)
    blocker = await computing(model, batcher)
    waiting = later(batcher, 2)
    await settle()

    def broken(batch: object) -> None:
        raise RuntimeError("bug in dispatch")

    monkeypatch.setattr(batcher, "_dispatch", broken)
    model.release()
    assert await blocker == 2
    with pytest.raises(BatcherClosed):
        await asyncio.wait_for(waiting, timeout=5)
    with pytest.raises(BatcherClosed):
        await batcher.submit(3)
    await batcher.stop(drain_timeout=1)


async def test_counters() -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=3, delay_s=0.05)
    await submit_all(batcher, [1, 2, 3])
    await submit_all(batcher, [4])
    stats = batcher.stats.as_dict(batcher.queue_depth)
    assert stats["requests"] == 4
    assert stats["batches"] == 2
    assert stats["items"] == 4
    assert stats["queue_depth"] == 0
    assert stats["batch_size_histogram"] == {"1": 1, "3": 1}
    await batcher.stop(drain_timeout=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size must be an integer >= 1, got 0"),
        ({"max_batch_delay_s": -1.0}, "max_batch_delay_s must be >= 0, got -1.0"),
        ({"max_queue_size": 0}, "max_queue_size must be an integer >= 1, got 0"),
        ({"concurrency": 0}, "concurrency must be an integer >= 1, got 0"),
    ],
)
def test_invalid_settings_name_the_value(kwargs: dict[str, float], message: str) -> None:
    settings: dict[str, float] = {
        "max_batch_size": 4,
        "max_batch_delay_s": 0.01,
        "max_queue_size": 8,
    }
    settings.update(kwargs)
    with pytest.raises(ValueError, match=message):
        MicroBatcher(lambda items: items, **settings)  # type: ignore[arg-type]


class RecordingObserver(BatcherObserver):
    def __init__(self) -> None:
        self.batches: list[tuple[int, float]] = []
        self.events: list[str] = []

    def batch_done(self, queue_waits: Sequence[float], compute_seconds: float) -> None:
        assert all(wait >= 0 for wait in queue_waits)
        self.batches.append((len(queue_waits), compute_seconds))

    def dropped(self, reason: str) -> None:
        self.events.append(f"dropped:{reason}")

    def rejected(self, reason: str) -> None:
        self.events.append(f"rejected:{reason}")


async def test_observer_sees_batches_drops_and_rejections() -> None:
    model = FakeModel()
    observer = RecordingObserver()
    batcher: MicroBatcher[int, int] = MicroBatcher(
        model, max_batch_size=2, max_batch_delay_s=0.01, max_queue_size=8, observer=observer
    )
    batcher.start()
    await submit_all(batcher, [1, 2])
    blocker = await computing(model, batcher)
    expiring = later(batcher, 3, deadline=asyncio.get_running_loop().time() + 0.05)
    await advance(0.05)
    with pytest.raises(DeadlineExceeded):
        await expiring
    model.release()
    await blocker
    await batcher.stop(drain_timeout=1)
    with pytest.raises(BatcherClosed):
        await batcher.submit(4)
    assert [size for size, _ in observer.batches] == [2, 1]
    assert observer.events == ["dropped:expired", "rejected:closed"]


async def test_interactive_items_go_first_and_bulk_items_fill_spare_capacity() -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=4, delay_s=0.01, queue=16, priorities=2)
    blocker = await computing(model, batcher, item=0)
    bulk = [asyncio.create_task(batcher.submit(i, priority=1)) for i in range(100, 106)]
    await settle()
    interactive = [asyncio.create_task(batcher.submit(i)) for i in (1, 2)]
    await settle()
    model.release()
    assert await asyncio.gather(blocker, *interactive, *bulk) == [
        i * 2 for i in (0, 1, 2, *range(100, 106))
    ]
    # Interactive items lead the first batch after the blocker; bulk items fill it, and
    # the rest of the bulk runs as soon as nothing interactive waits.
    assert model.batches[1][:2] == [1, 2]
    assert sorted(model.seen[3:]) == list(range(100, 106))
    await batcher.stop(drain_timeout=1)


async def test_each_priority_class_has_its_own_queue_bound() -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=1, delay_s=0, queue=2, priorities=2)
    blocker = await computing(model, batcher)
    bulk = [asyncio.create_task(batcher.submit(10, priority=1))]
    await settle()  # the loop takes 10 as the next batch; 11 and 12 fill the queue
    bulk += [asyncio.create_task(batcher.submit(i, priority=1)) for i in (11, 12)]
    await settle()
    assert batcher.queue_depth == 2
    with pytest.raises(QueueFull):
        await batcher.submit(13, priority=1)
    interactive = asyncio.create_task(batcher.submit(2))
    await settle()
    model.release()
    assert await asyncio.gather(blocker, interactive, *bulk) == [2, 4, 20, 22, 24]
    await batcher.stop(drain_timeout=1)


async def test_interactive_item_displaces_bulk_from_a_batch_waiting_for_the_worker() -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=2, delay_s=0, queue=16, priorities=2)
    blocker = await computing(model, batcher, item=0)
    bulk = [asyncio.create_task(batcher.submit(i, priority=1)) for i in (100, 101, 102)]
    await settle()  # the next batch, [100, 101], is formed and waits
    assert batcher.queue_depth == 1
    urgent = asyncio.create_task(batcher.submit(1))
    await settle()
    model.release()
    assert await asyncio.gather(blocker, urgent, *bulk) == [0, 2, 200, 202, 204]
    assert model.batches[1] == [1, 100]
    assert sorted(model.seen[3:]) == [101, 102]
    await batcher.stop(drain_timeout=1)


async def test_items_that_could_not_meet_their_deadline_are_refused_at_once() -> None:
    model = FakeModel()
    loop = asyncio.get_running_loop()
    batcher = make_batcher(model, max_batch_size=1, delay_s=0)
    assert batcher.expected_wait() is None  # nothing measured yet: everything is admitted
    blocker = await computing(model, batcher)
    await advance(0.2)
    model.release()
    await blocker  # one batch of one item took 0.2 s
    blocker = await computing(model, batcher)
    queued = [later(batcher, i) for i in (2, 3)]
    await settle()
    expected = batcher.expected_wait()
    assert expected is not None
    assert expected >= 0.5  # three items ahead of a new one, at >= 0.16 s each
    with pytest.raises(QueueFull, match="behind"):
        await batcher.submit(9, deadline=loop.time() + 0.1)
    assert batcher.stats.rejected_late == 1
    model.release()
    assert await asyncio.gather(blocker, *queued) == [2, 4, 6]
    assert 9 not in model.seen
    await batcher.stop(drain_timeout=1)


async def test_an_item_admitted_before_its_preparation_is_not_refused_again() -> None:
    model = FakeModel()
    loop = asyncio.get_running_loop()
    batcher = make_batcher(model, max_batch_size=1, delay_s=0)
    batcher.expect_seconds_per_item(0.2)
    assert batcher.expected_wait(coming=3) == pytest.approx(4 * 0.2)
    blocker = await computing(model, batcher)
    deadline = loop.time() + 0.1
    with pytest.raises(QueueFull):
        batcher.admit(deadline)
    with pytest.raises(QueueFull):
        await batcher.submit(8, deadline=deadline)
    assert batcher.stats.rejected_late == 2
    admitted = later(batcher, 9, deadline=deadline, admitted=True)
    await advance(0.1)
    with pytest.raises(DeadlineExceeded):
        await admitted  # queued, not refused, and it still cannot outlive its deadline
    assert batcher.stats.rejected_late == 2
    model.release()
    assert await blocker == 2
    assert 9 not in model.seen
    await batcher.stop(drain_timeout=1)


async def test_a_lone_item_is_admitted_only_with_time_for_its_whole_batch() -> None:
    batcher = make_batcher(FakeModel(), max_batch_size=4, delay_s=0)
    now = asyncio.get_running_loop().time()
    batcher.expect_seconds_per_item(0.1)  # batches of four take 0.4 s
    # Items ahead count at the per-item pace; the item's own batch counts in full.
    assert batcher.expected_wait(coming=3) == pytest.approx(3 * 0.1 + 0.4)
    # At 0.1 s per item a lone item would fit in 0.3 s, but its batch takes 0.4 s.
    with pytest.raises(QueueFull, match="behind"):
        batcher.admit(now + 0.3)
    batcher.admit(now + 1.0)
    await batcher.stop(drain_timeout=1)


async def test_a_warm_up_measurement_makes_shedding_work_before_the_first_batch() -> None:
    model = FakeModel()
    loop = asyncio.get_running_loop()
    batcher = make_batcher(model, max_batch_size=1, delay_s=0)
    batcher.expect_seconds_per_item(0.5)
    assert batcher.expected_wait() == pytest.approx(0.5)
    with pytest.raises(QueueFull, match="behind"):
        await batcher.submit(1, deadline=loop.time() + 0.2)
    assert await batcher.submit(2, deadline=loop.time() + 5) == 4
    after_a_fast_batch = batcher.expected_wait()
    assert after_a_fast_batch is not None
    assert after_a_fast_batch < 0.5
    batcher.expect_seconds_per_item(9.0)  # measured batches outrank a later seed
    assert batcher.expected_wait() == after_a_fast_batch
    await batcher.stop(drain_timeout=1)


async def test_queued_items_the_slower_pace_cannot_finish_in_time_are_refused_early() -> None:
    model = FakeModel()
    loop = asyncio.get_running_loop()
    batcher = make_batcher(model, max_batch_size=1, delay_s=0)
    batcher.expect_seconds_per_item(0.01)
    blocker = await computing(model, batcher)
    started = loop.time()
    deadline = started + 1.0
    # Admitted at the seeded pace: ten items of 0.01 s are well within a second.
    queued = [later(batcher, i, deadline=deadline) for i in range(10, 20)]
    await advance(0.5)
    model.release()  # one item took 0.5 s: the pace is now about 0.1 s per item
    outcomes = await asyncio.gather(*queued, return_exceptions=True)
    refused_at = loop.time()
    await blocker
    assert outcomes[0] == 20, outcomes
    # The last ones cannot be done before the deadline: refused as late, before it.
    assert all(isinstance(o, QueueFull) and "behind" in str(o) for o in outcomes[-5:]), outcomes
    assert not any(isinstance(o, DeadlineExceeded) for o in outcomes), outcomes
    assert refused_at < deadline
    refused = [i for i, o in zip(range(10, 20), outcomes, strict=True) if isinstance(o, QueueFull)]
    assert not set(refused) & set(model.seen)
    assert batcher.stats.rejected_late == len(refused)
    await batcher.stop(drain_timeout=1)


async def test_after_a_single_item_batch_an_idle_model_does_not_wait_for_company() -> None:
    model = FakeModel()
    loop = asyncio.get_running_loop()
    batcher = make_batcher(model, max_batch_size=8, delay_s=0.5)
    assert await batcher.submit(1) == 2  # the first batch waits out the delay: traffic unknown
    started = loop.time()
    assert await batcher.submit(2) == 4
    assert loop.time() == started  # no delay waited
    assert model.batches == [[1], [2]]
    await batcher.stop(drain_timeout=1)


async def bulk_items_behind_an_urgent_flood(
    model: FakeModel, batcher: MicroBatcher[int, int]
) -> list[int]:
    """Bulk items 100 and 101, then urgent items 1 to 20, all queued while the model is
    busy; returns the order in which the model computed them."""
    blocker = await computing(model, batcher, item=0)
    bulk = [asyncio.create_task(batcher.submit(i, priority=1)) for i in (100, 101)]
    urgent = [asyncio.create_task(batcher.submit(i)) for i in range(1, 21)]
    await settle()
    model.release()
    await asyncio.gather(blocker, *urgent, *bulk)
    return model.seen


async def test_bulk_items_get_their_minimum_share_under_saturating_urgent_load() -> None:
    model = FakeModel()
    batcher: MicroBatcher[int, int] = MicroBatcher(
        model,
        max_batch_size=2,
        max_batch_delay_s=0,
        max_queue_size=64,
        priorities=2,
        min_share=0.25,
    )
    batcher.start()
    order = await bulk_items_behind_an_urgent_flood(model, batcher)
    # Urgent items alone would fill every batch until the 20th; with a quarter share
    # each bulk item runs after at most four urgent ones.
    assert order.index(100) <= 6, model.batches
    assert order.index(101) - order.index(100) <= 6, model.batches
    await batcher.stop(drain_timeout=1)


async def test_without_a_minimum_share_urgent_items_always_go_first() -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=2, delay_s=0, queue=64, priorities=2)
    order = await bulk_items_behind_an_urgent_flood(model, batcher)
    assert order[-2:] == [100, 101], model.batches
    await batcher.stop(drain_timeout=1)


async def test_a_batch_that_fails_fast_leaves_the_pace_estimate_alone() -> None:
    def broken(items: list[int]) -> Sequence[int]:
        raise RuntimeError("the model fell over")

    batcher = make_batcher(broken, max_batch_size=1, delay_s=0)
    batcher.expect_seconds_per_item(0.5)
    with pytest.raises(RuntimeError, match="fell over"):
        await batcher.submit(1)
    # A failure in microseconds is no measure of the model: admission still expects 0.5 s.
    assert batcher.expected_wait() == pytest.approx(0.5)
    await batcher.stop(drain_timeout=1)


async def test_a_crashed_batch_loop_tells_its_owner_and_refuses_work() -> None:
    crashes: list[BaseException] = []
    batcher: MicroBatcher[int, int] = MicroBatcher(
        FakeModel(),
        max_batch_size=2,
        max_batch_delay_s=0,
        max_queue_size=8,
        on_crash=crashes.append,
    )

    def bug(*args: object) -> None:
        raise AssertionError("a bug in the batch loop")

    batcher.queues.fill = bug  # type: ignore[method-assign]
    batcher.start()
    with pytest.raises(BatcherClosed, match="crashed"):
        await asyncio.wait_for(batcher.submit(1), timeout=5)
    assert [type(error) for error in crashes] == [AssertionError]
    with pytest.raises(BatcherClosed):
        await batcher.submit(2)
    await batcher.stop(drain_timeout=1)


class SideBySideModel:
    """Doubles each input; every call waits for ``release`` and counts how many calls
    were running at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.running = 0
        self.most_at_once = 0
        self.calls = 0
        self._started = threading.Semaphore(0)
        self._gate = threading.Event()

    def __call__(self, items: list[int]) -> Sequence[int | BaseException]:
        with self._lock:
            self.calls += 1
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        self._started.release()
        self._gate.wait(timeout=30)
        with self._lock:
            self.running -= 1
        return [item * 2 for item in items]

    async def started(self, within: float) -> bool:
        """Whether one more call started within ``within`` seconds."""
        return await asyncio.to_thread(self._started.acquire, True, within)

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()


async def two_workers_busy(
    max_batch_size: int, items: int
) -> tuple[SideBySideModel, MicroBatcher[int, int], list["asyncio.Task[int]"]]:
    """A batcher of two workers and ``items`` submitted, once both workers are held
    computing a batch."""
    model = SideBySideModel()
    batcher = make_batcher(model, max_batch_size=max_batch_size, delay_s=0.01, concurrency=2)
    tasks = [later(batcher, i) for i in range(items)]
    assert await model.started(within=10)
    assert await model.started(within=10)
    return model, batcher, tasks


async def test_up_to_concurrency_batches_compute_at_once() -> None:
    model, batcher, tasks = await two_workers_busy(max_batch_size=2, items=7)
    assert not await model.started(within=0.2), "a third batch started beside two"
    assert batcher.queue_depth == 1  # behind the next batch of two, forming
    model.release()
    assert await asyncio.gather(*tasks) == [i * 2 for i in range(7)]
    assert model.most_at_once == 2
    assert model.calls == 4
    await batcher.stop(drain_timeout=1)


async def test_a_free_worker_takes_a_lone_item_at_once_beside_a_busy_one() -> None:
    model = SideBySideModel()
    model.release()
    batcher = make_batcher(model, max_batch_size=4, delay_s=1.0, concurrency=2)
    assert await batcher.submit(0) == 0  # a batch of one, after the delay
    assert await model.started(within=1)
    model.hold()
    first = later(batcher, 1)
    assert await model.started(within=0.5)  # the last batch held one item: no delay
    second = later(batcher, 2)
    assert await model.started(within=0.5)  # nor beside it, while a worker is free
    model.release()
    assert await asyncio.gather(first, second) == [2, 4]
    await batcher.stop(drain_timeout=1)


async def test_the_pace_of_batches_side_by_side_counts_once_per_worker() -> None:
    batcher = make_batcher(FakeModel(), max_batch_size=4, delay_s=0, concurrency=2)
    batcher.expect_seconds_per_item(0.1)  # batches of four take 0.4 s, two at a time
    assert batcher.expected_wait(coming=6) == pytest.approx(6 * 0.1 / 2 + 0.4)
    await batcher.stop(drain_timeout=1)


async def test_stop_fails_every_item_of_batches_computing_side_by_side() -> None:
    model, batcher, tasks = await two_workers_busy(max_batch_size=1, items=4)
    await stop_while_held(model, batcher, tasks)


async def test_a_wait_within_the_deadline_is_admitted_however_long() -> None:
    batcher = make_batcher(FakeModel(), max_batch_size=4, delay_s=0)
    now = asyncio.get_running_loop().time()
    batcher.expect_seconds_per_item(0.01)  # batches of four take 0.04 s
    wait = batcher.expected_wait(coming=100)
    assert wait == pytest.approx(100 * 0.01 + 0.04)
    # Twenty-five batches in a row vary by a few of their own spreads, not by a fifth of
    # the whole wait: 1.04 s of work fits within 1.1 s (a 20% margin refused it).
    batcher.admit(now + 1.1, coming=100)
    with pytest.raises(QueueFull, match="behind"):
        batcher.admit(now + 1.05, coming=100)
    await batcher.stop(drain_timeout=1)


async def test_the_wait_to_be_prepared_overlaps_the_wait_for_the_model() -> None:
    batcher = make_batcher(FakeModel(), max_batch_size=4, delay_s=0)
    batcher.expect_seconds_per_item(0.01)
    # Meanwhile the model computes the ten items ahead (0.1 s): the longer wait counts.
    assert batcher.expected_wait(coming=10, ready_in=0.03) == pytest.approx(0.1 + 0.04)
    assert batcher.expected_wait(coming=10, ready_in=0.3) == pytest.approx(0.3 + 0.04)
    await batcher.stop(drain_timeout=1)
