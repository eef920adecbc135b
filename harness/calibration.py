"""The shared calibration photos, ../shared/calibration beside the repository: 200
ImageNet photos named ``<WordNet id>_<class name>.JPEG``, one per class. They are not part
of the repository; the tests that need them skip, and the benchmark leaves them out, when
the folder is absent."""

from collections.abc import Sequence
from pathlib import Path

FOLDER = Path(__file__).resolve().parent.parent.parent / "shared" / "calibration"


def photos(folder: Path = FOLDER) -> list[Path]:
    """The photos in ``folder``, sorted; none when it is absent."""
    return sorted(folder.glob("*.JPEG"))


def true_classes(paths: Sequence[Path], labels: Sequence[str]) -> list[int]:
    """Each photo's class index in ``labels``, from the class name in its file name."""
    index = {_key(label): i for i, label in enumerate(labels)}
    return [index[_key(path.stem.split("_", 1)[1])] for path in paths]


def _key(name: str) -> str:
    # The labels file and the file names spell class names differently.
    return name.lower().replace("_", " ").replace("-", " ").replace("'", "")
