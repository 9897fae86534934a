# The two README commands: `make demo` and `make test`. Each creates or refreshes
# .venv and installs what it needs, so both work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Stamps carry a hash of pyproject.toml: editing the dependencies reinstalls.
DEPS_HASH := $(shell sha1sum pyproject.toml | cut -c1-10)
BASE_STAMP := $(VENV)/.base-$(DEPS_HASH)
DEV_STAMP := $(VENV)/.dev-$(DEPS_HASH)
HF_STAMP := $(VENV)/.hf-$(DEPS_HASH)
TPU_STAMP := $(VENV)/.tpu-$(DEPS_HASH)
EXPORT_STAMP := $(VENV)/.export-$(DEPS_HASH)
export JAX_PLATFORMS ?=

.PHONY: demo test test-fast test-durations lint format bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(BASE_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(DEV_STAMP): $(BASE_STAMP)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# torch is pinned to the CPU wheel (see pyproject's [hf] extra): an unpinned torch
# would pull a multi-GB CUDA build.
$(HF_STAMP): $(BASE_STAMP)
	$(PY) -m pip install -q -e ".[hf]"
	touch $@

# libtpu (jax[tpu]) for `jaxllm plan --topology v5e-8 ...` on this CPU machine.
$(TPU_STAMP): $(BASE_STAMP)
	$(PY) -m pip install -q -e ".[tpu]"
	touch $@

# jax2onnx last, without its orbax-checkpoint pin (see pyproject's [export] extra).
$(EXPORT_STAMP): $(BASE_STAMP)
	$(PY) -m pip install -q -e ".[export]"
	$(PY) -m pip install -q --no-deps "jax2onnx==0.17.1"
	touch $@

install: $(BASE_STAMP)

demo: $(BASE_STAMP)
	$(PY) -m jaxllm.demo

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(DEV_STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Two xdist workers: much of the suite is single-threaded (XLA compiles, subprocess
# runs, data preparation), so two processes keep both cores busy. tests/conftest.py
# orders the tests longest-first from tests/durations.json and groups the tests that
# share a module fixture (a trained run); with --dist loadgroup its scheduler hands each
# worker the next longest unit as it frees up (tests/schedule.py).
XDIST := -n 2 --dist loadgroup
test: $(DEV_STAMP) $(HF_STAMP) $(TPU_STAMP) $(EXPORT_STAMP) lint
	$(PY) -m pytest -q $(XDIST) --durations=30

# The inner loop: unit tests only (no end-to-end runs, which are marked slow).
test-fast: $(DEV_STAMP) $(HF_STAMP) $(TPU_STAMP) $(EXPORT_STAMP) lint
	$(PY) -m pytest -q $(XDIST) -m "not slow" --durations=15

# Refreshes tests/durations.json (commit it) after tests were added or got slower.
test-durations: $(DEV_STAMP) $(HF_STAMP) $(TPU_STAMP) $(EXPORT_STAMP)
	$(PY) -m pytest -q $(XDIST) --store-durations

bench: $(HF_STAMP)
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs .cache
