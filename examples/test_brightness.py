"""The brightness task's own tests, as its author writes them: the task alone, without a
server (tests/test_tasks_e2e.py serves it as examples/README.md says).

    python -m pytest examples/test_brightness.py
"""

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from classification.errors import ImageTooLarge, UnsupportedImage
from examples.brightness import Brightness, BrightnessOptions
from serving import LoadContext

PHOTO = Path(__file__).resolve().parent.parent / "tests" / "data" / "chelsea.jpg"


def png(colour: str, size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def loaded(tmp_path: Path) -> Brightness:
    task = Brightness()
    task.load(LoadContext(device="cpu", threads=1, cache_dir=tmp_path))
    return task


def test_one_batch_answers_each_item_with_its_own_grid(tmp_path: Path) -> None:
    task = loaded(tmp_path)
    white = {"image": f"data:image/png;base64,{b64(png('white'))}"}  # JSON, as in a job
    items = [
        task.decode(PHOTO.read_bytes(), BrightnessOptions(grid=2)),
        task.decode(png("black"), BrightnessOptions()),
        task.decode(white, BrightnessOptions(grid=3)),
    ]
    photo, black, bright = task.predict_batch(items)
    assert not isinstance(photo, Exception)
    assert 0.1 < photo.brightness < 0.9
    assert [len(row) for row in photo.grid] == [2, 2]
    assert not isinstance(black, Exception)
    assert (black.brightness, black.dark, black.grid) == (0.0, True, [[0.0]])
    assert not isinstance(bright, Exception)
    assert bright.brightness == 1.0
    assert bright.grid == [[1.0] * 3] * 3


def test_what_is_not_an_image_fails_that_request(tmp_path: Path) -> None:
    task = loaded(tmp_path)
    with pytest.raises(UnsupportedImage):
        task.decode(b"just some text", BrightnessOptions())


def test_the_pixel_limit_applies(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(ImageTooLarge):
        loaded(tmp_path).decode(png("grey", (40, 30)), BrightnessOptions())


def test_dark_below_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DARK_BELOW", "0.99")
    task = loaded(tmp_path)
    [photo] = task.predict_batch([task.decode(PHOTO.read_bytes(), BrightnessOptions())])
    assert not isinstance(photo, Exception)
    assert photo.dark
