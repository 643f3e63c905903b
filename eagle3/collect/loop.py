"""The collection run, backend-agnostic: check everything cheap, then stream samples to the store.

Order matters for the user: every check that can fail fast (target config, layers, data,
output directory and resume settings) runs BEFORE the target is loaded or a server is asked
for anything expensive.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm
from transformers import AutoTokenizer

from eagle3.argparsing import prog_name
from eagle3.collect.args import CollectArgs
from eagle3.collect.common import CollectError
from eagle3.config import resolve_layers as resolve_layer_spec
from eagle3.config import to_vllm_layer_ids
from eagle3.data.sources import Conversation, LoadStats, load_conversations
from eagle3.data.store import DiskFullError, NonFiniteSampleError, StoreWriter, read_manifest
from eagle3.data.template import ChatRenderer, resolve_thinking, tokenizer_hash
from eagle3.target import config_hash, load_target_config

MAX_WARNINGS = 10  # samples named one by one; the summary counts them all


class Backend(Protocol):
    def samples(self, conversations: list[Conversation]): ...  # yields Sample | None, in order

    def close(self) -> None: ...


@dataclass
class Plan:
    args: CollectArgs
    layers: list[int]
    num_layers: int
    hidden_size: int
    renderer: ChatRenderer
    conversations: list[Conversation]  # this rank's share, not yet stored
    load_stats: LoadStats
    writer: StoreWriter
    rank: int
    world_size: int
    token_budget: int | None  # this rank's share of --target-tokens


@dataclass
class Summary:
    output_dir: str
    new_samples: int
    new_tokens: int
    skipped_empty: int
    skipped_bad_lines: int
    seconds: float
    manifest: dict[str, Any]
    backend_lines: list[str] = field(default_factory=list)  # e.g. the vLLM servers and their requests
    skipped_non_finite: int = 0  # samples whose states were inf/NaN (as stored): not stored

    def text(self) -> str:
        m = self.manifest
        bytes_per_token = m["num_bytes"] / m["num_tokens"] if m["num_tokens"] else 0.0
        lines = [
            f"collected {self.new_samples} samples / {self.new_tokens} tokens in {self.seconds:.1f} s "
            f"({self.new_tokens / max(self.seconds, 1e-9):.0f} tokens/s)",
            f"store {self.output_dir}: {m['num_samples']} samples, {m['num_tokens']} tokens, "
            f"{m['num_assistant_tokens']} assistant tokens, {m['num_bytes'] / 2**20:.1f} MiB "
            f"({bytes_per_token:.0f} bytes/token), layers {m['layers']} (vLLM ids {m['vllm_layer_ids']}), "
            f"ranks {m['ranks']}",
        ]
        if self.skipped_empty:
            lines.append(f"skipped {self.skipped_empty} conversations with no assistant token (after --max-length)")
        if self.skipped_non_finite:
            lines.append(
                f"skipped {self.skipped_non_finite} samples whose hidden states hold inf/NaN as "
                f"{m['hidden_dtype']} (not stored; a rerun tries them again)"
            )
        if self.skipped_bad_lines:
            lines.append(f"skipped {self.skipped_bad_lines} malformed records (--skip-bad-lines)")
        lines += self.backend_lines
        return "\n".join(lines)


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) as set by torchrun / accelerate launch; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shard_of(args: CollectArgs) -> tuple[int, int]:
    """(this client's shard, number of shards): --shard-index/--num-shards, else torchrun's env.

    Shard i takes the conversations with key % num_shards == i and writes ``shard-rII-*`` files,
    so clients on several nodes can share one output directory (one manifest, under its lock)."""
    rank, world_size = distributed_rank()
    if args.num_shards is None:
        return rank, world_size
    if world_size > 1 and (rank, world_size) != (args.shard_index, args.num_shards):
        raise CollectError(
            f"--num-shards {args.num_shards} --shard-index {args.shard_index} disagree with the launcher's "
            f"WORLD_SIZE={world_size} RANK={rank}: use one or the other."
        )
    return args.shard_index, args.num_shards


def resolve_layers(args: CollectArgs, num_layers: int) -> list[int]:
    return resolve_layer_spec(args.layers, num_layers, flag="--layers")


def store_header(args: CollectArgs, config, layers: list[int], tokenizer) -> dict[str, Any]:
    """Everything a resume must match. --target-tokens is not in it: raising it is how one extends a run."""
    sources = [str(Path(s).resolve()) if Path(s).exists() else s for s in args.dataset]
    return {
        "layers": layers,
        "vllm_layer_ids": to_vllm_layer_ids(layers),
        "hidden_size": config.hidden_size,
        "hidden_dtype": args.hidden_dtype,
        "target": {
            "name_or_path": args.model,
            "config_hash": config_hash(config),
            "num_hidden_layers": config.num_hidden_layers,
            "vocab_size": config.vocab_size,
        },
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "settings": {
            "dataset": sources,
            "dataset_split": args.dataset_split,
            "backend": args.backend,
            "regenerate": args.regenerate,
            "max_new_tokens": args.max_new_tokens if args.regenerate else None,
            "temperature": args.temperature if args.regenerate else None,
            "top_p": args.top_p if args.regenerate else None,
            "seed": args.seed,
            "enable_thinking": args.enable_thinking,
            "max_length": args.max_length,
        },
    }


def hf_max_length(max_length: int, config) -> int:
    """--max-length capped at the target's positions (``max_position_embeddings``): the hf backend
    would otherwise run the target past them, as no server for it would."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and max_length > positions:
        print(
            f"run_collect.py: --max-length {max_length} capped at {positions}: the target has {positions} positions.",
            file=sys.stderr,
        )
        return positions
    return max_length


def prepare(args: CollectArgs) -> Plan:
    config = load_target_config(args.model)
    if args.backend == "vllm":  # what a server for this target serves at most (see --print-server-command)
        from eagle3.collect.server_commands import served_max_length

        args = replace(args, max_length=served_max_length(args.max_length, config))
    else:
        args = replace(args, max_length=hf_max_length(args.max_length, config))
    layers = resolve_layers(args, config.num_hidden_layers)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # "auto" becomes what serving does, before the manifest records it (a resume compares the choice)
    thinking, statement = resolve_thinking(args.enable_thinking, tokenizer)
    args = replace(args, enable_thinking=thinking)
    renderer = ChatRenderer(tokenizer, enable_thinking=thinking, max_length=args.max_length)
    conversations, stats = load_conversations(
        args.dataset, split=args.dataset_split, skip_bad_lines=args.skip_bad_lines
    )
    rank, world_size = shard_of(args)
    if rank == 0:
        print(f"{prog_name('run_collect.py')}: {statement}", flush=True)
    writer = StoreWriter(
        args.output_dir, store_header(args, config, layers, tokenizer), rank=rank, shard_max_tokens=args.shard_tokens
    )
    todo = [c for c in conversations if c.key % world_size == rank and c.key not in writer.done_keys]
    budget = math.ceil(args.target_tokens / world_size) if args.target_tokens is not None else None
    return Plan(
        args=args,
        layers=layers,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        renderer=renderer,
        conversations=todo,
        load_stats=stats,
        writer=writer,
        rank=rank,
        world_size=world_size,
        token_budget=budget,
    )


def make_backend(plan: Plan) -> Backend:
    args = plan.args
    if args.backend == "hf":
        from eagle3.collect.hf import HfBackend

        return HfBackend(
            args.model,
            plan.renderer,
            plan.layers,
            batch_size=args.batch_size,
            regenerate=args.regenerate,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            device=args.device,
            dtype=args.dtype,
            hidden_dtype=args.hidden_dtype,
        )
    from eagle3.collect.vllm_client import VllmBackend

    return VllmBackend.from_args(args, plan.renderer, plan.layers, plan.num_layers, plan.hidden_size, rank=plan.rank)


def nothing_stored_message(args: CollectArgs, skipped: int) -> str:
    """Why a run that read conversations stored none, and what to change."""
    why = (
        f"none left room for an answer within --max-length {args.max_length} (the rendered prompt alone is "
        "that long"
        + (f", or the answer was cut to nothing by --max-new-tokens {args.max_new_tokens}" if args.regenerate else "")
        + ")"
    )
    if not args.regenerate:
        why += " or had an assistant turn to train on (--no-regenerate keeps the dataset's answers)"
    return (
        f"every conversation ({skipped}) was skipped and nothing was stored: {why}. Raise --max-length "
        f"(e.g. --max-length {args.max_length * 2}), or use shorter conversations"
        + ("" if args.regenerate else ", or drop --no-regenerate to have the target write the answers")
        + f". The empty store in {args.output_dir} is reused by the next run whatever its settings."
    )


def collect(args: CollectArgs) -> Summary:
    """Run a collection (resuming what the output directory already holds) and return its summary."""
    started = time.perf_counter()
    plan = prepare(args)
    args = plan.args
    backend_lines: list[str] = []
    writer = plan.writer
    stored = writer.stored_tokens()
    new_samples = new_tokens = skipped_empty = skipped_non_finite = 0
    budget_left = None if plan.token_budget is None else max(plan.token_budget - stored, 0)
    if plan.conversations and budget_left != 0:
        backend = make_backend(plan)
        collecting_since = time.perf_counter()  # tokens/s without the model load / server checks
        by_tokens = budget_left is not None
        bar = tqdm(
            total=budget_left if by_tokens else len(plan.conversations),
            unit="tok" if by_tokens else "sample",
            unit_scale=by_tokens,
            desc=f"collect r{plan.rank}" if plan.world_size > 1 else "collect",
            disable=args.quiet,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        try:
            for sample in backend.samples(plan.conversations):
                if sample is None:
                    skipped_empty += 1
                    bar.update(0 if by_tokens else 1)
                    continue
                try:
                    added = writer.add(sample)
                except NonFiniteSampleError as error:  # one bad sample must not stop a long run
                    skipped_non_finite += 1
                    if skipped_non_finite <= MAX_WARNINGS:
                        tqdm.write(f"{prog_name('run_collect.py')}: skipped {error}", file=sys.stderr)
                    continue
                if added:
                    new_samples += 1
                    new_tokens += len(sample.input_ids)
                    # the sample that crosses --target-tokens is kept whole; the bar stops at 100 %
                    bar.update(min(len(sample.input_ids), bar.total - bar.n) if by_tokens else 1)
                    elapsed = max(time.perf_counter() - collecting_since, 1e-9)
                    bar.set_postfix(samples=new_samples, tok_s=f"{new_tokens / elapsed:.0f}", refresh=False)
                if budget_left is not None and new_tokens >= budget_left:
                    break
        except BaseException as error:
            # Keep what is complete (a crash of the backend or Ctrl-C must not throw away finished
            # samples), unless writing is what failed.
            if not isinstance(error, DiskFullError):
                writer.flush()
            raise
        finally:
            bar.close()
            backend.close()
            backend_lines = getattr(backend, "summary_lines", list)()
        writer.close()
        if new_samples == 0 and skipped_empty and not read_manifest(args.output_dir)["num_samples"]:
            raise CollectError(nothing_stored_message(args, skipped_empty))
    return Summary(
        output_dir=str(args.output_dir),
        new_samples=new_samples,
        new_tokens=new_tokens,
        skipped_empty=skipped_empty,
        skipped_bad_lines=plan.load_stats.skipped,
        seconds=time.perf_counter() - started,
        manifest=read_manifest(args.output_dir),
        backend_lines=backend_lines,
        skipped_non_finite=skipped_non_finite,
    )
