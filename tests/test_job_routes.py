"""What api/routes/jobs.py does with a job's items before the store sees them."""

import base64

import pytest
from fastapi.exceptions import RequestValidationError

from api.routes.jobs import _pack, job_options
from classification.task import ClassifyOptions, ImageClassification
from serving import InputError
from serving.service import unpack_job_item


def test_json_items_that_can_never_be_images_become_their_errors() -> None:
    photo = base64.b64encode(b"\xff\xd8 not decoded here").decode()
    items = [photo, 5, {}, [photo], {"image": photo}, None, b"file", InputError("text part")]
    packed = _pack(items, ImageClassification(), {})
    for index in (1, 2, 3, 5):
        error = packed[index]
        assert isinstance(error, dict), error
        assert error["error"]["status"] == 422
        assert "'image' (a base64 string) is missing" in error["error"]["detail"]
    # What might be an image is kept for the runner to decode, as it came.
    kept = [unpack_job_item(packed[i]) for i in (0, 4, 6)]  # type: ignore[arg-type]
    assert kept == [(photo, {}), ({"image": photo}, {}), (b"file", {})]
    assert packed[7] == {"error": {"status": 400, "detail": "text part"}}


def test_a_jobs_options_are_kept_with_each_item() -> None:
    packed = _pack([b"file", {"image": "abc"}], ImageClassification(), {"top_k": 3})
    kept = [unpack_job_item(item) for item in packed]  # type: ignore[arg-type]
    assert kept == [(b"file", {"top_k": 3}), ({"image": "abc"}, {"top_k": 3})]


def test_options_from_a_jobs_query_are_validated_as_on_the_tasks_route() -> None:
    task = ImageClassification()
    assert job_options(task, {"top_k": "3"}) == ClassifyOptions(top_k=3)
    assert job_options(task, {}) == ClassifyOptions()
    with pytest.raises(RequestValidationError) as caught:
        job_options(task, {"top_k": "50"})
    [error] = caught.value.errors()
    assert error["loc"] == ("query", "top_k")
