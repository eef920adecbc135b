# Quick start: `make run` serves the default model on :5001; `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.DEFAULT_GOAL := help
.PHONY: help install install-dev services run test test-fast lint typecheck pytest docker-check bench bench-jobs bench-overload page-screenshot calibrate clean

help:
	@echo "make run    - create $(VENV) if needed, install what changed, serve on :5001"
	@echo "make test   - lint, type-check and run the whole test suite"
	@echo "make test-fast - the unit tests only (no server processes, no model timing), under a minute"
	@echo "make docker-check - replay the Dockerfile in a fresh virtualenv and serve one request"
	@echo "make bench  - offline limits, ours beside Triton, mosec, LitServe, overload; writes bench/results/"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Stamps record what is installed, so requirements are reinstalled only when they change.
$(VENV)/.runtime-installed: requirements.txt | $(PY)
	$(PY) -m pip install --quiet --progress-bar on -r requirements.txt
	touch $@

# The gRPC messages, compiled from their .proto (an import would compile them too).
v2/generated/inference_pb2.py: v2/proto/inference.proto $(VENV)/.runtime-installed
	$(PY) -m v2.stubs

$(VENV)/.dev-installed: requirements-dev.txt $(VENV)/.runtime-installed
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

$(VENV)/.bench-installed: requirements-bench.txt $(VENV)/.runtime-installed
	$(PY) -m pip install --quiet -r requirements-bench.txt
	touch $@

install: $(VENV)/.runtime-installed v2/generated/inference_pb2.py
install-dev: $(VENV)/.dev-installed v2/generated/inference_pb2.py

run: install
	$(PY) main.py

lint: install-dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: install-dev
	$(PY) -m mypy

# redis-server, haproxy, chromium and qemu-user, which the tests start on their own (Debian
# packages).
services:
	bash scripts/install-services.sh

pytest: install-dev services
	$(PY) -m pytest

test: lint typecheck pytest

# The tests not marked e2e: what to run after each edit.
test-fast: install-dev services
	$(PY) -m pytest -m "not e2e"

# A benchmark, not a test: about a quarter of an hour (two more minutes on its first run, to
# make .venv-triton for the Triton peer), and the machine should be otherwise idle.
bench: $(VENV)/.bench-installed services
	$(PY) bench/run.py

# Overload against impolite clients: open loop at 2x/4x the peak, a retry storm, CPU per
# refusal (about two minutes).
bench-overload: $(VENV)/.bench-installed
	$(PY) bench/overload.py

# Only the jobs section: /jobs with each store, the Redis store's cost per item.
bench-jobs: install-dev services
	$(PY) bench/job_store_bench.py

# The README's picture of the page (docs/page.png), from a real server and browser.
page-screenshot: install-dev services
	$(PY) scripts/page_screenshot.py

# The default model's int8 activation ranges (classification/data/int8_ranges/), measured
# on ../shared/calibration or on CALIBRATION_FOLDER; run again when the weights change.
calibrate: install-dev
	$(PY) scripts/calibrate.py $(CALIBRATION_FOLDER)

# No Docker engine here: replay the Dockerfile's install steps and CMD instead.
docker-check:
	$(PYTHON) scripts/dockerfile_smoke.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
