# One-command developer loop. Every target creates .venv if missing, installs torch first,
# then the project.
#
# Which torch build: `pip install torch` from PyPI gives the CUDA build on Linux (several GB).
# For the CPU build, name PyTorch's CPU wheel index:
#     make TORCH_INDEX=https://download.pytorch.org/whl/cpu test
# A GPU user passes nothing (or the index of their CUDA version, e.g. .../whl/cu126). The
# default (empty) takes torch from pip's own configuration, which on the developers' machine
# points at a local folder of CPU wheels.
PY ?= python3.11
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_INDEX_ARG := $(if $(strip $(TORCH_INDEX)),--extra-index-url $(TORCH_INDEX),)
# the numerics tests again with 2 threads and another CPU's kernels (MKL's and OpenBLAS's AVX2
# code paths, what an AMD EPYC runs): a float assertion that depends on the order of
# summation fails here instead of on a user's machine
NUMERICS_ENV := SIMENV_TEST_THREADS=2 OMP_NUM_THREADS=2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
	ATEN_CPU_CAPABILITY=avx2 OPENBLAS_CORETYPE=Zen
NUMERICS_TESTS := tests/simenv tests/retrieval tests/ranking tests/agents

.PHONY: install demo reports reports-machine test test-numerics lint format clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH_INDEX_ARG) "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev,rl,ray]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m benchmarks all --quick --threads 1

# The published report set: every experiment with verdicts, full profile, 3 seeds, one torch
# thread per experiment, two experiments at a time (2 cores; the same numbers as serial).
# ann and scale (hours at 1M-10M items; speed and memory, not verdicts over users) run apart:
# make reports-machine. Budget and measured time: "Published reports" in README.md.
REPORTS_WORKERS ?= 2
reports: $(STAMP)
	$(BIN)/python -m benchmarks all --seeds 3 --threads 1 --exclude scale,ann \
		--backend processes --workers $(REPORTS_WORKERS)

reports-machine: $(STAMP)
	$(BIN)/python -m benchmarks ann --seeds 3 --threads 1
	$(BIN)/python -m benchmarks scale --threads 1

# -q comes from pyproject's addopts; a second -q here would hide pytest's summary line
test: $(STAMP)
	$(BIN)/python -m pytest -x tests

test-numerics: $(STAMP)
	$(NUMERICS_ENV) $(BIN)/python -m pytest -x $(NUMERICS_TESTS)

lint: $(STAMP)
	$(BIN)/ruff check simenv retrieval ranking agents benchmarks tests
	$(BIN)/ruff format --check simenv retrieval ranking agents benchmarks tests

format: $(STAMP)
	$(BIN)/ruff format simenv retrieval ranking agents benchmarks tests
	$(BIN)/ruff check --fix simenv retrieval ranking agents benchmarks tests

clean:
	rm -rf $(VENV) reports .pytest_cache .hypothesis
