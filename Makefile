# The two README commands: `make run` and `make test`. Each sets itself up on a fresh machine
# with only Python 3.11+ and pip: a virtual environment in .venv, the project installed into it.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= config/node.toml

.PHONY: run test lint typecheck pytest bench-ingest clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/dicom-node serve --config $(CONFIG)

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check dicom_node tests bench models

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest

bench-ingest: $(STAMP)
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
