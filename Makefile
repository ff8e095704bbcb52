# One bootstrap for users and CI: everything runs from a project-local .venv
# built from nothing but the Python on PATH.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint typecheck unit bench bench-quick clean ray test-ray

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
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

typecheck: $(VENV)/.installed
	$(BIN)/mypy

unit: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## backend="ray" needs the heavy `ray` extra (~285 MB): added to this venv on demand.
ray: $(VENV)/.ray

$(VENV)/.ray: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[ray]'
	touch $@

## The Ray backend's tests alone (a local Ray cluster on 127.0.0.1).
test-ray: $(VENV)/.ray
	$(BIN)/python -m pytest tests/test_ray_backend.py tests/test_ray_edges.py $(PYTEST_ARGS)

## Benchmarks run on demand, never in CI's pass/fail.
bench: $(VENV)/.installed
	$(BIN)/python benchmarks/engine.py

bench-quick: $(VENV)/.installed
	$(BIN)/python benchmarks/engine.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache corral-bench corral-demo corral-tune
