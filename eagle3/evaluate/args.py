"""Options of run_eval.py / eagle3-eval, parsed like the other tools (see eagle3/argparsing.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from eagle3.argparsing import module_available, parse_dataclass
from eagle3.data.template import THINKING_HELP, parse_thinking


@dataclass
class EvalArgs:
    model: str | None = field(
        default=None,
        metadata={
            "help": "Target model folder or Hugging Face id (required).",
            "aliases": ["--target", "--base-model", "--base_model", "--target-model", "--target_model"],
        },
    )
    draft: str | None = field(
        default=None, metadata={"help": "Draft folder, e.g. OUTPUT_DIR/best_model from run_train.py (required)."}
    )
    dataset: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Prompts (required): JSONL/JSON files (ShareGPT, OpenAI or {'prompt': ...}) or a Hugging Face "
            "dataset; each conversation up to its first answer."
        },
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of a Hugging Face dataset."})
    backend: str = field(
        default="hf",
        metadata={
            "help": "hf: chain speculation in this process; vllm: vLLM's own spec decoding and counters.",
            "choices": ["hf", "vllm"],
        },
    )
    num_speculative_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Draft tokens proposed per target step (k). Default: 3 for EAGLE-3, block_size - 1 for a DFlash "
            "draft (the blocks it was trained on).",
            "aliases": ["-k"],
        },
    )
    temperature: float = field(
        default=0.0,
        metadata={"help": "Sampling temperature; 0 = greedy (lossless check). Qwen3 recommends 0.6 (thinking)."},
    )
    top_p: float = field(
        default=1.0,
        metadata={"help": "Nucleus sampling of the target above temperature 0, as vLLM applies it (Qwen3: 0.95)."},
    )
    top_k: int = field(
        default=0,
        metadata={"help": "Top-k sampling of the target above temperature 0; 0 = off, as in vLLM (Qwen3: 20)."},
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Tokens generated per prompt."})
    num_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts (default: all)."})
    # "auto" | "true" | "false"; "auto", True or False after parsing (see run_collect.py's flag)
    enable_thinking: str = field(default="auto", metadata={"help": THINKING_HELP, "nargs": "?", "const": "true"})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    output: str | None = field(default=None, metadata={"help": "Write the report as JSON here."})
    plot: str | None = field(
        default=None, metadata={"help": "Write a PNG plot (per-position acceptance) here; needs matplotlib."}
    )
    no_baseline: bool = field(
        default=False, metadata={"help": "Skip the target-only run (no speedup, no lossless check)."}
    )
    draft_sampling: str = field(
        default="greedy",
        metadata={
            "help": "Above temperature 0, both backends (vllm: speculative_config.draft_sample_method): greedy = "
            "vLLM's default (the draft's argmax, kept with probability p_target); probabilistic = sample the "
            "draft, keep with min(1, p/q): higher acceptance, k x vocab floats per sequence on the GPU.",
            "choices": ["greedy", "probabilistic"],
        },
    )
    device: str | None = field(
        default=None,
        metadata={"help": "hf backend: torch device for target and draft (default: cuda when available, else cpu)."},
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of target and draft. hf backend, auto: the checkpoint's on a GPU, fp32 on a CPU (bf16 "
            "there is slow, and its rounding makes batched verification and one-token generation disagree on "
            "near-ties, so a T=0 run would not be identical to target-only). vllm backend, auto: vLLM's choice "
            "(the checkpoint's; bf16 for fp32 checkpoints on CPU).",
            "choices": ["auto", "bf16", "fp16", "fp32"],
        },
    )
    tensor_parallel_size: int = field(
        default=1,
        metadata={"help": "vllm backend: GPUs per engine (each engine runs in its own process).", "aliases": ["-tp"]},
    )
    gpu_memory_utilization: float = field(
        default=0.9, metadata={"help": "vllm backend: fraction of each GPU's memory an engine may take."}
    )
    enforce_eager: bool | None = field(
        default=None,
        metadata={
            "help": "vllm backend: no CUDA graphs. Default: eager on CPU only, so GPU speeds are what vLLM serves."
        },
    )

    def __post_init__(self) -> None:
        self.enable_thinking = parse_thinking(self.enable_thinking)
        for name, what in (("model", "the target's folder or Hub id"), ("draft", "the draft folder")):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required: {what}")
        if not self.dataset:
            raise ValueError("--dataset is required: JSONL/JSON file(s) of prompts or a Hugging Face dataset")
        if self.num_speculative_tokens is not None and self.num_speculative_tokens < 1:
            raise ValueError(f"--num-speculative-tokens must be >= 1, got {self.num_speculative_tokens}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p} (1 = off)")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0, got {self.top_k} (0 = off)")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"--tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"--num-prompts must be >= 1, got {self.num_prompts} (omit it to use all prompts)")
        # Missing packages are found now, not after the whole evaluation.
        if self.plot and not module_available("matplotlib"):
            raise ValueError(
                f"--plot {self.plot} needs matplotlib: pip install matplotlib (or pip install 'eagle3-qwen3[plot]'),"
                " or drop --plot"
            )
        if self.backend == "vllm" and not module_available("vllm"):
            raise ValueError(
                "--backend vllm needs vLLM installed: pip install 'eagle3-qwen3[vllm]' on GPU machines "
                "('eagle3-qwen3[cpu]' on CPU-only ones), or use --backend hf"
            )


def parse_args(argv: list[str] | None = None) -> EvalArgs:
    return parse_dataclass(
        EvalArgs, argv, prog="run_eval.py", description="Measure an EAGLE-3 draft's acceptance length (hf or vLLM)."
    )
