# smollm2 — everything a user types. `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch on machines without CUDA (on this project's CI machines it lies on disk). Where your package index
# serves a CUDA build under this name, use e.g.  make setup TORCH_CPU="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH_CPU ?= torch==2.13.0
TORCH_GPU ?= torch>=2.6
CONFIG ?= configs/smollm2_135.yaml
DATA ?= shakespeare
NPROC ?= 1
# Written by setup once the venv holds torch and this project with its dev extras; every target that runs the project
# depends on it, so each works on a fresh clone, and is redone only when pyproject.toml (the dependencies) changes.
INSTALLED := $(VENV)/.installed

.PHONY: help setup prep demo test test-fast lint train bench bench-prep clean

help:
	@echo "make setup      venv in $(VENV) + editable install with dev extras (CPU torch where no GPU); the other"
	@echo "                targets run it first when needed: once, and after pyproject.toml changes (redo: rm $(INSTALLED))"
	@echo "make prep       tokenize the default corpus (or DATA=path/glob) into data/<name>/ shards"
	@echo "make demo       CPU demo: prep + tiny phase 1 + phase 2 (2 gloo ranks) + samples, minutes"
	@echo "make test       the test suite (what CI runs)"
	@echo "make lint       ruff"
	@echo "make train      torchrun --nproc_per_node=\$$NPROC -m smollm2.train --config \$$CONFIG"
	@echo "make bench      training-step benchmark vs the plain reference (bench/step.py)"
	@echo "make bench-prep data-prep throughput vs raw tiktoken (bench/prep.py)"

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Order-only on the interpreter: the venv's python is a symlink whose date is the system python's.
$(INSTALLED): pyproject.toml | $(BIN)/python
	@if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    echo "CUDA found: installing $(TORCH_GPU)"; $(BIN)/pip install -q "$(TORCH_GPU)"; \
	  else \
	    echo "no CUDA: installing the CPU build ($(TORCH_CPU))"; $(BIN)/pip install -q $(TORCH_CPU); \
	  fi; \
	fi
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(INSTALLED)
	@$(BIN)/python -c "import torch, smollm2; print('smollm2', smollm2.__version__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())"

prep: $(INSTALLED)
	$(BIN)/python -m data_prep --source $(DATA)

demo: $(INSTALLED)
	$(BIN)/python -m data_prep --source shakespeare
	PATH="$(abspath $(BIN)):$$PATH" PYTHON=$(abspath $(BIN))/python launch/demo.sh

test: $(INSTALLED)
	$(BIN)/python -m pytest -q tests

test-fast: $(INSTALLED)
	$(BIN)/python -m pytest -q tests -m unit

lint: $(INSTALLED)
	$(BIN)/ruff check smollm2 data_prep bench tests

train: $(INSTALLED)
	$(BIN)/torchrun --nproc_per_node=$(NPROC) -m smollm2.train --config $(CONFIG)

bench: $(INSTALLED)
	$(BIN)/python -m bench.step

bench-prep: $(INSTALLED)
	$(BIN)/python -m bench.prep

clean:
	rm -rf runs wandb .pytest_cache .ruff_cache
