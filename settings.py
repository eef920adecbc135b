"""Every knob of the server, read once from environment variables (case-insensitive)."""

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigError(Exception):
    """An environment variable holds a value the server cannot run with."""


class Settings(BaseSettings):
    """Server configuration. Each field is the environment variable of the same name."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="Interface `python main.py` binds to.")
    port: int = Field(5001, ge=1, le=65535, description="Port `python main.py` listens on.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    model: str = Field(
        "efficientnet_lite0",
        min_length=1,
        description="efficientnet_lite0 (bundled weights) or a torchvision classification model.",
    )
    weights: Path | None = Field(None, description="State-dict file to load instead of defaults.")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    channels_last: Literal["auto", "true", "false"] = Field(
        "auto", description="auto times both memory formats at warm-up and keeps the faster."
    )
    torch_threads: int = Field(0, ge=0, description="Intra-op threads; 0 means one per core.")

    max_batch_size: int = Field(4, ge=1, le=1024)
    max_batch_delay_ms: float = Field(5.0, ge=0, le=10_000)
    max_queue_size: int = Field(256, ge=1)
    timeout: float = Field(2.0, gt=0, description="Seconds a request may wait before 504.")
    drain_timeout: float = Field(10.0, ge=0, description="Seconds to finish work at shutdown.")
    top_k: int = Field(5, ge=1, le=20)

    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    decode_workers: int = Field(
        default_factory=lambda: min(4, os.cpu_count() or 1),
        ge=1,
        description="Threads that decode and resize uploads.",
    )


def load_settings() -> Settings:
    """Reads the environment, or raises ConfigError naming each bad variable and value."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = ".".join(str(part) for part in error["loc"]).upper()
            problems.append(f"{name}={error.get('input')!r}: {error['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read on first use."""
    return load_settings()
