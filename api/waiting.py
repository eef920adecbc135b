"""A request still waiting in the kernel, read without the transport: the parked path of
api/protocol.py peeks at its head, judges it, and drops its body uncopied.

Nothing here knows uvicorn; the protocol hands over the connection's socket.
"""

import socket
import urllib.parse
from dataclasses import dataclass

import httptools

HEAD_BYTES = 8192
"""How much of a waiting request is read to judge it: its head must fit."""
DROP_CHUNK = 1 << 20
"""A waiting body is dropped in the kernel this much at a time."""
MAX_DROP_DIGITS = 12
"""A request whose declared body has more digits than this is read the normal way (and
refused 413 there)."""
_DROP = int(socket.MSG_TRUNC | socket.MSG_DONTWAIT)  # or-ing the enums per call costs more


class RequestHead:
    """httptools callbacks that keep what the door needs from one request's head (and
    nothing of its body)."""

    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.repeated = False  # a header given twice: left to the full parser
        self.complete = False

    def on_url(self, url: bytes) -> None:
        if not self.complete:
            self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.complete:
            name = name.lower()
            self.repeated |= name in self.headers
            self.headers[name] = value

    def on_headers_complete(self) -> None:
        self.complete = True


@dataclass(frozen=True, slots=True)
class WaitingRequest:
    method: str
    path: str  # percent-decoded, without the query
    spans: int  # bytes of head and body together


def parse_waiting(waiting: bytes) -> WaitingRequest | None:
    """The request whose head starts ``waiting``, when it may be judged and dropped from
    its head alone: a complete HTTP/1.1 keep-alive head with one Content-Length (of at
    most MAX_DROP_DIGITS digits) and no Transfer-Encoding, Expect or Upgrade. None for
    anything else, which is read the normal way (and answered there, 400 if malformed)."""
    end = waiting.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = RequestHead()
    parser = httptools.HttpRequestParser(head)
    try:
        parser.feed_data(waiting[: end + 4])
        path = httptools.parse_url(head.url).path.decode("ascii")
    except (httptools.HttpParserError, UnicodeDecodeError):
        return None
    headers = head.headers
    length = headers.get(b"content-length", b"")
    if (
        not head.complete
        or head.repeated
        or not length.isdigit()
        or len(length) > MAX_DROP_DIGITS
        or b"transfer-encoding" in headers
        or b"expect" in headers
        or b"upgrade" in headers
        or parser.get_http_version() != "1.1"
        or not parser.should_keep_alive()
    ):
        return None
    if "%" in path:
        path = urllib.parse.unquote(path)
    return WaitingRequest(parser.get_method().decode("ascii"), path, end + 4 + int(length))


def peek(sock: socket.socket) -> bytes | None:
    """The start of what waits in ``sock`` (up to HEAD_BYTES, consumed); b"" at its end
    or on an error; None when nothing waits."""
    try:
        return sock.recv(HEAD_BYTES, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def drop(sock: socket.socket, count: int) -> int:
    """Drops up to ``count`` bytes waiting in ``sock``, in the kernel, uncopied; returns
    how many are still to come."""
    if count <= 0:
        return 0
    try:
        while count:
            # recv allocates the size asked for, even for bytes it drops.
            dropped = len(sock.recv(min(count, DROP_CHUNK), _DROP))
            if not dropped:
                break
            count -= dropped
    except OSError:
        pass
    return count
