"""Options of run_collect.py / eagle3-collect (the original recipe's flags keep working).

One vocabulary across the tools: ``--model`` is the target (``--target``, ``--base-model`` are
aliases), ``--layers`` the aux layers (``--target-layers`` alias), ``--max-length`` the sample
length cap with the same default as training. A YAML/JSON file of these options can come first
(``run_collect.py collect.yaml --batch-size 4``); see eagle3/argparsing.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from eagle3.argparsing import parse_dataclass
from eagle3.config import DEFAULT_MAX_LENGTH, parse_layers
from eagle3.data.template import THINKING_HELP, parse_thinking
from eagle3.target import resolve_model

DATA, REGEN, STORE, BACKEND = "data", "regeneration (train on the target's own answers)", "store", "backend"
# Flags the hf backend has no use for: given with it, they would be silently ignored.
VLLM_ONLY = (
    "server_url",
    "generate_url",
    "generate_model",
    "concurrent_requests",
    "request_timeout",
    "max_retries",
    "max_request_attempts",
    "hidden_states_dir",
    "port",
    "host",
    "server_args",
)


def looks_like_a_path(model: str) -> bool:
    """A Hub id is NAME or ORG/NAME: anything else with a slash (or ~) can only be a local path."""
    return model.startswith(("./", "../", "/", "~")) or model.count("/") > 1


@dataclass
class CollectArgs:
    _sections = (DATA, REGEN, STORE, BACKEND)
    _default_section = "other"

    # --- data ---
    model: str | None = field(
        default=None,
        metadata={
            "section": DATA,
            "help": "Target model: local folder or Hugging Face id (required).",
            "aliases": ["--target", "--base-model", "--base_model", "--target-model", "--target_model"],
        },
    )
    dataset: list[str] = field(
        default_factory=list,
        metadata={
            "section": DATA,
            "help": "Conversations (required): .jsonl/.json/.jsonl.gz/.json.gz files (ShareGPT 'conversations', "
            "OpenAI 'messages' or 'prompt'; a .json file may hold one array), or a Hugging Face dataset name "
            "or local dataset folder.",
        },
    )
    dataset_split: str = field(default="train", metadata={"section": DATA, "help": "Split of a Hugging Face dataset."})
    skip_bad_lines: bool = field(
        default=False, metadata={"section": DATA, "help": "Skip (and count) malformed records instead of stopping."}
    )
    max_length: int = field(
        default=DEFAULT_MAX_LENGTH,
        metadata={
            "section": DATA,
            "help": "Token cap per sample (prompt + answers); a conversation whose first prompt alone is longer "
            "is skipped.",
        },
    )
    # "auto" | "true" | "false" on the command line; "auto", True or False after parsing (a bare
    # --enable-thinking, as before, means true)
    enable_thinking: str = field(
        default="auto", metadata={"section": DATA, "help": THINKING_HELP, "nargs": "?", "const": "true"}
    )
    # --- regeneration ---
    regenerate: bool = field(
        default=True,
        metadata={
            "section": REGEN,
            "help": "Regenerate every assistant turn with the target, in order (later turns see the new "
            "answers); --no-regenerate keeps the dataset's answers.",
        },
    )
    max_new_tokens: int = field(default=1024, metadata={"section": REGEN, "help": "Tokens per regenerated answer."})
    temperature: float = field(default=0.0, metadata={"section": REGEN, "help": "Sampling temperature; 0 = greedy."})
    top_p: float = field(default=1.0, metadata={"section": REGEN, "help": "Nucleus sampling top-p."})
    seed: int = field(default=0, metadata={"section": REGEN, "help": "Sampling seed."})
    # --- store ---
    output_dir: str | None = field(
        default=None,
        metadata={"section": STORE, "help": "Where shards + manifest.json go (resumes when present); required."},
    )
    layers: str | None = field(
        default=None,
        metadata={
            "section": STORE,
            "help": "Aux layers, comma-separated 0-based decoder layer indices (layer i = OUTPUT of layer i; "
            "vLLM id i+1). Default: EAGLE-3's 1,L//2-1,L-4. dflash[:N]: DFlash's N (default 5) layers spread from 1 "
            "to L-3, what run_train.py --draft-type dflash reads. Becomes a list of ints after parsing.",
            "aliases": ["--target-layers", "--target_layers"],
        },
    )
    target_tokens: int | None = field(
        default=None, metadata={"section": STORE, "help": "Stop after this many stored tokens (default: all data)."}
    )
    hidden_dtype: str = field(
        default="bf16",
        metadata={
            "section": STORE,
            "help": "How states are stored: bf16 (the plain floor, (n_aux+1)*H*2 bytes/token), fp16, fp32, or fp8 "
            "(e4m3 with a scale per token per layer, about half of bf16).",
            "choices": ["bf16", "fp16", "fp32", "fp8"],
        },
    )
    no_states: bool = field(
        default=False,
        metadata={
            "section": STORE,
            "help": "Store token ids and loss masks only (a few bytes/token), for run_train.py --online --data-dir: "
            "the target computes the states during training.",
        },
    )
    shard_tokens: int = field(
        default=1 << 16, metadata={"section": STORE, "help": "Tokens per shard (a kill loses at most one)."}
    )
    num_shards: int | None = field(
        default=None,
        metadata={
            "section": STORE,
            "help": "Split the dataset between this many clients, e.g. one per node (default: the launcher's "
            "WORLD_SIZE, else 1). Shard i writes shard-rII-* files; all may share one --output-dir.",
        },
    )
    shard_index: int | None = field(
        default=None,
        metadata={
            "section": STORE,
            "help": "This client's shard, 0..num-shards-1: it collects the conversations whose key mod num-shards is this index "
            "(default: the launcher's RANK).",
        },
    )
    # --- backend ---
    backend: str = field(
        default="hf",
        metadata={
            "section": BACKEND,
            "help": "hf: in-process transformers; vllm: running vLLM servers (see --print-server-command).",
            "choices": ["hf", "vllm"],
        },
    )
    batch_size: int = field(
        default=8, metadata={"section": BACKEND, "help": "hf: conversations per generate/forward batch."}
    )
    device: str | None = field(
        default=None,
        metadata={"section": BACKEND, "help": "hf: torch device (default: cuda:LOCAL_RANK when present, else cpu)."},
    )
    dtype: str = field(
        default="auto",
        metadata={"section": BACKEND, "help": "hf: dtype to load the target in (auto = its checkpoint)."},
    )
    server_url: list[str] = field(
        default_factory=list,
        metadata={
            "section": BACKEND,
            "help": "vllm: server base URL(s), e.g. http://127.0.0.1:8000; each request goes to the "
            "least-loaded live one, a failing server is worked around (see docs/COLLECT.md).",
        },
    )
    generate_url: list[str] = field(
        default_factory=list,
        metadata={
            "section": BACKEND,
            "help": "vllm: plain generation server URL(s) for the regeneration (repeat the flag or separate with "
            "commas): any OpenAI-compatible /v1/completions server of the same target (a plain `vllm serve`, "
            "SGLang, your own deployment), with the same dispatch, failover and start-up check as --server-url. "
            "The --server-url servers then only capture (one prefill per sample). Default: the --server-url "
            "servers regenerate too.",
            "action": "extend",
        },
    )
    generate_model: str | None = field(
        default=None,
        metadata={
            "section": BACKEND,
            "help": "vllm: the model name the --generate-url servers serve the target as (default: --model); "
            "they must still use the target's tokenizer (checked at start).",
        },
    )
    concurrent_requests: int = field(
        default=16,
        metadata={
            "section": BACKEND,
            "help": "vllm: requests in flight per server (16: 1.4-2.8x the throughput of 4 in bench/bench_collect.py "
            "--vllm; on GPU servers go up to the server's --max-num-seqs, the client holds only file paths).",
        },
    )
    request_timeout: float = field(default=600.0, metadata={"section": BACKEND, "help": "vllm: seconds per request."})
    max_retries: int = field(
        default=5, metadata={"section": BACKEND, "help": "vllm: retries (exponential backoff) per request."}
    )
    max_request_attempts: int = field(
        default=5,
        metadata={
            "section": BACKEND,
            "help": "vllm: servers a request may be sent to (again) after failing on one (its server went down "
            "or it failed its retries there); then the run stops naming it. Bounds a request that makes every "
            "server fail, even servers that restart.",
        },
    )
    hidden_states_dir: str = field(
        default="/tmp/eagle3-hidden-states",
        metadata={
            "section": BACKEND,
            "help": "vllm: where the server's connector writes per-request files (must be readable here).",
        },
    )
    port: int = field(default=8000, metadata={"section": BACKEND, "help": "Port used by --print-server-command."})
    host: str | None = field(
        default=None,
        metadata={"section": BACKEND, "help": "Host the printed server binds (default: vLLM's, all interfaces)."},
    )
    server_args: str = field(
        default="",
        metadata={
            "section": BACKEND,
            "help": "Extra vLLM server flags for --print-server-command; write it with '=': "
            "--server-args='--enforce-eager'.",
        },
    )
    # None | "auto" (the bare flag) | "extract" | "generate" | "both"
    print_server_command: str | None = field(
        default=None,
        metadata={
            "section": BACKEND,
            "help": "Print the exact vLLM server command(s) for these settings and exit: the extraction server "
            "(the bare flag; both, labelled, when --generate-url is given), `generate` (a plain `vllm serve` for "
            "--generate-url) or `both` (the generation server on --port + 1). One command prints as one line.",
            "nargs": "?",
            "const": "auto",
            "choices": ["auto", "extract", "generate", "both"],
        },
    )
    quiet: bool = field(default=False, metadata={"help": "No progress bar."})

    def __post_init__(self) -> None:
        # --layers arrives as text ("0,13,27") and is kept as a list of ints from here on.
        self.layers = parse_layers(self.layers, flag="--layers")
        self.enable_thinking = parse_thinking(self.enable_thinking)
        # --generate-url A,B --generate-url C: one list (a deployment's URLs are often pasted comma-separated)
        self.generate_url = [url for given in self.generate_url for url in given.split(",") if url]
        positive = ("batch_size", "concurrent_requests", "max_new_tokens", "max_length", "shard_tokens")
        for name in (*positive, "max_request_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.target_tokens is not None and self.target_tokens < 1:
            raise ValueError(f"--target-tokens must be >= 1, got {self.target_tokens} (omit it to use all the data)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if (self.num_shards is None) != (self.shard_index is None):
            raise ValueError("--num-shards and --shard-index go together")
        if self.num_shards is not None and not 0 <= self.shard_index < self.num_shards:
            raise ValueError(
                f"--shard-index must be in 0..{self.num_shards - 1} (--num-shards {self.num_shards}), "
                f"got {self.shard_index}"
            )
        if not self.model:
            raise ValueError("--model is required: the target model's folder or Hugging Face id")
        self.model = resolve_model(self.model)  # stored in the manifest: ./x and x resume alike
        if looks_like_a_path(self.model) and not Path(self.model).expanduser().exists():
            raise ValueError(
                f"--model {self.model}: no such local folder (and not a Hugging Face id, which looks like "
                "ORG/NAME); check the path."
            )
        if self.print_server_command:
            return
        if not self.output_dir:
            raise ValueError("--output-dir is required: where the shards and manifest.json go")
        if not self.dataset:
            raise ValueError("--dataset is required (JSONL/JSON file(s) or a Hugging Face dataset)")
        if self.no_states:
            self.hidden_dtype = "none"  # the store's name for "ids and masks only"
        if self.backend == "vllm":
            self._check_vllm_servers()
        if self.backend == "hf":
            self._refuse_vllm_flags()

    def _check_vllm_servers(self) -> None:
        """Which servers the run needs: capture needs --server-url; regeneration the --generate-url
        servers when given (else --server-url)."""
        if self.generate_url and not self.regenerate:
            raise ValueError("--generate-url with --no-regenerate: nothing is generated; drop one of them")
        if self.generate_model and not self.generate_url:
            raise ValueError("--generate-model names the model on the --generate-url servers: add --generate-url")
        if not self.server_url and not (self.generate_url and self.no_states):
            raise ValueError(
                "--backend vllm needs --server-url (the servers that capture the states; start one with the "
                "command --print-server-command prints)"
                + ("" if not self.generate_url else "; only --no-states runs on --generate-url servers alone")
            )

    def _refuse_vllm_flags(self) -> None:
        """A vLLM flag given to the hf backend (its value differs from the default) is a mistake to
        report, not an option to ignore: the user believes it does something."""
        defaults = {f.name: f.default if f.default_factory is MISSING else f.default_factory() for f in fields(self)}
        given = [name for name in VLLM_ONLY if getattr(self, name) != defaults[name]]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ValueError(
                f"{flags}: only for --backend vllm (or --print-server-command); the hf backend (the default) "
                "would ignore it. Add --backend vllm --server-url URL, or drop it."
            )


def parse_args(argv: Sequence[str] | None = None) -> CollectArgs:
    return parse_dataclass(
        CollectArgs,
        argv,
        prog="run_collect.py",
        description="Collect target hidden states (aux layers + last hidden state) for EAGLE-3 training.",
    )
