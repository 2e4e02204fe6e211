# Every target creates or reuses .venv and installs what it needs.
# TORCH_SPEC pins the CPU wheel available on the reference machine; elsewhere
# `make test TORCH_SPEC=torch` takes whatever build fits your platform.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 2

.PHONY: demo demo-seeds test test-cuda bench venv clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	touch $@

$(VENV)/.test: $(VENV)/.torch pyproject.toml
	$(PY) -m pip install -q -e ".[test]"
	touch $@

$(VENV)/.demo: $(VENV)/.torch pyproject.toml
	$(PY) -m pip install -q -e ".[plot]"
	touch $@

$(VENV)/.bench: $(VENV)/.torch pyproject.toml
	$(PY) -m pip install -q -e ".[bench]"
	touch $@

venv: $(VENV)/.test

demo: $(VENV)/.demo
	$(PY) scripts/demo.py

# The demo once per seed, each its own base, data and runs, and one report over them.
demo-seeds: $(VENV)/.demo
	$(PY) scripts/demo.py --seeds 0,1,2 --out out/demo-seeds

test: $(VENV)/.test
	$(PY) -m pytest -q tests

# The model, sampler and training loops on a GPU (fails without one): make test-cuda TORCH_SPEC=torch
test-cuda: $(VENV)/.test
	$(PY) -m pytest -q tests/cuda_checks.py

bench: $(VENV)/.bench
	$(PY) scripts/bench_generate.py
	$(PY) scripts/bench_sft.py
	$(PY) scripts/bench_grpo.py
	$(PY) scripts/bench_scaling.py
	$(PY) scripts/bench_vocab.py

clean:
	rm -rf $(VENV) runs out
