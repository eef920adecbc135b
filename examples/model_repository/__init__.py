"""A model repository built from the default model, as a user with a ``model.onnx`` and a
``labels.txt`` would have it:

    python -m examples.model_repository             # writes the files beside config.pbtxt
    MODEL_REPOSITORY=examples/model_repository TASKS= python main.py

The model file and the labels are made here (exported from the weights the efficientnet
package ships, copied from the ImageNet class list), not kept in git.
"""

import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL = "efficientnet_lite0"


def build(repository: Path = HERE, cache_dir: Path = Path(".model-cache")) -> Path:
    """Writes ``MODEL/1/model.onnx`` and ``MODEL/labels.txt`` into ``repository`` (with the
    example's config.pbtxt, when that is another folder); returns the model's folder."""
    from classification.models import _LABELS_FILE, load_model
    from classification.onnx_backend import exported_model

    folder = repository / MODEL
    (folder / "1").mkdir(parents=True, exist_ok=True)
    if folder != HERE / MODEL:
        shutil.copyfile(HERE / MODEL / "config.pbtxt", folder / "config.pbtxt")
    loaded = load_model(MODEL)
    onnx = exported_model(loaded.module, MODEL, loaded.preprocess.crop_size, cache_dir)
    shutil.copyfile(onnx, folder / "1" / "model.onnx")
    shutil.copyfile(_LABELS_FILE, folder / "labels.txt")
    return folder


if __name__ == "__main__":
    print(f"wrote {build()}")
