"""The three ways to feed training (issue 9): store bf16, store fp8, or no states (online).

1. Bytes per token from real ``run_collect.py`` runs on a random target at H=2048, per
   ``--hidden-dtype`` (bf16, fp8, none), against the bf16 floor ``(n_aux + 1) * H * 2``.
2. Quality: on the trained tiny target, the same conversations collected as bf16 and as fp8,
   a draft trained on each with the same seed and budget, vLLM acceptance length (k=3, T=0)
   of both on held-out prompts, in one vLLM process.
3. Speed: training tokens/s offline (bf16 store) vs online (ids-only store, the target runs
   in training) over the same samples and steps, measured here; and the cost model (FLOPs
   per token of the target forward vs the draft's TTT training step) at Qwen3-1.7B and
   Qwen3-8B shapes, which tells when online pays on GPUs.

    python bench/bench_storage.py [--samples 400] [--epochs 4] [--skip-quality]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from transformers import TrainerCallback

from eagle3.collect.cli import main as collect_main
from eagle3.data.codecs import bytes_per_token_floor
from eagle3.data.store import read_manifest
from eagle3.testing import QWEN3_SHAPES, build_tiny_target, synthetic_conversations, tiny_target, write_jsonl
from eagle3.train.args import parse_args
from eagle3.train.main import train
from eagle3.train.memory_model import DraftShape, draft_parameter_counts, target_shape

TRAIN_FLAGS = ["--report_to", "none", "--disable_tqdm", "true", "--dataloader_num_workers", "0"]


def collect(model: Path, chats: Path, out: Path, *flags: str) -> dict:
    collect_main(["--model", str(model), "--dataset", str(chats), "--output-dir", str(out), "--quiet", *flags])
    return read_manifest(out)


def bytes_per_token(work: Path) -> None:
    model = build_tiny_target(work / "h2048", num_layers=4, hidden_size=2048)
    chats = write_jsonl(work / "chats.jsonl", synthetic_conversations(24, seed=3))
    print("\n1. bytes per token, real run_collect.py runs at H=2048, 3 aux layers (bf16 floor = 4 * H * 2 = 16384)")
    floor = bytes_per_token_floor("bf16", 3, 2048)
    for dtype in ("bf16", "fp8", "none"):
        flags = ["--no-states"] if dtype == "none" else ["--hidden-dtype", dtype]
        manifest = collect(model, chats, work / f"store-{dtype}", "--no-regenerate", "--layers", "0,1,2", *flags)
        measured = manifest["num_bytes"] / manifest["num_tokens"]
        print(f"   {dtype:>5}: {measured:8.1f} bytes/token = {measured / floor:.3f}x the bf16 floor")


class _Runtime(TrainerCallback):
    """The Trainer's own train_runtime: model loading and evaluation are not in it."""

    seconds = 0.0

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seconds = (logs or {}).get("train_runtime", self.seconds)


def train_draft(data: Path, out: Path, target: Path, epochs: int, *flags: str) -> float:
    """Train; returns training tokens/s."""
    args = parse_args(
        ["--data-dir", str(data), "--output-dir", str(out), "--base-model", str(target), "--epochs", str(epochs)]
        + ["--batch-size", "16", "--lr", "1e-3", "--draft-vocab-size", "512", "--eval-ratio", "0.05"]
        + ["--save_total_limit", "1", "--seed", "0", *TRAIN_FLAGS, *flags]
    )
    runtime = _Runtime()
    train(args, callbacks=[runtime])
    tokens = json.loads((out / "best_model" / "eagle3_eval.json").read_text())["data"]["num_train_tokens"]
    return tokens * epochs / runtime.seconds


def quality(work: Path, samples: int, epochs: int) -> None:
    target = tiny_target(trained=True)
    chats = write_jsonl(work / "q-chats.jsonl", synthetic_conversations(samples, seed=11, turns=2))
    print(f"\n2. quality: {samples} conversations, bf16 vs fp8 store, {epochs} epochs each, same seed")
    drafts = {}
    for dtype in ("bf16", "fp8"):
        collect(
            target, chats, work / f"q-{dtype}", "--hidden-dtype", dtype, "--batch-size", "32", "--max-new-tokens", "64"
        )
        train_draft(work / f"q-{dtype}", work / f"draft-{dtype}", target, epochs)
        drafts[dtype] = work / f"draft-{dtype}" / "best_model"
    heldout = synthetic_conversations(24, seed=12345)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target)
    prompts = [
        tokenizer.apply_chat_template(
            c["messages"][:1], add_generation_prompt=True, enable_thinking=False, tokenize=False
        )
        for c in heldout
    ]
    (work / "prompts.json").write_text(json.dumps(prompts))
    command = [sys.executable, "-m", "eagle3.evaluate.vllm_bench", "--model", str(target), "--max-tokens", "64"]
    command += [arg for draft in drafts.values() for arg in ("--draft", str(draft))]
    command += [
        "--num-speculative-tokens",
        "3",
        "--prompts",
        str(work / "prompts.json"),
        "--json",
        str(work / "v.json"),
    ]
    subprocess.run(command, check=True, capture_output=True)
    runs = json.loads((work / "v.json").read_text())["drafts"]
    accept = {dtype: runs[str(draft)]["acceptance_length"] for dtype, draft in drafts.items()}
    for dtype, value in accept.items():
        print(f"   {dtype:>5} store -> vLLM acceptance length (k=3, T=0, 24 held-out prompts): {value:.3f}")
    print(f"   fp8 / bf16 = {accept['fp8'] / accept['bf16']:.3f}  (aim: within 1 %)")


def speed(work: Path, epochs: int) -> None:
    target = tiny_target(trained=True)
    chats = write_jsonl(work / "s-chats.jsonl", synthetic_conversations(160, seed=5))
    print("\n3. training speed here (CPU, tiny target: the target forward is as cheap as the draft step)")
    collect(target, chats, work / "s-bf16", "--no-regenerate")
    collect(target, chats, work / "s-ids", "--no-regenerate", "--no-states")
    offline = train_draft(work / "s-bf16", work / "s-offline", target, epochs)
    online = train_draft(work / "s-ids", work / "s-online", target, epochs, "--online")
    print(f"   offline {offline:.0f} tokens/s, online {online:.0f} tokens/s: online/offline = {online / offline:.2f}")
    print("\n   cost model per token (FLOPs; a training step costs 3x its forward):")
    for name in ("qwen3-1.7b", "qwen3-8b"):
        shape = QWEN3_SHAPES[name]
        h, q, kv = shape["hidden_size"], shape["num_attention_heads"], shape["num_key_value_heads"]
        layer = h * (q + 2 * kv) * shape["head_dim"] + q * shape["head_dim"] * h + 3 * h * shape["intermediate_size"]
        target_flops = 2 * shape["num_hidden_layers"] * layer  # forward only, no lm_head needed
        draft = DraftShape(**target_shape(shape), draft_vocab_size=32000)
        draft_forward = 2 * draft_parameter_counts(draft)[0]  # fc, layer, 32k lm_head
        head = 2 * h * 32000  # the target head's draft-vocab rows, for the target distribution
        draft_step = 7 * 3 * draft_forward + head
        print(
            f"   {name}: target forward {target_flops / 1e9:.1f} GFLOP/token, draft TTT step (7 steps) "
            f"{draft_step / 1e9:.1f} GFLOP/token -> online costs {1 + target_flops / draft_step:.2f}x offline compute"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=400, help="conversations for the quality comparison")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--skip-quality", action="store_true", help="bytes and speed only (no vLLM)")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bytes_per_token(work)
        speed(work, epochs=2)
        if not options.skip_quality:
            quality(work, options.samples, options.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
