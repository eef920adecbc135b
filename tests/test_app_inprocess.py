"""The app in-process, through its lifespan, with httpx's ASGI transport and the real model."""

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from main import create_app
from settings import Settings
from tests.images import photo_bytes, photo_of

pytestmark = pytest.mark.anyio


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    # A long delay with a batch of two: two posts gathered must share one batch.
    app: FastAPI = create_app(Settings(max_batch_size=2, max_batch_delay_ms=2000))
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(app.state.engine.warmed_up.wait(), timeout=120)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield client


async def test_two_concurrent_posts_share_one_batch(client: httpx.AsyncClient) -> None:
    names = ["chelsea", "coffee"]
    responses = await asyncio.wait_for(
        asyncio.gather(*(client.post("/cls", files={"file": (n, photo_bytes(n))}) for n in names)),
        timeout=60,
    )
    assert [photo_of(r.json()["prediction"]["label"]) for r in responses] == names
    stats = (await client.get("/metadata")).json()["stats"]
    assert stats["batch_size_histogram"] == {"2": 1}
    assert stats["items"] == 2


async def test_openapi_documents_cls_errors(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    cls = spec["paths"]["/cls"]["post"]
    assert {"400", "413", "415", "422", "503", "504"} <= set(cls["responses"])
    assert "multipart/form-data" in cls["requestBody"]["content"]
