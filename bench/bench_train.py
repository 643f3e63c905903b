"""Training benchmarks (CPU is fine; random tensors, no download).

1. Throughput: Eagle3Trainer tokens/s against a minimal hand-written loop (same draft, same
   TTT loss, same optimizer and batches) in the same process.
2. Peak memory of one training step at Qwen3-1.7B's shapes (H=2048, vocab 151936, draft vocab
   32000, 7 TTT steps) for: this loss, this loss with --head-checkpointing, and the naive loss
   that materialises the target's fp32 full-vocab logits for every step.

    python bench/bench_train.py --throughput --memory             # memory at T=2048 (--mem-seq-len)
    python bench/bench_train.py --memory-model   # eagle3.train.memory_model vs measured, 1.7B/4B drafts
    python bench/bench_train.py --memory-model-dflash   # the same for a DFlash draft at Qwen3-1.7B's shape
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time

import psutil
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import Qwen3Config

from eagle3.config import Eagle3Qwen3Config
from eagle3.memory import PeakRSS
from eagle3.target import TargetHead, final_norm
from eagle3.testing import QWEN3_SHAPES
from eagle3.train.args import Eagle3TrainingArguments
from eagle3.train.dataset import Eagle3Collator
from eagle3.train.loss import TargetProjector, ttt_loss
from eagle3.train.memory_model import estimate_peak_memory, target_shape
from eagle3.train.model import Eagle3DraftForTraining
from eagle3.train.trainer import Eagle3Trainer


def make_parts(hidden, vocab, draft_vocab, steps, heads, kv_heads, head_dim, intermediate, seed=0, variant="eagle3"):
    torch.manual_seed(seed)
    target_config = Qwen3Config(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        vocab_size=vocab,
        num_hidden_layers=28,
        max_position_embeddings=40960,
    )
    config = Eagle3Qwen3Config.from_target_config(
        target_config, target_layers=[1, 13, 24], draft_vocab_size=draft_vocab, draft_variant=variant
    )
    draft = Eagle3DraftForTraining(config).float()
    draft.ttt_steps, draft.ttt_decay = steps, 0.8
    head = TargetHead(
        config=target_config,
        embed_tokens=torch.randn(vocab, hidden) * 0.02,
        norm=torch.ones(hidden),
        lm_head=torch.randn(vocab, hidden) * 0.02,
    )
    draft_ids = torch.sort(torch.randperm(vocab)[:draft_vocab]).values if draft_vocab < vocab else torch.arange(vocab)
    draft.set_draft_vocab(draft_ids)
    draft.load_target_embeddings(head.embed_tokens)
    return draft, head, draft_ids


class RandomSamples(Dataset):
    def __init__(self, n, length, hidden, vocab, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.items = [
            {
                "input_ids": torch.randint(0, vocab, (length,), generator=g),
                "loss_mask": torch.ones(length, dtype=torch.bool),
                "aux_hidden_states": torch.randn(length, 3 * hidden, generator=g).bfloat16(),
                "last_hidden_states": torch.randn(length, hidden, generator=g).bfloat16(),
            }
            for _ in range(n)
        ]
        self.lengths = [length] * n

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def throughput(args) -> dict:
    shapes = dict(
        hidden=256, vocab=4096, draft_vocab=1024, steps=args.steps, heads=4, kv_heads=2, head_dim=64, intermediate=768
    )
    data = RandomSamples(args.batches * args.batch_size, args.seq_len, shapes["hidden"], shapes["vocab"])
    collate = Eagle3Collator()
    tokens = args.batches * args.batch_size * args.seq_len

    def hand_loop() -> float:
        """Same model, loss, AdamW, clipping and batches as the Trainer; nothing else."""
        draft, head, ids = make_parts(**shapes)
        projector = TargetProjector(head, ids)
        optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
        draft.train()
        start = time.perf_counter()
        for b in range(args.batches):
            batch = collate([data[b * args.batch_size + j] for j in range(args.batch_size)])
            target = projector(batch["last_hidden_states"], batch["loss_mask"])
            loss, _ = ttt_loss(draft, batch["input_ids"], batch["aux_hidden_states"], target, args.steps, 0.8)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(draft.parameters(), 0.5)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    hand_loop()  # warm-up (allocator, kernels) so neither side pays first-run costs
    loop_times = [hand_loop()]

    draft, head, ids = make_parts(**shapes)
    with tempfile.TemporaryDirectory() as out:
        targs = Eagle3TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=args.batch_size,
            max_steps=args.batches,
            report_to=[],
            save_strategy="no",
            eval_strategy="no",
            logging_steps=10**6,
            disable_tqdm=True,
            ttt_steps=args.steps,
            dataloader_num_workers=0,
            train_sampling_strategy="sequential",
            warmup_steps=0,
            lr_scheduler_type="constant",
            dataloader_pin_memory=False,
        )
        trainer = Eagle3Trainer(
            model=draft, args=targs, train_dataset=data, data_collator=collate, target=TargetProjector(head, ids)
        )
        start = time.perf_counter()
        trainer.train()
        trainer_s = time.perf_counter() - start
    loop_times.append(hand_loop())  # before and after: the CPU is shared, take the faster
    loop_s = min(loop_times)
    return {
        "tokens": tokens,
        "loop_tokens_per_s": tokens / loop_s,
        "trainer_tokens_per_s": tokens / trainer_s,
        "ratio": loop_s / trainer_s,
        "shapes": shapes,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
    }


def naive_loss(draft, head, draft_ids, input_ids, aux, last, loss_mask, steps, decay):
    """What OOMs in the wild: fp32 target logits over the full vocab for every TTT step, and a
    full-vocab draft-target comparison; the draft side is the same unroll."""
    hidden_t = final_norm(last, head.norm, 1e-6)
    target_full = [(hidden_t @ head.lm_head.T)[:, 1 + i :].float() for i in range(steps)]  # per step, fp32
    batch, length = input_ids.shape
    padded = F.pad(input_ids, (0, steps + 1))
    embeds = draft.embed_tokens(padded)
    positions = torch.arange(length).expand(batch, -1)
    hidden = draft.combine_hidden_states(aux)
    cache = draft.new_cache("ttt")
    loss = 0.0
    for i in range(steps):
        normed, hidden = draft.draft_step(hidden, embeds[:, 1 + i : 1 + i + length], positions + i, cache)
        n = length - 1 - i
        full_probs = target_full[i].softmax(-1)
        probs = full_probs[..., draft_ids]
        probs = probs / probs.sum(-1, keepdim=True)
        valid = torch.isin(full_probs.argmax(-1), draft_ids) & loss_mask[:, 1 + i :]
        logp = draft.compute_logits(normed[:, :n]).float().log_softmax(-1)
        loss = loss + decay**i * (-(probs * logp).sum(-1) * valid).sum() / valid.sum().clamp(min=1)
    return loss


MEMORY_KINDS = ("ours", "ours_head_checkpointing", "naive")


def memory_step(kind: str, length: int) -> dict:
    """Peak memory of ONE training step of ``kind`` in this (fresh) process."""
    shapes = dict(
        hidden=2048, vocab=151936, draft_vocab=32000, steps=7, heads=16, kv_heads=8, head_dim=128, intermediate=6144
    )
    draft, head, ids = make_parts(**shapes)
    projector = TargetProjector(head, ids)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, shapes["vocab"], (1, length), generator=g)
    aux = torch.randn(1, length, 3 * 2048, generator=g).bfloat16()
    last = torch.randn(1, length, 2048, generator=g).bfloat16()
    mask = torch.ones(1, length, dtype=torch.bool)
    start = time.perf_counter()
    with PeakRSS() as peak:
        if kind == "naive":
            loss = naive_loss(draft, head, ids, input_ids, aux, last, mask, 7, 0.8)
        else:
            draft.head_checkpointing = kind == "ours_head_checkpointing"
            loss, _ = ttt_loss(draft, input_ids, aux, projector(last, mask), 7, 0.8, draft.head_checkpointing)
        loss.backward()
    return {"peak_gib_above_baseline": round(peak.delta_gib, 3), "seconds": round(time.perf_counter() - start, 2)}


def memory(args) -> dict:
    """Each kind in its own process, so one that runs out of memory is reported, not fatal."""
    results: dict = {"seq_len": args.mem_seq_len, "shapes": "Qwen3-1.7B: H=2048, vocab 151936, draft 32000, 7 steps"}
    for kind in MEMORY_KINDS:
        child = subprocess.run(
            [sys.executable, __file__, "--memory-kind", kind, "--mem-seq-len", str(args.mem_seq_len)],
            capture_output=True,
            text=True,
        )
        if child.returncode == 0:
            results[kind] = json.loads(child.stdout.strip().splitlines()[-1])
        elif child.returncode in (-9, 137):
            results[kind] = {"killed": f"out of memory (> {psutil.virtual_memory().total / 2**30:.0f} GiB machine)"}
        else:
            results[kind] = {"failed": child.stderr[-500:]}
        print(kind, results[kind], flush=True)
    ours, naive = results["ours"].get("peak_gib_above_baseline"), results["naive"].get("peak_gib_above_baseline")
    if ours and naive:
        results["ours_over_naive"] = round(ours / naive, 3)
    return results


# Draft shapes of Qwen3 targets (eagle3.testing.QWEN3_SHAPES) for the memory-model check.
MODEL_SHAPES = {
    name: dict(
        hidden=shape["hidden_size"],
        vocab=shape["vocab_size"],
        heads=shape["num_attention_heads"],
        kv_heads=shape["num_key_value_heads"],
        head_dim=shape["head_dim"],
        intermediate=shape["intermediate_size"],
    )
    for name, shape in QWEN3_SHAPES.items()
}
# Two lengths of one shape (the TTT attention's [T, T] term grows with T) and a second shape.
MODEL_CHECKS = (("qwen3-1.7b", 512), ("qwen3-1.7b", 2048), ("qwen3-4b", 1024))


def model_estimate(shape: str, length: int, steps: int = 7, draft_vocab: int = 32000):
    return estimate_peak_memory(
        **target_shape(QWEN3_SHAPES[shape]),
        draft_vocab_size=draft_vocab,
        tokens_per_batch=length,
        max_length=length,
        ttt_steps=steps,
        loss="lk_lambda",  # the loss that keeps more (the draft's probabilities too), as model_step trains
        target_dtype_bytes=2,
    )


def model_step(shape: str, length: int) -> dict:
    """Measured peak of two full training steps (forward, backward, AdamW step) in this fresh
    process, above the resident memory before anything was built: what the estimate covers."""
    dims = MODEL_SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, dims["vocab"], (1, length), generator=g)
    aux = torch.randn(1, length, 3 * dims["hidden"], generator=g).bfloat16()
    last = torch.randn(1, length, dims["hidden"], generator=g).bfloat16()
    mask = torch.ones(1, length, dtype=torch.bool)
    gc.collect()
    base = psutil.Process().memory_info().rss
    draft, head, ids = make_parts(draft_vocab=32000, steps=7, variant="eagle3.1", **dims)  # run_train.py's default
    # As run_train.py holds them: the target's head in its checkpoint dtype (bf16), the draft's
    # copy of the embedding in fp32; the TargetHead itself is dropped after building.
    head.lm_head, head.embed_tokens = head.lm_head.bfloat16(), None
    projector = TargetProjector(head, ids)
    del head
    gc.collect()
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-4)
    with PeakRSS() as peak:  # the peak of training (building has its own, smaller, transient)
        for _ in range(2):
            loss, _ = ttt_loss(draft, input_ids, aux, projector(last, mask), 7, 0.8, loss_type="lk_lambda")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del loss
    return {"measured_gib": round((peak.peak - base) / 2**30, 3)}


# A DFlash draft at Qwen3-1.7B's shape: 2 layers (5 in the published drafts: the layers are a small
# part of the peak, the blocks' full-vocabulary heads are most of it), blocks of 16, two anchor counts.
DFLASH_CHECKS = ((512, 32), (512, 96))
DFLASH_LAYERS = 2


def dflash_estimate(length: int, anchors: int):
    from eagle3.train.memory_model import estimate_dflash_peak_memory

    return estimate_dflash_peak_memory(
        **target_shape(QWEN3_SHAPES["qwen3-1.7b"]),
        tokens_per_batch=length,
        max_length=length,
        num_anchors=anchors,
        block_size=16,
        num_aux=5,
        num_draft_layers=DFLASH_LAYERS,
        target_dtype_bytes=2,
    )


def dflash_model_step(length: int, anchors: int) -> dict:
    """Measured peak of two DFlash training steps (every position an answer token, so every block
    is drawn), above the resident memory before anything was built."""
    from eagle3.dflash import DFlashQwen3Config
    from eagle3.train.model import DFlashDraftForTraining

    shape = QWEN3_SHAPES["qwen3-1.7b"]
    target_config = Qwen3Config(**shape)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, shape["vocab_size"], (1, length), generator=g)
    aux = torch.randn(1, length, 5 * shape["hidden_size"], generator=g).bfloat16()
    last = torch.randn(1, length, shape["hidden_size"], generator=g).bfloat16()
    mask = torch.ones(1, length, dtype=torch.bool)
    gc.collect()
    base = psutil.Process().memory_info().rss
    config = DFlashQwen3Config.from_target_config(
        target_config, [1, 7, 13, 19, 25], mask_token_id=151669, num_draft_layers=DFLASH_LAYERS, block_size=16
    )
    draft = DFlashDraftForTraining(config).float()
    draft.num_anchors, draft.loss_decay, draft.loss_type, draft.lk_eta = anchors, 7.0, "soft_ce", 1.0
    lm_head = torch.randn(shape["vocab_size"], shape["hidden_size"], generator=g).bfloat16()
    draft.load_target_embeddings(lm_head, lm_head)
    head = TargetHead(config=target_config, embed_tokens=None, norm=torch.ones(shape["hidden_size"]), lm_head=lm_head)
    projector = TargetProjector(head, torch.arange(shape["vocab_size"]))
    del head
    gc.collect()
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-4)
    with PeakRSS() as peak:
        for _ in range(2):
            target = projector(last, mask, input_ids)
            out = draft(input_ids, aux, target.probs, target.pred, target.valid, target.assistant, target.greedy)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del out, target
    return {"measured_gib": round((peak.peak - base) / 2**30, 3)}


def _estimate_vs_child(child_flags: list[str], estimate, entry: dict) -> dict:
    """Run this script with ``child_flags`` (a measuring child process) and put its measured peak
    next to the estimate in ``entry``."""
    child = subprocess.run([sys.executable, __file__, *child_flags], capture_output=True, text=True)
    entry["estimated_gib"] = round(estimate.total / 2**30, 3)
    if child.returncode != 0:
        entry["failed"] = child.stderr[-500:]
    else:
        entry.update(json.loads(child.stdout.strip().splitlines()[-1]))
        entry["estimate_over_measured"] = round(entry["estimated_gib"] / entry["measured_gib"], 3)
        entry["within_15_percent"] = abs(entry["estimate_over_measured"] - 1) <= 0.15
    print(entry, flush=True)
    return entry


def dflash_memory_model_check(args) -> dict:
    results = {"measured_with": "process peak RSS above the pre-build baseline (psutil, 5 ms sampling)"}
    for length, anchors in DFLASH_CHECKS:
        flags = ["--dflash-step", str(anchors), "--mem-seq-len", str(length)]
        entry = {"seq_len": length, "anchors": anchors}
        results[f"dflash@{length}x{anchors}"] = _estimate_vs_child(flags, dflash_estimate(length, anchors), entry)
    return results


def memory_model_check(args) -> dict:
    """Estimate vs measured peak at two model shapes, each measured in its own process."""
    results = {"measured_with": "process peak RSS above the pre-build baseline (psutil, 5 ms sampling)"}
    for shape, length in MODEL_CHECKS:
        flags = ["--model-step", shape, "--mem-seq-len", str(length)]
        results[f"{shape}@{length}"] = _estimate_vs_child(flags, model_estimate(shape, length), {"seq_len": length})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--throughput", action="store_true")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--mem-seq-len", type=int, default=2048)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--memory-model", action="store_true", help="estimated vs measured peak at two shapes")
    parser.add_argument("--memory-kind", choices=MEMORY_KINDS, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--model-step", choices=list(MODEL_SHAPES), help=argparse.SUPPRESS)  # child process
    parser.add_argument("--memory-model-dflash", action="store_true", help="the same for a DFlash draft")
    parser.add_argument("--dflash-step", type=int, help=argparse.SUPPRESS)  # child process: anchors
    args = parser.parse_args()
    if args.memory_kind:
        print(json.dumps(memory_step(args.memory_kind, args.mem_seq_len)))
        return
    if args.model_step:
        print(json.dumps(model_step(args.model_step, args.mem_seq_len)))
        return
    if args.dflash_step:
        print(json.dumps(dflash_model_step(args.mem_seq_len, args.dflash_step)))
        return
    results = {}
    if args.throughput:
        results["throughput"] = throughput(args)
        print(json.dumps(results["throughput"], indent=1), flush=True)
    if args.memory:
        results["memory"] = memory(args)
        print(json.dumps(results["memory"], indent=1), flush=True)
    if args.memory_model:
        results["memory_model"] = memory_model_check(args)
        print(json.dumps(results["memory_model"], indent=1), flush=True)
    if args.memory_model_dflash:
        results["memory_model_dflash"] = dflash_memory_model_check(args)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
