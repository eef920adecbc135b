"""A task's tensor form: the named, typed inputs and outputs through which the Open
Inference Protocol (KServe V2) reaches it, over HTTP and gRPC alike.

A request of N rows becomes N items of the task's batcher: each row's inputs become one
payload for ``decode``, as a multipart file or a JSON body would, and the N results
become the output tensors, whose first dimension is the row.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.task import InputError

# The protocol's datatypes, as numpy holds them. BYTES rows are Python bytes objects.
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, datatype and shape, with -1 for the rows (the
    first dimension) and for any other dimension of variable size."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.datatype not in DATATYPES:
            raise ValueError(f"tensor {self.name!r}: unknown datatype {self.datatype!r}")
        if not self.shape or self.shape[0] != -1:
            raise ValueError(f"tensor {self.name!r}: the first dimension is the rows, -1")

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def check(self, datatype: str, shape: tuple[int, ...]) -> None:
        """Raises InputError unless a tensor of ``datatype`` and ``shape`` fits this one."""
        if datatype != self.datatype:
            raise InputError(
                f"input {self.name!r} has datatype {datatype}; the model takes {self.datatype}"
            )
        fits = len(shape) == len(self.shape) and all(
            want in (-1, got) for want, got in zip(self.shape, shape, strict=True)
        )
        if not fits or shape[0] < 1:
            raise InputError(
                f"input {self.name!r} has shape {list(shape)}; the model takes"
                f" {list(self.shape)} (-1: any size, the first dimension is the rows, at least one)"
            )


@dataclass(frozen=True)
class TensorForm:
    """What a task's ``tensor_form`` declares."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


Row = Mapping[str, np.ndarray]
"""One row of a request: each input's values for it, without the row dimension."""


def only_bytes(row: Row, name: str) -> bytes:
    """The one BYTES element of input ``name`` in ``row`` (an input of shape [-1, 1])."""
    value = row[name]
    if value.size != 1:
        raise InputError(f"input {name!r} takes one element per row, got {value.size}")
    element = value.reshape(-1)[0]
    if not isinstance(element, bytes):
        raise InputError(f"input {name!r} must hold bytes")
    return element


def text_tensor(rows: list[list[str]]) -> np.ndarray:
    """A BYTES tensor of UTF-8 strings, [rows, columns]."""
    tensor = np.empty((len(rows), len(rows[0]) if rows else 0), dtype=object)
    for i, row in enumerate(rows):
        tensor[i, :] = [text.encode() for text in row]
    return tensor
