# make train: set up .venv, train on the built-in corpus, translate, print test BLEU.
# make test: set up .venv and run the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN ?= runs/builtin
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: help setup train lint test test-all docs docs-serve wheel-check multi30k multi30k-v2 multi30k-student bench-train bench-decode bench-soak bench-serve bench-chaos bench-data gpu-check clean

help:  ## list targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(BIN)/transformer-train: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/transformer-train  ## create .venv and install the package

train: setup  ## train on the built-in corpus (minutes on a CPU), translate, print test BLEU
	rm -rf $(RUN)
	$(BIN)/transformer-train experiment=builtin run_dir=$(RUN) hydra.run.dir=$(RUN)
	@echo "--- translations"
	printf 'twenty-one\nthree hundred forty-five\nWe see seventy-seven red cars.\nthe nineteen small dogs\n' | \
		$(BIN)/transformer-decode checkpoint=$(RUN)
	@echo "--- test BLEU"
	$(BIN)/transformer-evaluate checkpoint=$(RUN) data=builtin

lint: setup  ## ruff check and the formatter's check
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

test: lint  ## lint, then every test but the end-to-end ones marked slow (~2-3 min on 2 cores)
	$(BIN)/python -m pytest -m "not slow"

test-all: lint  ## lint, then every test, the slow end-to-end ones included (what CI runs; ~15 min on 2 cores)
	$(BIN)/python -m pytest

$(BIN)/mkdocs: pyproject.toml | setup
	$(BIN)/python -m pip install -q -e '.[docs]'
	touch $@

docs: $(BIN)/mkdocs  ## build the documentation site into site/ (mkdocs build --strict: a broken link fails)
	$(BIN)/mkdocs build --strict

docs-serve: $(BIN)/mkdocs  ## preview the documentation site at http://127.0.0.1:8000, rebuilt on every save
	$(BIN)/mkdocs serve

wheel-check: $(BIN)/mkdocs  ## build the wheel, install it in a clean venv, train from it outside the checkout
	bash .ci/wheel-check $(BIN)/python

multi30k: setup  ## the tuned Multi30k recipe: train (<= 60 min on 2 cores), then test2016 BLEU
	$(BIN)/transformer-train experiment=multi30k_en_de run_dir=runs/multi30k hydra.run.dir=runs/multi30k

multi30k-v2: setup  ## the Multi30k recipe with SwiGLU and rotary positions (not exportable to HF/CTranslate2)
	$(BIN)/transformer-train experiment=multi30k_en_de_v2 run_dir=runs/multi30k-v2 hydra.run.dir=runs/multi30k-v2

multi30k-student: setup  ## distil runs/multi30k (make multi30k) into a 6+1 student, then compare them
	$(BIN)/transformer-distill teacher=runs/multi30k experiment=multi30k_student run_dir=runs/multi30k-student hydra.run.dir=runs/multi30k-student

bench-train: setup  ## training speed against Hugging Face Marian (tokens/s, ms/step, memory, MFU)
	$(BIN)/python scripts/bench_train.py

bench-decode: setup  ## decoding speed and BLEU against HF generate() and CTranslate2
	$(BIN)/pip install -q -e '.[ct2]'
	$(BIN)/python scripts/bench_decode.py

bench-soak: setup  ## speed and resident memory over an hour of the Multi30k recipe (scripts/bench_soak.py)
	$(BIN)/python scripts/bench_soak.py

bench-serve: setup  ## transformer-serve with and without dynamic batching, against transformer-decode
	$(BIN)/python scripts/bench_serve.py

bench-chaos: setup  ## transformer-serve under faults: worker killed, slow clients, oversized bodies, the worst request
	$(BIN)/python scripts/bench_chaos.py

bench-data: setup  ## start-up time and memory on generated corpora of 100k-4.5M pairs
	$(BIN)/python scripts/bench_data.py

gpu-check:  ## on a GPU machine: CUDA tests, training and decoding benchmarks, one table (docs/gpu.md)
	bash scripts/gpu_check.sh

clean:  ## remove .venv, runs and caches
	rm -rf $(VENV) runs outputs multirun .pytest_cache src/*.egg-info site build dist
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
