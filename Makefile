# Set-up and entry points. The virtual environment is made once and reused; it is re-installed only
# when a requirements file changes.
VENV ?= .venv
BOOTSTRAP_PYTHON ?= $(shell command -v python3.11 || command -v python3)
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)
PARAMS ?=

.PHONY: venv repro test bench clean-venv

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PYTHON) || $(BOOTSTRAP_PYTHON) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

# Runs the pipeline. PARAMS=presets/NAME.yaml first copies that preset over params.yaml.
repro: venv
	@if [ -n "$(PARAMS)" ]; then cp "$(PARAMS)" params.yaml && echo "params.yaml <- $(PARAMS)"; fi
	@test -d .git || (git init -q && echo "initialized a git repository (DVC needs one)")
	dvc repro

test: venv
	$(PYTHON) -m pytest -q

bench: venv
	$(PYTHON) -m benchmarks.run_all

clean-venv:
	rm -rf $(VENV)
