"""The benchmark: offline limits, five servers under load, and overload, in one run.

    make bench        (python bench/run.py)

Writes bench/results/<date>-<host>.md, .json and .png. Every figure comes from this run
on this machine; the targets of the performance issue are checked at the end.
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import job_store_bench  # noqa: E402  (bench/, first on the path when run as a script)

from classification import Classifier, ClassifyInput, load_model  # noqa: E402
from classification.backend import seconds_per_batch  # noqa: E402
from harness import calibration  # noqa: E402
from harness.server import Server, free_port, stop, wait_ready  # noqa: E402
from settings import Settings  # noqa: E402

PHOTOS = sorted((ROOT / "tests" / "data").glob("*.jpg"))
LONG_SIDES = (320, 640, 1024, 1600, 2400)
BATCH_SIZES = (1, 2, 4, 8, 16, 32)
CONCURRENCY = (1, 8, 32, 128)


def make_images(folder: Path) -> list[Path]:
    """The sample photos re-encoded at several sizes: varied, real JPEGs."""
    paths = []
    for photo in PHOTOS:
        image = Image.open(photo).convert("RGB")
        for side in LONG_SIDES:
            scale = side / max(image.size)
            resized = image.resize(
                (round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC
            )
            path = folder / f"{photo.stem}-{side}.jpg"
            resized.save(path, quality=90)
            paths.append(path)
    return paths


def offline(images: list[Path]) -> tuple[dict[str, Any], Callable[[], float]]:
    """Decode cost, model throughput per batch size per backend, and the pipeline limit;
    and a function that measures the pipeline limit of the default setup again."""
    settings = Settings()
    model = load_model("efficientnet_lite0")
    data = [path.read_bytes() for path in images]
    threads = settings.intra_op_threads
    classifiers = {
        "onnxruntime": Classifier(model, backend="onnxruntime", threads=threads),
        "onnxruntime int8": Classifier(
            model, backend="onnxruntime", precision="int8", threads=threads
        ),
        "torch": Classifier(load_model("efficientnet_lite0"), backend="torch"),
    }
    any_classifier = classifiers["onnxruntime"]
    started = time.perf_counter()
    rounds = 5
    for _ in range(rounds):
        for blob in data:
            any_classifier.prepare(blob, max_pixels=10**9)
    decode_ms = (time.perf_counter() - started) / (rounds * len(data)) * 1000

    result: dict[str, Any] = {"decode_ms_per_image": round(decode_ms, 2), "backends": {}}
    for name, classifier in classifiers.items():
        workers = settings.decode_threads("cpu", int8=classifier.precision == "int8")
        if name == "torch":
            classifier.warmup(4)  # picks the faster memory layout, as the server does
        seconds = seconds_per_batch(classifier.backend, BATCH_SIZES)
        rates = {size: round(size / seconds[size], 1) for size in BATCH_SIZES}
        best = max(rates, key=lambda size: rates[size])
        single_ms = 1000 / rates[1]
        pipeline = pipeline_rate(classifier, data, best, workers)
        result["backends"][name] = {
            "images_per_second": rates,
            "best_batch_size": best,
            "single_image_ms": round(decode_ms + single_ms, 2),
            "pipeline_images_per_second": round(pipeline, 1),
        }
    result["int8_agreement"] = agreement(
        classifiers["onnxruntime"], classifiers["onnxruntime int8"], images
    )
    default = default_backend()
    return result, partial(
        pipeline_rate,
        classifiers[default],
        data,
        result["backends"][default]["best_batch_size"],
        settings.decode_threads("cpu", int8=default == "onnxruntime int8"),
    )


def default_backend() -> str:
    """The offline backend that matches our server with default settings."""
    auto = Classifier(load_model("efficientnet_lite0"), backend="onnxruntime", precision="auto")
    return "onnxruntime int8" if auto.precision == "int8" else "onnxruntime"


def agreement(float32: Classifier, int8: Classifier, images: list[Path]) -> dict[str, Any]:
    """Top-1 agreement between float32 and int8 on the benchmark's photos and, when the
    folder is there, on the 200 labelled photos of ../shared/calibration (with each one's
    top-1 accuracy)."""

    def top1(classifier: Classifier, paths: list[Path]) -> list[int]:
        batch = [
            ClassifyInput(classifier.prepare(p.read_bytes(), max_pixels=10**9), 1) for p in paths
        ]
        return [scores[0].class_id for scores in classifier.predict(batch)]

    result: dict[str, Any] = {}
    a, b = top1(float32, images), top1(int8, images)
    result["bench_photos"] = {"images": len(images), "agreement": same(a, b)}
    shared = calibration.photos()
    if shared:
        truth = calibration.true_classes(shared, float32.labels)
        a, b = top1(float32, shared), top1(int8, shared)
        result["shared_photos"] = {
            "images": len(shared),
            "agreement": same(a, b),
            "top1_float32": same(a, truth),
            "top1_int8": same(b, truth),
        }
    return result


def same(a: list[int], b: list[int]) -> float:
    return round(sum(x == y for x, y in zip(a, b, strict=True)) / len(a), 4)


def pipeline_rate(
    classifier: Classifier, data: list[bytes], batch: int, workers: int, rounds: int = 3
) -> float:
    """Decode in the server's thread pool while the model runs batches: images per second,
    the best of ``rounds`` (a limit is what the machine can do, and it only ever gets
    slowed down by other work)."""
    blobs = data * 8
    best = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            pixels = pool.map(lambda blob: classifier.prepare(blob, max_pixels=10**9), blobs)
            pending: list[ClassifyInput] = []
            for item in pixels:
                pending.append(ClassifyInput(item, 5))
                if len(pending) == batch:
                    classifier.predict(pending)
                    pending = []
            if pending:
                classifier.predict(pending)
        best = max(best, len(blobs) / (time.perf_counter() - started))
    return best


def start(command: list[str], env: dict[str, str], port: int, log: Path) -> Server:
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, for stop_all
        )
    return Server(process, f"http://127.0.0.1:{port}", log)


def stop_all(server: Server) -> None:
    """Stops a server and every process it started. LitServe's workers outlive a SIGTERM
    to its main process, and left running they would take CPU from the rest of the run."""
    group = server.process.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    stop(server)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)


def load(port: int, concurrency: int, duration: float, images: Path, *extra: str) -> dict[str, Any]:
    """One bench/loadgen.py run; ``extra`` are its options (--impolite, --rate R)."""
    output = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "loadgen.py"),
            "--port",
            str(port),
            "--concurrency",
            str(concurrency),
            "--duration",
            str(duration),
            "--images",
            str(images),
            *extra,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    raw = json.loads(output.stdout)
    statuses = raw["statuses"]
    ok = sorted(t for s, t in zip(statuses, raw["latencies_s"], strict=True) if s == 200)
    mix = {str(code): statuses.count(code) for code in sorted(set(statuses))}
    return {
        "concurrency": concurrency,
        "requests": len(statuses),
        "status_mix": mix,
        "throughput_rps": round(len(ok) / duration, 1),
        "p50_ms": percentile(ok, 50),
        "p95_ms": percentile(ok, 95),
        "p99_ms": percentile(ok, 99),
        "loadgen_cpu_percent": raw["loadgen_cpu_percent"],
        **{key: raw[key] for key in ("server_cpu_in_window_s", "answered_in_window") if key in raw},
    }


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, round(q / 100 * (len(sorted_values) - 1)))
    return round(sorted_values[index] * 1000, 1)


SERVERS: dict[str, tuple[list[str], dict[str, str]]] = {
    "ours (defaults)": ([sys.executable, "main.py"], {}),
    "ours PRECISION=float32": ([sys.executable, "main.py"], {"PRECISION": "float32"}),
    "LitServe": ([sys.executable, "bench/litserve_server.py"], {}),
    "ours MAX_BATCH_SIZE=1": ([sys.executable, "main.py"], {"MAX_BATCH_SIZE": "1"}),
    "ours BACKEND=torch": ([sys.executable, "main.py"], {"BACKEND": "torch"}),
    "naive FastAPI": ([sys.executable, "bench/naive_server.py"], {}),
}


def servers(
    names: list[str],
    images: Path,
    logs: Path,
    duration: float,
    levels: tuple[int, ...] = CONCURRENCY,
) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        command, env = SERVERS[name]
        port = free_port()
        full_env = {"PORT": str(port), "LOG_LEVEL": "warning", **env}
        server = start([*command, str(port)], full_env, port, logs / f"{slug(name)}.log")
        try:
            wait_ready(server, timeout=180)
            results[name] = []
            for concurrency in levels:
                row = load(port, concurrency, duration, images)
                print(
                    f"  {name:24} c={concurrency:<4} {row['throughput_rps']:7.1f} req/s "
                    f"p50 {row['p50_ms']} ms p99 {row['p99_ms']} ms",
                    flush=True,
                )
                results[name].append(row)
        finally:
            stop_all(server)
    return results


def overload(images: Path, logs: Path, duration: float) -> dict[str, Any]:
    port = free_port()
    env = {"PORT": str(port), "LOG_LEVEL": "warning", "TIMEOUT": "2"}
    server = start([sys.executable, "main.py"], env, port, logs / "overload.log")
    try:
        wait_ready(server, timeout=180)
        row = load(port, 256, duration, images)
    finally:
        stop_all(server)
    row["goodput_rps"] = row["throughput_rps"]
    return row


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def machine() -> dict[str, Any]:
    import onnxruntime
    import torch

    cpu = "unknown"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "host": socket.gethostname(),
        # Anything else running shares the cores: this should be near 0.
        "load_average_at_start": round(os.getloadavg()[0], 2),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def targets(report: dict[str, Any]) -> list[tuple[str, str, bool]]:
    ours = report["servers"]["ours (defaults)"]
    lit = report["servers"]["LitServe"]
    backend = report["offline"]["backends"][default_backend()]
    float32 = {row["concurrency"]: row for row in report["servers"]["ours PRECISION=float32"]}
    by_c = {row["concurrency"]: row for row in ours}
    peak = max(row["throughput_rps"] for row in ours)
    over = report["overload"]
    limit = max(backend["pipeline_images_per_second"], backend["pipeline_after_ours"])
    checks = [
        (
            "c=1 p50 <= offline single-image latency + 5 ms",
            f"{by_c[1]['p50_ms']} ms vs {backend['single_image_ms']} + 5 ms",
            by_c[1]["p50_ms"] <= backend["single_image_ms"] + 5,
        ),
    ]
    for c in (8, 32, 128):
        checks.append(
            (
                f"c={c} throughput >= 85% of the offline pipeline limit",
                f"{by_c[c]['throughput_rps']} vs 0.85 x {limit} = {0.85 * limit:.1f} req/s",
                by_c[c]["throughput_rps"] >= 0.85 * limit,
            )
        )
    lit32 = next(row for row in lit if row["concurrency"] == 32)["throughput_rps"]
    if shared := report.get("servers_on_shared_photos"):
        int8_rps = shared["ours (defaults)"][0]["throughput_rps"]
        float32_rps = shared["ours PRECISION=float32"][0]["throughput_rps"]
        checks.append(
            (
                "c=32 on the 200 ImageNet-size photos: defaults >= 1.8x PRECISION=float32",
                f"{int8_rps} vs 1.8 x {float32_rps} = {1.8 * float32_rps:.1f} req/s",
                int8_rps >= 1.8 * float32_rps,
            )
        )
    checks += [
        (
            "c=32 throughput (defaults) >= 1.8x PRECISION=float32",
            f"{by_c[32]['throughput_rps']} vs 1.8 x {float32[32]['throughput_rps']} = "
            f"{1.8 * float32[32]['throughput_rps']:.1f} req/s",
            by_c[32]["throughput_rps"] >= 1.8 * float32[32]["throughput_rps"],
        ),
        (
            "c=32 throughput >= 2.5x LitServe",
            f"{by_c[32]['throughput_rps']} vs 2.5 x {lit32} = {2.5 * lit32:.1f} req/s",
            by_c[32]["throughput_rps"] >= 2.5 * lit32,
        ),
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
    return checks


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, rows in report["servers"].items():
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
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(CONCURRENCY, [str(c) for c in CONCURRENCY])
        axis.set_xlabel("concurrent clients")
        axis.grid(alpha=0.3)
    left.set_ylabel("responses 200 per second")
    left.set_title("Throughput")
    right.set_ylabel("latency (ms)")
    right.set_yscale("log")
    right.set_title("Latency, p50 (solid) and p99 (dashed)")
    left.legend(fontsize=8)
    figure.suptitle(
        f"EfficientNet-Lite0 /cls, {report['machine']['cores']} cores, {report['machine']['cpu']}",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def markdown(report: dict[str, Any], png: str) -> str:
    m = report["machine"]
    off = report["offline"]
    lines = [
        f"# Benchmark, {m['date']}",
        "",
        f"Machine: `{m['host']}`, {m['cpu']}, {m['cores']} cores, no GPU. Python {m['python']}, "
        f"torch {m['torch']}, onnxruntime {m['onnxruntime']}; load average "
        f"{m['load_average_at_start']} at the start. Reproduce with `make bench`.",
        "",
        "## Offline limits (no HTTP)",
        "",
        f"Decode + resize + crop: {off['decode_ms_per_image']} ms per image "
        f"({len(LONG_SIDES) * len(PHOTOS)} JPEGs, long side {LONG_SIDES[0]}-{LONG_SIDES[-1]} px).",
        "",
        "| Backend | "
        + " | ".join(f"batch {b}" for b in BATCH_SIZES)
        + " | single image (decode + model) | pipeline limit |",
        "|---" * (len(BATCH_SIZES) + 3) + "|",
    ]
    for name, row in off["backends"].items():
        rates = " | ".join(f"{row['images_per_second'][b]} img/s" for b in BATCH_SIZES)
        limit = f"{row['pipeline_images_per_second']} img/s"
        if "pipeline_after_ours" in row:
            limit += f", {row['pipeline_after_ours']} after our server's run"
        lines.append(f"| {name} | {rates} | {row['single_image_ms']} ms | {limit} |")
    lines += [
        "",
        *agreement_lines(off["int8_agreement"]),
        "",
        "## Servers under load",
        "",
        f"Closed-loop clients on keep-alive connections, each sending the next of "
        f"{len(LONG_SIDES) * len(PHOTOS)} JPEGs; {report['duration_s']} s measured per level "
        "after 1 s of warm-up. Latencies are of 200 responses. Order of the run: offline "
        "limits, ours (defaults), ours PRECISION=float32 (each also on the shared photos when "
        "present), the pipeline limit again, overload, then the other servers as listed.",
        "",
        f"![throughput and latency]({png})",
        "",
        "| Server | clients | req/s | p50 ms | p95 ms | p99 ms | statuses | load generator CPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in report["servers"].items():
        for row in rows:
            lines.append(
                f"| {name} | {row['concurrency']} | {row['throughput_rps']} | {row['p50_ms']} | "
                f"{row['p95_ms']} | {row['p99_ms']} | {row['status_mix']} | "
                f"{row['loadgen_cpu_percent']}% |"
            )
    if shared := report.get("servers_on_shared_photos"):
        lines += [
            "",
            "On the 200 photos of ../shared/calibration (ImageNet's size, about 500 x 375 px), "
            "32 clients:",
            "",
            "| Server | req/s | p50 ms | p99 ms | statuses |",
            "|---|---|---|---|---|",
        ]
        for name, [row] in shared.items():
            lines.append(
                f"| {name} | {row['throughput_rps']} | {row['p50_ms']} | {row['p99_ms']} | "
                f"{row['status_mix']} |"
            )
    over = report["overload"]
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
    for target, measured, met in report["targets"]:
        lines.append(f"| {target} | {measured} | {'yes' if met else '**no**'} |")
    return "\n".join(lines) + "\n"


def agreement_lines(agreement: dict[str, Any]) -> list[str]:
    bench = agreement["bench_photos"]
    lines = [
        "",
        f"int8 against float32, top-1 agreement: {bench['agreement']:.1%} on the "
        f"{bench['images']} benchmark JPEGs.",
    ]
    if "shared_photos" in agreement:
        shared = agreement["shared_photos"]
        lines[-1] += (
            f" On the {shared['images']} labelled photos of ../shared/calibration: agreement "
            f"{shared['agreement']:.1%}, top-1 {shared['top1_float32']:.1%} float32 and "
            f"{shared['top1_int8']:.1%} int8 (int8 is calibrated on these photos)."
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per load level")
    args = parser.parse_args()
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        images = work / "images"
        images.mkdir()
        paths = make_images(images)
        print(f"offline limits on {len(paths)} JPEGs ...", flush=True)
        report: dict[str, Any] = {"machine": machine(), "duration_s": args.duration}
        report["offline"], pipeline_again = offline(paths)
        print(json.dumps(report["offline"], indent=1), flush=True)
        # This shared machine's speed drifts over minutes, so what the targets compare
        # runs close together: our server, the limit again (the targets use the higher
        # of the two), overload, then LitServe.
        print("servers under load ...", flush=True)
        ours, float32, lit, *others = SERVERS
        report["servers"] = servers([ours, float32], images, work, args.duration)
        if calibration.FOLDER.is_dir():
            # The same two on photos of ImageNet's size (about 500 x 375), which decode in
            # a fraction of the time the benchmark's large JPEGs take.
            print("ours on ../shared/calibration ...", flush=True)
            report["servers_on_shared_photos"] = servers(
                [ours, float32], calibration.FOLDER, work, args.duration, levels=(32,)
            )
        onnx = report["offline"]["backends"][default_backend()]
        onnx["pipeline_after_ours"] = round(pipeline_again(), 1)
        print(f"pipeline limit again: {onnx['pipeline_after_ours']} img/s", flush=True)
        print("overload ...", flush=True)
        report["overload"] = overload(images, work, max(args.duration, 10))
        report["servers"] |= servers([lit, *others], images, work, args.duration)
        print("jobs ...", flush=True)
        report["jobs"] = job_store_bench.run(work)
    report["targets"] = targets(report)
    stem = f"{datetime.date.today().isoformat()}-{report['machine']['host']}"
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1))
    chart(report, out_dir / f"{stem}.png")
    jobs_section = job_store_bench.markdown(report["jobs"])
    (out_dir / f"{stem}.md").write_text(markdown(report, f"{stem}.png") + "\n" + jobs_section)
    print(f"\nwrote bench/results/{stem}.md, .json and .png")
    for target, measured, met in report["targets"]:
        print(f"  {'met ' if met else 'MISS'} {target}: {measured}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    np.seterr(all="ignore")
    main()
