# moe_lab: everything below works from a fresh clone with nothing but Python 3.
#
#   make lab    JupyterLab on notebooks/
#   make test   tests/ plus every notebook under notebooks/ (nbval-lax)
#   make run    execute notebooks/*.ipynb headless into runs/
#   make clean  remove the venv and runs/

PYTHON ?= python3
VENV ?= .venv
# Torch is installed first, on its own, so you can choose the build.
# Override e.g. `make test TORCH=torch==2.13.0` for a CPU-only wheel.
TORCH ?= torch>=2.9
# Extras of moe_lab installed into the venv; environment.yml installs the same
# (tests/test_packaging.py checks that they agree).
EXTRAS ?= lab,test,hf
LAB_ARGS ?=
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Top-level notebooks, executed by `make run`.
NOTEBOOKS = $(sort $(wildcard notebooks/*.ipynb))
# Any notebook below notebooks/ (what nbval would collect); empty when the
# folder is missing or holds none, and then pytest is not pointed at it.
NBVAL_NOTEBOOKS = $(shell find notebooks -name '*.ipynb' -not -path '*/.ipynb_checkpoints/*' 2>/dev/null)

.DEFAULT_GOAL := help
.PHONY: help install lab test run clean

help:
	@echo "make lab    - JupyterLab on notebooks/ (LAB_ARGS=...)"
	@echo "make test   - pytest tests/ and the notebooks via nbval-lax (PYTEST_ARGS=...)"
	@echo "make run    - execute notebooks/*.ipynb with papermill into runs/"
	@echo "make clean  - remove $(VENV) and runs/"
	@echo "Variables: PYTHON=$(PYTHON) VENV=$(VENV) TORCH='$(TORCH)' EXTRAS=$(EXTRAS)"

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install "$(TORCH)"
	$(BIN)/python -m pip install -e ".[$(EXTRAS)]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (moe_lab)"
	touch $@

lab: $(STAMP)
	mkdir -p notebooks
	$(BIN)/jupyter lab notebooks/ $(LAB_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest tests $(if $(strip $(NBVAL_NOTEBOOKS)),--nbval-lax --nbval-current-env notebooks) $(PYTEST_ARGS)

run: $(STAMP)
	@if [ -z "$(strip $(NOTEBOOKS))" ]; then echo "make run: no notebooks/*.ipynb yet, nothing to run"; exit 0; fi
	$(BIN)/moe-lab run $(NOTEBOOKS) --output-dir runs

clean:
	rm -rf $(VENV) runs
