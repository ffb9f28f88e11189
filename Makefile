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
# serves `make demo`) resolved together. Byte-compiled afterwards on every core instead of by pip, one file
# after another (80-90 s of a 2-core install, against about 50 s): compiled it must be, since a Python run
# with PYTHONDONTWRITEBYTECODE set (as on these machines) would compile torch at every import. Files that
# are no Python 3 (templates in some packages) fail to compile, as they do under pip: not an error.
INSTALL := $(BIN)/python -m pip install -q --no-compile $(TORCH_PIN) -e
COMPILE := $(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true

$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(INSTALL) .
	$(COMPILE)
	touch $@

$(DEV_STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(INSTALL) ".[dev]"
	$(COMPILE)
	touch $(STAMP) $@

demo: $(STAMP)
	$(BIN)/actpat demo --out demo_out

test: $(DEV_STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

bench: $(STAMP)
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) demo_out build *.egg-info
