# Quickstart targets. The first use creates .venv and installs the pinned stack into it.
#   make train   train the embedded default model (configs/tiny.flags) end to end
#   make test    run the whole test suite (every bench in --smoke mode included)
#   make bench   run every benchmark in bench/ at full size (bench/README.md; a quiet machine)
#   make demo    the fine-tuning demo: LoRA-tune runs/tiny on synthetic instructions
#                (configs/sft-lora-tiny.flags), then its held-out exact match
#   make grpo-demo  GRPO on the demo from the SFT run (configs/grpo-tiny.flags; runs
#                `make demo` first if runs/sft-lora-tiny is missing), then its exact match
# Extra flags reach the trainer through ARGS, e.g. make train ARGS="--workdir=runs/t2".

PYTHON ?= python3
VENV ?= .venv
PIP_VERSION := 26.3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=
# Test processes (pytest-xdist, whole files per process): the CPU count, at most 4.
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; n = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count(); print(min(4, n or 1))")

.PHONY: install train demo grpo-demo test bench wheel clean

install: $(STAMP)

# PYTHONWARNINGS silences setuptools' notice about editable installs (a `!!` block).
$(STAMP): setup.py requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet pip==$(PIP_VERSION) -c requirements/constraints.txt setuptools wheel
	PYTHONWARNINGS="ignore:Editable installation" \
	    $(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e '.[dev,parity,edge,serve]'
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/python -m deepseek_tf.train --flagfile=configs/tiny.flags $(ARGS)

demo: $(STAMP)
	test -f runs/tiny/checkpoints/checkpoint || $(BIN)/python -m deepseek_tf.train --flagfile=configs/tiny.flags
	test -f data/sft-demo/heldout.jsonl || $(BIN)/python -m deepseek_tf.data.demo --output_dir=data/sft-demo
	$(BIN)/python -m deepseek_tf.train --flagfile=configs/sft-lora-tiny.flags $(ARGS)
	$(BIN)/python -m deepseek_tf.evaluate --workdir=runs/sft-lora-tiny \
	    --data.inputs=data/sft-demo/heldout.jsonl --task=generate --max_new_tokens=16 --batch_size=50

grpo-demo: $(STAMP)
	test -f runs/sft-lora-tiny/adapter/adapter_config.json || $(MAKE) demo ARGS=
	$(BIN)/python -m deepseek_tf.train --flagfile=configs/grpo-tiny.flags $(ARGS)
	$(BIN)/python -m deepseek_tf.evaluate --workdir=runs/grpo-tiny \
	    --data.inputs=data/sft-demo/heldout.jsonl --task=generate --max_new_tokens=16 --batch_size=50

test: $(STAMP)
	$(BIN)/python -m pytest tests -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

BENCHES := compare_hf decode train_throughput moe_scaling data_throughput remat_memory \
	mwms_scaling edge dsa serve_load distill grpo v4 quantize moe_decode batch_decode sharding

bench: $(STAMP)
	for b in $(BENCHES); do $(BIN)/python bench/$$b.py $(ARGS) || exit 1; done

wheel: $(STAMP)
	$(BIN)/python -m pip wheel --no-deps -w dist .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
