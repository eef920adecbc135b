"""Overload against impolite clients: the peak, open-loop arrivals at 2x and 4x of it,
a retry storm of 256 clients that ignore Retry-After, and the server's CPU per refusal.

    .venv/bin/python bench/overload.py      (about two minutes; make bench-overload)
    OVERLOAD_PRECISION=float32 .venv/bin/python bench/overload.py   (the float32 model)
    OVERLOAD_PROTOCOL=grpc .venv/bin/python bench/overload.py   (ModelInfer over gRPC)

Writes bench/results/<date>-<host>-overload.md and .json.
"""

import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import run  # bench/run.py, importable once its folder is on the path
import servers
from loadgen import cpu_seconds

from harness.server import free_ports, wait_ready

TIMEOUT_S = 2.0
STORM_CLIENTS = 256
PEAK_CONCURRENCY = 32


PROTOCOL = os.environ.get("OVERLOAD_PROTOCOL", "multipart")  # or v2, grpc


def measured(
    pid: int, port: int, concurrency: int, duration: float, images: Path, *extra: str
) -> dict[str, Any]:
    """A load run over PROTOCOL on ``port``, with the server's CPU
    seconds over the whole run."""
    before = cpu_seconds(pid)
    extra = ("--protocol", PROTOCOL, *extra)
    row = servers.load(port, concurrency, duration, images, *extra)
    row["server_cpu_s"] = round(cpu_seconds(pid) - before, 2)
    mix = row["status_mix"]
    answers = sum(mix.values())
    row["goodput_rps"] = row["throughput_rps"]
    row["refused"] = mix.get("503", 0)
    row["timed_out"] = mix.get("504", 0)
    row["timed_out_share"] = round(row["timed_out"] / answers, 4) if answers else None
    return row


def serve(env: dict[str, str], logs: Path, name: str) -> tuple[servers.Server, int]:
    """A server, and the port the load goes to (its gRPC port over gRPC)."""
    port, grpc_port = free_ports(2)
    full_env = {
        "PORT": str(port),
        "GRPC_PORT": str(grpc_port),
        "LOG_LEVEL": "warning",
        "TIMEOUT": str(TIMEOUT_S),
        **env,
    }
    server = servers.start([sys.executable, "main.py"], full_env, port, logs / f"{name}.log")
    wait_ready(server, timeout=180)
    return server, servers.load_port(PROTOCOL, server)


def refusal_cost(images: Path, logs: Path, duration: float, env: dict[str, str]) -> dict[str, Any]:
    """The server's CPU per refusal, on a server that refuses every /cls request (with
    TIMEOUT far below one batch, admission turns each one away up front), under the
    retry storm: the server's CPU time over the measured window, less what it spends
    idle, per refusal answered in that window. The run-in second, in which the clients
    open their connections and each takes a first refusal with its body read, is left
    out, as the other runs leave it out; the whole run's figure is reported beside it."""
    server, port = serve({**env, "TIMEOUT": "0.001"}, logs, "refuse-all")
    pid = server.process.pid
    try:
        before = cpu_seconds(pid)
        time.sleep(duration + 1)
        idle_per_s = (cpu_seconds(pid) - before) / (duration + 1)  # doing nothing
        storm = ("--impolite", "--server-pid", str(pid))
        row = measured(pid, port, STORM_CLIENTS, duration, images, *storm)
    finally:
        servers.stop_all(server)
    row["server_idle_cpu_s_per_s"] = round(idle_per_s, 4)
    busy = row["server_cpu_in_window_s"] - idle_per_s * duration
    row["server_cpu_ms_per_refusal"] = round(1000 * busy / row["answered_in_window"]["503"], 3)
    # The whole run: the run-in's refusals counted at the window's rate.
    busy = row["server_cpu_s"] - idle_per_s * (duration + 1)
    refused = row["refused"] * (duration + 1) / duration
    row["server_cpu_ms_per_refusal_with_run_in"] = round(1000 * busy / refused, 3)
    return row


def overload_suite(
    images: Path, logs: Path, duration: float, env: dict[str, str]
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "timeout_s": TIMEOUT_S,
        "duration_s": duration,
        "env": env,
        "protocol": PROTOCOL,
    }
    server, port = serve(env, logs, "overload")
    pid = server.process.pid
    try:
        peak = measured(pid, port, PEAK_CONCURRENCY, duration, images)
        report["peak"] = peak
        for factor in (2, 4):
            rate = factor * peak["goodput_rps"]
            row = measured(pid, port, 1, duration, images, "--rate", str(rate))
            row["rate_rps"] = round(rate, 1)
            report[f"open_loop_{factor}x"] = row
        report["storm"] = measured(pid, port, STORM_CLIENTS, duration, images, "--impolite")
        report["polite_256"] = measured(pid, port, STORM_CLIENTS, duration, images)
    finally:
        servers.stop_all(server)
    report["refusal"] = refusal_cost(images, logs, duration, env)
    for name in ("open_loop_2x", "open_loop_4x", "storm", "polite_256"):
        row = report[name]
        row["goodput_share"] = round(row["goodput_rps"] / peak["goodput_rps"], 3)
    report["targets"] = targets(report)
    return report


def targets(report: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for each overload target of issue #11."""
    limit_ms = 1000 * report["timeout_s"]
    rows = []
    for factor in (2, 4):
        row = report[f"open_loop_{factor}x"]
        only = set(row["status_mix"]) <= {"200", "503"}
        p99 = row["p99_ms"] or 0.0
        rows.append(
            (
                f"open loop {factor}x: goodput >= 90% of peak, only 200/503, p99 <= TIMEOUT",
                f"{row['goodput_share']:.0%}, {row['status_mix']}, p99 {p99:.0f} ms",
                row["goodput_share"] >= 0.9 and only and p99 <= limit_ms,
            )
        )
    storm = report["storm"]
    p99 = storm["p99_ms"] or 0.0
    rows.append(
        (
            "retry storm: goodput >= 75% of peak, 504 <= 1%, p99 <= TIMEOUT",
            f"{storm['goodput_share']:.0%}, 504 {storm['timed_out_share']:.2%}, p99 {p99:.0f} ms",
            storm["goodput_share"] >= 0.75 and storm["timed_out_share"] <= 0.01 and p99 <= limit_ms,
        )
    )
    cost = report["refusal"]["server_cpu_ms_per_refusal"]
    rows.append(("server CPU per refusal <= 0.1 ms", f"{cost:.3f} ms", cost <= 0.1))
    return rows


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    settings = "".join(f", {name}={value}" for name, value in report["env"].items())
    lines = [
        f"# Overload against impolite clients, {report['date']}",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}."
        f" Load average at start (1, 5, 15 min): {report['load_average_at_start']}.",
        f"One server (uvicorn, defaults{settings}, TIMEOUT={report['timeout_s']:g}), cls over"
        f" {report['protocol']} with the benchmark's 15 photos, {report['duration_s']:g} s per"
        " run after a 1 s run-in.",
        "",
        "| run | offered | goodput (req/s) | share of peak | status mix | p99 of 200s (ms)"
        " | server CPU (s) | loadgen CPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    offered = {
        "peak": f"{PEAK_CONCURRENCY} closed-loop clients",
        "open_loop_2x": "open loop, 2x peak",
        "open_loop_4x": "open loop, 4x peak",
        "storm": f"{STORM_CLIENTS} clients ignoring Retry-After",
        "polite_256": f"{STORM_CLIENTS} clients waiting out Retry-After",
        "refusal": "every request refused (TIMEOUT=0.001)",
    }
    for name, label in offered.items():
        row = report[name]
        if "rate_rps" in row:
            label += f" ({row['rate_rps']:.0f} req/s)"
        share = row.get("goodput_share", 1.0 if name == "peak" else None)
        lines.append(
            f"| {name} | {label} | {row['goodput_rps']} | "
            f"{'' if share is None else f'{share:.0%}'} | {row['status_mix']} | "
            f"{row['p99_ms']} | {row['server_cpu_s']} | {row['loadgen_cpu_percent']}% |"
        )
    lines += [
        "",
        f"Server CPU per refusal: {report['refusal']['server_cpu_ms_per_refusal']} ms over the"
        " measured window; with the run-in second (each connection's first refusal reads"
        f" its body), {report['refusal']['server_cpu_ms_per_refusal_with_run_in']} ms.",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        *(f"| {t} | {m} | {'yes' if ok else 'NO'} |" for t, m, ok in report["targets"]),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    duration = float(os.environ.get("OVERLOAD_DURATION_S", "10"))
    # OVERLOAD_PRECISION=float32 measures the float32 model against the default's int8.
    precision = os.environ.get("OVERLOAD_PRECISION")
    env = {"PRECISION": precision} if precision else {}
    with tempfile.TemporaryDirectory(prefix="bench-overload-") as tmp:
        work = Path(tmp)
        images = work / "images"
        images.mkdir()
        run.make_images(images)
        report: dict[str, Any] = {
            "date": datetime.date.today().isoformat(),
            "machine": run.machine(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        }
        started = time.monotonic()
        report |= overload_suite(images, work, duration, env)
        report["wall_s"] = round(time.monotonic() - started)
    for target, value, met in report["targets"]:
        print(f"{'met ' if met else 'MISS'} {target}: {value}")
    out = servers.ROOT / "bench" / "results"
    stem = f"{report['date']}-{platform.node() or 'host'}-overload"
    if precision:
        stem += f"-{precision}"
    if PROTOCOL != "multipart":
        stem += f"-{PROTOCOL}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (out / f"{stem}.md").write_text(markdown(report))
    print(f"wrote bench/results/{stem}.md")


if __name__ == "__main__":
    main()
