# Quick start:  make test   |   make demo
# Both create .venv on first use. On a GPU machine pick another torch, e.g.
#   make test TORCH="torch==2.14.0"      (and pip install '.[vllm]' for vLLM rollouts)
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: test demo venv lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: otherwise a dependency may resolve to a multi-GB CUDA build
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(VENV)/.installed
	$(PY) demo.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache
