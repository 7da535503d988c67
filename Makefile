# h3de: `make help` lists the targets. Every target installs into .venv first when it is missing or
# when setup.cfg / constraints.txt changed (the stamp file name carries their checksum).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.cfg constraints.txt | cksum | cut -d' ' -f1)
PHANTOM := data/phantom
PHANTOM_FINE := data/phantom_1mm
# regenerate the phantoms when the generator changes them (src/h3de/data/phantom.py _GENERATOR_VERSION)
PHANTOM_VERSION := $(shell sed -n 's/^_GENERATOR_VERSION = \([0-9]*\).*/\1/p' src/h3de/data/phantom.py)
AFIDS := data/afids
# regenerate the AFIDs subjects when their generator changes (src/h3de/data/afids.py _GENERATOR_VERSION)
AFIDS_VERSION := $(shell sed -n 's/^_GENERATOR_VERSION = \([0-9]*\).*/\1/p' src/h3de/data/afids.py)
EXPERIMENT ?= experiments/phantom_h3de.yaml
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install data data-fine data-afids train test test-all lint format benchmark clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[1m%-10s\033[0m %s\n", $$1, $$2}'

$(STAMP): setup.cfg constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP) ## create .venv and install h3de with its dev tools (torch pinned by constraints.txt)

$(PHANTOM)/.version-$(PHANTOM_VERSION): | $(STAMP)
	$(BIN)/h3de data phantom --out $(PHANTOM) --seed 0 --workers 2
	@rm -f $(PHANTOM)/.version-* && touch $@

$(PHANTOM_FINE)/.version-$(PHANTOM_VERSION): | $(STAMP)
	$(BIN)/h3de data phantom --out $(PHANTOM_FINE) --seed 0 --voxel-mm 1.0 --workers 2
	@rm -f $(PHANTOM_FINE)/.version-* && touch $@

data: $(PHANTOM)/.version-$(PHANTOM_VERSION) ## generate the built-in phantom dataset (data/phantom, 3 mm)

data-fine: $(PHANTOM_FINE)/.version-$(PHANTOM_VERSION) ## generate the 1 mm phantom (data/phantom_1mm) of the fine-resolution experiments

$(AFIDS)/.version-$(AFIDS_VERSION): | $(STAMP)
	$(BIN)/h3de data afids --out $(AFIDS) --seed 0
	@rm -f $(AFIDS)/.version-* && touch $@

data-afids: $(AFIDS)/.version-$(AFIDS_VERSION) ## MNI brain templates + expert AFIDs from the autoafids==0.1.4 wheel (pip download, checksums pinned), synthetic val/test subjects (data/afids)

train: $(STAMP) $(PHANTOM)/.version-$(PHANTOM_VERSION) ## train EXPERIMENT (default experiments/phantom_h3de.yaml); extra overrides in ARGS="key=value ..."
	$(BIN)/h3de train $(EXPERIMENT) $(ARGS)

test: $(STAMP) ## run the default test suite (slow tests excluded)
	$(BIN)/python -m pytest -q $(ARGS)

test-all: $(STAMP) ## run every test, the slow ones included
	$(BIN)/python -m pytest -q -m "slow or not slow" $(ARGS)

lint: $(STAMP) ## ruff check and format check
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP) ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

benchmark: $(STAMP) $(PHANTOM)/.version-$(PHANTOM_VERSION) ## run every benchmark (tens of minutes on 2 cores); each rewrites its .md
	$(BIN)/python benchmarks/heatmap_targets.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/vbra_attention.py
	$(BIN)/python benchmarks/networks.py
	$(BIN)/python benchmarks/anchor_loss.py
	$(BIN)/python benchmarks/phantom_accuracy.py
	$(BIN)/python benchmarks/presence.py
	$(BIN)/python benchmarks/framework_overhead.py
	$(BIN)/python benchmarks/scaling.py
	$(MAKE) data-fine
	$(BIN)/python benchmarks/fine_accuracy.py
	$(BIN)/python benchmarks/predict_cost.py
	$(BIN)/python benchmarks/export_speed.py

clean: ## remove runs and generated data (keeps .venv)
	rm -rf runs wandb $(PHANTOM) $(PHANTOM_FINE) $(AFIDS)
