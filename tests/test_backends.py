"""ONNX Runtime against PyTorch, the fallback, the export cache and the batch-size choice."""

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import classification.onnx_backend as onnx_backend
from classification import Classifier, load_model
from serving.warmup import BATCH_OVERHEAD_S, TUNE_SHARE, choose_batch_size, serving_scores
from tests.images import PHOTOS, photo_bytes

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def onnx_classifier(cache_dir: Path) -> Classifier:
    return Classifier(load_model("efficientnet_lite0"), backend="onnxruntime", cache_dir=cache_dir)


def test_onnx_and_torch_agree_on_real_photos(onnx_classifier: Classifier) -> None:
    assert onnx_classifier.backend.name == "onnxruntime"
    assert onnx_classifier.fallback_reason is None
    batch = np.stack(
        [onnx_classifier.prepare(photo_bytes(name), max_pixels=10**8) for name in PHOTOS]
    )
    onnx = onnx_classifier.backend.forward(batch).softmax(dim=1)
    reference = onnx_classifier.torch_backend.forward(batch).softmax(dim=1)
    assert (onnx - reference).abs().max() < 1e-4
    assert onnx.argmax(dim=1).tolist() == reference.argmax(dim=1).tolist() == [285, 967, 657]


def test_auto_uses_onnx_runtime_on_the_cpu(cache_dir: Path) -> None:
    classifier = Classifier(load_model("efficientnet_lite0"), backend="auto", cache_dir=cache_dir)
    assert classifier.backend.name == "onnxruntime"
    assert classifier.describe()["backend"] == "onnxruntime"


def test_export_is_cached_and_reused_on_restart(
    onnx_classifier: Classifier, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    [exported] = cache_dir.glob("efficientnet_lite0-*.onnx")
    stamp = exported.stat().st_mtime_ns

    def no_export(*args: object, **kwargs: object) -> None:
        raise AssertionError("exported again although the cache holds the model")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    again = Classifier(load_model("efficientnet_lite0"), backend="onnxruntime", cache_dir=cache_dir)
    assert again.backend.name == "onnxruntime"
    assert exported.stat().st_mtime_ns == stamp
    assert list(cache_dir.glob("*.onnx")) == [exported]


def test_a_corrupt_cached_export_is_replaced_by_a_fresh_one(
    onnx_classifier: Classifier, tmp_path: Path
) -> None:
    [exported] = onnx_classifier.backend.model_path.parent.glob("efficientnet_lite0-*.onnx")
    corrupt = tmp_path / exported.name
    corrupt.write_bytes(exported.read_bytes()[:4096])  # as a disk-full crash leaves it
    again = Classifier(load_model("efficientnet_lite0"), backend="onnxruntime", cache_dir=tmp_path)
    assert again.backend.name == "onnxruntime", again.fallback_reason
    assert corrupt.stat().st_size == exported.stat().st_size


def test_other_weights_get_their_own_cache_entry(cache_dir: Path) -> None:
    model = load_model("efficientnet_lite0")
    with torch.no_grad():
        next(model.module.parameters()).mul_(1.01)
    assert onnx_backend.weights_digest(model.module) not in {
        path.name.split("-")[1] for path in cache_dir.glob("*.onnx")
    }


def test_failed_export_falls_back_to_torch_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_export(*args: object, **kwargs: object) -> None:
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with caplog.at_level(logging.WARNING):
        classifier = Classifier(
            load_model("efficientnet_lite0"), backend="onnxruntime", cache_dir=tmp_path
        )
    assert classifier.backend.name == "torch"
    assert "unsupported operator" in (classifier.fallback_reason or "")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "serving with PyTorch" in warnings[0].getMessage()
    assert not list(tmp_path.glob("*"))  # no half-written export left behind


def test_diverging_outputs_fall_back_to_torch(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = onnx_backend.OnnxBackend.forward

    def skewed(self: onnx_backend.OnnxBackend, pixels: np.ndarray) -> torch.Tensor:
        return real(self, pixels).roll(1, dims=1)

    monkeypatch.setattr(onnx_backend.OnnxBackend, "forward", skewed)
    classifier = Classifier(
        load_model("efficientnet_lite0"), backend="onnxruntime", cache_dir=cache_dir
    )
    assert classifier.backend.name == "torch"
    assert "differ" in (classifier.fallback_reason or "")


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({1: 0.5, 2: 0.75, 4: 0.95, 8: 1.0, 16: 0.99, 32: 0.6}, 8),
        ({1: 0.42, 2: 0.63, 4: 1.0, 8: 0.84, 16: 0.6, 32: 0.33}, 4),
        ({1: 1.0, 2: 0.96, 4: 1.0, 8: 0.85}, 4),
        ({1: 0.4, 2: 0.7, 4: 0.96, 8: 0.85, 16: 1.0, 32: 0.97}, 16),
        ({1: 0.06, 2: 0.13, 4: 0.25, 8: 0.5, 16: 1.0}, 16),
        ({1: 1.0}, 1),
    ],
)
def test_auto_batch_size_is_the_one_that_serves_best(
    table: dict[int, float], expected: int
) -> None:
    assert choose_batch_size(table) == expected


# serving_scores of five fresh starts each, on a 2-core AMD EPYC with AVX2 only: sizes 4
# to 32 serve alike, and the best of them moved with the noise.
MEASURED_ON_AVX2 = {
    "float32": [
        {1: 0.733, 2: 0.921, 4: 0.958, 8: 1.0, 16: 0.996, 32: 0.999},
        {1: 0.786, 2: 0.914, 4: 0.961, 8: 0.961, 16: 0.977, 32: 0.95},
        {1: 0.793, 2: 0.921, 4: 0.879, 8: 0.974, 16: 1.0, 32: 0.991},
        {1: 0.648, 2: 0.865, 4: 0.903, 8: 0.953, 16: 0.962, 32: 0.992},
        {1: 0.763, 2: 0.89, 4: 0.931, 8: 0.975, 16: 1.0, 32: 0.995},
    ],
    "int8": [
        {1: 0.62, 2: 0.845, 4: 0.934, 8: 0.953, 16: 1.0, 32: 0.956},
        {1: 0.711, 2: 0.869, 4: 0.929, 8: 0.977, 16: 0.937, 32: 0.994},
        {1: 0.662, 2: 0.71, 4: 0.843, 8: 0.996, 16: 0.964, 32: 0.992},
        {1: 0.712, 2: 0.862, 4: 0.944, 8: 1.0, 16: 0.966, 32: 0.951},
        {1: 0.58, 2: 0.644, 4: 0.939, 8: 0.985, 16: 0.873, 32: 1.0},
    ],
}


@pytest.mark.parametrize("precision", sorted(MEASURED_ON_AVX2))
def test_sizes_that_serve_alike_give_the_same_choice_at_every_start(precision: str) -> None:
    tables = MEASURED_ON_AVX2[precision]
    assert len({max(table, key=lambda size: table[size]) for table in tables}) > 1
    assert {choose_batch_size(table) for table in tables} == {8}


def test_a_size_chosen_before_is_kept_while_it_stays_within_90_percent() -> None:
    table = {1: 0.7, 2: 0.85, 4: 0.97, 8: 1.0, 16: 0.92}
    assert choose_batch_size(table) == 8
    assert choose_batch_size(table, previous=4) == 4
    assert choose_batch_size(table, previous=16) == 16
    assert choose_batch_size(table, previous=2) == 8  # no longer good enough
    assert choose_batch_size(table, previous=64) == 8  # not measured this time


def test_serving_scores_count_each_batch_s_hand_off_and_cancel_drift() -> None:
    # Batches of 1, 2 and 4 computing at the same pace per item; a second round twice as
    # slow throughout (a busy host). Each batch also costs BATCH_OVERHEAD_S to serve.
    fast = {1: 0.01, 2: 0.02, 4: 0.04}
    table = [fast, {n: 2 * seconds for n, seconds in fast.items()}]
    scores = serving_scores(table)
    assert scores[4] == 1.0
    expected = (1 / (0.01 + BATCH_OVERHEAD_S)) / (4 / (0.04 + BATCH_OVERHEAD_S))
    assert scores[1] < scores[2] < 1.0
    assert scores[1] == pytest.approx(expected, abs=0.06)


def test_warmup_times_each_batch_size_side_by_side_and_reports_the_choice(
    onnx_classifier: Classifier,
) -> None:
    assert onnx_classifier.concurrency == torch.get_num_threads()
    report = onnx_classifier.warmup(8, tune=True)
    assert set(report["images_per_second"]) == set(report["serving_scores"]) == {1, 2, 4, 8}
    assert report["batch_size"] == choose_batch_size(report["serving_scores"])
    assert report["backend"] == "onnxruntime"
    # The pace of one batch among those computing side by side, near the table's.
    per_item = onnx_classifier.concurrency / report["images_per_second"][report["batch_size"]]
    assert report["seconds_per_item"] == pytest.approx(per_item, rel=0.5)


def test_a_later_start_keeps_the_batch_size_it_chose(cache_dir: Path) -> None:
    model = load_model("efficientnet_lite0")
    first = Classifier(model, backend="onnxruntime", cache_dir=cache_dir).warmup(8, tune=True)
    [kept] = cache_dir.glob("efficientnet_lite0-batch-size-*.json")
    assert json.loads(kept.read_text()) == {"batch_size": first["batch_size"]}
    # Another start, on the same model and machine, finds it: had it measured 2 best, say.
    kept.write_text(json.dumps({"batch_size": 2}))
    again = Classifier(model, backend="onnxruntime", cache_dir=cache_dir).warmup(8, tune=True)
    if again["serving_scores"][2] >= TUNE_SHARE * max(again["serving_scores"].values()):
        assert (again["batch_size"], again["batch_size_kept"]) == (2, True)
    else:
        assert again["batch_size"] == choose_batch_size(again["serving_scores"])
        assert not again["batch_size_kept"]
    # Another precision, another machine, another model: another file.
    Classifier(model, backend="onnxruntime", precision="int8", cache_dir=cache_dir).warmup(
        8, tune=True
    )
    assert len(list(cache_dir.glob("efficientnet_lite0-batch-size-*.json"))) == 2


def test_warmup_without_tuning_still_times_the_model(onnx_classifier: Classifier) -> None:
    report = onnx_classifier.warmup(4)
    assert report["batch_size"] == 4
    assert 0 < report["seconds_per_item"] < 1


def test_half_precision_needs_cuda() -> None:
    with pytest.raises(ValueError, match="DTYPE=float16 needs DEVICE=cuda"):
        Classifier(load_model("efficientnet_lite0"), device="cpu", dtype="float16")


def test_a_call_beside_a_running_one_uses_the_single_threaded_session(cache_dir: Path) -> None:
    classifier = Classifier(
        load_model("efficientnet_lite0"), backend="onnxruntime", threads=2, cache_dir=cache_dir
    )
    backend = classifier.backend
    assert isinstance(backend, onnx_backend.OnnxBackend)
    assert classifier.concurrency == backend.concurrency == 2
    batch = np.stack([classifier.prepare(photo_bytes("coffee"), max_pixels=10**8)])
    expected = backend.forward(batch)

    alone, entered, release = backend.sessions.alone, threading.Event(), threading.Event()

    class Held:
        """The two-threaded session, held mid-call until released."""

        def run(self, *args: object) -> object:
            entered.set()
            assert release.wait(30)
            return alone.run(*args)

    backend.sessions.alone = Held()
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(backend.forward, batch)
        assert entered.wait(30)
        # Beside the held call, this one runs, on the other session, and agrees with it.
        assert torch.equal(backend.forward(batch), expected)
        assert not first.done()
        release.set()
        assert torch.equal(first.result(timeout=30), expected)
    backend.sessions.alone = alone
    assert torch.equal(backend.forward(batch), expected)  # alone again: two threads
