"""Tasks that fail the way real models do, for the tests of how the server copes."""

import os
import time
from typing import Any

from serving import LoadContext
from tests.test_tasks_e2e import Square


class FailingWarmUp(Square):
    """Loads, then fails its warm-up (as a model too big for the device does)."""

    def warm_up(self, max_batch_size: int, tune: bool) -> dict[str, Any]:
        raise RuntimeError("out of memory during warm-up")


class SlowLoad(Square):
    """Takes SLOW_LOAD_S seconds to load, as a big model or a first ONNX export does."""

    def load(self, context: LoadContext) -> None:
        time.sleep(float(os.environ.get("SLOW_LOAD_S", "5")))
        super().load(context)
