# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-gce test lint typecheck bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## demo: run the example build end to end on the emulated Windows host, then print the phase timings
demo: $(STAMP)
	$(BIN)/python examples/demo.py

## test: the whole suite (lint, types, tests against the emulator and a real sshd)
test: $(STAMP) lint typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples

typecheck: $(STAMP)
	$(BIN)/mypy
	cd bench && ../$(BIN)/mypy --strict copy.py overhead.py

## bench: transfer vs. the 6 KB echo method and a plain POST (bench/copy.py); overhead above GCE delays
bench: $(STAMP)
	$(BIN)/python bench/copy.py
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) build src/*.egg-info
