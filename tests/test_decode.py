"""Decoding and preprocessing, on real photos."""

import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from classification import BadImage, Classifier, ImageTooLarge, UnsupportedImage
from classification.decode import PixelBudget, decode_image
from classification.models import load_model
from tests.images import (
    chelsea,
    encode,
    exif_rotated_jpeg,
    photo_bytes,
    png_claiming,
    truncated_jpeg,
)

LITE0 = load_model("efficientnet_lite0").preprocess


def decode(data: bytes, max_pixels: int = 10**8) -> Image.Image:
    return decode_image(data, max_pixels=max_pixels, min_side=256)


def test_crop_matches_resize_then_center_crop() -> None:
    image = chelsea()
    reference = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224)])(image)
    ours = LITE0.crop(image).astype(np.int16)
    theirs = np.asarray(reference).astype(np.int16)
    assert ours.shape == theirs.shape == (224, 224, 3)
    assert np.abs(ours - theirs).mean() < 1.5


def test_normalize_scales_pixels_as_the_weights_expect() -> None:
    pixels = torch.tensor([[[[0, 127, 255]]]], dtype=torch.uint8)
    normalized = LITE0.normalize(pixels)
    assert normalized.shape == (1, 3, 1, 1)
    assert normalized.flatten().tolist() == pytest.approx([-127 / 128, 0.0, 128 / 128])


def test_large_jpeg_is_decoded_at_reduced_scale_without_changing_the_result() -> None:
    big = chelsea().resize((451 * 9, 300 * 9), Image.Resampling.BICUBIC)
    data = encode(big, "JPEG", quality=92)
    classifier = Classifier(load_model("efficientnet_lite0"))
    drafted = classifier.prepare(data, max_pixels=10**8)
    full = LITE0.crop(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.abs(drafted.astype(np.int16) - full.astype(np.int16)).mean() < 1.0
    probabilities = classifier.backend.forward(np.stack([drafted, full])).softmax(dim=1)
    assert probabilities.argmax(dim=1).tolist() == [285, 285]
    assert (probabilities[0] - probabilities[1]).abs().max() < 0.02


def test_draft_decodes_fewer_pixels_but_covers_the_resize() -> None:
    big = chelsea().resize((451 * 9, 300 * 9), Image.Resampling.BICUBIC)
    drafted = decode(encode(big, "JPEG", quality=92))
    assert 256 <= min(drafted.size) < 2700 // 2


def test_exif_orientation_is_applied() -> None:
    upright = chelsea()
    decoded = decode(exif_rotated_jpeg(upright))
    assert decoded.size == upright.size
    difference = np.abs(np.asarray(decoded).astype(np.int16) - np.asarray(upright).astype(np.int16))
    assert difference.mean() < 4.0


def test_pixel_limit_is_checked_from_the_header() -> None:
    with pytest.raises(ImageTooLarge, match="50000x50000"):
        decode(png_claiming(50000, 50000))
    with pytest.raises(ImageTooLarge):
        decode(photo_bytes("chelsea"), max_pixels=451 * 300 - 1)
    assert decode(photo_bytes("chelsea"), max_pixels=451 * 300).size == (451, 300)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", BadImage),
        (truncated_jpeg(), BadImage),
        (b"GIF89a" + b"\x00" * 20, BadImage),
        (b"%PDF-1.4 not an image", UnsupportedImage),
        (encode(chelsea(), "PPM"), UnsupportedImage),
        (encode(chelsea().convert("F"), "TIFF"), UnsupportedImage),
    ],
    ids=["empty", "truncated-jpeg", "broken-gif", "pdf", "ppm-not-allowed", "float-tiff"],
)
def test_bad_input_raises_a_named_error(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode(data)


def test_32_bit_signed_pixels_clip_to_black_and_white() -> None:
    values = np.array([[-1000, 0, 65535, 100_000]], dtype=np.int32).repeat(4, axis=0)
    buffer = io.BytesIO()
    Image.fromarray(values, mode="I").save(buffer, format="TIFF")
    decoded = np.asarray(decode(buffer.getvalue()))
    # Negative is below black: it must not wrap around to a huge unsigned value (white).
    assert decoded[0, :, 0].tolist() == [0, 0, 255, 255]


def png(pixels: np.ndarray) -> bytes:
    return encode(Image.fromarray(pixels), "PNG")  # uint16: I;16, 4 channels: RGBA


def test_a_large_16_bit_image_is_reduced_as_a_full_conversion_then_reduce_would() -> None:
    rows, cols = np.mgrid[0:1100, 0:1300]
    grey = ((rows * 37 + cols * 91) % 65536).astype(np.uint16)
    decoded = decode(png(grey))  # converted in strips of 256 rows, each reduced
    # The same conversion on the whole image, then reduced: 8 bits, rounded.
    eight_bit = ((grey.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    expected = np.asarray(Image.fromarray(eight_bit).reduce(4).convert("RGB"))
    assert decoded.size == (325, 275)  # the shorter side still covers min_side
    assert np.array_equal(np.asarray(decoded), expected)


def test_transparent_pixels_are_averaged_by_what_shows_through() -> None:
    # Opaque red beside fully transparent black: reduced 2:1 over white it is half red,
    # half white, not darkened by the black that does not show.
    rgba = np.zeros((600, 1200, 4), dtype=np.uint8)
    rgba[:, 0::2] = (255, 0, 0, 255)
    decoded = decode(png(rgba))
    assert decoded.size == (600, 300)
    red, green, blue = np.asarray(decoded)[0, 0].tolist()
    assert red == 255  # averaged as stored, it was half black: 191
    assert green == blue
    assert abs(green - 127.5) <= 1


def test_a_small_transparent_image_is_composited_over_white_pixel_for_pixel() -> None:
    rgba = np.random.default_rng(0).integers(0, 256, (300, 400, 4), dtype=np.uint8)
    decoded = np.asarray(decode(png(rgba)), dtype=np.int32)
    alpha = rgba[..., 3:].astype(np.int32)
    expected = (rgba[..., :3] * alpha + 255 * (255 - alpha)) / 255
    assert np.abs(decoded - expected).max() <= 1


def test_a_decode_that_does_not_fit_the_budget_waits_for_room() -> None:
    budget = PixelBudget(100)
    entered, leave = threading.Event(), threading.Event()

    def second() -> None:
        with budget.hold(60):
            entered.set()
            leave.wait(5)

    thread = threading.Thread(target=second)
    with budget.hold(70):
        thread.start()
        assert not entered.wait(0.3)  # 70 + 60 > 100: it waits
        assert budget.in_use == 70
    assert entered.wait(5)  # room once the first is done
    assert budget.in_use == 60
    leave.set()
    thread.join()
    assert budget.in_use == 0
    with budget.hold(10**9):  # an image larger than the budget takes all of it, alone
        assert budget.in_use == 100
