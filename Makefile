# The README's two commands: `make run` (main job on the embedded default) and
# `make test` (the test suite). Both set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
CORES ?= 2
# The CPU wheel of torch 2.13.0 lies on this project's machines; elsewhere pip may fetch
# a (large) CUDA build: set TORCH_SPEC or install torch into $(VENV) first.
TORCH_SPEC ?= torch==2.13.0
# The embedded default needs no model hub; set HF_HUB_OFFLINE=0 to use hub models.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= $(HF_HUB_OFFLINE)
export TOKENIZERS_PARALLELISM ?= false

BIN := $(VENV)/bin

.PHONY: run test test-all setup setup-test clean-outputs
run: setup
	$(BIN)/snakemake --cores $(CORES) $(if $(CONFIG),--configfile $(CONFIG))

test: setup-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

test-all: setup-test
	$(BIN)/pytest -m "slow or not slow"

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

# `make run` installs only what the pipeline needs; `make test` adds the test tools
# (pytest, ruff, the docs generator) on top.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[test]"
	touch $@

clean-outputs:
	rm -rf data/models data/corpora data/stores data/lenses data/tables data/report data/logs
