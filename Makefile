# netpress: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv on first use. torch==2.13.0 is installed FIRST: on these machines it is a
# local CPU build, while any other torch request would pull a multi-GB CUDA build.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.netpress-installed
TORCH  := torch==2.13.0
SHARED ?= $(abspath ../shared/data)
export NETPRESS_DATA ?= $(if $(wildcard $(SHARED)),$(SHARED),)

.PHONY: install demo test lint typecheck unit bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev,data,onnx,report]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/netpress demo --out demo-out

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck unit

bench: $(STAMP)
	$(BIN)/python benchmarks/unstructured.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache .mypy_cache .ruff_cache
