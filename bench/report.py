"""The benchmark's report: its targets, its chart and its Markdown."""

import json
from pathlib import Path
from typing import Any

from servers import PEERS, PROTOCOL_NAMES, REPOSITORY_SERVER

FLOAT32 = "ours PRECISION=float32"
DEFAULTS = "ours (defaults)"
# The Open Inference Protocol: (ours, the multipart run of the same precision, Triton's
# run over the same protocol and client).
PROTOCOL_PAIRS = [
    (f"{DEFAULTS} gRPC", DEFAULTS, "Triton (PyTriton) int8"),
    (f"{FLOAT32} gRPC", FLOAT32, "Triton (PyTriton) float32 gRPC"),
    (f"{FLOAT32} V2 HTTP", FLOAT32, "Triton (PyTriton) float32"),
]


def by_concurrency(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {row["concurrency"]: row for row in rows}


def best_peer(result: dict[str, Any], concurrency: int) -> tuple[str, float]:
    """The peer with the most answers per second at ``concurrency``, and that rate."""
    rates = {
        name: by_concurrency(result["servers"][name])[concurrency]["throughput_rps"]
        for name in PEERS
        if name in result["servers"]
    }
    if not rates:
        return "no peer", 0.0
    name = max(rates, key=lambda peer: rates[peer])
    return name, rates[name]


def targets(result: dict[str, Any]) -> list[tuple[str, str, bool]]:
    servers = result["servers"]
    ours, float32 = by_concurrency(servers[DEFAULTS]), by_concurrency(servers[FLOAT32])
    off = result["offline"]
    default = "onnxruntime int8" if off["default_precision"] == "int8" else "onnxruntime float32"
    limit32 = off["limits"]["float32"]["images_per_second"]
    peak32 = max(row["throughput_rps"] for row in servers[FLOAT32] if row["concurrency"] <= 32)
    peer32, peer32_rps = best_peer(result, 32)
    peer128, peer128_rps = best_peer(result, 128)
    at128 = float32[128]
    refused128 = at128["status_mix"].get("503", 0)
    checks = [
        (
            "c=1 p50 (defaults) <= offline single-image latency + 5 ms",
            f"{ours[1]['p50_ms']} ms vs {off['backends'][default]['single_image_ms']} + 5 ms",
            ours[1]["p50_ms"] <= off["backends"][default]["single_image_ms"] + 5,
        ),
        (
            "c=32 float32 >= 85% of the physical limit (decode + model core-time)",
            f"{float32[32]['throughput_rps']} vs 0.85 x {limit32} = {0.85 * limit32:.1f} req/s "
            f"({float32[32]['throughput_rps'] / limit32:.0%})",
            float32[32]["throughput_rps"] >= 0.85 * limit32,
        ),
        (
            "c=32 float32 >= 1.1x the best peer (same model, float32)",
            f"{float32[32]['throughput_rps']} vs 1.1 x {peer32_rps} ({peer32}) = "
            f"{1.1 * peer32_rps:.1f} req/s",
            float32[32]["throughput_rps"] >= 1.1 * peer32_rps,
        ),
        (
            "c=128 TIMEOUT=2 float32: goodput >= our c<=32 peak",
            f"{at128['throughput_rps']} vs {peak32} req/s",
            at128["throughput_rps"] >= peak32,
        ),
        (
            "c=128 TIMEOUT=2 float32: goodput >= the best peer's at 128",
            f"{at128['throughput_rps']} vs {peer128_rps} ({peer128}) req/s",
            at128["throughput_rps"] >= peer128_rps,
        ),
        (
            "c=128 TIMEOUT=2 float32: no 503 while the 200s' p99 is under 1.6 s",
            f"{refused128} x 503, p99 {at128['p99_ms']} ms",
            refused128 == 0 or (at128["p99_ms"] or 0) >= 1600,
        ),
    ]
    over = result["overload"]
    peak = max(row["throughput_rps"] for row in servers[DEFAULTS])
    checks += [
        (
            "c=256 TIMEOUT=2: only 200, 503, 504",
            json.dumps(over["status_mix"]),
            set(over["status_mix"]) <= {"200", "503", "504"},
        ),
        (
            "c=256 TIMEOUT=2: p99 of 200s <= 2 s",
            f"{over['p99_ms']} ms",
            over["p99_ms"] is not None and over["p99_ms"] <= 2000,
        ),
        (
            "c=256 TIMEOUT=2: goodput >= 90% of peak",
            f"{over['goodput_rps']} vs 0.9 x {peak} = {0.9 * peak:.1f} req/s",
            over["goodput_rps"] >= 0.9 * peak,
        ),
    ]
    checks += protocol_targets(servers)
    checks += repository_targets(servers)
    if off["default_precision"] == "int8":
        checks.append(
            (
                "c=32 (defaults: int8) >= 1.3x PRECISION=float32",
                f"{ours[32]['throughput_rps']} vs 1.3 x {float32[32]['throughput_rps']} = "
                f"{1.3 * float32[32]['throughput_rps']:.1f} req/s",
                ours[32]["throughput_rps"] >= 1.3 * float32[32]["throughput_rps"],
            )
        )
    return checks


def repository_targets(servers: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str, bool]]:
    """The default model served from MODEL_REPOSITORY within 5% of /cls's throughput at
    32 clients, on one server, and only 200 or 503."""
    repository = f"{REPOSITORY_SERVER} {PROTOCOL_NAMES['repository']}"
    if repository not in servers or REPOSITORY_SERVER not in servers:
        return []
    rps = by_concurrency(servers[repository])[32]["throughput_rps"]
    cls_rps = by_concurrency(servers[REPOSITORY_SERVER])[32]["throughput_rps"]
    statuses = {code for row in servers[repository] for code in row["status_mix"]}
    return [
        (
            "c=32 the repository's copy of the model >= 0.95x /cls",
            f"{rps} vs 0.95 x {cls_rps} = {0.95 * cls_rps:.1f} req/s",
            rps >= 0.95 * cls_rps,
        ),
        (
            "the repository's copy, c=1-128: only 200 or 503",
            ", ".join(sorted(statuses)),
            statuses <= {"200", "503"},
        ),
    ]


def protocol_targets(servers: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str, bool]]:
    """Over the Open Inference Protocol: at least multipart /cls's throughput and 1.2x
    Triton's at 32 clients, p50 at 1 client within 1 ms of /cls's, and only 200 or 503
    (UNAVAILABLE) at every level."""
    checks = []
    for name, multipart_name, triton_name in PROTOCOL_PAIRS:
        if name not in servers or multipart_name not in servers:
            continue
        ours, multipart = by_concurrency(servers[name]), by_concurrency(servers[multipart_name])
        rps, cls_rps = ours[32]["throughput_rps"], multipart[32]["throughput_rps"]
        checks.append(
            (f"c=32 {name} >= multipart /cls", f"{rps} vs {cls_rps} req/s", rps >= cls_rps)
        )
        if triton_name in servers:
            triton_row = by_concurrency(servers[triton_name])[32]
            triton = triton_row["throughput_rps"]
            cpu = (ours[32].get("server_cpu_ms_per_200"), triton_row.get("server_cpu_ms_per_200"))
            spent = f"; server CPU per 200: {cpu[0]} vs {cpu[1]} ms" if None not in cpu else ""
            checks.append(
                (
                    f"c=32 {name} >= 1.2x {triton_name}",
                    f"{rps} vs 1.2 x {triton} = {1.2 * triton:.1f} req/s{spent}",
                    rps >= 1.2 * triton,
                )
            )
        p50, cls_p50 = ours[1]["p50_ms"], multipart[1]["p50_ms"]
        checks.append(
            (
                f"c=1 p50 {name} within 1 ms of /cls",
                f"{p50} vs {cls_p50} ms",
                p50 is not None and cls_p50 is not None and p50 <= cls_p50 + 1,
            )
        )
        statuses = {code for row in servers[name] for code in row["status_mix"]}
        checks.append(
            (
                f"{name}, c=1-128: only 200 or 503 (UNAVAILABLE)",
                ", ".join(sorted(statuses)),
                statuses <= {"200", "503"},
            )
        )
    return checks


def precision(name: str, default_precision: str) -> str:
    """The precision a run served: int8 where named, or for our defaults where they are."""
    if "int8" in name or (name.startswith(DEFAULTS) and default_precision == "int8"):
        return "int8"
    return "float32"


def chart(result: dict[str, Any], path: Path, levels: tuple[int, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, rows in result["servers"].items():
        cs = [row["concurrency"] for row in rows]
        left.plot(cs, [row["throughput_rps"] for row in rows], marker="o", label=name)
        (line,) = right.plot(cs, [row["p50_ms"] for row in rows], marker="o", label=f"{name} p50")
        right.plot(
            cs,
            [row["p99_ms"] for row in rows],
            marker="x",
            linestyle="--",
            color=line.get_color(),
            label=f"{name} p99",
        )
    limit = result["offline"]["limits"]["float32"]["images_per_second"]
    left.axhline(limit, color="grey", linestyle=":", label=f"float32 physical limit ({limit})")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(levels, [str(c) for c in levels])
        axis.set_xlabel("concurrent clients")
        axis.grid(alpha=0.3)
    left.set_ylabel("responses 200 per second")
    left.set_title("Throughput")
    right.set_ylabel("latency (ms)")
    right.set_yscale("log")
    right.set_title("Latency, p50 (solid) and p99 (dashed)")
    left.legend(fontsize=7)
    m = result["machine"]
    figure.suptitle(
        f"EfficientNet-Lite0 /cls, {m['cores']} cores, {m['cpu']} ({', '.join(m['cpu_flags'])})",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def markdown(result: dict[str, Any], png: str) -> str:
    m = result["machine"]
    off = result["offline"]
    sizes = list(next(iter(off["backends"].values()))["images_per_second"])
    lines = [
        f"# Benchmark, {m['date']}",
        "",
        f"Machine: `{m['host']}`, {m['cpu']}, {m['cores']} cores ({', '.join(m['cpu_flags'])}), "
        f"no GPU. Python {m['python']}, torch {m['torch']}, onnxruntime {m['onnxruntime']}; "
        f"load average {m['load_average_at_start']} at the start. Reproduce with `make bench`.",
        "",
        f"Photos: {result['photos']}. `PRECISION=auto` serves {off['default_precision']} here ("
        f"{off['default_precision_reason'].removeprefix('PRECISION=auto: ')}).",
        "",
        "## Offline (no HTTP)",
        "",
        f"Decode + resize + crop: {off['decode_ms_per_image']} ms of one thread per photo.",
        "",
        "| Backend (every thread) | " + " | ".join(f"batch {b}" for b in sizes) + " |",
        "|---" * (len(sizes) + 1) + "|",
    ]
    for name, row in off["backends"].items():
        rates = " | ".join(f"{row['images_per_second'][b]} img/s" for b in sizes)
        lines.append(f"| {name} | {rates} |")
    lines += ["", "**Physical limit** of the cores: one thread's decode plus model time per image,"]
    lines += ["at the model's best batch size, shared by every core.", ""]
    lines += ["| Model | decode ms | model ms (best) | limit |", "|---|---|---|---|"]
    for name, limit in off["limits"].items():
        lines.append(
            f"| {name} | {limit['decode_core_ms']} | {limit['model_core_ms_best']} | "
            f"{limit['images_per_second']} img/s |"
        )
    lines += recipe_lines(off["recipes"])
    lines += [
        "",
        "## Servers under load",
        "",
        f"Closed-loop clients on keep-alive connections; {result['duration_s']} s measured per "
        "level after 1 s of warm-up; latencies are of 200 responses. The peers serve the same "
        "ONNX file with our Classifier's preprocessing and ONNX Runtime options, in float32 "
        "unless named int8. Runs named V2 HTTP or gRPC send the same photos over the Open "
        "Inference Protocol (the binary tensor extension, or ModelInfer with raw contents, "
        "one channel per client) from the same client as Triton's runs, on the same server "
        "process as the run without the suffix, each level over each protocol in turn; a "
        "gRPC UNAVAILABLE counts as 503. Triton int8 is over gRPC.",
        "",
        f"![throughput and latency]({png})",
        "",
        "*Server CPU per 200* is the CPU time of the server's processes (workers and model"
        " processes included) over the measured window, per answer 200 in it; the client"
        " runs on the same cores.",
        "",
        "| Server | clients | req/s | share of limit | server CPU per 200 | p50 ms | p95 ms |"
        " p99 ms | statuses |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in result["servers"].items():
        limit = off["limits"][precision(name, off["default_precision"])]["images_per_second"]
        for row in rows:
            cpu = row.get("server_cpu_ms_per_200")
            lines.append(
                f"| {name} | {row['concurrency']} | {row['throughput_rps']} | "
                f"{row['throughput_rps'] / limit:.0%} | {'' if cpu is None else f'{cpu} ms'} | "
                f"{row['p50_ms']} | {row['p95_ms']} | {row['p99_ms']} | {row['status_mix']} |"
            )
    over = result["overload"]
    lines += [
        "",
        "## Overload: 256 clients, TIMEOUT=2",
        "",
        f"Status mix {over['status_mix']}; p99 of the 200s {over['p99_ms']} ms; goodput "
        f"{over['goodput_rps']} responses 200 per second.",
        "",
        "## Targets",
        "",
        "| Target | Measured | Met |",
        "|---|---|---|",
    ]
    for target, measured, met in result["targets"]:
        lines.append(f"| {target} | {measured} | {'yes' if met else '**no**'} |")
    return "\n".join(lines) + "\n"


def recipe_lines(recipes: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"**int8 recipes** (this CPU's: `{recipes['this_cpu']}`), model alone on every thread; "
        f"agreement with float32 on the {recipes['photos']} labelled photos of "
        "../shared/calibration, on which the int8 ranges were measured:",
        "",
        "| Model | batch 1 / 8 / 16 | top-1 agreement | largest probability difference | top-1 |",
        "|---|---|---|---|---|",
    ]
    for name, row in recipes["recipes"].items():
        rates = " / ".join(str(rate) for rate in row["images_per_second"].values())
        lines.append(
            f"| {name} | {rates} img/s | {row.get('agreement', '-')} | "
            f"{row.get('largest_difference', '-')} | {row.get('top1', '-')} |"
        )
    return lines
