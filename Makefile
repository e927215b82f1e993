# Set-up and entry points. The virtual environment is made once and reused; it is re-installed only
# when a requirements file or pyproject.toml changes. The project itself is installed into it (editable),
# so its commands (weakseg-predict) are on the PATH of an activated environment.
VENV ?= .venv
BOOTSTRAP_PYTHON ?= $(shell command -v python3.11 || command -v python3)
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)
PARAMS ?=

.PHONY: venv repro lint test bench bench-quality clean-venv

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PYTHON) || $(BOOTSTRAP_PYTHON) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements-dev.txt
	$(PYTHON) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Runs the pipeline. PARAMS=presets/NAME.yaml first copies that preset over params.yaml.
repro: venv
	@if [ -n "$(PARAMS)" ]; then cp "$(PARAMS)" params.yaml && echo "params.yaml <- $(PARAMS)"; fi
	@test -d .git || (git init -q && echo "initialized a git repository (DVC needs one)")
	dvc repro

# Lint, format check and type check of all the Python code; make test runs it first.
lint: venv
	$(PYTHON) -m ruff check weakseg stages tests benchmarks
	$(PYTHON) -m ruff format --check weakseg stages tests benchmarks
	$(PYTHON) -m mypy weakseg stages tests benchmarks

test: venv lint
	$(PYTHON) -m pytest -q

# Speed benchmarks (results/benchmarks.*), then the quality benchmark (results/quality.*, README table).
bench: venv
	$(PYTHON) -m benchmarks.run_all
	$(PYTHON) -m benchmarks.bench_quality

# Quality against pixel truth, three seeds a row (hours on 2 cores; resumes where it stopped). Exits
# non-zero, naming the row, when the default method falls below the trivial baseline.
bench-quality: venv
	$(PYTHON) -m benchmarks.bench_quality

clean-venv:
	rm -rf $(VENV)
