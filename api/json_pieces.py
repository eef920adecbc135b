"""JSON parsing that a large body does not turn into a long pause for every request.

``json.loads`` holds the GIL for the whole document, so even in a worker thread it stalls
the event loop for as long as it parses: about a quarter of a second for 25 MB of small
values. ``loads_in_pieces`` parses the same JSON one member of the top-level object, and
one element of the arrays there, at a time; between pieces the interpreter can switch to
the event loop's thread. Run it in a thread.
"""

import json
import re
from typing import Any

_DECODER = json.JSONDecoder()
_WHITESPACE = re.compile(r"[ \t\n\r]*")
# Containers this shallow are taken apart; anything deeper is one piece.
_PIECE_DEPTH = 2


def loads_in_pieces(data: bytes) -> Any:
    """What ``json.loads(data)`` returns, with the same errors (ValueError, and
    UnicodeDecodeError for bytes that are not UTF-8)."""
    text = data.decode()
    value, end = _value(text, _skip(text, 0), 0)
    if _skip(text, end) != len(text):
        raise json.JSONDecodeError("Extra data", text, _skip(text, end))
    return value


def _skip(text: str, index: int) -> int:
    match = _WHITESPACE.match(text, index)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def _value(text: str, index: int, depth: int) -> tuple[Any, int]:
    if depth < _PIECE_DEPTH and text.startswith("[", index):
        return _array(text, index + 1, depth)
    if depth < _PIECE_DEPTH and text.startswith("{", index):
        return _object(text, index + 1, depth)
    return _DECODER.raw_decode(text, index)


def _array(text: str, index: int, depth: int) -> tuple[list[Any], int]:
    items: list[Any] = []
    index = _skip(text, index)
    if text.startswith("]", index):
        return items, index + 1
    while True:
        item, index = _value(text, index, depth + 1)
        items.append(item)
        index, closed = _after_piece(text, index, "]")
        if closed:
            return items, index


def _object(text: str, index: int, depth: int) -> tuple[dict[str, Any], int]:
    members: dict[str, Any] = {}
    index = _skip(text, index)
    if text.startswith("}", index):
        return members, index + 1
    while True:
        if not text.startswith('"', index):
            raise json.JSONDecodeError(
                "Expecting property name enclosed in double quotes", text, index
            )
        key, index = _DECODER.raw_decode(text, index)
        index = _skip(text, index)
        if not text.startswith(":", index):
            raise json.JSONDecodeError("Expecting ':' delimiter", text, index)
        members[key], index = _value(text, _skip(text, index + 1), depth + 1)
        index, closed = _after_piece(text, index, "}")
        if closed:
            return members, index


def _after_piece(text: str, index: int, close: str) -> tuple[int, bool]:
    """After an element or member: where the next one starts, or the index past
    ``close`` and True when the container ends there."""
    index = _skip(text, index)
    if text.startswith(",", index):
        return _skip(text, index + 1), False
    if text.startswith(close, index):
        return index + 1, True
    raise json.JSONDecodeError("Expecting ',' delimiter", text, index)
