# Two commands for a fresh machine: `make run` (the pipeline on the default data) and
# `make test`. Both create .venv when it is missing and install the pinned dependencies.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
# Stages and tests find the venv's dvc and python first.
export PATH := $(BIN):$(PATH)

.PHONY: setup setup-gpu run lint test test-fast e2e bench mlflow-ui clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	# back to tensorflow-cpu first where setup-gpu swapped it (both install the module tensorflow)
	if [ -f $(GPU_STAMP) ]; then $(VENV)/bin/python -m pip uninstall -y -q tensorflow && rm $(GPU_STAMP); fi
	$(VENV)/bin/python -m pip install --disable-pip-version-check -q \
		-r requirements.txt -r requirements-dev.txt -c constraints.txt
	touch $(STAMP)

# Keras on an NVIDIA GPU: TensorFlow's CUDA build in place of tensorflow-cpu (the same version and
# dependencies), its CUDA 12 libraries in a folder of their own (pipeline/frameworks/keras/cuda.py).
# torch needs nothing more: its wheels are CUDA builds. `make setup` undoes it.
TF_VERSION := $(shell sed -n 's/^tensorflow-cpu==//p' requirements.txt)
GPU_STAMP := $(VENV)/.installed-gpu
setup-gpu: $(GPU_STAMP)

$(GPU_STAMP): $(STAMP) requirements-gpu.txt
	$(VENV)/bin/python -m pip uninstall -y -q tensorflow-cpu
	$(VENV)/bin/python -m pip install --disable-pip-version-check -q --no-deps tensorflow==$(TF_VERSION)
	$(VENV)/bin/python -m pip install --disable-pip-version-check -q --no-deps --upgrade \
		--target $(VENV)/tensorflow-cuda12 -r requirements-gpu.txt
	touch $(GPU_STAMP)

run: setup
	dvc repro

lint: setup
	$(VENV)/bin/ruff check .

# Two workers: stage subprocesses spend much of their time in single-threaded imports, which a
# second worker overlaps; --dist loadgroup keeps each xdist_group (tests sharing a repository) on one.
PYTEST := $(VENV)/bin/python -m pytest -n 2 --dist loadgroup

# The suite without the end-to-end DVC runs (about 10 min on 2 cores); CI runs `make e2e` after it.
test: lint
	$(PYTEST) -m "not e2e"

test-fast: setup
	$(PYTEST) -m "not slow"

# The real dvc.yaml end to end in temporary repositories: a clone's rerun checked byte for byte,
# experiments, the queue, a sweep, photos, and the DVC fault tests (about 14 min on 2 cores: docs/benchmarks.md#test-suites).
e2e: setup
	$(PYTEST) -m e2e

bench: setup
	$(VENV)/bin/python -m bench.pipeline
	$(VENV)/bin/python -m bench.stream
	$(VENV)/bin/python -m bench.data
	$(VENV)/bin/python -m bench.frameworks
	$(VENV)/bin/python -m bench.duplicates
	$(VENV)/bin/python -m bench.finetune
	$(VENV)/bin/python -m bench.integrity
	$(VENV)/bin/python -m bench.queue
	$(VENV)/bin/python -m bench.batch
	$(VENV)/bin/python -m bench.portable

mlflow-ui: setup
	@# the store first mirrors what DVC holds (a checkout, `dvc exp apply`): pipeline/sync.py
	$(BIN)/python -m pipeline sync
	@echo "MLflow UI: http://127.0.0.1:5000/#/experiments?workflowType=machine_learning (the model-training views)"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(abspath mlflow.db) --port 5000

clean:
	rm -rf $(VENV)
