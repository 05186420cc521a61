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

# every benchmark, one after the other (hours on a 2-core CPU; results in benchmarks/results/)
BENCH_DATA = --data $(NETPRESS_DATA)
bench: $(STAMP)
	$(BIN)/pip install --quiet --no-deps torch-pruning==1.6.1
	$(BIN)/python benchmarks/unstructured.py $(BENCH_DATA) --recover-images 5000
	$(BIN)/python benchmarks/structured_coverage.py --out benchmarks/results/structured_coverage.json
	$(BIN)/python benchmarks/structured.py speed --out benchmarks/results/structured_speed.json
	$(BIN)/python benchmarks/structured.py accuracy $(BENCH_DATA) --epochs 1 --train-images 10000 \
		--models benchmarks/results/structured_models --out benchmarks/results/structured_accuracy.json
	$(BIN)/python benchmarks/structured.py oneshot $(BENCH_DATA) --out benchmarks/results/structured_oneshot.json
	$(BIN)/python benchmarks/quantization.py $(BENCH_DATA)
	$(BIN)/python benchmarks/combined.py $(BENCH_DATA)
	$(BIN)/python benchmarks/fidelity.py $(BENCH_DATA)
	$(BIN)/python benchmarks/search.py $(BENCH_DATA)
	$(BIN)/python benchmarks/search.py $(BENCH_DATA) --trials 30 --reference-trials 0 \
		--out benchmarks/results/search_rl.json
	$(BIN)/python benchmarks/split.py $(BENCH_DATA)
	$(BIN)/python benchmarks/toolbox.py activations $(BENCH_DATA) --steps 200
	$(BIN)/python benchmarks/toolbox.py robustness $(BENCH_DATA) --steps 100 --cond-reg 0.1
	$(BIN)/python benchmarks/toolbox.py importance $(BENCH_DATA) --steps 50 --early-epochs 2

clean:
	rm -rf $(VENV) demo-out .pytest_cache .mypy_cache .ruff_cache
