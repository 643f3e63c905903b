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
from pathlib import Path

import torch
from transformers import TrainingArguments

from eagle3.argparsing import parse_dataclass
from eagle3.collect.args import CollectArgs
from eagle3.config import DEFAULT_MAX_LENGTH, NORM_FIELDS
from eagle3.data.template import parse_thinking
from eagle3.dflash import DEFAULT_BLOCK_SIZE, DEFAULT_NUM_DRAFT_LAYERS, default_loss_decay

# The checkout holding this package: accelerate_configs/*.yaml name ds_configs/*.json relative to it.
REPO_ROOT = Path(__file__).resolve().parents[2]
DEEPSPEED_CONFIG_ENV = "ACCELERATE_DEEPSPEED_CONFIG_FILE"  # set by `accelerate launch` from the YAML

DEFAULT_HIDDEN_STATES_DIR = "/tmp/eagle3-hidden-states"

EAGLE3_SECTION = "EAGLE-3 options"
CHANGED_DEFAULTS_SECTION = "training options with EAGLE-3 defaults (recipe aliases)"
TRAINER_SECTION = "transformers TrainingArguments"


# Fields run_train.py takes from run_collect.py for --online --dataset (its name -> ours).
COLLECT_OPTIONS = {
    "dataset_split": "dataset_split",
    "skip_bad_lines": "skip_bad_lines",
    "enable_thinking": "enable_thinking",
    "regenerate": "regenerate",
    "max_new_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "batch_size": "collect_batch_size",
}


def _collect_option(name: str, **metadata) -> dataclasses.Field:
    """A field with run_collect.py's default and help for its option ``name``, read with --online --dataset."""
    source = CollectArgs.__dataclass_fields__[name]
    help_ = source.metadata["help"].removeprefix("hf: ")
    return field(
        default=source.default, metadata={"help": f"With --online --dataset (collection): {help_}", **metadata}
    )


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
        metadata={
            "help": "Use only shards written by these collector ranks, e.g. 0 or 0,1 (default: all, which is what "
            "you want after `torchrun ... run_collect.py`). For training on part of a collection, e.g. while "
            "the other ranks are still collecting."
        },
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
    max_tokens_per_batch: int | None = field(
        default=None,
        metadata={
            "help": "Size micro-batches by tokens, per device: samples of similar length are packed until their "
            "padded size (samples x longest) reaches this budget; --batch-size is then unused. The batch with "
            "the most tokens comes first, so a budget too large for the device fails at step 1. The estimated "
            "peak memory printed before training (and docs/TRAIN.md's table) says what fits.",
            "aliases": ["--max_tokens_per_batch"],
        },
    )
    # --- online training: the target computes the states inside training (no states on disk) ---
    online: bool = field(
        default=False,
        metadata={
            "help": "Run the frozen target inside training to compute the hidden states per batch (nothing "
            "stored): train from --data-dir (any store; a run_collect.py --no-states one is a few bytes/token) "
            "or straight from --dataset."
        },
    )
    dataset: list[str] | None = field(
        default=None,
        metadata={
            "help": "With --online: chat data (JSONL / HF dataset, as run_collect.py --dataset); answers are "
            "regenerated by the target and ids + masks stored under OUTPUT_DIR/online_data first (resumable)."
        },
    )
    # run_collect.py's options for the collection --online --dataset runs first (same names, same
    # defaults, taken from CollectArgs); --batch-size is training's, so the generate batch is
    # --collect-batch-size
    dataset_split: str = _collect_option("dataset_split")
    skip_bad_lines: bool = _collect_option("skip_bad_lines")
    enable_thinking: str = _collect_option("enable_thinking", nargs="?", const="true")
    regenerate: bool = _collect_option("regenerate")
    max_new_tokens: int = _collect_option("max_new_tokens")
    temperature: float = _collect_option("temperature")
    top_p: float = _collect_option("top_p")
    collect_batch_size: int = _collect_option("batch_size")
    server_url: list[str] | None = field(
        default=None,
        metadata={
            "help": "With --online: stream the hidden states from these running vLLM servers (started with "
            "run_collect.py --print-server-command) instead of running the target here; with --dataset they "
            "also regenerate the answers. States pass through memory only; DataLoader workers prefetch.",
            "aliases": ["--server_url"],
        },
    )
    generate_url: list[str] | None = field(
        default=None,
        metadata={
            "help": "With --online --dataset --server-url: regenerate the answers on these plain OpenAI-compatible "
            "servers of the target instead (repeat or comma-separate; see run_collect.py --generate-url); the "
            "--server-url servers then only compute the states.",
            "aliases": ["--generate_url"],
            "action": "extend",
        },
    )
    hidden_states_dir: str = field(
        default=DEFAULT_HIDDEN_STATES_DIR,
        metadata={
            "help": "With --server-url: where the servers' connector writes per-request files (read and deleted "
            "at once; must be visible here).",
            "aliases": ["--hidden_states_dir"],
        },
    )
    online_dtype: str = field(
        default="auto",
        metadata={
            "help": "With --online: dtype the target runs in (auto: bf16 on GPU, fp32 on CPU).",
            "choices": ["auto", "bf16", "fp16", "fp32"],
        },
    )
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
    draft_type: str = field(
        default="eagle3",
        metadata={
            "help": "eagle3 (default) or dflash: a DFlash block-diffusion draft (arXiv 2602.06036) that drafts "
            "--block-size - 1 tokens in one pass, served by vLLM with method dflash. It reads the target layers the "
            "data was collected at (collect with run_collect.py --layers dflash for its default 5).",
            "choices": ["eagle3", "dflash"],
            "aliases": ["--draft_type"],
        },
    )
    num_draft_layers: int | None = field(
        default=None,
        metadata={"help": "Decoder layers in the draft (default: 1 for EAGLE-3, 5 for DFlash, as published)."},
    )
    draft_vocab_size: int = field(
        default=32000, metadata={"help": "Draft lm_head size; capped at the target vocabulary."}
    )
    draft_intermediate_size: int | None = field(
        default=None,
        metadata={
            "help": "The draft's (dense) MLP width. Default: the target's intermediate_size; for MoE targets "
            "without one (Qwen3.5-MoE) 3 x hidden_size rounded up to 256."
        },
    )
    draft_arch: str = field(
        default="qwen3",
        metadata={
            "help": "qwen3 (vLLM >= 0.25, q/k norms) or llama (SGLang / older vLLM).",
            "choices": ["qwen3", "llama"],
        },
    )
    draft_variant: str | None = field(
        default=None,
        metadata={
            "help": "eagle3.1 (default for --draft-arch qwen3: fc_norm + norm_output, one RMSNorm per aux layer before "
            "fc, post-norm hidden state fed to the next draft step; vLLM reads both from config.json) or eagle3 (the "
            "recipe; default for --draft-arch llama, whose servers, SGLang and older vLLM, may not read the norm "
            "fields). bench/bench_methods.py: eagle3.1 + lk_lambda reach 1.20x the recipe's vLLM acceptance at k=3.",
            "choices": ["eagle3", "eagle3.1"],
        },
    )
    fc_norm: bool | None = field(
        default=None, metadata={"help": "Override the variant: RMSNorm per aux layer before fc (vLLM config key)."}
    )
    norm_before_fc: bool | None = field(
        default=None, metadata={"help": "Override the variant: one RMSNorm over all aux states before fc."}
    )
    norm_output: bool | None = field(
        default=None, metadata={"help": "Override the variant: feed the post-norm hidden state to the next step."}
    )
    norm_before_residual: bool | None = field(
        default=None, metadata={"help": "Override the variant: layer 0's residual is hidden_norm(h)."}
    )
    init_lm_head_from_target: bool = field(
        default=True, metadata={"help": "Start the draft lm_head from the target's lm_head rows of the draft vocab."}
    )
    # --- training-time test ---
    ttt_steps: int = field(default=7, metadata={"help": "Training-time-test unroll length (draft steps per position)."})
    ttt_decay: float = field(default=0.8, metadata={"help": "Loss weight of TTT step i is ttt_decay**i."})
    loss: str = field(
        default="soft_ce",
        metadata={
            "help": "Per-step loss against the target distribution p: soft_ce (default, the recipe's: -sum p log q; "
            "with EAGLE-3.1 it beat or tied lk_lambda at T=0 and T=0.6 in bench/bench_methods.py, 4 seeds), lk_lambda "
            "(acceptance-aware, arXiv 2602.23881: w*KL + (1-w)*(1 - sum min(p, q)), w = exp(-lk_eta * mean "
            "acceptance)) or forward_kl (KL(p||q): soft_ce minus the target's entropy, same gradient)",
            "choices": ["soft_ce", "forward_kl", "lk_lambda"],
        },
    )
    lk_eta: float = field(
        default=1.0,
        metadata={
            "help": "With --loss lk_lambda: the KL weight is exp(-lk_eta * mean acceptance). The LK paper "
            "(arXiv 2602.23881) uses 3; 1.0 keeps this toolkit's earlier behaviour until a benchmark picks "
            "the default.",
            "aliases": ["--lk_eta"],
        },
    )
    head_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Recompute each step's lm_head + loss in backward instead of keeping [B, T, draft_vocab] "
            "activations (less memory, ~1 extra lm_head matmul per step)."
        },
    )

    # --- DFlash (--draft-type dflash) ---
    block_size: int = field(
        default=DEFAULT_BLOCK_SIZE,
        metadata={
            "help": "DFlash: tokens per block (the verified one + block_size - 1 masks); serve with "
            "num_speculative_tokens = block_size - 1. 16 as the published Qwen3 drafts.",
            "aliases": ["--block_size"],
        },
    )
    mask_token_id: int | None = field(
        default=None,
        metadata={
            "help": "DFlash: the id fed at masked slots (default: the first embedding row the tokenizer does not "
            "use, 151669 for Qwen3).",
            "aliases": ["--mask_token_id"],
        },
    )
    num_anchors: int = field(
        default=512,
        metadata={
            "help": "DFlash: blocks drawn per sample and step (random anchors in the answers).",
            "aliases": ["--num_anchors"],
        },
    )
    dflash_loss_decay: float | None = field(
        default=None,
        metadata={
            "help": "DFlash: block position k weighs exp(-(k-1)/gamma) (default: the paper's 7 for blocks of 16, "
            "5 for 10, 4 for 8).",
            "aliases": ["--dflash_loss_decay"],
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
        # What the user asked for, before use_cpu is set for CPU-only multi-process runs below:
        # only the user's --use_cpu lets a GPU machine train on CPU (eagle3.device).
        self.cpu_requested = bool(self.use_cpu)
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
        self._resolve_draft_type()
        if self.draft_variant is None:
            self.draft_variant = "eagle3" if self.draft_arch == "llama" else "eagle3.1"
        if self.ttt_steps < 1:
            raise ValueError(f"--ttt-steps must be >= 1 (7 is EAGLE-3's), got {self.ttt_steps}")
        if self.dataset and not self.online:
            raise ValueError("--dataset is for --online training; offline training reads --data-dir")
        if self.online and bool(self.dataset) == bool(self.data_dir):
            raise ValueError("--online: give either --dataset (chat data) or --data-dir (a run_collect.py store)")
        if self.server_url and not self.online:
            raise ValueError("--server-url is for --online training (states streamed from vLLM servers)")
        self.generate_url = [url for given in self.generate_url or [] for url in given.split(",") if url] or None
        if self.generate_url and not (self.online and self.dataset and self.server_url):
            raise ValueError(
                "--generate-url is read by --online --dataset --server-url (the regeneration before training); "
                "add them, or drop --generate-url (a --data-dir store is regenerated already)"
            )
        self.enable_thinking = parse_thinking(self.enable_thinking)
        self._refuse_flags_of_other_modes()
        if self.server_url and self.dataloader_num_workers == 0:
            # The workers are the prefetch queue: without them every batch waits for its capture.
            self.dataloader_num_workers = 2
        if self.online and self.dataset and not self.model:
            raise ValueError("--online --dataset needs --model (the target that answers and computes the states)")
        if self.lk_eta < 0:
            raise ValueError(f"--lk-eta must be >= 0 (the LK paper uses 3), got {self.lk_eta}")
        if self.lk_eta != 1.0 and self.loss != "lk_lambda":
            raise ValueError(
                f"--lk-eta {self.lk_eta} is for --loss lk_lambda, but --loss is {self.loss}: drop --lk-eta "
                "or use --loss lk_lambda"
            )
        if not 0.0 <= self.eval_ratio < 1.0:
            raise ValueError(f"--eval-ratio must be in [0, 1), got {self.eval_ratio}")
        if self.max_length < 2:
            raise ValueError(f"--max-length must be >= 2, got {self.max_length}")
        if self.max_new_tokens < 1 or self.collect_batch_size < 1:
            raise ValueError("--max-new-tokens and --collect-batch-size must be >= 1")
        if not 0.0 < self.top_p <= 1.0 or self.temperature < 0:
            raise ValueError(f"--top-p must be in (0, 1] and --temperature >= 0, got {self.top_p}, {self.temperature}")
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch < 1:
            raise ValueError(f"--max-tokens-per-batch must be >= 1, got {self.max_tokens_per_batch}")
        self._resolve_deepspeed_configs()
        super().__post_init__()  # reads the DeepSpeed config (--deepspeed or accelerate's environment)
        if self.eval_ratio == 0.0:
            self.eval_strategy = "no"  # nothing to evaluate on; the best model is then the final one
            self.metric_for_best_model = None

    def _resolve_draft_type(self) -> None:
        """Defaults that depend on --draft-type, and the flags the other draft type would ignore."""
        dflash = self.draft_type == "dflash"
        if self.num_draft_layers is None:
            self.num_draft_layers = DEFAULT_NUM_DRAFT_LAYERS if dflash else 1
        if self.num_draft_layers < 1:
            raise ValueError(f"--num-draft-layers must be >= 1, got {self.num_draft_layers}")
        eagle3_only = {
            "ttt_steps": 7,
            "ttt_decay": 0.8,
            "draft_vocab_size": 32000,
            "draft_arch": "qwen3",
            "draft_variant": None,
            "head_checkpointing": False,
            **{name: None for name in NORM_FIELDS},
        }
        dflash_only = {
            "block_size": DEFAULT_BLOCK_SIZE,
            "mask_token_id": None,
            "num_anchors": 512,
            "dflash_loss_decay": None,
        }
        other = eagle3_only if dflash else dflash_only
        given = [name for name, default in other.items() if getattr(self, name) != default]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            mine, theirs = ("dflash", "eagle3") if dflash else ("eagle3", "dflash")
            raise ValueError(
                f"{flags}: only read by --draft-type {theirs}, and this run trains --draft-type {mine}; drop it"
            )
        if dflash:
            if self.block_size < 2:
                raise ValueError(
                    f"--block-size must be >= 2 (the verified token + at least one mask), got {self.block_size}"
                )
            if self.num_anchors < 1:
                raise ValueError(f"--num-anchors must be >= 1, got {self.num_anchors}")
            if self.dflash_loss_decay is None:
                self.dflash_loss_decay = default_loss_decay(self.block_size)
            if self.dflash_loss_decay <= 0:
                raise ValueError(f"--dflash-loss-decay must be > 0, got {self.dflash_loss_decay}")

    def _refuse_flags_of_other_modes(self) -> None:
        """A flag that only another mode reads would be silently ignored: say so instead. A value
        different from the default counts as given (the dataclass does not record what was typed)."""
        defaults = {ours: CollectArgs.__dataclass_fields__[theirs].default for theirs, ours in COLLECT_OPTIONS.items()}
        given = [name for name, default in defaults.items() if getattr(self, name) != default]
        if given and not (self.online and self.dataset):
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ValueError(
                f"{flags}: only read by --online --dataset (the collection run_train.py runs first); add "
                "--online --dataset chats.jsonl, or drop it (a --data-dir store was collected with its own settings)"
            )
        if self.collect_batch_size != defaults["collect_batch_size"] and self.server_url:
            raise ValueError(
                "--collect-batch-size has no effect with --server-url (the vLLM servers batch the requests "
                "themselves); drop --collect-batch-size"
            )
        if self.online_dtype != "auto" and not self.online:
            raise ValueError(
                f"--online-dtype {self.online_dtype} is for --online training (the target running inside "
                "training); add --online or drop --online-dtype"
            )
        if self.online_dtype != "auto" and self.server_url:
            raise ValueError(
                f"--online-dtype {self.online_dtype} has no effect with --server-url (the vLLM servers run the "
                "target, in the dtype they were started with); drop --online-dtype"
            )
        if self.hidden_states_dir != DEFAULT_HIDDEN_STATES_DIR and not self.server_url:
            raise ValueError(
                f"--hidden-states-dir {self.hidden_states_dir} is for --server-url (where the vLLM servers write "
                "the states); add --online --server-url or drop --hidden-states-dir"
            )
        if self.max_tokens_per_batch is not None and self.train_sampling_strategy != "group_by_length":
            raise ValueError(
                f"--train_sampling_strategy {self.train_sampling_strategy} has no effect with --max-tokens-per-batch "
                "(token-budget batches are packed by length and shuffled by their own sampler); drop one of them"
            )

    def _resolve_deepspeed_configs(self) -> None:
        """Find a relative DeepSpeed JSON from any working directory: the shipped accelerate YAMLs
        (and the docs' ``--deepspeed ds_configs/zero2.json``) name ds_configs/ relative to the repo."""
        if isinstance(self.deepspeed, str) and self.deepspeed.endswith(".json"):  # not an inline/base64 config
            self.deepspeed = find_deepspeed_config(self.deepspeed, f"--deepspeed {self.deepspeed}")
        env = os.environ.get(DEEPSPEED_CONFIG_ENV, "")
        if self.deepspeed is None and env.endswith(".json"):
            os.environ[DEEPSPEED_CONFIG_ENV] = find_deepspeed_config(
                env, f"the accelerate config's deepspeed_config_file {env} ({DEEPSPEED_CONFIG_ENV})"
            )

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


def find_deepspeed_config(path: str, what: str) -> str:
    """``path`` as given when it exists (relative to the working directory, as before), else the
    same relative path in this checkout (accelerate_configs/ and ds_configs/ live there)."""
    if Path(path).is_file():
        return path
    in_repo = REPO_ROOT / path
    if not Path(path).is_absolute() and in_repo.is_file():
        return str(in_repo)
    raise ValueError(
        f"{what}: no such file in the working directory {Path.cwd()} or in {REPO_ROOT}. Give the JSON's "
        "absolute path (the shipped ones are in ds_configs/ of the eagle3-qwen3 checkout)."
    )


def parse_args(argv: Sequence[str] | None = None) -> Eagle3TrainingArguments:
    """``[CONFIG.yaml|json] [flags]``; a mistake exits 2 naming the flag (see eagle3/argparsing.py)."""
    return parse_dataclass(
        Eagle3TrainingArguments,
        argv,
        prog="run_train.py",
        description="Train an EAGLE-3 draft for a Qwen3 target from run_collect.py data (any TrainingArguments "
        "option works too).",
    )
