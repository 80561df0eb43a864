# farreid — `make help` lists the targets. Everything runs inside a local virtualenv (.venv).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
FARREID := $(VENV)/bin/farreid
DEMO_ROOT ?= data/demo
TORCH_CPU ?= torch==2.13.0

.DEFAULT_GOAL := help
.PHONY: help install demo demo-data test test-slow test-gpu test-all test-min lint format bench clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[36m%-11s\033[0m %s\n", $$1, $$2}'

install: $(VENV)/.installed ## create .venv with the CPU build of torch and farreid[cpu,dev] (editable)

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# The CPU wheel first: the range in pyproject then installs nothing heavier (no multi-GB CUDA build).
	$(PY) -m pip install -q $(TORCH_CPU)
	@# `cpu` = the CPU FAISS wheel; a GPU machine installs `.[gpu]` instead (one FAISS wheel either way).
	$(PY) -m pip install -q -e '.[cpu,dev]'
	@touch $@

demo-data: install ## generate the DetReIDX-format demo dataset in $(DEMO_ROOT) if missing
	@test -f $(DEMO_ROOT)/.complete || ($(PY) -m farreid.data.synthetic $(DEMO_ROOT) --seed 0 && touch $(DEMO_ROOT)/.complete)

demo: demo-data ## set up, generate demo data, score the untrained model, fit, test, print the per-case table
	$(PY) -m farreid.demo --config configs/demo.yaml --data.root $(DEMO_ROOT)

# The slowest tests of each run are printed (--durations) so that a test that grows is seen.
PYTEST := $(VENV)/bin/pytest -q --durations=15

test: install ## the fast tier: CPU, hermetic, about a minute (what you run while you work)
	$(PYTEST) -m "not slow and not gpu"

test-slow: install ## the slow tier: multi-epoch fits, resume and signals, DDP, README commands, export at recipe size
	$(PYTEST) -m "slow and not gpu"

test-gpu: install ## the GPU tier (pytest marker `gpu`): skipped with the reason where no CUDA device exists
	$(PYTEST) -m "gpu" -rs

test-all: install ## every tier, fast first (what CI runs)
	$(PYTEST) -m "not slow and not gpu"
	$(PYTEST) -m "slow or gpu" -rs

test-min: ## the fast tier in a fresh venv (MIN_VENV, in /tmp) with every dependency at its lower bound
	scripts/min_versions.sh

lint: install ## ruff check + format check, and no import cycle inside farreid
	$(VENV)/bin/ruff check farreid tests benchmarks scripts
	$(VENV)/bin/ruff format --check farreid tests benchmarks scripts
	$(PY) scripts/import_graph.py

format: install ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix farreid tests benchmarks scripts
	$(VENV)/bin/ruff format farreid tests benchmarks scripts

bench: demo-data ## run the benchmarks (loader, model, re-ranking) and print their figures
	$(PY) benchmarks/loader.py --root $(DEMO_ROOT)
	$(PY) benchmarks/model.py
	$(PY) benchmarks/reranking.py

clean: ## remove runs, demo data and caches (keeps .venv)
	rm -rf runs $(DEMO_ROOT) .pytest_cache .ruff_cache
