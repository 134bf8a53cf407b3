# dograph: `make demo` and `make test` set everything up on a machine with Python 3.11.
# They create .venv if it is missing and install the project (CPU torch pinned to 2.13.0).
.DEFAULT_GOAL := help
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A CPU build of torch (an unpinned torch, or one pulled by lm-eval/accelerate, is a multi-GB CUDA build).
TORCH_CPU := torch==2.13.0
PYTEST_FLAGS ?=
# Paper artifacts: `make table1 SCALE=smoke|cpu|paper` (conf/reproduce/<scale>.yaml); `make paper` builds them all.
SCALE ?= smoke
# BUDGET=100m trains only the missing runs that fit (priority order; the same command continues); JOBS=2 side by side.
REPRODUCE_FLAGS = $(if $(BUDGET),--budget $(BUDGET)) $(if $(JOBS),--jobs $(JOBS))
ARTIFACTS := table1 table2 table3 table4 table5 table6 table7 table8 table9 table10 \
	figure1 figure2 figure3 figure4 figure5

.PHONY: help install demo test test-all lint clean distclean bench bench-fsdp gpu-wheels bench-gpu paper planted pays \
	$(ARTIFACTS) clean-results

help:  ## List the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'
	@echo "  make table1 ... table10, figure1 ... figure5 [SCALE=smoke|cpu|paper]: one paper artifact into results/SCALE/"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing dograph and its dependencies into $(VENV) (first time: about 2 minutes)"
	$(PY) -m pip install --disable-pip-version-check -q "$(TORCH_CPU)" -e ".[cpu,dev]"
	@touch $(STAMP)

install: $(STAMP)  ## Create .venv and install the project (CPU)

demo: $(STAMP)  ## Train the default mixer on the embedded offline corpus (a few minutes on 2 CPU cores)
	$(PY) run.py overwrite=true

test: $(STAMP)  ## Run the fast test suite (no slow tests; under 15 minutes on 2 cores)
	$(PY) -m pytest -m "not slow" -q $(PYTEST_FLAGS)

test-all: $(STAMP)  ## Run every test, slow and multi-process ones included
	$(PY) -m pytest -q $(PYTEST_FLAGS)

lint: $(STAMP)  ## ruff
	$(PY) -m ruff check .

bench: $(STAMP)  ## Benchmarks: trainer vs plain loop; DoGraph step, projection, K-means and solve costs
	$(PY) -m benchmarks.throughput
	$(PY) -m benchmarks.step_time

bench-fsdp: $(STAMP)  ## DoGraph's one-backward vs two-pass update under FSDP2, 2 gloo ranks on the CPU (NPROC=, ARGS=)
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc_per_node $(or $(NPROC),2) \
		-m benchmarks.fsdp_step --device cpu $(ARGS)

gpu-wheels:  ## Download the wheels an offline CUDA machine lacks into .gpu_wheels (cp312, about 26 MiB)
	bash benchmarks/gpu.sh fetch

bench-gpu:  ## Every GPU measurement in one JSON + Markdown report, under 8 minutes (CPU shapes without CUDA)
	bash benchmarks/gpu.sh run

paper: $(STAMP)  ## Every paper table and figure at SCALE=smoke|cpu|paper into results/$(SCALE)/ (trains what is missing; BUDGET=100m JOBS=2)
	$(PY) -m experiments.reproduce paper --scale $(SCALE) $(REPRODUCE_FLAGS)

planted: $(STAMP)  ## The planted-structure study: 7 methods x 3 scenarios x 3 seeds into results/planted/ (BUDGET=100m JOBS=2)
	$(PY) -m experiments.reproduce planted --scale planted $(REPRODUCE_FLAGS)

pays: $(STAMP)  ## When DoGraph pays (issue 19): ESS cost, sample-weight variants, longer runs into results/pays/ (BUDGET=100m JOBS=2)
	$(PY) -m experiments.reproduce pays --scale pays $(REPRODUCE_FLAGS)

$(ARTIFACTS): $(STAMP)  ## (make table1 ... table10, figure1 ... figure5 SCALE=...) one paper artifact
	$(PY) -m experiments.reproduce $@ --scale $(SCALE) $(REPRODUCE_FLAGS)

clean-results:  ## Remove the runs and artifacts of SCALE (outputs/reproduce/$(SCALE), results/$(SCALE); SCALE=planted, pays too)
	rm -rf outputs/reproduce/$(SCALE) results/$(SCALE)

clean:  ## Remove run outputs and tool caches (keeps .venv and the data cache)
	rm -rf outputs multirun .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +

distclean: clean  ## Also remove .venv and the data/tokenizer cache
	rm -rf $(VENV) .cache
