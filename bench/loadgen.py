"""A small closed-loop HTTP/1.1 load generator: C keep-alive connections, each sending
the next pre-built multipart /cls request as soon as the last one is answered (or, after
a 503, once its Retry-After has passed).

    python bench/loadgen.py --port 5001 --concurrency 8 --duration 8 --images DIR

Prints JSON: statuses, latencies of the measured window, and the generator's own CPU use.
Kept to raw asyncio streams so that the client costs little CPU on a shared machine.
"""

import argparse
import asyncio
import json
import resource
import time
from pathlib import Path

BOUNDARY = "bench-boundary-7d1f"


def build_request(path: str, port: int, image: bytes, name: str) -> bytes:
    body = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: image/jpeg\r\n\r\n".encode()
        + image
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool, float]:
    """The status code, whether the server will close the connection, and Retry-After."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("closed")
    status = int(status_line.split()[1])
    length, close, retry_after = 0, False, 0.0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
        elif name == b"retry-after":
            retry_after = float(value)
    await reader.readexactly(length)
    return status, close, retry_after


async def connection(
    port: int,
    requests: list[bytes],
    offset: int,
    measure_from: float,
    stop_at: float,
    samples: list[tuple[int, float]],
) -> None:
    loop = asyncio.get_running_loop()
    writer = None
    sent = offset
    while loop.time() < stop_at:
        if writer is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert reader is not None
        started = loop.time()
        writer.write(requests[sent % len(requests)])
        sent += 1
        try:
            status, close, retry_after = await asyncio.wait_for(read_response(reader), 60)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            status, close, retry_after = 0, True, 0.0
        if started >= measure_from:
            samples.append((status, loop.time() - started))
        if close or retry_after:
            # The server's keep-alive timeout may end an idle connection while we wait,
            # just as we send on it: wait on no connection, and open a new one after.
            writer.close()
            writer = None
        if retry_after:
            # A well-behaved client, like python -m client, waits as the server asks.
            await asyncio.sleep(min(retry_after, max(0.0, stop_at - loop.time())))
    if writer is not None:
        writer.close()


async def run(args: argparse.Namespace, requests: list[bytes]) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    measure_from = loop.time() + args.warmup
    stop_at = measure_from + args.duration
    samples: list[tuple[int, float]] = []
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.gather(
        *(
            connection(args.port, requests, i * 7, measure_from, stop_at, samples)
            for i in range(args.concurrency)
        )
    )
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage.ru_utime - usage_before.ru_utime) + (usage.ru_stime - usage_before.ru_stime)
    wall = loop.time() - (measure_from - args.warmup)
    return {
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "statuses": [s for s, _ in samples],
        "latencies_s": [round(t, 6) for _, t in samples],
        "loadgen_cpu_percent": round(100 * cpu / wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/cls")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--images", required=True)
    args = parser.parse_args()
    images = sorted(Path(args.images).glob("*.jpg"))
    requests = [build_request(args.path, args.port, p.read_bytes(), p.name) for p in images]
    started = time.perf_counter()
    result = asyncio.run(run(args, requests))
    result["wall_s"] = round(time.perf_counter() - started, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
