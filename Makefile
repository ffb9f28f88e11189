# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
# pytest-xdist worker processes of `make test` (the CI machine has 2 cores): make test TEST_WORKERS=8
TEST_WORKERS ?= 2

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# One pip run each: the torch pin and the package (with the dev extras for `make test`, which then also
# serves `make demo`) resolved together. Not byte-compiled by pip (one file after another, 80-90 s of a
# 2-core install) nor ahead of time: make's commands may cache bytecode, so each module is compiled once,
# at its first import (about 4,000 of the venv's 15,000 files, 25 s), and later runs read the cache. With
# PYTHONDONTWRITEBYTECODE set (as on these machines) every process would compile torch at its import.
unexport PYTHONDONTWRITEBYTECODE
INSTALL := $(BIN)/python -m pip install -q --no-compile $(TORCH_PIN) -e

$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(INSTALL) .
	touch $@

$(DEV_STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(INSTALL) ".[dev]"
	touch $(STAMP) $@

demo: $(STAMP)
	$(BIN)/actpat demo --out demo_out

test: $(DEV_STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

bench: $(STAMP)
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) demo_out build *.egg-info
