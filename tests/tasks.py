"""Tasks the tests serve: ``Square``, a tiny one, and tasks that fail the way real models
do, for the tests of how the server copes."""

import os
import threading
import time
from typing import Any

from pydantic import BaseModel, Field

from serving import InputError, LoadContext, Task, TaskSettings

UNLUCKY = 13


class SquareOptions(BaseModel):
    offset: int = Field(0, ge=0, le=100)


class Square(Task[int, int]):
    """Squares a number: `{"x": 3}` gives `{"square": 9}`. 13 fails in the model."""

    name = "square"
    Options = SquareOptions

    def load(self, context: LoadContext) -> None:
        self.lock = threading.Lock()
        self.threads = context.threads

    def decode(self, payload: Any, options: SquareOptions) -> int:
        x = payload.get("x") if isinstance(payload, dict) else payload
        if not isinstance(x, int):
            raise InputError('send {"x": <an integer>}', 422)
        if abs(x) > 1_000_000:
            raise InputError("x is over a million; send a smaller number", 413)
        return x + options.offset

    def predict_batch(self, items: list[int]) -> list[int | Exception]:
        time.sleep(0.05)  # a model's time, during which other requests queue up
        return [ValueError("unlucky") if x == UNLUCKY else x * x for x in items]

    def encode(self, result: int, options: SquareOptions) -> dict[str, int]:
        return {"square": result}

    def example(self) -> int:
        return 2

    def describe(self) -> dict[str, Any]:
        return {"name": "square", "threads": self.threads}


class ShiftSettings(TaskSettings):
    shift: int = Field(0, ge=0, le=1000, description="Added to x before it is squared.")


class Shifted(Square):
    """Square with a setting of its own: SHIFT is added to x."""

    name = "shifted"
    Settings = ShiftSettings

    def decode(self, payload: Any, options: SquareOptions) -> int:
        settings: ShiftSettings = self.settings
        return super().decode(payload, options) + settings.shift


class FailingWarmUp(Square):
    """Loads, then fails its warm-up (as a model too big for the device does)."""

    def warm_up(self, max_batch_size: int, tune: bool) -> dict[str, Any]:
        raise RuntimeError("out of memory during warm-up")


class SlowLoad(Square):
    """Takes SLOW_LOAD_S seconds to load, as a big model or a first ONNX export does."""

    def load(self, context: LoadContext) -> None:
        time.sleep(float(os.environ.get("SLOW_LOAD_S", "5")))
        super().load(context)
