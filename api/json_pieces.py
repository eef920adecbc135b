"""JSON parsing that a large body does not turn into a long pause for every request, nor
into gigabytes of Python objects.

``json.loads`` holds the GIL for the whole document, so even in a worker thread it stalls
the event loop for as long as it parses: about a quarter of a second for 25 MB of small
values. ``loads_in_pieces`` parses the same JSON one member of the top-level object, and
one element of the arrays there, at a time; between pieces the interpreter can switch to
the event loop's thread. Run it in a thread.

It also bounds what a body can cost. A JSON value as small as ``{}`` or ``"ab"`` becomes
a Python object twenty to thirty times its size, so a body of many tiny values would take
gigabytes: the pieces are counted as they are parsed, and a deeper container is counted
by a scan of its text before it is parsed. Past ``max_values`` (or ``max_items`` elements
in one array) parsing stops, having built only what came before.
"""

import json
import re
from typing import Any

_DECODER = json.JSONDecoder()
_WHITESPACE = re.compile(r"[ \t\n\r]*")
# A whole string, or one character that starts a value or separates values, or ends a
# container.
_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[{,\]}]')
# Containers this shallow are taken apart; anything deeper is one piece.
_PIECE_DEPTH = 2


class TooManyItems(Exception):
    """An array holds more than the ``max_items`` elements asked for."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} items")
        self.limit = limit


class TooManyValues(Exception):
    """The document holds more values than ``max_values``."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} JSON values")
        self.limit = limit


class _Parse:
    def __init__(self, text: str, max_items: int | None, max_values: int | None) -> None:
        self.text = text
        self.max_items = max_items
        self.max_values = max_values
        self.values = 0

    def count(self, values: int) -> None:
        self.values += values
        if self.max_values is not None and self.values > self.max_values:
            raise TooManyValues(self.max_values)

    def value(self, index: int, depth: int) -> tuple[Any, int]:
        text = self.text
        self.count(1)
        if text.startswith("[", index):
            if depth < _PIECE_DEPTH:
                return self.array(index + 1, depth)
            self.count_container(index)
        elif text.startswith("{", index):
            if depth < _PIECE_DEPTH:
                return self.object(index + 1, depth)
            self.count_container(index)
        return _DECODER.raw_decode(text, index)

    def count_container(self, index: int) -> None:
        """Counts the values of the container that starts at ``index`` without building
        any of them, stopping once they are too many. Malformed text is left for the
        parser to refuse."""
        if self.max_values is None:
            return
        depth = values = 0
        room = self.max_values - self.values
        for match in _TOKENS.finditer(self.text, index):
            token = match.group()
            if token in "]}":
                depth -= 1
                if depth == 0:
                    break
            elif token in "[{,":
                depth += token != ","
                values += 1
                if values > room:
                    break
        self.count(values)

    def array(self, index: int, depth: int) -> tuple[list[Any], int]:
        items: list[Any] = []
        index = _skip(self.text, index)
        if self.text.startswith("]", index):
            return items, index + 1
        while True:
            if self.max_items is not None and len(items) == self.max_items:
                raise TooManyItems(self.max_items)
            item, index = self.value(index, depth + 1)
            items.append(item)
            index, closed = _after_piece(self.text, index, "]")
            if closed:
                return items, index

    def object(self, index: int, depth: int) -> tuple[dict[str, Any], int]:
        text = self.text
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
            members[key], index = self.value(_skip(text, index + 1), depth + 1)
            index, closed = _after_piece(text, index, "}")
            if closed:
                return members, index


def loads_in_pieces(
    data: bytes | bytearray, *, max_items: int | None = None, max_values: int | None = None
) -> Any:
    """What ``json.loads(data)`` returns, with the same errors (ValueError, and
    UnicodeDecodeError for bytes that are not UTF-8, RecursionError for nesting deeper
    than the interpreter's stack). Raises TooManyItems when an array at the top or in
    the top-level object has more than ``max_items`` elements, and TooManyValues when
    the document has more than ``max_values`` values (a value in an array or object
    counts one, and so does each container)."""
    text = data.decode()
    parse = _Parse(text, max_items, max_values)
    value, end = parse.value(_skip(text, 0), 0)
    if _skip(text, end) != len(text):
        raise json.JSONDecodeError("Extra data", text, _skip(text, end))
    return value


def _skip(text: str, index: int) -> int:
    match = _WHITESPACE.match(text, index)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def _after_piece(text: str, index: int, close: str) -> tuple[int, bool]:
    """After an element or member: where the next one starts, or the index past
    ``close`` and True when the container ends there."""
    index = _skip(text, index)
    if text.startswith(",", index):
        return _skip(text, index + 1), False
    if text.startswith(close, index):
        return index + 1, True
    raise json.JSONDecodeError("Expecting ',' delimiter", text, index)
