"""Command line of run_collect.py (the original recipe's flags keep working)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field

from eagle3.config import parse_layers


@dataclass
class CollectArgs:
    model: str
    output_dir: str | None
    dataset: list[str] = field(default_factory=list)
    dataset_split: str = "train"
    layers: list[int] | None = None  # command-line numbering (output of 0-based layer i); None = EAGLE-3 default
    target_tokens: int | None = None  # stop after this many stored tokens; None = all the data
    backend: str = "hf"
    batch_size: int = 8
    concurrent_requests: int = 4
    server_url: list[str] = field(default_factory=list)
    regenerate: bool = True
    max_new_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    enable_thinking: bool = False
    max_length: int = 4096
    seed: int = 0
    hidden_dtype: str = "bf16"
    skip_bad_lines: bool = False
    shard_tokens: int = 1 << 16
    device: str | None = None
    dtype: str = "auto"
    request_timeout: float = 600.0
    max_retries: int = 5
    hidden_states_dir: str = "/tmp/eagle3-hidden-states"
    port: int = 8000
    host: str | None = None
    server_args: str = ""
    print_server_command: bool = False
    quiet: bool = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_collect.py",
        description="Collect target hidden states (aux layers + last hidden state) for EAGLE-3 training.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--model", required=True, help="target model: local folder or Hugging Face id")
    data.add_argument(
        "--dataset",
        nargs="+",
        default=[],
        help="JSONL file(s) (ShareGPT 'conversations', OpenAI 'messages' or 'prompt'), "
        "or a Hugging Face dataset name / local dataset folder",
    )
    data.add_argument("--dataset-split", default="train", help="split of a Hugging Face dataset")
    data.add_argument(
        "--skip-bad-lines", action="store_true", help="skip (and count) malformed records instead of stopping"
    )
    data.add_argument("--max-length", type=int, default=4096, help="truncate samples to this many tokens")
    data.add_argument(
        "--enable-thinking", action="store_true", help="render with Qwen3's thinking switch on (as served)"
    )

    regen = parser.add_argument_group("regeneration (train on the target's own answers)")
    regen.add_argument(
        "--regenerate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="regenerate every assistant turn with the target, in order (later turns see the new answers)",
    )
    regen.add_argument("--max-new-tokens", type=int, default=1024)
    regen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    regen.add_argument("--top-p", type=float, default=1.0)
    regen.add_argument("--seed", type=int, default=0)

    store = parser.add_argument_group("store")
    store.add_argument("--output-dir", help="where shards + manifest.json go (resumes when present); required")
    store.add_argument(
        "--layers",
        default=None,
        help="aux layers, comma-separated 0-based decoder layer indices (layer i = OUTPUT of layer i; "
        "vLLM id i+1). Default: EAGLE-3's 1,L//2-1,L-4",
    )
    store.add_argument(
        "--target-tokens", type=int, default=None, help="stop after this many stored tokens (default: all data)"
    )
    store.add_argument("--hidden-dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    store.add_argument("--shard-tokens", type=int, default=1 << 16, help="tokens per shard (a kill loses at most one)")

    backend = parser.add_argument_group("backend")
    backend.add_argument(
        "--backend", choices=["hf", "vllm"], default="hf", help="hf: in-process transformers; vllm: servers"
    )
    backend.add_argument("--batch-size", type=int, default=8, help="hf: conversations per generate/forward batch")
    backend.add_argument(
        "--device", default=None, help="hf: torch device (default: cuda:LOCAL_RANK when present, else cpu)"
    )
    backend.add_argument(
        "--dtype", default="auto", help="hf: dtype to load the target in (auto = its checkpoint dtype)"
    )
    backend.add_argument(
        "--server-url",
        nargs="+",
        default=[],
        help="vllm: server base URL(s), e.g. http://127.0.0.1:8000; spread across",
    )
    backend.add_argument("--concurrent-requests", type=int, default=4, help="vllm: requests in flight per server")
    backend.add_argument("--request-timeout", type=float, default=600.0, help="vllm: seconds per request")
    backend.add_argument("--max-retries", type=int, default=5, help="vllm: retries (exponential backoff) per request")
    backend.add_argument(
        "--hidden-states-dir",
        default="/tmp/eagle3-hidden-states",
        help="vllm: where the server's connector writes per-request files (must be readable here)",
    )
    backend.add_argument("--port", type=int, default=8000, help="port used by --print-server-command")
    backend.add_argument("--host", default=None, help="host the printed server binds (default: vLLM's, all interfaces)")
    backend.add_argument(
        "--server-args",
        default="",
        help="extra vLLM server flags for --print-server-command; write it with '=': --server-args='--enforce-eager'",
    )
    backend.add_argument(
        "--print-server-command",
        action="store_true",
        help="print the exact vLLM server command for these settings and exit",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> CollectArgs:
    parser = build_parser()
    namespace = parser.parse_args(argv)
    values = vars(namespace)
    values["layers"] = parse_layers(values["layers"], flag="--layers")
    for flag in ("batch_size", "concurrent_requests", "max_new_tokens", "max_length", "shard_tokens"):
        if values[flag] < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {values[flag]}")
    if values["target_tokens"] is not None and values["target_tokens"] < 1:
        parser.error(f"--target-tokens must be >= 1, got {values['target_tokens']}")
    if not 0.0 < values["top_p"] <= 1.0:
        parser.error(f"--top-p must be in (0, 1], got {values['top_p']}")
    if values["temperature"] < 0:
        parser.error(f"--temperature must be >= 0, got {values['temperature']}")
    if not values["print_server_command"]:
        if not values["output_dir"]:
            parser.error("--output-dir is required")
        if not values["dataset"]:
            parser.error("--dataset is required (JSONL file(s) or a Hugging Face dataset)")
        if values["backend"] == "vllm" and not values["server_url"]:
            parser.error(
                "--backend vllm needs --server-url (start a server with the command --print-server-command prints)"
            )
    return CollectArgs(**values)
