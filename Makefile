# `make quickstart` and `make test` create the environment in .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build on this kind of machine; on a GPU machine use e.g. TORCH="torch==2.13.0" from your CUDA index.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?= -m "not slow"

.PHONY: env quickstart test test-all clean-env

$(PY): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,launchers]"
	touch $(PY)

env: $(PY)

quickstart: $(PY)  ## offline: SmolLM2-135M, prefix m=16 and LoRA r=4 on SST-2, on CPU
	$(PY) train.py -m experiment=quickstart

test: $(PY)  ## the fast suite (what CI runs)
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: $(PY)  ## includes slow tests (real pretrained model)
	$(PY) -m pytest

clean-env:
	rm -rf $(VENV)
