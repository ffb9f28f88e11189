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
# serves `make demo`) resolved together. --no-compile: byte-compiling every installed module took 80-90 s
# of a 2-core install (135-159 s against 55-70 s); the modules imported are compiled at their first import
# instead (about 20 s more for torch, Lightning and the rest, once).
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
