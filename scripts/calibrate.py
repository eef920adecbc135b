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

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from classification.embedding import backbone  # noqa: E402
from classification.image_model import prepare_image  # noqa: E402
from classification.models import DEFAULT_MODEL, load_model  # noqa: E402
from classification.onnx_backend import OPSET, OnnxBackend, exported_model  # noqa: E402
from classification.quantize import (  # noqa: E402
    RANGES_DIR,
    calibration_images,
    committed_ranges,
    image_ranges,
    write_ranges,
)


def write_all(folder: Path, target: Path) -> None:
    """Measures the ranges of the default classifier and its backbone on the images in
    ``folder`` and writes them into the folder ``target``."""
    images = calibration_images(folder)
    contents = [path.read_bytes() for path in images]
    classifier = load_model(DEFAULT_MODEL)
    with tempfile.TemporaryDirectory() as cache:
        for model in (classifier, backbone(classifier)):
            exported = exported_model(
                model.module, model.name, model.preprocess.crop_size, Path(cache)
            )
            backend = OnnxBackend(exported, model.preprocess, threads=2)

            def inputs(data: bytes, backend: OnnxBackend = backend) -> np.ndarray:
                pixels = prepare_image(backend.preprocess, data, max_pixels=10**8)
                return backend.inputs(pixels[None])

            ranges = image_ranges(exported, contents, inputs)
            path = target / committed_ranges(exported).name
            about = {"images": len(images), "model": model.name, "opset": OPSET}
            write_ranges(path, ranges, about)
            print(f"{path}: {len(ranges)} tensors from {len(images)} images")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = ROOT.parent / "shared" / "calibration"
    parser.add_argument("folder", nargs="?", type=Path, default=default)
    write_all(parser.parse_args().folder, RANGES_DIR)


if __name__ == "__main__":
    main()
