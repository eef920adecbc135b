"""Int8 ONNX models: activation ranges measured on calibration photos, then static QDQ
quantisation with uint8 activations and per-channel int8 weights, in the recipe that this
CPU's int8 kernels compute exactly (``int8_recipe``).

The ranges of the default model are committed in ``data/int8_ranges/`` (see
``scripts/calibrate.py``), so a server quantises at startup with no photos of its own.
Other models calibrate on the images in CALIBRATION_DIR.
"""

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

RANGES_DIR = Path(__file__).parent / "data" / "int8_ranges"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# More photos than this add little to MinMax ranges and only slow the startup down.
MAX_CALIBRATION_IMAGES = 500
_CALIBRATION_BATCH = 16

Ranges = dict[str, tuple[float, float]]


class QuantizationUnavailable(Exception):
    """Int8 cannot be built for this model; the message says what to provide."""


@dataclass(frozen=True)
class Int8Recipe:
    """How the weights are quantised, for the int8 kernels of one kind of CPU."""

    name: str
    # 7-bit weights wherever ONNX Runtime multiplies with vpmaddubsw, and the first
    # convolution kept in float32: see int8_recipe.
    seven_bit_gemm: bool


# For kernels that add products in 32 bits (VNNI, AMX, Arm): 8-bit weights are exact.
FULL_RANGE = Int8Recipe("full-range", seven_bit_gemm=False)
# For x86 without VNNI, whose kernels add pairs of products in 16 bits.
SEVEN_BIT_GEMM = Int8Recipe("7-bit-gemm", seven_bit_gemm=True)


def int8_recipe(capabilities: Mapping[str, Any] | None = None) -> Int8Recipe:
    """The recipe whose int8 model this CPU computes without overflow. ``capabilities`` is
    ``torch.cpu.get_capabilities()`` (the CPU's own CPUID answers, as ONNX Runtime reads
    them) unless given.

    On x86 without VNNI (AVX2 and AVX-512 CPUs before Cascade Lake and Zen 4), ONNX
    Runtime's uint8 x int8 kernels use vpmaddubsw, which adds two products into a
    saturating 16-bit sum: 255 x 127 x 2 does not fit. Weights of 7 bits (at most 64)
    always fit. Depthwise convolutions have kernels of their own that widen first, so
    they keep 8 bits, and the first convolution, which sees the image's full range and
    costs little, stays in float32.
    """
    if capabilities is None:
        import torch

        capabilities = torch.cpu.get_capabilities()
    if not str(capabilities.get("architecture", "")).startswith("x86"):
        return FULL_RANGE
    if any(capabilities.get(flag) for flag in ("avx512_vnni", "avx_vnni", "amx_int8")):
        return FULL_RANGE
    return SEVEN_BIT_GEMM


def committed_ranges(float_path: Path) -> Path:
    """Where the committed ranges of a float32 export live: its file name holds the model
    name, the weights' digest and the opset, so other weights never match."""
    return RANGES_DIR / f"{float_path.stem}.json"


def optimised_model(float_path: Path) -> Path:
    """The float32 model as the quantiser should see it: ONNX Runtime's basic graph
    optimisations applied (constants folded, padding merged into convolutions) and shapes
    inferred, written beside ``float_path``. Without it the int8 model keeps float
    islands and runs at about half the speed. Calibration and quantisation both use it,
    so the ranges name its tensors."""
    path = float_path.with_name(f"{float_path.stem}-optimised.onnx")
    if path.is_file():
        return path
    from onnxruntime.quantization.shape_inference import quant_pre_process

    partial = path.with_suffix(f".{os.getpid()}.tmp")
    quant_pre_process(str(float_path), str(partial), skip_symbolic_shape=True)
    partial.replace(path)
    return path


def calibrate(model_path: Path, batches: Iterable[np.ndarray]) -> Ranges:
    """The lowest and highest value of every activation of the float32 model at
    ``model_path`` over ``batches`` (normalised float32 NCHW inputs): MinMax calibration."""
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self, inputs: Iterator[np.ndarray]) -> None:
            self.inputs = inputs

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.inputs, None)
            return None if batch is None else {"input": batch}

    with tempfile.TemporaryDirectory(prefix="calibrate-") as scratch:
        calibrator = create_calibrator(
            optimised_model(model_path),
            [],
            augmented_model_path=Path(scratch, "augmented.onnx"),
            calibrate_method=CalibrationMethod.MinMax,
        )
        calibrator.collect_data(Reader(iter(batches)))
        measured = calibrator.compute_data()
    return {
        name: (np.asarray(data.range_value[0]).item(), np.asarray(data.range_value[1]).item())
        for name, data in sorted(measured.data.items())
    }


def calibration_images(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name, at most
    MAX_CALIBRATION_IMAGES of them."""
    if not folder.is_dir():
        raise QuantizationUnavailable(f"CALIBRATION_DIR={str(folder)!r} is not a folder")
    images = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not images:
        raise QuantizationUnavailable(
            f"CALIBRATION_DIR={str(folder)!r} holds no images "
            f"({', '.join(sorted(IMAGE_SUFFIXES))}): put 100-500 typical inputs there"
        )
    return images[:MAX_CALIBRATION_IMAGES]


def folder_ranges(
    model_path: Path,
    folder: Path,
    inputs: Callable[[bytes], np.ndarray],
    cache_dir: Path,
) -> Ranges:
    """Ranges measured on the images in ``folder``, each turned into one normalised input
    by ``inputs``; files that do not decode are left out. Cached in ``cache_dir`` by the
    model file and the images' contents."""
    images = calibration_images(folder)
    key = hashlib.sha256(model_path.name.encode())
    contents = []
    for path in images:
        data = path.read_bytes()
        key.update(hashlib.sha256(data).digest())
        contents.append(data)
    cached = cache_dir / f"{model_path.stem}-ranges-{key.hexdigest()[:16]}.json"
    try:
        return read_ranges(cached)
    except (OSError, ValueError):
        pass
    logger.info("calibrating int8 on %d images from %s", len(images), folder)
    ranges = image_ranges(model_path, contents, inputs)
    write_ranges(cached, ranges, {"images": len(images), "source": str(folder)})
    return ranges


def image_ranges(
    model_path: Path, images: list[bytes], inputs: Callable[[bytes], np.ndarray]
) -> Ranges:
    """Ranges measured on image files, each turned into one normalised input by
    ``inputs``, in batches. A file that ``inputs`` rejects with ValueError (an image that
    does not decode) is left out, with a warning."""

    def batches() -> Iterator[np.ndarray]:
        for start in range(0, len(images), _CALIBRATION_BATCH):
            batch = []
            for data in images[start : start + _CALIBRATION_BATCH]:
                try:
                    batch.append(inputs(data))
                except ValueError as exc:
                    logger.warning("a calibration image is left out: %s", exc)
            if batch:
                yield np.concatenate(batch)

    return calibrate(model_path, batches())


def write_ranges(path: Path, ranges: Ranges, about: dict[str, object]) -> None:
    """Writes ``ranges`` as JSON, beside a description of where they came from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"about": about, "method": "minmax", "ranges": ranges}
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    partial.replace(path)


def read_ranges(path: Path) -> Ranges:
    """The ranges in a file written by ``write_ranges``. Raises ValueError when it is
    not one."""
    document = json.loads(path.read_text())
    try:
        return {name: (float(low), float(high)) for name, (low, high) in document["ranges"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{path} does not hold activation ranges: {exc!r}") from exc


def quantized_model(
    float_path: Path, ranges: Ranges, cache_dir: Path, recipe: Int8Recipe = FULL_RANGE
) -> Path:
    """The int8 form of the float32 model at ``float_path``, built on first use and
    cached beside it, keyed by the float32 file's name, the recipe and the ranges.

    QDQ format, uint8 activations and per-channel symmetric int8 weights: the form that
    ONNX Runtime fuses completely into QLinearConv and QLinearAdd on x86.
    """
    digest = hashlib.sha256(json.dumps(ranges, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir / f"{float_path.stem}-int8-{recipe.name}-{digest}.onnx"
    if path.is_file():
        logger.info("using the cached int8 model %s", path)
        return path
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import load_model_with_shape_infer

    # quantize_static with these ranges in place of a calibration run: the same quantizer
    # and options, fed from JSON (equal ranges, byte-identical models).
    tensors = TensorsData(
        CalibrationMethod.MinMax,
        {
            name: TensorData(lowest=np.float32(low), highest=np.float32(high))
            for name, (low, high) in ranges.items()
        },
    )
    optimised = optimised_model(float_path)
    try:
        model = load_model_with_shape_infer(optimised)
    except Exception as exc:  # a corrupt file in the cache: the next start makes it again
        optimised.unlink(missing_ok=True)
        raise QuantizationUnavailable(f"cannot read {optimised}: {exc}") from exc
    kept_float, seven_bit = _recipe_nodes(model.graph, recipe)
    quantizer = QDQQuantizer(
        model,
        True,  # per-channel weights
        False,  # full 8-bit range, but for the weights in ``seven_bit``
        QuantType.QInt8,
        QuantType.QUInt8,
        tensors,
        [],  # every node ...
        kept_float,  # ... but these
        ["Conv", "Gemm", "Add", "Clip", "GlobalAveragePool", "Reshape", "MatMul", "Relu"],
        {
            "TensorQuantOverrides": {
                weight: [{"reduce_range": True, "axis": axis}] for weight, axis in seven_bit
            }
        },
    )
    try:
        quantizer.quantize_model()
    except ValueError as exc:  # a tensor without a range: the ranges are another export's
        raise QuantizationUnavailable(
            f"the activation ranges do not fit {float_path.name} ({exc}): calibrate again "
            "with CALIBRATION_DIR (or scripts/calibrate.py for the default model)"
        ) from exc
    quantizer.model.remove_unused_constant()
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    quantizer.model.save_model_to_file(str(partial), False)
    partial.replace(path)
    logger.info("quantised %s to %s (%s weights)", float_path.name, path, recipe.name)
    return path


def _recipe_nodes(graph: Any, recipe: Int8Recipe) -> tuple[list[str], list[tuple[str, int]]]:
    """The nodes ``recipe`` keeps in float32, and the weights it gives 7 bits with the
    axis of their channels."""
    if not recipe.seven_bit_gemm:
        return [], []
    shapes = {tensor.name: list(tensor.dims) for tensor in graph.initializer}
    inputs = {tensor.name for tensor in graph.input}
    kept_float: list[str] = []
    seven_bit: list[tuple[str, int]] = []
    for node in graph.node:
        attributes = {a.name: a for a in node.attribute}
        weight = node.input[1] if len(node.input) > 1 else ""
        if weight not in shapes:
            continue
        if node.op_type == "Conv":
            if node.input[0] in inputs:
                kept_float.append(node.name)
            elif not _depthwise(shapes[weight], attributes):
                seven_bit.append((weight, 0))
        elif node.op_type == "Gemm":
            trans_b = "transB" in attributes and attributes["transB"].i == 1
            seven_bit.append((weight, 0 if trans_b else 1))
        elif node.op_type == "MatMul" and len(shapes[weight]) == 2:
            seven_bit.append((weight, 1))
    return kept_float, seven_bit


def _depthwise(weight_shape: list[int], attributes: dict[str, Any]) -> bool:
    """One filter per channel: ONNX Runtime's depthwise kernel, which widens to 16 bits
    before it multiplies."""
    group = attributes["group"].i if "group" in attributes else 1
    return group > 1 and weight_shape[0] == group and weight_shape[1] == 1
