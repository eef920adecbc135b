"""Configuration from the environment."""

import pytest

from settings import ConfigError, Settings, load_settings


def test_defaults() -> None:
    settings = Settings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 5001
    assert settings.timeout == 2.0


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
        ("PORT", "http"),
    ],
)
def test_invalid_value_names_the_variable_and_value(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=f"{name}='{value}'"):
        load_settings()


def test_a_field_of_several_types_fails_in_one_plain_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_BATCH_SIZE", "abc")
    with pytest.raises(ConfigError) as raised:
        load_settings()
    message = str(raised.value)
    assert message.startswith("invalid configuration: MAX_BATCH_SIZE='abc': ")
    assert "valid integer" in message
    assert "'auto'" in message
    assert "INT" not in message
    assert "LITERAL" not in message


@pytest.mark.parametrize(
    ("cores", "workers", "device", "expected"),
    [(2, 1, "cpu", 1), (16, 1, "cpu", 8), (16, 2, "cpu", 4), (1, 1, "cpu", 1), (16, 2, "cuda", 8)],
)
def test_decode_threads_leave_the_cpu_model_its_cores(
    monkeypatch: pytest.MonkeyPatch, cores: int, workers: int, device: str, expected: int
) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    settings = Settings(workers=workers)
    assert settings.decode_threads(device) == expected
    assert Settings(workers=workers, decode_workers=3).decode_threads(device) == 3


def test_an_int8_model_gets_every_core_for_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert Settings(workers=2).decode_threads("cpu", light_model=True) == 8
    assert Settings(workers=2, decode_workers=3).decode_threads("cpu", light_model=True) == 3


def test_explicit_model_control_is_refused_with_several_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MODEL_CONTROL", "explicit")
    monkeypatch.setenv("WORKERS", "2")
    with pytest.raises(ConfigError, match="MODEL_CONTROL=explicit with WORKERS=2: a load"):
        load_settings()
