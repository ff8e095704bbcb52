# One bootstrap for users and CI: everything runs from a project-local .venv
# built from nothing but the Python on PATH.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint typecheck unit bench bench-quick clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

## The main job: a side-by-side run of the ways people fan out async calls.
demo: $(VENV)/.installed
	$(BIN)/corral demo

## Everything CI checks: lint, types, the test suite.
test: lint typecheck unit

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(VENV)/.installed
	$(BIN)/mypy

unit: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## Benchmarks run on demand, never in CI's pass/fail.
bench: $(VENV)/.installed
	$(BIN)/python benchmarks/engine.py

bench-quick: $(VENV)/.installed
	$(BIN)/python benchmarks/engine.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache corral-bench corral-demo corral-tune
