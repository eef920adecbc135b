"""Other models and weight files, loaded offline."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from classification import Classifier, ClassifyInput, load_model
from tests.images import chelsea


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init state dict: torchvision's pretrained weights need network."""
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def test_torchvision_model_with_weights_file_carries_its_own_preprocessing_and_labels(
    resnet18_weights: Path,
) -> None:
    model = load_model("resnet18", resnet18_weights)
    assert model.preprocess.resize_size == 256
    assert model.preprocess.crop_size == 224
    assert model.preprocess.mean == pytest.approx((0.485 * 255, 0.456 * 255, 0.406 * 255))
    assert len(model.labels) == 1000
    assert model.labels[285] == "Egyptian cat"
    classifier = Classifier(model, channels_last="false")
    pixels = model.preprocess.crop(chelsea())
    [scores] = classifier.predict([ClassifyInput(pixels, 3)])
    assert len(scores) == 3
    expected = model.module(model.preprocess.normalize(torch.from_numpy(pixels[None].copy())))
    assert scores[0].class_id == int(expected.argmax())


def test_default_model_uses_lite_preprocessing() -> None:
    model = load_model("efficientnet_lite0")
    assert (model.preprocess.mean, model.preprocess.std) == ((127.0,) * 3, (128.0,) * 3)
    assert model.weights.endswith(".pth")


def test_unknown_model_is_refused_with_the_variable_name() -> None:
    with pytest.raises(ValueError, match="MODEL='resnet9000'"):
        load_model("resnet9000")


def test_weights_of_another_model_are_refused(resnet18_weights: Path) -> None:
    with pytest.raises(ValueError, match="does not fit the model"):
        load_model("efficientnet_lite0", resnet18_weights)


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))  # type: ignore[return-value]


def test_weights_file_that_carries_code_is_refused_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    weights = tmp_path / "evil.pt"
    weights.write_bytes(pickle.dumps({"conv.weight": _Payload(marker)}))
    with pytest.raises(ValueError, match="WEIGHTS="):
        load_model("resnet18", weights)
    assert not marker.exists()


def test_classifier_answers_each_item_with_its_own_top_k() -> None:
    classifier = Classifier(load_model("efficientnet_lite0"))
    pixels = classifier.preprocess.crop(chelsea())
    results = classifier.predict(
        [ClassifyInput(pixels, 1), ClassifyInput(np.zeros_like(pixels), 4)]
    )
    assert [len(r) for r in results] == [1, 4]
    assert results[0][0].label == "Egyptian cat"
