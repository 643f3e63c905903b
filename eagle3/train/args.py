"""Eagle3TrainingArguments: TrainingArguments plus the EAGLE-3 method's own fields.

Every ``TrainingArguments`` option keeps working (``--report_to``, ``--push_to_hub``,
``--deepspeed``, ``--resume_from_checkpoint``, ...). The original recipe's flags are argparse
aliases of the same fields, so ``--epochs 10`` and ``--num_train_epochs 10`` are one option
(HfArgumentParser also accepts ``--output-dir`` for ``--output_dir`` by itself). The target is
``--model`` and its layers ``--layers`` as in run_collect.py and run_eval.py (``--base-model``,
``--target-layers`` stay aliases). A YAML or JSON file first holds the same options by field
name or flag, overridden by the flags after it (see eagle3/argparsing.py). ``--help`` lists the
EAGLE-3 options first, then TrainingArguments whose defaults this method changes, then the rest.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from eagle3.argparsing import parse_dataclass
from eagle3.config import DEFAULT_MAX_LENGTH

EAGLE3_SECTION = "EAGLE-3 options"
CHANGED_DEFAULTS_SECTION = "training options with EAGLE-3 defaults (recipe aliases)"
TRAINER_SECTION = "transformers TrainingArguments"


@dataclass
class Eagle3TrainingArguments(TrainingArguments):
    _sections = (EAGLE3_SECTION, CHANGED_DEFAULTS_SECTION, TRAINER_SECTION)

    @classmethod
    def _section_of(cls, field_: dataclasses.Field) -> str:
        """Sections follow where a field is declared, so a new EAGLE-3 field needs no extra step."""
        if field_.name not in TrainingArguments.__dataclass_fields__:
            return EAGLE3_SECTION
        return CHANGED_DEFAULTS_SECTION if field_.name in cls.__annotations__ else TRAINER_SECTION

    # --- data ---
    data_dir: str | None = field(
        default=None, metadata={"help": "run_collect.py output directory (manifest.json + shards)."}
    )
    filter_rank: str | None = field(
        default=None,
        metadata={"help": "Use only shards written by these collector ranks, e.g. 0 or 0,1 (default: all)."},
    )
    deduplicate: bool = field(
        default=True,
        metadata={"help": "Drop samples whose token ids repeat an earlier one (--no-deduplicate to keep them)."},
    )
    eval_ratio: float = field(
        default=0.05,
        metadata={"help": "Fraction of samples held out for evaluation (deterministic split, data_seed/seed)."},
    )
    max_length: int = field(default=DEFAULT_MAX_LENGTH, metadata={"help": "Truncate samples to this many tokens."})
    # --- target and draft ---
    model: str | None = field(
        default=None,
        metadata={
            "help": "Target model (local folder or Hub id); default: the one recorded in the data manifest.",
            "aliases": ["--base-model", "--base_model", "--target-model", "--target_model", "--target"],
        },
    )
    layers: str | None = field(
        default=None,
        metadata={
            "help": "Aux layers as 0-based decoder layer outputs, e.g. 0,13,27. Optional: read from the "
            "manifest, and must match it when given.",
            "aliases": ["--target-layers", "--target_layers"],
        },
    )
    num_draft_layers: int = field(
        default=1, metadata={"help": "Decoder layers in the draft (1 is the EAGLE-3 default)."}
    )
    draft_vocab_size: int = field(
        default=32000, metadata={"help": "Draft lm_head size; capped at the target vocabulary."}
    )
    draft_arch: str = field(
        default="qwen3",
        metadata={
            "help": "qwen3 (vLLM >= 0.25, q/k norms) or llama (SGLang / older vLLM).",
            "choices": ["qwen3", "llama"],
        },
    )
    init_lm_head_from_target: bool = field(
        default=True, metadata={"help": "Start the draft lm_head from the target's lm_head rows of the draft vocab."}
    )
    # --- training-time test ---
    ttt_steps: int = field(default=7, metadata={"help": "Training-time-test unroll length (draft steps per position)."})
    ttt_decay: float = field(default=0.8, metadata={"help": "Loss weight of TTT step i is ttt_decay**i."})
    head_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Recompute each step's lm_head + loss in backward instead of keeping [B, T, draft_vocab] "
            "activations (less memory, ~1 extra lm_head matmul per step)."
        },
    )

    # --- TrainingArguments fields re-declared for the recipe's aliases and this method's defaults ---
    output_dir: str | None = field(
        default="eagle3_qwen3_model", metadata={"help": "Where checkpoints, best_model/ and final_model/ go."}
    )
    num_train_epochs: float = field(default=3.0, metadata={"help": "Total training epochs.", "aliases": ["--epochs"]})
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "Batch size per device for training.", "aliases": ["--batch-size", "--batch_size"]}
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak AdamW learning rate.", "aliases": ["--lr"]})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=0.5, metadata={"help": "Gradient clipping norm."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(
        default=0.015, metadata={"help": "Warmup steps (int) or fraction of training (float < 1)."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate: no, steps or epoch."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to checkpoint: no, steps, epoch or best."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most this many checkpoint-* folders."})
    metric_for_best_model: str | None = field(
        default="accept_len",
        metadata={
            "help": "Eval metric that picks best_model/: accept_len (consecutive-run estimator, tracks vLLM), "
            "or accept_len_product (1 + sum_k prod_i acc_i)."
        },
    )
    # greater_is_better stays transformers' (None: inferred, False for a metric ending in "loss").
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={"help": "DDP: every draft parameter gets a gradient each step, so no unused-parameter search."},
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep all batch keys (the loss needs them)."})
    train_sampling_strategy: str = field(
        default="group_by_length",
        metadata={
            "help": "group_by_length (default: little padding), random, sequential or batch_rebalance.",
            "choices": ["random", "sequential", "group_by_length", "batch_rebalance"],
        },
    )

    def __post_init__(self) -> None:
        if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # CPU-only multi-process (CI, laptops): DeepSpeed's CPU default backend (oneCCL) is rarely
            # installed, and without use_cpu accelerate would see one process. gloo always works.
            self.use_cpu = True
            self.ddp_backend = self.ddp_backend or "gloo"
        if self.gradient_checkpointing:
            raise ValueError(
                "--gradient_checkpointing: not supported for the EAGLE-3 draft (one decoder layer; the TTT "
                "attention already recomputes in backward). Drop it; to save memory use --head-checkpointing "
                "(recomputes the lm_head + loss) or a smaller --per_device_train_batch_size/--max-length."
            )
        if self.ttt_steps < 1:
            raise ValueError(f"--ttt-steps must be >= 1 (7 is EAGLE-3's), got {self.ttt_steps}")
        if not 0.0 <= self.eval_ratio < 1.0:
            raise ValueError(f"--eval-ratio must be in [0, 1), got {self.eval_ratio}")
        if self.max_length < 2:
            raise ValueError(f"--max-length must be >= 2, got {self.max_length}")
        super().__post_init__()
        if self.eval_ratio == 0.0:
            self.eval_strategy = "no"  # nothing to evaluate on; the best model is then the final one
            self.metric_for_best_model = None

    @property
    def base_model(self) -> str | None:
        """Former name of ``model`` (the recipe's --base-model), kept for code written against it."""
        return self.model

    @property
    def target_layers(self) -> str | None:
        """Former name of ``layers`` (the recipe's --target-layers)."""
        return self.layers

    @property
    def filter_ranks(self) -> list[int] | None:
        if self.filter_rank is None or str(self.filter_rank) == "":
            return None
        return [int(r) for r in str(self.filter_rank).split(",") if r != ""]


def parse_args(argv: Sequence[str] | None = None) -> Eagle3TrainingArguments:
    """``[CONFIG.yaml|json] [flags]``; a mistake exits 2 naming the flag (see eagle3/argparsing.py)."""
    return parse_dataclass(
        Eagle3TrainingArguments,
        argv,
        prog="run_train.py",
        description="Train an EAGLE-3 draft for a Qwen3 target from run_collect.py data (any TrainingArguments "
        "option works too).",
    )
