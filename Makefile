# One-command developer loop. Every target creates .venv if missing, installs the CPU
# build of torch first (a plain `pip install torch` would pull a several-GB CUDA build),
# then the project.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint format clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,rl]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m benchmarks all --quick --threads 1

test: $(STAMP)
	$(BIN)/python -m pytest -x -q tests

lint: $(STAMP)
	$(BIN)/ruff check simenv retrieval ranking agents benchmarks tests
	$(BIN)/ruff format --check simenv retrieval ranking agents benchmarks tests

format: $(STAMP)
	$(BIN)/ruff format simenv retrieval ranking agents benchmarks tests
	$(BIN)/ruff check --fix simenv retrieval ranking agents benchmarks tests

clean:
	rm -rf $(VENV) reports .pytest_cache .hypothesis
