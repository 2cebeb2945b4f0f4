# `make demo` and `make test` work from a fresh clone: they create .venv if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Extras `make bench` installs: add cuda12 on an NVIDIA GPU host (`make bench BENCH_EXTRAS=bench,cuda12`).
BENCH_EXTRAS ?= bench
comma := ,
BENCH_STAMP := $(VENV)/.installed-$(subst $(comma),-,$(BENCH_EXTRAS))
KERAS_HUB := keras-hub==0.32.0
# libtpu for the scale suite's TPU targets (bench/scale.py compiles kithara's step ahead of time for
# TPU topologies; no TPU needed): the version jax 0.10.2's `tpu` extra pins, in a folder of its own
# that only the suite's children put on their path (with libtpu importable, jax would try to start a
# TPU backend). Smoke runs (CI) compile for the CPU backend only and skip it.
LIBTPU := libtpu==0.0.42.1
LIBTPU_DIR := $(VENV)/libtpu
LIBTPU_STAMP := $(LIBTPU_DIR)/.installed
# Tunix and MaxText for the peers suite (bench/peers.py), each in an environment of its own: their
# pins differ from kithara's (Tunix: safetensors<0.8; MaxText: Python >= 3.12, jax >= 0.11). Made
# unless BENCH_ARGS picks suites without peers. PYTHON312: a Python 3.12 (pyenv's on this
# project's machines).
TUNIX_VENV := bench/.venv-tunix
TUNIX_STAMP := $(TUNIX_VENV)/.installed
MAXTEXT_VENV := bench/.venv-maxtext
MAXTEXT_STAMP := $(MAXTEXT_VENV)/.installed
PYTHON312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) $(shell command -v python3.12))
PEERS_STAMPS := $(TUNIX_STAMP) $(MAXTEXT_STAMP)
PEERS_DEPS := $(if $(findstring --only,$(BENCH_ARGS)),$(if $(findstring peers,$(BENCH_ARGS)),$(PEERS_STAMPS)),$(PEERS_STAMPS))
BENCH_DEPS := $(BENCH_STAMP) $(if $(findstring --smoke,$(BENCH_ARGS)),,$(LIBTPU_STAMP)) $(PEERS_DEPS)

.PHONY: install demo test test-fast lint bench bench-peers-env clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The dev extras pin torch==2.13.0 (tests compare logits with transformers). On this
	# project's machines pip's find-links hold a CPU build of it and pip takes that; elsewhere
	# PyPI's build brings several GB of CUDA packages: point PIP_EXTRA_INDEX_URL at a CPU
	# wheel index first if that matters.
	$(BIN)/pip install --quiet -e ".[dev]"
	# keras-hub without its TensorFlow dependency: see README, "Why no TensorFlow".
	$(BIN)/pip install --quiet --no-deps $(KERAS_HUB)
	touch $(STAMP)

# The bench extra (TRL, torch) on top of the dev install: only `make bench` needs it.
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install --quiet -e ".[$(BENCH_EXTRAS)]"
	touch $(BENCH_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/kithara demo

# Two pytest workers (pytest-xdist), one test file each at a time (module fixtures, such as
# test_serve.py's server process, stay in one worker): the suite's CPU time is the same as in
# one process, its wall time about 25% shorter on a 2-core machine (docs/performance.md).
PYTEST_WORKERS ?= 2
PYTEST_PARALLEL := -n $(PYTEST_WORKERS) --dist loadfile

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL) tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL) -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check kithara tests bench examples
	$(BIN)/ruff format --check kithara tests bench examples
	$(BIN)/mypy

$(LIBTPU_STAMP): $(STAMP)
	$(BIN)/pip install --quiet --no-deps --upgrade --target $(LIBTPU_DIR) $(LIBTPU)
	touch $(LIBTPU_STAMP)

$(TUNIX_STAMP): bench/peers-tunix.txt
	test -x $(TUNIX_VENV)/bin/python || $(PYTHON) -m venv $(TUNIX_VENV)
	$(TUNIX_VENV)/bin/pip install --quiet --upgrade pip
	$(TUNIX_VENV)/bin/pip install --quiet -r bench/peers-tunix.txt
	touch $(TUNIX_STAMP)

$(MAXTEXT_STAMP): bench/peers-maxtext.txt
	@test -n "$(PYTHON312)" || { echo "MaxText needs Python 3.12: set PYTHON312=/path/to/python3.12"; exit 1; }
	test -x $(MAXTEXT_VENV)/bin/python || $(PYTHON312) -m venv $(MAXTEXT_VENV)
	$(MAXTEXT_VENV)/bin/pip install --quiet --upgrade pip
	$(MAXTEXT_VENV)/bin/pip install --quiet -r bench/peers-maxtext.txt
	touch $(MAXTEXT_STAMP)

bench-peers-env: $(PEERS_STAMPS)

bench: $(BENCH_DEPS)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(TUNIX_VENV) $(MAXTEXT_VENV) runs .pytest_cache
