"""The servers the benchmark loads, ours and its peers, and one load run against each.

The peers serve the same ONNX model file with the same preprocessing (our Classifier)
and the same ONNX Runtime options, each through its own protocol: Triton (through
PyTriton, in .venv-triton, which `make bench` makes from requirements-triton.txt) takes
the Open Inference Protocol, mosec a raw body, LitServe our multipart form.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.server import Server, free_ports, stop, wait_ready  # noqa: E402

CONCURRENCY = (1, 8, 32, 128)
# Rounds a level is split into when one server is loaded over several protocols.
ROUNDS = 3
TRITON_PYTHON = ROOT / ".venv-triton" / "bin" / "python"


@dataclass(frozen=True)
class Contender:
    """How to start one server on a port (appended to ``command``) and load it."""

    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    protocol: str = "multipart"  # bench/loadgen.py's --protocol; grpc: on GRPC_PORT
    # Further protocols loaded on the same server, each level in turn: one server
    # process (one batch size chosen at warm-up) for every protocol it is compared over.
    # Their rows are named "<name> V2 HTTP" and "<name> gRPC".
    also: tuple[str, ...] = ()
    ready_path: str = "/health/ready"
    needs: Path | None = None  # an interpreter that `make bench` makes, if it needs one

    def missing(self) -> str | None:
        """Why it cannot run here, if it cannot; asked when its turn comes, after
        `make bench` has made what it needs."""
        if self.needs is None or self.needs.exists():
            return None
        return f"{self.needs} is missing: make bench"


def _triton(
    precision: str = "float32", protocol: str = "v2", also: tuple[str, ...] = ()
) -> Contender:
    # The Python backend's stub links against the interpreter's shared library.
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    return Contender(
        [str(TRITON_PYTHON), "bench/peers/triton_server.py"],
        {"PRECISION": precision, "LD_LIBRARY_PATH": libdir},
        protocol=protocol,
        also=also,
        ready_path="/v2/models/cls/ready",
        needs=TRITON_PYTHON,
    )


OURS = [sys.executable, "main.py"]
FLOAT32 = {"PRECISION": "float32"}
# The default model as files in a model repository (examples/model_repository, made by
# `make bench`), served beside /cls by one server. Each of its two models gets every
# core's thread, as alone: they are loaded in turn, never at once.
REPOSITORY = {
    **FLOAT32,
    "MODEL_REPOSITORY": "examples/model_repository",
    "TORCH_THREADS": str(2 * (os.cpu_count() or 1)),
}
REPOSITORY_PATH = "/efficientnet_lite0"
REPOSITORY_SERVER = "ours float32, /cls beside the repository"
CONTENDERS: dict[str, Contender] = {
    "ours (defaults)": Contender(OURS, also=("grpc",)),
    "ours PRECISION=float32": Contender(OURS, FLOAT32, also=("v2", "grpc")),
    "Triton (PyTriton) float32": _triton(also=("grpc",)),
    "Triton (PyTriton) int8": _triton("int8", "grpc"),
    "mosec float32": Contender(
        [sys.executable, "bench/peers/mosec_server.py"],
        {"PRECISION": "float32"},
        protocol="raw",
        ready_path="/",
    ),
    "LitServe float32": Contender(
        [sys.executable, "bench/peers/litserve_server.py"], {"PRECISION": "float32"}
    ),
    REPOSITORY_SERVER: Contender(OURS, REPOSITORY, also=("repository",)),
    "ours MAX_BATCH_SIZE=1": Contender(OURS, {"MAX_BATCH_SIZE": "1"}),
    "ours BACKEND=torch": Contender(OURS, {"BACKEND": "torch"}),
    "naive FastAPI": Contender([sys.executable, "bench/naive_server.py"]),
}
PEERS = ["Triton (PyTriton) float32", "mosec float32", "LitServe float32"]
# Triton in int8 (over gRPC), beside our defaults' int8; PEERS are all float32.
TRITON_INT8 = "Triton (PyTriton) int8"
PROTOCOL_NAMES = {"v2": "V2 HTTP", "grpc": "gRPC", "repository": REPOSITORY_PATH}
# How bench/loadgen.py loads each protocol: its --protocol, and its --path if not the usual.
LOADGEN_ARGUMENTS = {"repository": ("--protocol", "multipart", "--path", REPOSITORY_PATH)}


def loadgen_arguments(protocol: str) -> tuple[str, ...]:
    return LOADGEN_ARGUMENTS.get(protocol, ("--protocol", protocol))


def row_name(name: str, contender: Contender, protocol: str) -> str:
    """The name of a contender's rows over ``protocol``: its own name for its first
    protocol, with the protocol's after it for the others."""
    return name if protocol == contender.protocol else f"{name} {PROTOCOL_NAMES[protocol]}"


def start(command: list[str], env: dict[str, str], port: int, log: Path) -> Server:
    """Starts ``command`` serving HTTP on ``port``, and gRPC on env's GRPC_PORT if set."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, for stop_all
        )
    grpc_port = env.get("GRPC_PORT", "0")
    grpc_target = f"127.0.0.1:{grpc_port}" if grpc_port != "0" else ""
    return Server(process, f"http://127.0.0.1:{port}", log, grpc_target)


def stop_all(server: Server) -> None:
    """Stops a server and every process it started. Peers' workers (LitServe's, mosec's,
    Triton's server) outlive a SIGTERM to the main process, and left running they would
    take CPU from the rest of the run."""
    group = server.process.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    stop(server)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)


def wait_until_ready(server: Server, contender: Contender, images: Path, timeout: float) -> None:
    """Until the contender's readiness path answers 200, then one real request: some
    peers answer their health check before their model workers are up."""
    wait_ready(server, timeout, contender.ready_path)
    for protocol in (contender.protocol, *contender.also):
        load(load_port(protocol, server), 1, 1.0, images, *loadgen_arguments(protocol), warmup=0.0)


def load_port(protocol: str, server: Server) -> int:
    """Where the load goes: gRPC on the server's GRPC_PORT, the rest on its HTTP port."""
    if protocol == "grpc":
        return int(server.grpc_target.rpartition(":")[2])
    return int(server.url.rsplit(":", 1)[1])


def load(
    port: int,
    concurrency: int,
    duration: float,
    images: Path,
    *extra: str,
    warmup: float = 1.0,
) -> dict[str, Any]:
    """One bench/loadgen.py run; ``extra`` are its options (--impolite, --rate R,
    --protocol P)."""
    return summary([run_loadgen(port, concurrency, duration, images, *extra, warmup=warmup)])


def run_loadgen(
    port: int,
    concurrency: int,
    duration: float,
    images: Path,
    *extra: str,
    warmup: float = 1.0,
) -> dict[str, Any]:
    """bench/loadgen.py's raw result, with the run's own concurrency and duration."""
    output = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "loadgen.py"),
            *("--port", str(port), "--concurrency", str(concurrency)),
            *("--duration", str(duration), "--warmup", str(warmup), "--images", str(images)),
            *extra,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    raw: dict[str, Any] = json.loads(output.stdout)
    return raw | {"concurrency": concurrency, "duration_s": duration}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rates, latency percentiles and statuses of one or more loadgen runs at one level,
    taken together."""
    statuses = [s for raw in runs for s in raw["statuses"]]
    latencies = [t for raw in runs for t in raw["latencies_s"]]
    duration = sum(raw["duration_s"] for raw in runs)
    ok = sorted(t for s, t in zip(statuses, latencies, strict=True) if s == 200)
    mix = {str(code): statuses.count(code) for code in sorted(set(statuses))}
    last = runs[-1]
    return {
        "concurrency": last["concurrency"],
        "requests": len(statuses),
        "status_mix": mix,
        "throughput_rps": round(len(ok) / duration, 1),
        "p50_ms": percentile(ok, 50),
        "p95_ms": percentile(ok, 95),
        "p99_ms": percentile(ok, 99),
        "loadgen_cpu_percent": round(sum(r["loadgen_cpu_percent"] for r in runs) / len(runs), 1),
        **server_cpu(runs),
    }


def server_cpu(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The server's CPU seconds over the measured windows of ``runs`` (loadgen's
    --server-pid), the answers that came in them, and the CPU milliseconds per 200."""
    if not all("server_cpu_in_window_s" in raw for raw in runs):
        return {}
    seconds = sum(raw["server_cpu_in_window_s"] for raw in runs)
    answered: dict[str, int] = {}
    for raw in runs:
        for status, count in raw["answered_in_window"].items():
            answered[status] = answered.get(status, 0) + count
    ok = answered.get("200", 0)
    return {
        "server_cpu_in_window_s": round(seconds, 2),
        "answered_in_window": answered,
        "server_cpu_ms_per_200": round(1000 * seconds / ok, 2) if ok else None,
    }


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, round(q / 100 * (len(sorted_values) - 1)))
    return round(sorted_values[index] * 1000, 1)


def run_levels(
    names: list[str],
    images: Path,
    logs: Path,
    duration: float,
    levels: tuple[int, ...] = CONCURRENCY,
) -> dict[str, list[dict[str, Any]]]:
    """Each named contender, started alone on a free port, at each concurrency level.
    One that cannot run here is left out, with its reason printed."""
    results: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        contender = CONTENDERS[name]
        if why := contender.missing():
            print(f"  {name}: left out, {why}", flush=True)
            continue
        port, grpc_port = free_ports(2)
        env = {"PORT": str(port), "GRPC_PORT": str(grpc_port), "LOG_LEVEL": "warning"}
        env |= contender.env
        log = logs / f"{slug(name)}.log"
        server = start([*contender.command, str(port)], env, port, log)
        try:
            wait_until_ready(server, contender, images, timeout=240)
            protocols = (contender.protocol, *contender.also)
            for protocol in protocols:
                results[row_name(name, contender, protocol)] = []
            for concurrency in levels:
                # Over several protocols, each level in rounds, each protocol in turn:
                # the machine's speed drifts over a minute, and a protocol measured
                # always first or last at a level would take the drift as its own.
                rounds = ROUNDS if len(protocols) > 1 else 1
                runs: dict[str, list[dict[str, Any]]] = {p: [] for p in protocols}
                for _ in range(rounds):
                    for protocol in protocols:
                        runs[protocol].append(
                            run_loadgen(
                                load_port(protocol, server),
                                concurrency,
                                duration / rounds,
                                images,
                                *loadgen_arguments(protocol),
                                *("--server-pid", str(server.process.pid)),
                            )
                        )
                for protocol in protocols:
                    row = summary(runs[protocol])
                    shown = row_name(name, contender, protocol)
                    print(
                        f"  {shown:34} c={concurrency:<4} {row['throughput_rps']:7.1f} req/s "
                        f"p50 {row['p50_ms']} ms p99 {row['p99_ms']} ms {row['status_mix']}",
                        flush=True,
                    )
                    results[shown].append(row)
        finally:
            stop_all(server)
    return results


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
