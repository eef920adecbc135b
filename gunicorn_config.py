"""gunicorn settings, from the same environment variables as the app.

    gunicorn main:app -c gunicorn_config.py

Each worker loads its own model and runs its own batcher. Shutdown order on SIGTERM:
in-flight requests get TIMEOUT + 1 s, then the batcher drains for DRAIN_TIMEOUT, all
inside GRACEFUL_TIMEOUT (settings.py refuses values that do not fit).
"""

import os
import shutil
import tempfile
from pathlib import Path

from settings import get_settings

# What prometheus_client's multiprocess mode names its files: {kind}_{pid}.db.
_METRIC_FILE_PREFIXES = ("counter_", "gauge_", "histogram_", "summary_")

_settings = get_settings()

bind = _settings.gunicorn_bind
workers = _settings.workers
worker_class = "worker.DrainingUvicornWorker"
timeout = _settings.worker_timeout
graceful_timeout = _settings.graceful_timeout
keepalive = _settings.keepalive
max_requests = _settings.max_requests
max_requests_jitter = _settings.max_requests_jitter
loglevel = _settings.log_level
errorlog = "-"
accesslog = None  # the app logs one line per request, with its request id

# Every worker writes its metrics here and /metrics sums them. Files left by an earlier
# server would be summed too, so a fresh directory is made per server unless the operator
# chose one; in a chosen one only prometheus_client's own files are removed, nothing
# else. It must be set before prometheus_client is first imported, which fixes its
# storage at import.
_made_metrics_dir = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _made_metrics_dir:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="prometheus-")
_metrics_dir = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
_metrics_dir.mkdir(parents=True, exist_ok=True)
for _stale in _metrics_dir.glob("*.db"):
    if _stale.is_file() and _stale.name.startswith(_METRIC_FILE_PREFIXES):
        _stale.unlink()


def post_fork(server: object, worker: object) -> None:
    # Starts the worker's timeout clock at fork. Left alone, gunicorn's first check
    # compares the heartbeat file's wall-clock time with its monotonic clock and never
    # fires, so a worker stuck before its first heartbeat (importing, loading) would
    # never be replaced. The worker class beats while the model loads.
    worker.tmp.notify()  # type: ignore[attr-defined]


def child_exit(server: object, worker: object) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined,no-untyped-call]


def on_exit(server: object) -> None:
    if _made_metrics_dir:
        shutil.rmtree(_metrics_dir, ignore_errors=True)
