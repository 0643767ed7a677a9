# Two entry points for a fresh machine; each builds its own virtual environment.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test setup setup-test setup-tpu clean

$(BIN)/.runtime: requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	# IFEval's checkers only (lm_eval.tasks.ifeval); the rest of lm-eval's tree (torch, datasets, ...) unneeded.
	$(BIN)/pip install -q --no-deps lm-eval==0.4.13
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(BIN)/.test: requirements-test.txt $(BIN)/.runtime
	$(BIN)/pip install -q -r requirements-test.txt
	# Reference code only (tests exec single loss functions from their sources): files, no dependency trees.
	$(BIN)/pip install -q --no-deps trl==1.16.0 verl==0.9.1
	# Tunix's vanilla Sampler for benchmarks/bench_rollout.py: its tree (datasets, tfds, qwix, ...) is unneeded.
	$(BIN)/pip install -q --no-deps google-tunix==0.1.7
	touch $@

setup: $(BIN)/.runtime
setup-test: $(BIN)/.test
# libtpu for `keye plan` (ahead-of-time TPU compiles on any machine); setup-test has it too.
setup-tpu: $(BIN)/.runtime
	$(BIN)/pip install -q 'jax[tpu]==0.10.2'

demo: setup
	$(BIN)/keye train configs/demo/all.yaml

test: setup-test
	$(BIN)/python -m pytest -q -x --timeout=900 tests

clean:
	rm -rf $(VENV)
