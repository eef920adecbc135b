"""A task's own settings: declared with the task, read from the environment at startup,
named in errors, shown in /metadata; and the configuration table lists every one."""

import asyncio
import re
from pathlib import Path

import httpx
import pytest

from classification.settings import ClassificationSettings, ImageSettings
from main import create_app
from serving.registry import load_tasks
from settings import ConfigError
from settings import Settings as ServerSettings
from tests.helpers import EVERY_SETTING
from tests.tasks import Square

ROOT = Path(__file__).resolve().parent.parent


def test_the_image_tasks_defaults() -> None:
    settings = ClassificationSettings()
    assert settings.model == "efficientnet_lite0"
    assert settings.precision == "auto"
    assert settings.top_k == 5
    assert "top_k" not in ImageSettings.model_fields  # /embed has no classes to count


def test_the_server_settings_hold_no_task_setting() -> None:
    assert not set(ServerSettings.model_fields) & set(ClassificationSettings.model_fields)


@pytest.mark.parametrize(
    ("name", "value", "spec"),
    [
        ("TOP_K", "50", "classification.task:ImageClassification"),
        ("CHANNELS_LAST", "sometimes", "classification.task:ImageEmbedding"),
        ("PRECISION", "int4", "classification.task:ImageClassification"),
        ("SHIFT", "x", "tests.tasks:Shifted"),
        ("shift", "-1", "tests.tasks:Shifted"),
    ],
)
def test_a_bad_task_setting_stops_startup_naming_it_and_its_task(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, spec: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=rf"for task '\w+': {name.upper()}='{value}'"):
        load_tasks(spec)
    with pytest.raises(ConfigError, match=f"{name.upper()}='{value}'"):
        create_app(ServerSettings(tasks=spec), exit_on_failure=False)


def test_a_task_that_declares_no_settings_reads_none() -> None:
    [task] = load_tasks("tests.tasks:Square")
    assert task.settings.model_dump() == {}


def test_settings_that_are_not_task_settings_are_refused() -> None:
    with pytest.raises(ValueError, match=r"Settings must subclass serving\.TaskSettings"):
        load_tasks("tests.test_task_settings:WrongSettings")


class WrongSettings(Square):
    """Declares the server's settings class as its own."""

    name = "wrong"
    Settings = ServerSettings


@pytest.mark.e2e
@pytest.mark.anyio
async def test_a_task_setting_reaches_the_task_and_metadata(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SHIFT", "3")
    app = create_app(ServerSettings(tasks="tests.tasks:Shifted"), exit_on_failure=False)
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(app.state.engine.warmed_up.wait(), timeout=60)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            answer = await client.post("/shifted", json={"x": 2})
            metadata = (await client.get("/metadata")).json()
    assert answer.json() == {"square": 25}
    assert metadata["tasks"]["shifted"]["settings"] == {"shift": 3}


def test_the_configuration_table_lists_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([A-Z_0-9]+)` \|", table, re.MULTILINE))
    assert listed >= EVERY_SETTING, EVERY_SETTING - listed
    assert listed <= EVERY_SETTING, listed - EVERY_SETTING
