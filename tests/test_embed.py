"""Image embeddings: the two backends agree, and distances mean something."""

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from classification import Embedder, load_model
from harness import calibration
from tests.images import encode, photo_bytes

pytestmark = pytest.mark.e2e

PHOTOS = ("chelsea", "coffee", "rocket")


@pytest.fixture(scope="module")
def embedders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Embedder]:
    cache = tmp_path_factory.mktemp("model-cache")
    model = load_model("efficientnet_lite0")
    return {
        backend: Embedder(model, backend=backend, cache_dir=cache)
        for backend in ("torch", "onnxruntime")
    }


def vectors(embedder: Embedder, images: list[bytes]) -> np.ndarray:
    pixels = [embedder.prepare(data, max_pixels=10**8) for data in images]
    return np.array(embedder.predict(pixels))


def near_duplicate(name: str) -> bytes:
    """The photo as it might be found again: mirrored, cropped, smaller, recompressed."""
    image = Image.open(io.BytesIO(photo_bytes(name))).convert("RGB")
    width, height = image.size
    image = ImageOps.mirror(image.crop((width // 10, height // 10, width, height)))
    return encode(image.resize((width // 2, height // 2)), "JPEG", quality=60)


def test_the_two_backends_give_the_same_unit_vectors(embedders: dict[str, Embedder]) -> None:
    onnx = embedders["onnxruntime"]
    assert onnx.backend.name == "onnxruntime", onnx.fallback_reason
    images = [photo_bytes(name) for name in PHOTOS]
    torch_vectors = vectors(embedders["torch"], images)
    onnx_vectors = vectors(onnx, images)
    assert torch_vectors.shape == (3, 1280)  # EfficientNet-Lite0's pooled features
    assert np.allclose(np.linalg.norm(onnx_vectors, axis=1), 1, atol=1e-4)
    assert np.abs(torch_vectors - onnx_vectors).max() < 1e-4
    # Each photo is nearest to itself across backends.
    assert (torch_vectors @ onnx_vectors.T).argmax(axis=1).tolist() == [0, 1, 2]


def test_a_near_duplicate_is_closer_than_any_other_photo(embedders: dict[str, Embedder]) -> None:
    embedder = embedders["onnxruntime"]
    originals = vectors(embedder, [photo_bytes(name) for name in PHOTOS])
    copies = vectors(embedder, [near_duplicate(name) for name in PHOTOS])
    similarity = copies @ originals.T
    for i, name in enumerate(PHOTOS):
        others = [similarity[i, j] for j in range(3) if j != i]
        assert similarity[i, i] > 0.8, (name, similarity)
        assert similarity[i, i] > max(others) + 0.2, (name, similarity)


@pytest.mark.skipif(not calibration.FOLDER.is_dir(), reason="../shared/calibration is not here")
def test_nearest_neighbours_share_a_kind_far_above_chance(embedders: dict[str, Embedder]) -> None:
    """On the shared photos (one per ImageNet class): a dog's nearest other photo is
    mostly another breed of dog, a bird's another bird."""
    files = calibration.photos()
    wordnet_ids = np.array([int(f.name[1:9]) for f in files])
    embedder = embedders["onnxruntime"]
    embedded = vectors(embedder, [f.read_bytes() for f in files])
    similarity = embedded @ embedded.T
    np.fill_diagonal(similarity, -1)
    nearest = similarity.argmax(axis=1)
    # WordNet id ranges of ImageNet's dog breeds and birds.
    for kind, low, high in (("dog", 2085620, 2113978), ("bird", 1514668, 1855672)):
        members = (wordnet_ids >= low) & (wordnet_ids <= high)
        share_of_kind = float(members[nearest][members].mean())
        chance = float(members.mean())
        assert members.sum() >= 10, kind
        assert share_of_kind > 3 * chance, (kind, share_of_kind, chance)
