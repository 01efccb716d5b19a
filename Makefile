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

.PHONY: setup test test-fast test-slow demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel; a loose range would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# The whole suite: about 3-4 minutes on 2 cores (the `slow` ones -- multi-process runs, whole tiny
# studies, DeepSpeed ZeRO-2/3 on 2 CPU processes -- take about 2 minutes of it).
test: setup
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: setup
	$(PY) -m pytest -m "not slow" -q -p no:cacheprovider

test-slow: setup
	$(PY) -m pytest -m slow -q -p no:cacheprovider

demo: setup
	$(VENV)/bin/lmkd study --task translation --budget quick --output runs/demo

bench: setup
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf runs .pytest_cache
