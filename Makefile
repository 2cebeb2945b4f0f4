# `make demo` and `make test` work from a fresh clone: they create .venv if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KERAS_HUB := keras-hub==0.32.0

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	# keras-hub without its TensorFlow dependency: see README, "Why no TensorFlow".
	$(BIN)/pip install --quiet --no-deps $(KERAS_HUB)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/kithara demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check kithara tests bench examples
	$(BIN)/ruff format --check kithara tests bench examples
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
