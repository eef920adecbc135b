"""Configuration from the environment."""

import pytest

from settings import ConfigError, Settings, load_settings


def test_defaults() -> None:
    settings = Settings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 5001
    assert settings.model == "efficientnet_lite0"
    assert settings.timeout == 2.0
    assert settings.top_k == 5


def test_lowercase_variables_work_as_in_the_original_compose_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("timeout", "1.0")
    monkeypatch.setenv("Max_Batch_Size", "8")
    settings = load_settings()
    assert settings.timeout == 1.0
    assert settings.max_batch_size == 8


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TIMEOUT", "0"),
        ("MAX_QUEUE_SIZE", "-1"),
        ("DEVICE", "tpu"),
        ("TOP_K", "50"),
        ("CHANNELS_LAST", "sometimes"),
        ("PORT", "http"),
    ],
)
def test_invalid_value_names_the_variable_and_value(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=f"{name}='{value}'"):
        load_settings()
