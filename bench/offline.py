"""What the benchmark measures without HTTP: the physical limit of this machine's cores
for the model and the photos, and the int8 recipes side by side.

The limit is what the cores could do if they did nothing but decode and compute: the
core-time of decoding one photo plus the core-time of the model on one image at its best
batch size, both on one thread, shared by every core.
"""

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from classification import Classifier
from classification.backend import seconds_per_batch
from classification.onnx_backend import OnnxBackend
from classification.quantize import (
    FULL_RANGE,
    SEVEN_BIT_GEMM,
    committed_ranges,
    int8_recipe,
    quantized_model,
    read_ranges,
)
from harness import calibration

BATCH_SIZES = (1, 2, 4, 8, 16, 32)
RECIPE_BATCH_SIZES = (1, 8, 16)


def decode_core_ms(classifier: Classifier, data: list[bytes], rounds: int = 3) -> float:
    """Milliseconds of one thread per photo to decode and crop ``data``: the best of
    ``rounds`` passes."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for blob in data:
            classifier.prepare(blob, max_pixels=10**9)
        best = min(best, (time.perf_counter() - started) / len(data))
    return round(best * 1000, 3)


def model_core_ms(backend: OnnxBackend) -> dict[int, float]:
    """Milliseconds of one thread per image, by batch size, for a single-threaded
    session (normalisation included, as the server computes it)."""
    seconds = seconds_per_batch(backend, BATCH_SIZES)
    return {n: round(seconds[n] / n * 1000, 3) for n in BATCH_SIZES}


def physical_limit(classifier: Classifier, decode: float) -> dict[str, Any]:
    """The images per second all cores could serve with ``classifier``'s ONNX model and
    ``decode`` ms of one thread to decode a photo: decode and model core-time at their
    best, each on one thread."""
    onnx = classifier.backend
    assert isinstance(onnx, OnnxBackend)
    one_thread = OnnxBackend(onnx.model_path, classifier.preprocess, threads=1)
    model = model_core_ms(one_thread)
    best = min(model.values())
    cores = os.cpu_count() or 1
    return {
        "decode_core_ms": decode,
        "model_core_ms": model,
        "model_core_ms_best": best,
        "cores": cores,
        "images_per_second": round(cores * 1000 / (decode + best), 1),
    }


def recipes(float32: Classifier, cache_dir: Path) -> dict[str, Any]:
    """Model throughput on every thread, and agreement with float32 on the 200 shared
    photos, of float32 and of both int8 recipes (whichever this CPU would use)."""
    onnx = float32.backend
    assert isinstance(onnx, OnnxBackend)
    ranges = read_ranges(committed_ranges(onnx.model_path))
    backends = {"float32": onnx}
    for recipe in (FULL_RANGE, SEVEN_BIT_GEMM):
        path = quantized_model(onnx.model_path, ranges, cache_dir, recipe)
        backends[f"int8 {recipe.name}"] = OnnxBackend(path, float32.preprocess, onnx.threads)
    photos = calibration.photos()
    pixels = [float32.prepare(p.read_bytes(), max_pixels=10**9) for p in photos]
    truth = calibration.true_classes(photos, float32.labels) if photos else []
    reference = probabilities(onnx, pixels)
    table: dict[str, Any] = {}
    for name, backend in backends.items():
        seconds = seconds_per_batch(backend, RECIPE_BATCH_SIZES)
        row: dict[str, Any] = {
            "images_per_second": {n: round(n / seconds[n], 1) for n in RECIPE_BATCH_SIZES}
        }
        if photos:
            probs = reference if backend is onnx else probabilities(backend, pixels)
            top1 = probs.argmax(axis=1)
            row["agreement"] = round(float(np.mean(top1 == reference.argmax(axis=1))), 4)
            row["largest_difference"] = round(float(np.abs(probs - reference).max()), 3)
            row["top1"] = round(float(np.mean(top1 == np.array(truth))), 4)
        table[name] = row
    return {"this_cpu": int8_recipe().name, "photos": len(photos), "recipes": table}


def probabilities(backend: OnnxBackend, pixels: list[np.ndarray]) -> np.ndarray:
    rows = [backend.forward(np.stack(pixels[i : i + 16])) for i in range(0, len(pixels), 16)]
    return np.concatenate([row.softmax(dim=1).numpy() for row in rows])
