"""Every knob of the server, read once from environment variables (case-insensitive).

A task's own knobs (the image tasks' MODEL, PRECISION, TOP_K, ...) live with the task, in
its ``Settings`` class, and are read by the same ``read_settings``."""

import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

S = TypeVar("S", bound=BaseSettings)

FROM_ENVIRONMENT = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)
"""How every settings class reads the environment: the server's and each task's."""


class ConfigError(Exception):
    """An environment variable holds a value the server cannot run with."""


class Settings(BaseSettings):
    """The server's configuration, shared by every task. Each field is the environment
    variable of the same name."""

    model_config = FROM_ENVIRONMENT

    host: str = Field("127.0.0.1", description="Interface `python main.py` binds to.")
    port: int = Field(5001, ge=1, le=65535, description="Port `python main.py` listens on.")
    grpc_port: int = Field(
        5002,
        ge=0,
        le=65535,
        description="Port of the Open Inference Protocol over gRPC, beside HTTP; 0: no gRPC.",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_file: Path | None = Field(None, description="Also append log lines to this file.")

    bind: str | None = Field(None, description="gunicorn's bind address; default HOST:PORT.")
    workers: int = Field(1, ge=1, le=64, description="gunicorn workers, each with its own model.")
    worker_timeout: int = Field(60, ge=1, description="gunicorn kills a silent worker after this.")
    graceful_timeout: int = Field(30, gt=0, description="gunicorn's limit for a clean stop.")
    keepalive: int = Field(5, ge=0, description="Seconds an idle keep-alive connection stays.")
    header_timeout_s: float = Field(
        10.0, gt=0, description="Seconds a request's head may take to arrive; then 408."
    )
    body_timeout_s: float = Field(
        10.0, gt=0, description="Seconds of slack before MIN_BODY_RATE applies to a body."
    )
    min_body_rate: int = Field(
        4096, ge=0, description="Bytes per second a body must average; slower gets 408."
    )
    max_connections: int = Field(
        1000, ge=1, description="Open connections per worker; one more gets 503 and is closed."
    )
    max_requests: int = Field(0, ge=0, description="Restart a worker after this many; 0 never.")
    max_requests_jitter: int = Field(0, ge=0)

    tasks: str = Field(
        "classification.task:ImageClassification",
        description="Tasks served, as package.module:Class, comma-separated; each is POST /{name}.",
    )
    model_repository: Path | None = Field(
        None, description="A folder of model files in Triton's layout, each served as a model."
    )
    model_control: Literal["none", "poll", "explicit"] = Field(
        "none", description="How served models follow MODEL_REPOSITORY once running."
    )
    model_poll_s: float = Field(
        5.0, gt=0, description="Seconds between reads of MODEL_CONTROL=poll."
    )
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    model_cache_dir: Path = Field(
        Path(".model-cache"), description="Where ONNX exports and int8 models are kept."
    )
    torch_threads: int = Field(
        0, ge=0, description="Intra-op threads per worker; 0 means cores / WORKERS."
    )

    max_batch_size: int | Literal["auto"] = Field(
        "auto", description="Most items per batch, or auto: timed at warm-up."
    )
    max_batch_size_limit: int = Field(32, ge=1, le=1024, description="Largest size auto tries.")
    max_batch_delay_ms: float = Field(5.0, ge=0, le=10_000)
    max_queue_size: int = Field(256, ge=1)
    timeout: float = Field(2.0, gt=0, description="Seconds a request may wait before 504.")
    shed_late_requests: bool = Field(
        True, description="503 at once for requests the model could not answer within TIMEOUT."
    )
    drain_timeout: float = Field(10.0, ge=0, description="Seconds to finish work at shutdown.")

    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1)
    max_job_files: int = Field(1000, ge=1, description="Images in one POST /jobs.")
    max_job_bytes: int = Field(256 * 1024 * 1024, ge=1, description="Body of one POST /jobs.")
    max_jobs: int = Field(100, ge=1, description="Jobs queued or running at once, all replicas.")
    max_queued_job_items: int = Field(
        100_000, ge=1, description="Job images waiting to be computed, all replicas."
    )
    max_queued_job_bytes: int = Field(
        1024 * 1024 * 1024, ge=1, description="Bytes of job images waiting, all replicas."
    )
    job_ttl_s: float = Field(3600.0, ge=1, description="A finished job is kept this long.")
    max_finished_job_bytes: int = Field(
        256 * 1024 * 1024, ge=1, description="What finished jobs keep, all replicas; oldest go."
    )
    job_concurrency: int = Field(
        0, ge=0, description="Job items in flight at once; 0: 4 on CPU, 2 batches on CUDA."
    )
    job_min_share: float = Field(
        0.05, ge=0, lt=1, description="Least share of the model that waiting job items get."
    )
    job_store: Literal["memory", "redis"] = Field(
        "memory", description="memory: one process; redis: shared by workers and replicas."
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="The Redis of JOB_STORE=redis.")
    redis_prefix: str = Field(
        "microbatch", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Prefix of every Redis key."
    )
    redis_timeout_s: float = Field(
        0.5, gt=0, le=30, description="Seconds a Redis command may take before 503."
    )
    job_claim_idle_s: float = Field(
        60.0, ge=1, description="A job item silent this long is taken over by another replica."
    )
    job_max_deliveries: int = Field(
        3, ge=1, description="Deliveries of one job item before it is recorded as an error."
    )
    sse_heartbeat_s: float = Field(5.0, gt=0, description="Comment line interval on SSE.")
    web_dir: Path | None = Field(
        None, description="Folder of the page at GET / (index.html and its files); default web/."
    )
    decode_workers: int = Field(
        0, ge=0, description="Threads that decode and resize uploads; 0: from the cores."
    )

    @property
    def cores_per_worker(self) -> int:
        return max(1, (os.cpu_count() or 1) // self.workers)

    @property
    def intra_op_threads(self) -> int:
        """Model threads per worker, so that WORKERS workers share the cores."""
        return self.torch_threads or self.cores_per_worker

    def decode_threads(self, device_type: str, *, light_model: bool = False) -> int:
        """DECODE_WORKERS, or by default all of a worker's cores beside a GPU or a light
        model such as int8 (decoding is then about half the work), and half of them beside
        a float32 model on the CPU, which computes on the same cores (a quarter of the work
        is decoding). On 2 cores at 32 clients: int8 132 req/s with 1 thread, 168 with 2;
        float32 108 with 1, 97 with 2."""
        if self.decode_workers:
            return self.decode_workers
        cores = self.cores_per_worker
        return cores if device_type == "cuda" or light_model else max(1, cores // 2)

    @property
    def batch_size_ceiling(self) -> int:
        """The largest batch the batcher may form before warm-up has chosen."""
        return self.max_batch_size_limit if self.max_batch_size == "auto" else self.max_batch_size

    @property
    def connection_grace_s(self) -> int:
        """Whole seconds a stopping worker waits for in-flight requests, which end by
        TIMEOUT at the latest."""
        return math.ceil(self.timeout) + 1

    @property
    def jobs_disabled_reason(self) -> str | None:
        """Why /jobs cannot work in this configuration, or None."""
        if self.job_store == "memory" and self.workers > 1:
            return (
                f"jobs are disabled: JOB_STORE=memory keeps each job in one of the"
                f" WORKERS={self.workers} processes, so another worker would answer 404 for"
                " it; set JOB_STORE=redis and REDIS_URL, or WORKERS=1"
            )
        if self.job_store == "memory" and self.max_requests > 0:
            return (
                f"jobs are disabled: JOB_STORE=memory keeps jobs in the worker's memory, and"
                f" MAX_REQUESTS={self.max_requests} restarts the worker, losing them; set"
                " JOB_STORE=redis and REDIS_URL, or MAX_REQUESTS=0"
            )
        return None

    @property
    def gunicorn_bind(self) -> str:
        return self.bind or f"{self.host}:{self.port}"

    @model_validator(mode="after")
    def _batch_size_in_range(self) -> "Settings":
        if self.max_batch_size != "auto" and not 1 <= self.max_batch_size <= 1024:
            raise ValueError(
                f"MAX_BATCH_SIZE='{self.max_batch_size}' must be auto or an integer from 1 to 1024"
            )
        return self

    @model_validator(mode="after")
    def _explicit_control_in_one_process(self) -> "Settings":
        if self.model_control == "explicit" and self.workers > 1:
            raise ValueError(
                f"MODEL_CONTROL=explicit with WORKERS={self.workers}: a load or unload request"
                " reaches one worker, and the others would go on serving what they had; use"
                " MODEL_CONTROL=poll (every worker follows the files), or WORKERS=1"
            )
        return self

    @model_validator(mode="after")
    def _shutdown_fits_in_graceful_timeout(self) -> "Settings":
        needed = self.connection_grace_s + self.drain_timeout
        if self.graceful_timeout <= needed:
            raise ValueError(
                f"GRACEFUL_TIMEOUT={self.graceful_timeout} must exceed ceil(TIMEOUT) + 1"
                f" + DRAIN_TIMEOUT = {needed}, or gunicorn kills workers mid-drain"
            )
        return self


def read_settings(cls: type[S], whose: str = "") -> S:
    """An instance of ``cls`` read from the environment, or ConfigError naming each bad
    variable and value (``whose``, such as "task 'cls'", says whose settings they are)."""
    try:
        return cls()
    except ValidationError as exc:
        problems: dict[str, list[str]] = {}
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            if not error["loc"]:
                problems.setdefault(message, [])
                continue
            # A field of several types fails once per type: one line, its reasons joined.
            name = str(error["loc"][0]).upper()
            problems.setdefault(f"{name}={error.get('input')!r}", []).append(message)
        text = "; ".join(
            f"{what}: {' or '.join(reasons)}" if reasons else what
            for what, reasons in problems.items()
        )
        where = f" for {whose}" if whose else ""
        raise ConfigError(f"invalid configuration{where}: {text}") from None


def load_settings() -> Settings:
    """Reads the server's settings, or raises ConfigError naming each bad variable."""
    return read_settings(Settings)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read on first use."""
    return load_settings()
