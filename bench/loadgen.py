"""A small HTTP/1.1 load generator for /cls, in three shapes:

- closed loop (default): C keep-alive connections, each sending the next pre-built
  multipart request as soon as the last one is answered, or after a 503 once its
  Retry-After has passed, as a polite client does;
- ``--impolite``: the same, ignoring Retry-After: a 503 is retried at once (a retry storm);
- ``--rate R``: open loop: R requests per second arrive whatever the answers, each on an
  idle connection or a new one; latency counts from the planned arrival.

    python bench/loadgen.py --port 5001 --concurrency 8 --duration 8 --images DIR

``--protocol`` says how a JPEG travels: ``multipart`` (our /cls and LitServe's), ``v2``
(the Open Inference Protocol's binary tensor extension, as Triton takes it), ``grpc`` (the
same protocol's ModelInfer over gRPC, the image in ``raw_input_contents``; ``--port`` is
then the gRPC port, each connection a channel of its own) or ``raw`` (the body of mosec's
/inference). Over gRPC, OK counts as 200, UNAVAILABLE as 503 (its
``grpc-retry-pushback-ms`` as Retry-After), DEADLINE_EXCEEDED as 504,
RESOURCE_EXHAUSTED as 429, CANCELLED as 499, and other codes as 500.

Prints JSON: statuses, latencies of the measured window, and the generator's own CPU use;
with ``--server-pid``, also the CPU time of the server's process group over the window
and the statuses of the answers that came in it (to put the two side by side).
Kept to raw asyncio streams so that the client costs little CPU on a shared machine.
"""

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from v2.stubs import messages

BOUNDARY = "bench-boundary-7d1f"


PATHS = {
    "multipart": "/cls",
    "v2": "/v2/models/cls/infer",
    "grpc": "/inference.GRPCInferenceService/ModelInfer",
    "raw": "/inference",
}
GRPC_STATUSES = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# gRPC codes counted as 500 or as CANCELLED (499), with their details, for the result.
OTHER_CODES: Counter[str] = Counter()
# Channels an open loop spreads its calls over (HTTP/2 multiplexes each).
OPEN_LOOP_CHANNELS = 8


def build_grpc_request(image: bytes) -> bytes:
    """A serialized ModelInferRequest for model cls: one BYTES element, raw."""
    pb = messages()
    request = pb.ModelInferRequest(model_name="cls")
    request.inputs.add(name="image", datatype="BYTES", shape=[1, 1])
    request.raw_input_contents.append(len(image).to_bytes(4, "little") + image)
    return bytes(request.SerializeToString())


class GrpcConnection:
    """A channel and its ModelInfer call, with requests and answers as bytes: nothing
    is parsed, so the client costs little."""

    def __init__(self, port: int, path: str) -> None:
        # A connection of its own, as each HTTP client has: grpc would otherwise share
        # one between the channels of a process that have the same target.
        options = [
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.use_local_subchannel_pool", 1),
        ]
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
        self.call = self.channel.unary_unary(path)

    async def send(self, request: bytes) -> tuple[int, float]:
        """The status of one call, and its retry hint in seconds (0 if none)."""
        try:
            await self.call(request, timeout=60)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE and "connect" in (exc.details() or ""):
                return 0, 0.0  # no server there: not a refusal
            if exc.code() not in GRPC_STATUSES or exc.code() == grpc.StatusCode.CANCELLED:
                OTHER_CODES[f"{exc.code().name}: {(exc.details() or '')[:100]}"] += 1
            retry_after = 0.0
            for key, value in exc.trailing_metadata() or ():
                if key == "grpc-retry-pushback-ms":
                    retry_after = int(value) / 1000
            return GRPC_STATUSES.get(exc.code(), 500), retry_after
        return 200, 0.0

    async def close(self) -> None:
        await self.channel.close()


def build_request(protocol: str, path: str, port: int, image: bytes, name: str) -> bytes:
    if protocol == "multipart":
        body = (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n".encode()
            + image
            + f"\r\n--{BOUNDARY}--\r\n".encode()
        )
        headers = f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
    elif protocol == "v2":
        # One BYTES element, its 4-byte little-endian length first, after the JSON header.
        tensor = len(image).to_bytes(4, "little") + image
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "image",
                        "shape": [1, 1],
                        "datatype": "BYTES",
                        "parameters": {"binary_data_size": len(tensor)},
                    }
                ]
            }
        ).encode()
        body = header + tensor
        headers = (
            "Content-Type: application/octet-stream\r\n"
            f"Inference-Header-Content-Length: {len(header)}\r\n"
        )
    else:
        body = image
        headers = "Content-Type: image/jpeg\r\n"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}"
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


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time so far of a process and of every other process in its
    process group (a server's workers, or a peer's model processes), from /proc."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended meanwhile
            continue
        if int(fields[2]) == pid or stat.parent.name == str(pid):
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


# Every time here is on this clock: the event loop's may tick in whole milliseconds
# (uvloop's does), too coarse for a latency of a few.
clock = time.perf_counter


class Record:
    """The measured window [measure_from, stop_at) on ``clock``: the status and
    latency of each request sent in it, and the statuses of the answers that came in it."""

    def __init__(self, measure_from: float, stop_at: float) -> None:
        self.measure_from = measure_from
        self.stop_at = stop_at
        self.samples: list[tuple[int, float]] = []
        self.answered: Counter[int] = Counter()

    def add(self, status: int, started: float) -> None:
        now = clock()
        if started >= self.measure_from:
            self.samples.append((status, now - started))
        if self.measure_from <= now < self.stop_at:
            self.answered[status] += 1


async def grpc_client(
    port: int, path: str, requests: list[bytes], offset: int, record: Record, polite: bool
) -> None:
    """A closed-loop client over a gRPC channel of its own."""
    connection = GrpcConnection(port, path)
    sent = offset
    try:
        while clock() < record.stop_at:
            started = clock()
            status, retry_after = await connection.send(requests[sent % len(requests)])
            sent += 1
            record.add(status, started)
            if polite and retry_after:
                await asyncio.sleep(min(retry_after, max(0.0, record.stop_at - clock())))
    finally:
        await connection.close()


async def grpc_open_loop(
    port: int, path: str, requests: list[bytes], rate: float, record: Record
) -> None:
    """Sends ``rate`` calls per second over a few channels, whatever the answers."""
    channels = [GrpcConnection(port, path) for _ in range(OPEN_LOOP_CHANNELS)]
    pending: set[asyncio.Task[None]] = set()

    async def one(connection: GrpcConnection, request: bytes, planned: float) -> None:
        status, _ = await connection.send(request)
        record.add(status, planned)

    planned = clock()
    sent = 0
    while planned < record.stop_at:
        await asyncio.sleep(max(0.0, planned - clock()))
        connection = channels[sent % len(channels)]
        task = asyncio.create_task(one(connection, requests[sent % len(requests)], planned))
        pending.add(task)
        task.add_done_callback(pending.discard)
        sent += 1
        planned += 1 / rate
    await asyncio.gather(*pending)
    for connection in channels:
        await connection.close()


async def connection(
    port: int, requests: list[bytes], offset: int, record: Record, polite: bool = True
) -> None:
    stop_at = record.stop_at
    writer = None
    sent = offset
    while clock() < stop_at:
        if writer is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert reader is not None
        started = clock()
        writer.write(requests[sent % len(requests)])
        sent += 1
        try:
            status, close, retry_after = await asyncio.wait_for(read_response(reader), 60)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            status, close, retry_after = 0, True, 0.0
        record.add(status, started)
        retry_after = retry_after if polite else 0.0
        if close or retry_after:
            # The server's keep-alive timeout may end an idle connection while we wait,
            # just as we send on it: wait on no connection, and open a new one after.
            writer.close()
            writer = None
        if retry_after:
            # A well-behaved client, like python -m client, waits as the server asks.
            await asyncio.sleep(min(retry_after, max(0.0, stop_at - clock())))
    if writer is not None:
        writer.close()


async def open_loop(port: int, requests: list[bytes], rate: float, record: Record) -> None:
    """Sends ``rate`` requests per second until the window ends, whatever the answers."""
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    pending: set[asyncio.Task[None]] = set()

    async def one(request: bytes, planned: float) -> None:
        try:
            reader, writer = (
                idle.pop() if idle else await asyncio.open_connection("127.0.0.1", port)
            )
        except OSError:
            record.add(0, planned)
            return
        writer.write(request)
        try:
            status, close, _ = await asyncio.wait_for(read_response(reader), 60)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            status, close = 0, True
        record.add(status, planned)
        if close:
            writer.close()
        else:
            idle.append((reader, writer))

    planned = clock()
    sent = 0
    while planned < record.stop_at:
        await asyncio.sleep(max(0.0, planned - clock()))
        task = asyncio.create_task(one(requests[sent % len(requests)], planned))
        pending.add(task)
        task.add_done_callback(pending.discard)
        sent += 1
        planned += 1 / rate
    await asyncio.gather(*pending)
    for _, writer in idle:
        writer.close()


async def run(args: argparse.Namespace, requests: list[bytes]) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    record = Record(clock() + args.warmup, clock() + args.warmup + args.duration)
    server_cpu: list[float] = []
    if args.server_pid:
        for at in (record.measure_from, record.stop_at):
            loop.call_later(at - clock(), lambda: server_cpu.append(cpu_seconds(args.server_pid)))
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    path = args.path or PATHS[args.protocol]
    if args.protocol == "grpc" and args.rate:
        await grpc_open_loop(args.port, path, requests, args.rate, record)
    elif args.protocol == "grpc":
        await asyncio.gather(
            *(
                grpc_client(args.port, path, requests, i * 7, record, not args.impolite)
                for i in range(args.concurrency)
            )
        )
    elif args.rate:
        await open_loop(args.port, requests, args.rate, record)
    else:
        await asyncio.gather(
            *(
                connection(args.port, requests, i * 7, record, not args.impolite)
                for i in range(args.concurrency)
            )
        )
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage.ru_utime - usage_before.ru_utime) + (usage.ru_stime - usage_before.ru_stime)
    wall = clock() - (record.measure_from - args.warmup)
    result: dict[str, object] = {
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "statuses": [s for s, _ in record.samples],
        "latencies_s": [round(t, 6) for _, t in record.samples],
        "loadgen_cpu_percent": round(100 * cpu / wall, 1),
    }
    if OTHER_CODES:
        result["grpc_other_codes"] = dict(OTHER_CODES)
    if len(server_cpu) == 2:
        result["server_cpu_in_window_s"] = round(server_cpu[1] - server_cpu[0], 3)
        result["answered_in_window"] = {str(k): v for k, v in sorted(record.answered.items())}
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--protocol", choices=sorted(PATHS), default="multipart")
    parser.add_argument("--path", help="default: the protocol's usual path")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--images", required=True)
    parser.add_argument("--impolite", action="store_true", help="retry a 503 at once")
    parser.add_argument("--rate", type=float, default=0, help="open loop: requests per second")
    parser.add_argument(
        "--server-pid", type=int, help="measure the CPU time of this process and its group"
    )
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # open loop: many connections
    images = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in {".jpg", ".jpeg"})
    path = args.path or PATHS[args.protocol]
    if args.protocol == "grpc":
        requests = [build_grpc_request(p.read_bytes()) for p in images]
    else:
        requests = [
            build_request(args.protocol, path, args.port, p.read_bytes(), p.name) for p in images
        ]
    started = time.perf_counter()
    result = uvloop.run(run(args, requests))
    result["wall_s"] = round(time.perf_counter() - started, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
