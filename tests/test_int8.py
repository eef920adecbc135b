"""PRECISION: int8 from the committed ranges or CALIBRATION_DIR, its cache, its startup
check and the fallback to float32; accuracy on the shared calibration photos over HTTP."""

import asyncio
import hashlib
import logging
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

import classification.classifier
import classification.image_model
from classification import Classifier, load_model
from classification.models import LoadedModel
from classification.quantize import RANGES_DIR, read_ranges
from harness import calibration
from harness.server import running_server
from tests.images import PHOTOS, TOP1, photo_bytes

needs_shared_photos = pytest.mark.skipif(
    not calibration.FOLDER.is_dir(),
    reason=f"{calibration.FOLDER} is absent (the photos are not part of the repository)",
)


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return load_model("efficientnet_lite0")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def int8(model: LoadedModel, cache_dir: Path) -> Classifier:
    return Classifier(model, backend="onnxruntime", precision="int8", cache_dir=cache_dir)


def int8_files(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("*-int8-*.onnx"))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_int8_comes_from_the_committed_ranges_and_is_cached(
    int8: Classifier, model: LoadedModel, cache_dir: Path, tmp_path: Path
) -> None:
    assert int8.precision == "int8", int8.precision_reason
    assert int8.precision_reason.startswith("PRECISION=int8 on the check photos")
    [cached] = int8_files(cache_dir)
    assert int8.backend.model_path == cached  # type: ignore[attr-defined]
    # Quantising again elsewhere gives the same bytes: the ranges are the only input.
    elsewhere = Classifier(model, backend="onnxruntime", precision="int8", cache_dir=tmp_path)
    [rebuilt] = int8_files(tmp_path)
    assert rebuilt.name == cached.name
    assert digest(rebuilt) == digest(cached)
    # A restart reuses the file.
    before = cached.stat().st_mtime_ns
    again = Classifier(model, backend="onnxruntime", precision="int8", cache_dir=cache_dir)
    assert again.precision == elsewhere.precision == "int8"
    assert cached.stat().st_mtime_ns == before


def test_a_corrupt_int8_cache_is_rebuilt(
    model: LoadedModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    Classifier(model, backend="onnxruntime", precision="int8", cache_dir=tmp_path)
    [cached] = int8_files(tmp_path)
    good = digest(cached)
    cached.write_bytes(cached.read_bytes()[:5000])
    with caplog.at_level(logging.WARNING):
        rebuilt = Classifier(model, backend="onnxruntime", precision="int8", cache_dir=tmp_path)
    assert rebuilt.precision == "int8"
    assert digest(cached) == good
    assert "unusable, making it again" in caplog.text


def test_int8_agrees_with_float32_on_the_test_photos(int8: Classifier, cache_dir: Path) -> None:
    float32 = Classifier(int8.model, backend="onnxruntime", cache_dir=cache_dir)
    assert float32.precision == "float32"
    assert float32.precision_reason == "PRECISION=float32"
    batch = np.stack([int8.prepare(photo_bytes(name), max_pixels=10**8) for name in PHOTOS])
    expected = float32.backend.forward(batch).softmax(dim=1)
    actual = int8.backend.forward(batch).softmax(dim=1)
    # Measured: 0.057 at most; a wrong range or a saturating kernel is off by far more.
    assert (actual - expected).abs().max() < 0.1
    labels = [int8.labels[i] for i in actual.argmax(dim=1).tolist()]
    assert all(label in TOP1[name] for name, label in zip(PHOTOS, labels, strict=True))
    # int8 is not float32 in disguise.
    assert (actual - expected).abs().max() > 1e-4


def test_auto_serves_float32_on_a_cpu_without_vnni(
    model: LoadedModel,
    cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(classification.image_model, "cpu_has_vnni", lambda: False)
    with caplog.at_level(logging.WARNING):
        classifier = Classifier(model, backend="onnxruntime", precision="auto", cache_dir=cache_dir)
    assert classifier.precision == "float32"
    assert "no VNNI" in classifier.precision_reason
    assert [r.getMessage() for r in caplog.records] == [
        f"serving float32: {classifier.precision_reason}"
    ]


def test_auto_serves_float32_when_int8_fails_its_check(
    model: LoadedModel,
    cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(classification.image_model, "cpu_has_vnni", lambda: True)
    monkeypatch.setattr(classification.classifier, "INT8_TOLERANCE", 1e-6)
    with caplog.at_level(logging.WARNING):
        classifier = Classifier(model, backend="onnxruntime", precision="auto", cache_dir=cache_dir)
    assert classifier.precision == "float32"
    assert classifier.backend.model_path.name.endswith("-opset17.onnx")  # type: ignore[attr-defined]
    assert "int8 disagrees with float32 on the check photos" in classifier.precision_reason
    assert [r.levelname for r in caplog.records] == ["WARNING"]


def test_auto_uses_int8_where_the_cpu_has_vnni(
    model: LoadedModel, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(classification.image_model, "cpu_has_vnni", lambda: True)
    classifier = Classifier(model, backend="onnxruntime", precision="auto", cache_dir=cache_dir)
    assert classifier.precision == "int8"
    assert classifier.precision_reason.startswith("PRECISION=auto: a CPU with VNNI")
    assert classifier.describe()["precision"] == "int8"


def test_int8_needs_onnx_runtime(model: LoadedModel) -> None:
    with pytest.raises(ValueError, match="PRECISION=int8 runs on ONNX Runtime"):
        Classifier(model, backend="torch", precision="int8")
    torch_auto = Classifier(model, backend="torch", precision="auto")
    assert torch_auto.precision == "float32"
    assert "ONNX Runtime" in torch_auto.precision_reason


def other_weights(model: LoadedModel, path: Path) -> LoadedModel:
    """The default model with slightly different weights, which have no committed ranges."""
    state = {k: v.clone() for k, v in model.module.state_dict().items()}
    state["_fc.bias"] += 0.01
    torch.save(state, path)
    return load_model("efficientnet_lite0", path)


def test_int8_without_ranges_names_calibration_dir(model: LoadedModel, tmp_path: Path) -> None:
    other = other_weights(model, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="set CALIBRATION_DIR to a folder of 100-500"):
        Classifier(other, backend="onnxruntime", precision="int8", cache_dir=tmp_path)


def test_calibration_dir_calibrates_other_weights(
    model: LoadedModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other = other_weights(model, tmp_path / "weights.pt")
    images = tmp_path / "images"
    images.mkdir()
    for path in PHOTOS.values():
        (images / path.name).write_bytes(path.read_bytes())
    (images / "notes.txt").write_text("not an image, and not picked up by its suffix")
    (images / "broken.jpg").write_bytes(photo_bytes("chelsea")[:300])
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING):
        classifier = Classifier(
            other, backend="onnxruntime", precision="int8", calibration_dir=images, cache_dir=cache
        )
    assert classifier.precision == "int8", classifier.precision_reason
    assert "a calibration image is left out" in caplog.text
    [ranges] = cache.glob("*-ranges-*.json")
    assert len(read_ranges(ranges)) > 90
    # The next start reads the measured ranges instead of calibrating again.
    before = ranges.stat().st_mtime_ns
    Classifier(
        other, backend="onnxruntime", precision="int8", calibration_dir=images, cache_dir=cache
    )
    assert ranges.stat().st_mtime_ns == before


def test_calibration_dir_without_images_says_what_to_provide(
    model: LoadedModel, tmp_path: Path
) -> None:
    classifier = Classifier(
        model, backend="onnxruntime", precision="int8", calibration_dir=tmp_path, cache_dir=tmp_path
    )
    assert classifier.precision == "float32"
    assert "holds no images" in classifier.precision_reason
    assert "put 100-500 typical inputs there" in classifier.precision_reason


@needs_shared_photos
def test_committed_ranges_are_those_of_the_shared_photos(tmp_path: Path) -> None:
    """scripts/calibrate.py, run on ../shared/calibration, reproduces the committed ranges."""
    import scripts.calibrate

    scripts.calibrate.write_all(calibration.FOLDER, tmp_path)
    committed = sorted(RANGES_DIR.glob("*.json"))
    assert [p.name for p in sorted(tmp_path.glob("*.json"))] == [p.name for p in committed]
    for path in committed:
        measured = read_ranges(tmp_path / path.name)
        assert measured.keys() == read_ranges(path).keys()
        for name, (low, high) in read_ranges(path).items():
            assert measured[name] == pytest.approx((low, high), rel=1e-4, abs=1e-5), name


async def top1_accuracy(url: str, photos: list[Path], labels: tuple[str, ...]) -> float:
    """The share of ``photos`` whose top class over HTTP is the one their name gives."""
    limit = asyncio.Semaphore(8)

    async def top1(client: httpx.AsyncClient, path: Path, data: bytes) -> int:
        async with limit:
            response = await client.post("/cls", files={"file": (path.name, data)})
        assert response.status_code == 200, response.text
        return int(response.json()["prediction"]["class_id"])

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        predicted = await asyncio.gather(*(top1(client, p, p.read_bytes()) for p in photos))
    truth = calibration.true_classes(photos, labels)
    return sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(photos)


@needs_shared_photos
def test_int8_top1_on_the_shared_photos_is_within_half_a_point_of_float32(
    model: LoadedModel, tmp_path: Path
) -> None:
    photos = calibration.photos()
    assert len(photos) == 200
    accuracy = {}
    for precision in ("float32", "int8"):
        env = {"PRECISION": precision, "MAX_BATCH_SIZE": "16"}
        with running_server(env, tmp_path / f"{precision}.log") as server:
            meta = httpx.get(f"{server.url}/metadata").json()["model"]
            assert meta["precision"] == precision, meta["precision_reason"]
            accuracy[precision] = asyncio.run(top1_accuracy(server.url, photos, model.labels))
    # Measured: float32 0.890, int8 0.895.
    assert accuracy["float32"] > 0.85
    assert accuracy["int8"] >= accuracy["float32"] - 0.005, accuracy
