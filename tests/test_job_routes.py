"""What api/routes/jobs.py does with a job's items before the store sees them."""

import base64

from api.routes.jobs import _pack
from classification.task import ImageClassification
from serving import InputError
from serving.service import unpack_job_item


def test_json_items_that_can_never_be_images_become_their_errors() -> None:
    photo = base64.b64encode(b"\xff\xd8 not decoded here").decode()
    items = [photo, 5, {}, [photo], {"image": photo}, None, b"file", InputError("text part")]
    packed = _pack(items, ImageClassification())
    for index in (1, 2, 3, 5):
        error = packed[index]
        assert isinstance(error, dict), error
        assert error["error"]["status"] == 422
        assert "'image' (a base64 string) is missing" in error["error"]["detail"]
    # What might be an image is kept for the runner to decode, as it came.
    assert [unpack_job_item(packed[i]) for i in (0, 4, 6)] == [photo, {"image": photo}, b"file"]
    assert packed[7] == {"error": {"status": 400, "detail": "text part"}}
