# The two commands of the README: `make demo` and `make test` (each sets up .venv first).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lmkd-installed

# Never touch the network for models or data.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

.PHONY: setup lint test test-fast test-slow test-all demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel; a loose range would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# The test suite (`make test`): everything but the `slow` tests, under 10 minutes on 2 cores.
# `make test-slow`: multi-process runs (torchrun DDP, DeepSpeed ZeRO-2/3 on 2 CPU processes) and
# whole tiny studies, a few minutes more; CI runs both (.ci/run), `make test-all` too.
# `make lint`: ruff's format check and linter (pyproject.toml [tool.ruff]); `make test` runs it first.
LINTED := lmkd tests benchmarks recipes eval
lint: setup
	$(VENV)/bin/ruff format --check --quiet $(LINTED)
	$(VENV)/bin/ruff check --quiet $(LINTED)

test: setup lint
	$(PY) -m pytest -m "not slow" -q -p no:cacheprovider

test-fast: test

test-slow: setup
	$(PY) -m pytest -m slow -q -p no:cacheprovider

test-all: setup lint
	$(PY) -m pytest -q -p no:cacheprovider

demo: setup
	$(VENV)/bin/lmkd study --task translation --budget quick --output runs/demo $(ARGS)

# `make bench`: one table (benchmarks/bench.py); the other benchmarks/bench_*.py run on their own.
bench: setup
	$(PY) benchmarks/bench.py

clean:
	rm -rf runs .pytest_cache
