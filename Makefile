# Quick start:  make test   |   make test-vllm   |   make demo
# Each creates its venv on first use. On a GPU machine pick another torch, e.g.
#   make test TORCH="torch==2.14.0"      (with vLLM: docs/vllm.md "Install on a GPU", one recipe)
PYTHON ?= python3
VENV   ?= .venv
VLLM_VENV ?= .venv-vllm
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: test test-vllm demo demo-base venv lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: otherwise a dependency may resolve to a multi-GB CUDA build
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,plot,track,lora]"
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS)

# vLLM's CPU build and the project in a venv of its own (~6 GB, ~4 minutes on a fresh machine)
$(VLLM_VENV)/.installed: tests/vllm_cpu/requirements.txt tests/vllm_cpu/install.sh pyproject.toml
	bash tests/vllm_cpu/install.sh $(VLLM_VENV)
	touch $@

# every vLLM path for real on the CPU, on the toy of each model family (Qwen2.5-VL, Qwen3-VL): the vllm backend
# of 01/02/06, 05's colocated rollouts (torchrun, 2 ranks); there the vllm tests fail, never skip, when vLLM
# is missing or broken
test-vllm: $(VLLM_VENV)/.installed
	VLAA_REQUIRE_VLLM=1 $(VLLM_VENV)/bin/python -m pytest -q -m vllm tests/test_vllm.py $(PYTEST_ARGS)

demo: $(VENV)/.installed
	$(PY) demo.py

# rebuild the demo's toy instruct base (assets/toy-base; deterministic on one thread, ~1.5 minutes)
demo-base: $(VENV)/.installed
	$(PY) demo.py --build-base

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache
