"""Online training: the frozen target computes the hidden states inside the training run.

Nothing is stored but token ids and loss masks. The samples are the ones collection makes
(same sources, chat rendering, regeneration, loss mask): either a ``run_collect.py
--no-states`` store given as ``--data-dir``, or ``--dataset`` turned into such a store under
``OUTPUT_DIR/online_data`` by the same collection loop (each rank regenerates its share,
resumable). Then each rank runs the target's forward on its own batch, on its own device,
without gradients, and the TTT loss proceeds exactly as offline (``Eagle3Trainer._prepare_inputs``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from eagle3.collect.hf import capture_states
from eagle3.config import parse_layers
from eagle3.families import load_text_model, without_zero3_init
from eagle3.target import load_target_config, target_family

ONLINE_DATA_DIR = "online_data"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def online_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU (how the target is served), fp32 on a CPU (bf16 matmuls are slow there)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


class OnlineTarget:
    """The frozen target on this rank's device; called with a right-padded batch of ids."""

    def __init__(self, model: str, layers: Sequence[int], device: torch.device | str, dtype: torch.dtype) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.layers = list(layers)
        with without_zero3_init():
            family = target_family(load_target_config(model))
            self.model = load_text_model(model, family, dtype=dtype, device_map={"": self.device})
        self.model.requires_grad_(False).eval()

    def __call__(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        input_ids = input_ids.to(self.device, non_blocking=True)
        positions = torch.arange(input_ids.shape[1], device=self.device)
        attention_mask = (positions[None, :] < lengths.to(self.device)[:, None]).long()
        aux, last = capture_states(self.model, self.layers, input_ids, attention_mask, self.dtype)
        return {"aux_hidden_states": aux, "last_hidden_states": last}


def online_layers(args) -> str | None:
    """--layers for the collection --online --dataset runs: as given, else the draft type's default."""
    if args.layers is None and getattr(args, "draft_type", "eagle3") == "dflash":
        return f"dflash:{args.num_draft_layers}"
    return args.layers


def prepare_online_data(args) -> str:
    """``--online --dataset``: regenerate and render into OUTPUT_DIR/online_data (ids + masks only),
    every rank its share, then wait for all ranks. Rerunning resumes what is there."""
    from eagle3.collect.args import CollectArgs
    from eagle3.collect.loop import collect

    output_dir = Path(args.output_dir) / ONLINE_DATA_DIR
    collect_args = CollectArgs(
        model=args.model,
        output_dir=str(output_dir),
        dataset=list(args.dataset),
        layers=parse_layers(online_layers(args), "--layers"),
        max_length=args.max_length,
        seed=args.seed,
        dataset_split=args.dataset_split,
        skip_bad_lines=args.skip_bad_lines,
        enable_thinking=args.enable_thinking,
        regenerate=args.regenerate,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        batch_size=args.collect_batch_size,
        hidden_dtype="none",
        quiet=not args.should_log,
    )
    if args.server_url:  # the servers regenerate (or the --generate-url ones) and later compute the states
        collect_args = replace(
            collect_args,
            backend="vllm",
            server_url=list(args.server_url),
            generate_url=list(args.generate_url or []),  # plain servers regenerate instead, when given
            hidden_states_dir=args.hidden_states_dir,
        )
    summary = collect(collect_args)
    if args.should_log:
        print(summary.text(), flush=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank's share is stored before anyone reads the manifest
    return str(output_dir)
