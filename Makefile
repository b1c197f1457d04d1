# moe_lab: everything below works from a fresh clone with nothing but Python 3.
#
#   make lab    JupyterLab on notebooks/
#   make test   tests/ plus every notebook under notebooks/ (nbval-lax), in PYTEST_WORKERS=2 processes
#   make run    execute notebooks/*.ipynb headless into runs/
#   make html   executed notebooks as static HTML pages (figures included) in html/
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
# JupyterLab refuses to start for root ("Running as root is not recommended") unless told it may;
# containers, cloud VMs and CI machines run as root, so `make lab` tells it there and only there.
ROOT_LAB_ARGS := $(if $(filter 0,$(shell id -u 2>/dev/null)),--allow-root)
PYTEST_ARGS ?=
# Worker processes for make test (pytest-xdist; each takes whole files, in the order tests/conftest.py collects
# them: the longest first). 0 runs everything in one process.
PYTEST_WORKERS ?= 2
RUNS_DIR ?= runs
HTML_DIR ?= html

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Top-level notebooks, executed by `make run`.
NOTEBOOKS = $(sort $(wildcard notebooks/*.ipynb))
# Any notebook below notebooks/ (what nbval would collect); empty when the
# folder is missing or holds none, and then pytest is not pointed at it.
NBVAL_NOTEBOOKS = $(shell find notebooks -name '*.ipynb' -not -path '*/.ipynb_checkpoints/*' 2>/dev/null)

.DEFAULT_GOAL := help
.PHONY: help install lab test run html clean

help:
	@echo "make lab    - JupyterLab on notebooks/ (LAB_ARGS=...)"
	@echo "make test   - pytest tests/ and the notebooks via nbval-lax (PYTEST_ARGS=..., PYTEST_WORKERS=2)"
	@echo "make run    - execute notebooks/*.ipynb with papermill into runs/"
	@echo "make html   - static HTML of the executed notebooks (plots included, offline) in html/"
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
	$(BIN)/jupyter lab notebooks/ $(ROOT_LAB_ARGS) $(LAB_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest tests $(if $(strip $(NBVAL_NOTEBOOKS)),--nbval-lax --nbval-current-env notebooks) \
	  -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

run: $(STAMP)
ifeq ($(strip $(NOTEBOOKS)),)
	@echo "make run: no notebooks/*.ipynb yet, nothing to run"
else
	$(BIN)/moe-lab run $(NOTEBOOKS) --output-dir $(RUNS_DIR)
endif

# Static pages for readers: each notebook is executed into $(RUNS_DIR)/ (skipped when its executed copy
# there is newer than the notebook), then converted by moe_lab.display.OfflineHTMLExporter: plotly
# figures drawn (plotly.js embedded once per page), saved widgets replaced by a static snapshot, and
# math rendered to MathML, so a page fetches nothing (no MathJax or require.js from a CDN) and works
# offline on its own; the notebooks need no extra line.
html: $(STAMP)
ifeq ($(strip $(NOTEBOOKS)),)
	@echo "make html: no notebooks/*.ipynb yet, nothing to render"
else
	@set -e; for nb in $(NOTEBOOKS); do \
	  out="$(RUNS_DIR)/$$(basename "$$nb")"; \
	  if [ "$$out" -nt "$$nb" ]; then echo "make html: reusing $$out (newer than $$nb)"; \
	  else $(BIN)/moe-lab run "$$nb" --output-dir "$(RUNS_DIR)" --quiet; fi; \
	done
	$(BIN)/jupyter nbconvert --to moe_lab.display.OfflineHTMLExporter --output-dir "$(HTML_DIR)" \
	  $(addprefix $(RUNS_DIR)/,$(notdir $(NOTEBOOKS)))
endif

clean:
	rm -rf $(VENV) $(RUNS_DIR) $(HTML_DIR)
