"""Tensors as the protocol carries them: raw little-endian bytes (the binary extension
over HTTP, ``raw_*_contents`` over gRPC) or lists of values (JSON, typed gRPC contents).
A BYTES element travels raw as a 4-byte little-endian length, then its bytes."""

import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving.task import InputError
from serving.tensors import DATATYPES

_LENGTH = struct.Struct("<I")


@dataclass
class Tensor:
    """One named input or output of a request: its datatype, shape and values."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    parameters: dict[str, Any] = field(default_factory=dict)


def elements(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def check_header(name: str, datatype: Any, shape: Any) -> tuple[str, tuple[int, ...]]:
    """A tensor's datatype and shape as sent, checked to be of the protocol's kinds."""
    if datatype not in DATATYPES:
        raise InputError(
            f"tensor {name!r}: unknown datatype {datatype!r}; use one of {', '.join(DATATYPES)}"
        )
    if (
        not isinstance(shape, list | tuple)
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        or len(shape) > 8
    ):
        raise InputError(f"tensor {name!r}: shape must be a list of sizes, got {shape!r}")
    return datatype, tuple(shape)


def from_raw(
    name: str, datatype: str, shape: tuple[int, ...], raw: bytes | memoryview
) -> np.ndarray:
    """The tensor that ``raw`` holds, checked against its declared shape."""
    count = elements(shape)
    if datatype == "BYTES":
        values = np.empty(count, dtype=object)
        view = memoryview(raw)
        at = 0
        for i in range(count):
            if at + 4 > len(view):
                raise InputError(f"tensor {name!r}: its bytes end inside element {i}")
            (length,) = _LENGTH.unpack_from(view, at)
            at += 4
            if at + length > len(view):
                raise InputError(f"tensor {name!r}: element {i} runs past its bytes")
            values[i] = bytes(view[at : at + length])
            at += length
        if at != len(view):
            raise InputError(f"tensor {name!r}: {len(view) - at} bytes left after {count} elements")
        return values.reshape(shape)
    dtype = DATATYPES[datatype].newbyteorder("<")
    if len(raw) != count * dtype.itemsize:
        raise InputError(
            f"tensor {name!r}: {len(raw)} bytes for shape {list(shape)} of {datatype};"
            f" expected {count * dtype.itemsize}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def to_raw(tensor: np.ndarray, datatype: str) -> bytes:
    """``tensor``'s values as raw bytes, row-major."""
    if datatype == "BYTES":
        parts = []
        for value in tensor.reshape(-1):
            data = value if isinstance(value, bytes) else str(value).encode()
            parts += [_LENGTH.pack(len(data)), data]
        return b"".join(parts)
    dtype = DATATYPES[datatype].newbyteorder("<")
    return np.ascontiguousarray(tensor, dtype=dtype).tobytes()


def from_list(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
    """The tensor that a list of values (flat, or nested as its shape) holds. BYTES
    values are strings (UTF-8) or, over gRPC, bytes."""
    if not isinstance(data, list):
        raise InputError(f"tensor {name!r}: 'data' must be a list")
    flat = _flatten(data)
    if len(flat) != elements(shape):
        raise InputError(
            f"tensor {name!r}: {len(flat)} values for shape {list(shape)};"
            f" expected {elements(shape)}"
        )
    if datatype == "BYTES":
        values = np.empty(len(flat), dtype=object)
        for i, value in enumerate(flat):
            if isinstance(value, str):
                value = value.encode()
            if not isinstance(value, bytes):
                raise InputError(f"tensor {name!r}: element {i} is not a string")
            values[i] = value
        return values.reshape(shape)
    try:
        return np.asarray(flat, dtype=DATATYPES[datatype]).reshape(shape)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InputError(f"tensor {name!r}: its values are not {datatype}: {exc}") from None


def _flatten(data: list[Any]) -> list[Any]:
    if not any(isinstance(value, list) for value in data):
        return data
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                if len(stack) > 8:
                    raise InputError("tensor data is nested deeper than any shape")
                stack.append(iter(value))
                break
            flat.append(value)
        else:
            stack.pop()
    return flat


def to_list(tensor: np.ndarray, datatype: str) -> list[Any]:
    """``tensor``'s values as a flat list, as JSON carries them: BYTES as text."""
    if datatype == "BYTES":
        return [
            value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            for value in tensor.reshape(-1)
        ]
    return list(tensor.reshape(-1).tolist())
