"""The parked path's view of a request still in the kernel: which heads it may judge
alone, and reading and dropping through a real socket pair."""

import socket
from collections.abc import Iterator

import pytest

from api.waiting import DROP_CHUNK, HEAD_BYTES, WaitingRequest, drop, parse_waiting, peek

HEAD = b"POST /cls HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\n"


def test_a_plain_post_is_read_from_its_head() -> None:
    assert parse_waiting(HEAD + b"hello") == WaitingRequest("POST", "/cls", len(HEAD) + 5)


def test_the_path_is_percent_decoded_and_loses_its_query() -> None:
    head = b"POST /%63ls?top_k=3 HTTP/1.1\r\ncontent-length: 0\r\n\r\n"
    assert parse_waiting(head) == WaitingRequest("POST", "/cls", len(head))


def test_the_span_counts_only_this_request_when_the_next_came_with_it() -> None:
    request = parse_waiting(HEAD + b"hello" + HEAD)
    assert request is not None
    assert request.spans == len(HEAD) + 5


@pytest.mark.parametrize(
    "waiting",
    [
        b"POST /cls HTTP/1.1\r\ncontent-length: 5\r\n",  # head not complete yet
        b"POST /cls HTTP/1.0\r\ncontent-length: 5\r\n\r\n",  # no keep-alive by default
        b"POST /cls HTTP/1.1\r\nconnection: close\r\ncontent-length: 5\r\n\r\n",
        b"POST /cls HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
        b"POST /cls HTTP/1.1\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n",
        b"POST /cls HTTP/1.1\r\ncontent-length: 5\r\nupgrade: h2c\r\n\r\n",
        b"POST /cls HTTP/1.1\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\n",
        b"POST /cls HTTP/1.1\r\n\r\n",  # no length: the normal way decides
        b"POST /cls HTTP/1.1\r\ncontent-length: -5\r\n\r\n",
        b"POST /cls HTTP/1.1\r\ncontent-length: 1234567890123\r\n\r\n",  # the normal 413
        b"POST /\xff HTTP/1.1\r\ncontent-length: 0\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
    ],
)
def test_anything_unusual_is_left_to_the_normal_way(waiting: bytes) -> None:
    assert parse_waiting(waiting) is None


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    with left, right:
        yield left, right


def test_peek_says_none_when_nothing_waits_and_empty_at_the_end(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    assert peek(ours) is None
    theirs.sendall(b"x" * (HEAD_BYTES + 10))
    assert len(peek(ours) or b"") == HEAD_BYTES
    theirs.close()
    assert peek(ours) == b"x" * 10
    assert peek(ours) == b""


def test_drop_discards_what_waits_and_says_what_is_still_to_come(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    theirs.setblocking(False)
    sent = theirs.send(b"y" * (DROP_CHUNK + 100))  # as much as the buffer takes
    assert drop(ours, sent + 7) == 7
    assert peek(ours) is None
    theirs.sendall(b"abc")
    assert drop(ours, 2) == 0
    assert peek(ours) == b"c"
    assert drop(ours, 0) == 0
