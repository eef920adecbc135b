"""Measures the int8 activation ranges of the default model (the classifier and its
feature backbone) on a folder of photos and writes them to classification/data/int8_ranges/,
where PRECISION=int8 and auto find them. Run it again when the weights or the export change.

    .venv/bin/python scripts/calibrate.py [FOLDER]
    make calibrate [CALIBRATION_FOLDER=...]     (FOLDER defaults to ../shared/calibration)
"""

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from classification import Classifier, Embedder  # noqa: E402
from classification.models import DEFAULT_MODEL, load_model  # noqa: E402
from classification.onnx_backend import OPSET  # noqa: E402
from classification.quantize import (  # noqa: E402
    RANGES_DIR,
    calibration_images,
    committed_ranges,
    image_ranges,
    write_ranges,
)
from harness import calibration  # noqa: E402


def write_all(folder: Path, target: Path) -> None:
    """Measures the ranges of the default classifier and its backbone on the images in
    ``folder`` and writes them into the folder ``target``."""
    images = calibration_images(folder)
    contents = [path.read_bytes() for path in images]
    model = load_model(DEFAULT_MODEL)
    with tempfile.TemporaryDirectory() as cache:
        for image_model in (
            Classifier(model, backend="onnxruntime", cache_dir=Path(cache), threads=2),
            Embedder(model, backend="onnxruntime", cache_dir=Path(cache), threads=2),
        ):
            exported = image_model.float32_onnx().model_path
            ranges = image_ranges(exported, contents, image_model.calibration_input)
            path = target / committed_ranges(exported).name
            about = {"images": len(images), "model": image_model.model.name, "opset": OPSET}
            write_ranges(path, ranges, about)
            print(f"{path}: {len(ranges)} tensors from {len(images)} images")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", type=Path, default=calibration.FOLDER)
    write_all(parser.parse_args().folder, RANGES_DIR)


if __name__ == "__main__":
    main()
