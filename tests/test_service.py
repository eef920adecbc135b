"""Unit tests of TaskService's bookkeeping, with a task whose decoding can be held."""

import threading

import pytest

from batching import DeadlineExceeded, QueueFull
from serving import LoadContext, NoOptions, Task
from serving.service import DecodePools, TaskService
from settings import Settings

pytestmark = pytest.mark.anyio


class HeldDecode(Task[int, int]):
    name = "held"

    def __init__(self) -> None:
        self.gate = threading.Event()

    def load(self, context: LoadContext) -> None:
        pass

    def decode(self, payload: object, options: NoOptions) -> int:
        self.gate.wait(timeout=30)
        return 1

    def predict_batch(self, items: list[int]) -> list[int | Exception]:
        return items

    def encode(self, result: int, options: NoOptions) -> int:
        return result


async def test_a_decode_that_timed_out_counts_until_its_thread_is_free() -> None:
    task = HeldDecode()
    pools = DecodePools(1)
    service = TaskService(task, Settings(timeout=0.2), pools)
    service.warmed_up.set()
    service.batcher.start()
    try:
        with pytest.raises(DeadlineExceeded, match="decoding"):
            await service.run(b"x", NoOptions())
        # The caller has its 504, but the decode thread is still busy with its input:
        # admission must keep counting it, or it promises a wait the pool cannot keep.
        assert service.metadata()["decode"]["in_flight"] == 1
        task.gate.set()
        # One decode thread: a second input is decoded only after the first is done.
        assert await service.run(b"y", NoOptions()) == 1
        assert service.metadata()["decode"]["in_flight"] == 0
    finally:
        task.gate.set()
        await service.batcher.stop(1)
        pools.shutdown()


class SlowDecode(HeldDecode):
    name = "slow"

    def warm_up(self, max_batch_size: int, tune: bool) -> dict[str, float]:
        return {"seconds_per_item": 0.001, "decode_seconds_per_item": 0.3}


@pytest.mark.parametrize(("timeout_s", "admitted"), [(0.25, False), (1.0, True)])
async def test_an_input_is_admitted_only_with_time_for_its_own_whole_decode(
    timeout_s: float, admitted: bool
) -> None:
    # Four idle decode threads share a backlog, but one input still takes one of them
    # its whole 0.3 s: within 0.25 s it cannot be answered, however many are free.
    pools = DecodePools(4)
    service = TaskService(SlowDecode(), Settings(timeout=timeout_s), pools)
    await service.warm_up()
    try:
        if admitted:
            service.admit()
        else:
            with pytest.raises(QueueFull, match="behind"):
                service.admit()
    finally:
        pools.shutdown()
