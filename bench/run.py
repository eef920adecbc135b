"""The benchmark: offline limits, our server beside its peers under load, and overload,
in one run.

    make bench        (python bench/run.py)

Writes bench/results/<date>-<host>.md, .json and .png. Every figure comes from this run
on this machine; the targets of the performance issues are checked at the end.

The load runs send the 200 photos of ../shared/calibration (ImageNet's, about 500 x 375
px) when that folder is there, else 15 JPEGs made from the test photos at sizes from 320
to 2400 px; the physical limit is measured on the same photos.
"""

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import job_store_bench
import offline
import report
from servers import (
    CONCURRENCY,
    PEERS,
    REPOSITORY_SERVER,
    ROOT,
    TRITON_INT8,
    load,
    run_levels,
    start,
    stop_all,
)

from classification import Classifier, load_model
from classification.backend import seconds_per_batch
from examples import model_repository
from harness import calibration
from harness.server import free_port, wait_ready
from settings import Settings

TEST_PHOTOS = sorted((ROOT / "tests" / "data").glob("*.jpg"))
LONG_SIDES = (320, 640, 1024, 1600, 2400)
BATCH_SIZES = offline.BATCH_SIZES
TIMEOUT_S = 2.0


def make_images(folder: Path) -> list[Path]:
    """The test photos re-encoded at several sizes: varied, real JPEGs."""
    paths = []
    for photo in TEST_PHOTOS:
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


def load_photos(work: Path) -> tuple[Path, str]:
    """The folder of photos the load runs send, and what they are."""
    if shared := calibration.photos():
        return calibration.FOLDER, f"the {len(shared)} photos of ../shared/calibration"
    folder = work / "images"
    folder.mkdir()
    paths = make_images(folder)
    sides = f"{LONG_SIDES[0]}-{LONG_SIDES[-1]} px"
    return folder, f"{len(paths)} JPEGs of the test photos, long side {sides}"


def photo_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg"})


def offline_limits(images: list[Path], cache_dir: Path) -> dict[str, Any]:
    """Decode cost, model throughput per batch size per backend, the physical limits of
    float32 and int8, and the int8 recipes."""
    settings = Settings()
    model = load_model("efficientnet_lite0")
    data = [path.read_bytes() for path in images]
    threads = settings.intra_op_threads
    classifiers = {
        "onnxruntime float32": Classifier(model, backend="onnxruntime", threads=threads),
        "onnxruntime int8": Classifier(
            model, backend="onnxruntime", precision="int8", threads=threads
        ),
        "torch": Classifier(load_model("efficientnet_lite0"), backend="torch"),
    }
    float32 = classifiers["onnxruntime float32"]
    decode_ms = offline.decode_core_ms(float32, data)
    result: dict[str, Any] = {"decode_ms_per_image": decode_ms, "backends": {}}
    for name, classifier in classifiers.items():
        if name == "torch":
            classifier.warmup(4)  # picks the faster memory layout, as the server does
        seconds = seconds_per_batch(classifier.backend, BATCH_SIZES)
        rates = {size: round(size / seconds[size], 1) for size in BATCH_SIZES}
        result["backends"][name] = {
            "images_per_second": rates,
            "single_image_ms": round(decode_ms + 1000 / rates[1], 2),
        }
    result["limits"] = {
        "float32": offline.physical_limit(float32, decode_ms),
        "int8": offline.physical_limit(classifiers["onnxruntime int8"], decode_ms),
    }
    result["recipes"] = offline.recipes(float32, cache_dir)
    auto = Classifier(model, backend="onnxruntime", precision="auto", threads=threads)
    result["default_precision"] = auto.precision
    result["default_precision_reason"] = auto.precision_reason
    return result


def overload(images: Path, logs: Path, duration: float) -> dict[str, Any]:
    port = free_port()
    env = {"PORT": str(port), "GRPC_PORT": "0", "LOG_LEVEL": "warning", "TIMEOUT": str(TIMEOUT_S)}
    server = start([sys.executable, "main.py"], env, port, logs / "overload.log")
    try:
        wait_ready(server, timeout=180)
        row = load(port, 256, duration, images)
    finally:
        stop_all(server)
    row["goodput_rps"] = row["throughput_rps"]
    return row


def machine() -> dict[str, Any]:
    import onnxruntime
    import torch

    cpu = "unknown"
    flags: set[str] = set()
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    return {
        "host": socket.gethostname(),
        # Anything else running shares the cores: this should be near 0.
        "load_average_at_start": round(os.getloadavg()[0], 2),
        "cpu": cpu,
        "cpu_flags": sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"}),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def isa(result: dict[str, Any]) -> str:
    """The instruction set that matters most here, for the results' file names."""
    flags = set(result["machine"]["cpu_flags"])
    if flags & {"avx512_vnni", "avx_vnni"}:
        return "vnni"
    return "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"


def ensure_triton_env() -> None:
    """Makes .venv-triton from requirements-triton.txt if it is missing (about a minute,
    from the package registry); the Triton peer is left out if that fails."""
    venv = ROOT / ".venv-triton"
    stamp = venv / ".installed"
    requirements = ROOT / "requirements-triton.txt"
    if stamp.exists() and stamp.stat().st_mtime >= requirements.stat().st_mtime:
        return
    print("making .venv-triton for the Triton peer (PyTriton, numpy < 2) ...", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "-r", str(requirements)], check=True)
    except subprocess.CalledProcessError as exc:
        print(f"  the Triton peer is left out: {exc}", flush=True)
        return
    stamp.touch()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per load level")
    args = parser.parse_args()
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    ensure_triton_env()
    print(f"the repository's model files: {model_repository.build()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        images, about_images = load_photos(work)
        paths = photo_files(images)
        print(f"offline limits on {about_images} ...", flush=True)
        result: dict[str, Any] = {
            "machine": machine(),
            "duration_s": args.duration,
            "photos": about_images,
        }
        result["offline"] = offline_limits(paths, work / "model-cache")
        print(json.dumps(result["offline"], indent=1), flush=True)
        # This shared machine's speed drifts over minutes, so what the targets compare
        # runs close together: ours, then the peers, then overload.
        print("servers under load ...", flush=True)
        ours = ["ours (defaults)", "ours PRECISION=float32", REPOSITORY_SERVER]
        contenders = [*ours, *PEERS, TRITON_INT8]
        result["servers"] = run_levels(contenders, images, work, args.duration)
        print("overload ...", flush=True)
        result["overload"] = overload(images, work, max(args.duration, 10))
        others = ["ours MAX_BATCH_SIZE=1", "ours BACKEND=torch", "naive FastAPI"]
        result["servers"] |= run_levels(others, images, work, args.duration)
        print("jobs ...", flush=True)
        result["jobs"] = job_store_bench.run(work)
    result["targets"] = report.targets(result)
    # Machines of one host name differ in instruction set, which decides int8's speed.
    stem = f"{datetime.date.today().isoformat()}-{result['machine']['host']}-{isa(result)}"
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    report.chart(result, out_dir / f"{stem}.png", CONCURRENCY)
    jobs_section = job_store_bench.markdown(result["jobs"])
    markdown = report.markdown(result, f"{stem}.png")
    (out_dir / f"{stem}.md").write_text(markdown + "\n" + jobs_section)
    print(f"\nwrote bench/results/{stem}.md, .json and .png")
    for target, measured, met in result["targets"]:
        print(f"  {'met ' if met else 'MISS'} {target}: {measured}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    np.seterr(all="ignore")
    main()
