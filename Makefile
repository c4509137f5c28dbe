# The two commands: `make demo` and `make test`. Each creates .venv and installs what it needs.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
DEMO_ARGS ?= --devices 5 --duration 60

.PHONY: demo test lint typecheck unit venv clean reference-model readme

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required, found " + sys.version' 
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  echo "python venv module missing; installing python3-venv (Debian/Ubuntu)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq python3-venv python3.11-venv >/dev/null || true; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv python3.11-venv >/dev/null || true; fi; \
	  rm -rf $(VENV); $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[edge,collector]'
	@touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[edge,collector,train,dev]'
	@touch $@ $(VENV)/.demo-installed

venv: $(VENV)/.test-installed

demo: $(VENV)/.demo-installed
	$(BIN)/fleet-collector demo $(DEMO_ARGS)

lint: $(VENV)/.test-installed
	$(BIN)/ruff check .

typecheck: $(VENV)/.test-installed
	$(BIN)/mypy

unit: $(VENV)/.test-installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck unit

# Regenerates the committed cabin dataset and reference bundle (see collector/training/README.md).
reference-model: $(VENV)/.test-installed
	$(BIN)/python -m collector.training.regenerate

# Rewrites README.md's configuration reference from the config models (a test checks it is current).
readme: $(VENV)/.test-installed
	$(BIN)/python docs/config_reference.py --write

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache var
