"""Benchmarks of the collection (issue 3).

1. Bytes per stored token against the floor (n_aux + 1) * H * 2 + 4 (int32 id) + 1 (mask):
   a real ``run_collect.py`` run (bf16, hf backend), read back from manifest.json.
2. hf backend capture throughput against a bare forward of the base model over the SAME
   padded batches in the same process, interleaved and repeated (median), so CPU noise from
   other processes hits both sides alike. Aim: capture >= 0.85 of the bare forward.

    python bench/bench_collect.py [--model PATH] [--hidden-size 512] [--samples 64] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from eagle3.collect.cli import main as collect_main
from eagle3.collect.hf import HfBackend
from eagle3.config import default_target_layers
from eagle3.data.store import HiddenStateStore, read_manifest
from eagle3.data.template import ChatRenderer
from eagle3.target import load_target_config
from eagle3.testing import synthetic_conversations, tiny_target, write_jsonl


def bytes_per_token(model: str, data: Path) -> dict:
    with tempfile.TemporaryDirectory() as out:
        collect_main(["--model", model, "--dataset", str(data), "--output-dir", out, "--no-regenerate", "--quiet"])
        manifest = read_manifest(out)
        assert len(HiddenStateStore(out)) == manifest["num_samples"]
    n_aux, hidden = len(manifest["layers"]), manifest["hidden_size"]
    floor = (n_aux + 1) * hidden * 2 + 4 + 1
    measured = manifest["num_bytes"] / manifest["num_tokens"]
    return {"tokens": manifest["num_tokens"], "bytes_per_token": measured, "floor": floor, "ratio": measured / floor}


def capture_vs_forward(model: str, conversations: list[dict], batch_size: int, repeats: int) -> dict:
    renderer = ChatRenderer(AutoTokenizer.from_pretrained(model))
    layers = default_target_layers(load_target_config(model).num_hidden_layers)
    backend = HfBackend(model, renderer, layers=layers, batch_size=batch_size, regenerate=False)
    sequences = [renderer.render(c["messages"]).input_ids for c in conversations]
    batches = [sequences[i : i + batch_size] for i in range(0, len(sequences), batch_size)]
    tokens = sum(len(s) for s in sequences)

    @torch.inference_mode()
    def bare(batch: list[list[int]]) -> None:
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), backend.pad_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        backend.model.model(input_ids=ids.to(backend.device), attention_mask=mask.to(backend.device), use_cache=False)

    def capture(batch: list[list[int]]) -> None:
        backend.capture(batch)  # states of every sample, on the CPU, in the stored dtype (bf16)

    def timed(run, batch) -> float:
        if backend.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run(batch)
        if backend.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    bare(batches[0]), capture(batches[0])  # warm-up
    # Alternate per batch (not per pass), so that load from other processes hits both sides
    # alike; the ratio is the median over repeats of (bare time / capture time) of a full pass.
    ratios, bare_total, capture_total = [], [], []
    for _ in range(repeats):
        b = c = 0.0
        for batch in batches:
            b += timed(bare, batch)
            c += timed(capture, batch)
        ratios.append(b / c)
        bare_total.append(b)
        capture_total.append(c)
    return {
        "tokens": tokens,
        "bare_tokens_per_s": tokens / statistics.median(bare_total),
        "capture_tokens_per_s": tokens / statistics.median(capture_total),
        "ratio": statistics.median(ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="target folder (default: a cached tiny random Qwen3)")
    parser.add_argument(
        "--hidden-size", type=int, default=128, help="hidden size of the tiny target when --model is left out"
    )
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sizes = {} if args.hidden_size == 128 else {"hidden_size": args.hidden_size}  # 128: the tests' cached target
    model = args.model or str(tiny_target(trained=False, **sizes))
    with tempfile.TemporaryDirectory() as tmp:
        conversations = synthetic_conversations(args.samples, seed=1, turns=2)
        size = bytes_per_token(model, write_jsonl(Path(tmp) / "chats.jsonl", conversations))
        speed = capture_vs_forward(model, conversations, args.batch_size, args.repeats)
    print(f"model {model} (threads: {torch.get_num_threads()})")
    print(
        f"storage: {size['bytes_per_token']:.1f} bytes/token over {size['tokens']} tokens; floor {size['floor']} "
        f"= (n_aux+1)*H*2 + 4 + 1 -> {size['ratio']:.3f}x the floor"
    )
    print(
        f"throughput: capture {speed['capture_tokens_per_s']:.0f} tok/s vs bare forward {speed['bare_tokens_per_s']:.0f} "
        f"tok/s over the same {speed['tokens']} tokens -> ratio {speed['ratio']:.3f} (aim >= 0.85)"
    )


if __name__ == "__main__":
    main()
