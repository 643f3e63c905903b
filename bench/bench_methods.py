"""Method benchmark: which draft variant and loss give the most vLLM acceptance per training budget.

On the trained tiny Qwen3 target (eagle3.testing.tiny_target(trained=True)), with ONE collected
data set (run_collect.py, answers regenerated greedily by the target) and the same training
budget (epochs, batch size, learning rate) for every method, it trains each method with each
seed (run_train.py), then measures on held-out prompts (another seed of the synthetic chats):

* vLLM's acceptance length at k=3 and k=5, at T=0 and at Qwen3's sampling (T=0.6, top-p 0.95,
  top-k 20) with both of vLLM's draft sampling methods (greedy, its default, and probabilistic);
  one vLLM process per setting evaluates every draft,
* in-process (hf) acceptance and the teacher-forced training-time estimate at k=3 (run_eval.py's
  three views on the same prompts),
* training wall time (run_train.py as a subprocess, the same for every method).

It prints a markdown table (mean and spread over seeds, ratios to the baseline) and writes all
numbers to OUT/results.json. Re-running resumes: collected data and trained drafts are reused.

    python bench/bench_methods.py --out bench_methods_out      # 8 trainings + 7 vLLM processes
    python bench/bench_methods.py --out OUT --methods baseline,eagle3.1 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name -> run_train.py flags on top of the shared budget
METHODS: dict[str, list[str]] = {
    # the recipe: EAGLE-3, soft cross-entropy (named explicitly: run_train.py's defaults are eagle3.1 + soft_ce)
    "baseline": ["--draft-variant", "eagle3", "--loss", "soft_ce"],
    # forward_kl has soft_ce's gradient (they differ by the target's entropy, a constant): it
    # trains the same draft up to float noise, so it is not in the default --methods.
    "forward_kl": ["--draft-variant", "eagle3", "--loss", "forward_kl"],
    "lk_lambda": ["--draft-variant", "eagle3", "--loss", "lk_lambda"],
    "eagle3.1": ["--draft-variant", "eagle3.1", "--loss", "soft_ce"],
    "eagle3.1+lk_lambda": ["--draft-variant", "eagle3.1", "--loss", "lk_lambda"],
    # the published LK weighting exp(-3 * alpha) (eta = 3; ours defaults to eta = 1)
    "eagle3.1+lk_eta3": ["--draft-variant", "eagle3.1", "--loss", "lk_lambda", "--lk-eta", "3"],
    # DFlash (arXiv 2602.06036): one non-causal pass drafts block_size - 1 tokens; the same store and
    # budget. Block 4 is trained for k=3, block 6 for k=5 (a block is served with k = block - 1).
    "dflash": ["--draft-type", "dflash", "--block-size", "4", "--num-draft-layers", "1"],
    "dflash-b6": ["--draft-type", "dflash", "--block-size", "6", "--num-draft-layers", "1"],
}
# EAGLE-3's own budget flags (TTT unroll, reduced vocabulary): DFlash has neither.
EAGLE3_BUDGET = ["--draft-vocab-size", "256", "--ttt-steps", "5"]


def method_flags(method: str) -> list[str]:
    flags = METHODS[method]
    return flags if "dflash" in flags else [*EAGLE3_BUDGET, *flags]


# How users serve Qwen3 above temperature 0 (its generation_config): T=0.6, top-p 0.95, top-k 20.
QWEN3_SAMPLING = {"temperature": 0.6, "top_p": 0.95, "top_k": 20}


def run(command: list[str], log: Path) -> float:
    """Run a command with its output in ``log``; return its wall time; stop the bench on failure."""
    started = time.perf_counter()
    with log.open("w") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(command)}\n  see {log}")
    return time.perf_counter() - started


def collect(out: Path, target: Path, conversations: int, max_new_tokens: int) -> Path:
    from eagle3.testing import synthetic_conversations, write_jsonl

    chats = write_jsonl(out / "chats.jsonl", synthetic_conversations(conversations, seed=0))
    data = out / "data"
    if not (data / "manifest.json").exists() or not any(data.glob("*.safetensors")):
        print(f"collecting {conversations} conversations -> {data}", flush=True)
        command = [sys.executable, "run_collect.py", "--model", str(target), "--dataset", str(chats)]
        command += ["--output-dir", str(data), "--batch-size", "32", "--max-new-tokens", str(max_new_tokens)]
        command += ["--enable-thinking", "false"]  # the tiny target answers with empty think blocks
        run(command + ["--quiet"], out / "collect.log")
    return data


def train(out: Path, target: Path, data: Path, method: str, seed: int, budget: list[str]) -> dict:
    run_dir = out / "runs" / f"{method}-seed{seed}"
    info_file = run_dir / "bench_train.json"
    if info_file.exists():
        return json.loads(info_file.read_text())
    command = [sys.executable, "run_train.py", "--data-dir", str(data), "--output-dir", str(run_dir)]
    command += ["--base-model", str(target), "--seed", str(seed), *budget, *method_flags(method)]
    print(f"training {method} (seed {seed})", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    seconds = run(command, run_dir / "train.log")
    metrics = json.loads((run_dir / "best_model" / "eagle3_eval.json").read_text())["metrics"]
    info = {"seconds": seconds, "eval_accept_len_k3": metrics.get("eval_accept_len_k3")}
    info_file.write_text(json.dumps(info))
    return info


def time_methods(target: Path, data: Path, methods: list[str], repeats: int = 12) -> dict[str, float]:
    """Median seconds of one training step (TTT forward + backward + AdamW) per method, on the same
    batches, methods interleaved (A B C A B C ...) so that a busy shared machine slows all alike.
    The bench's wall-clock training times are also printed, but on a shared machine they mostly
    measure the neighbours."""
    import torch

    from eagle3.data.store import HiddenStateStore
    from eagle3.target import TargetHead
    from eagle3.train.args import parse_args
    from eagle3.train.dataset import Eagle3Collator, StoreDataset
    from eagle3.train.loss import TargetProjector, count_items
    from eagle3.train.main import build_draft, check_data_against_target

    torch.set_num_threads(1)
    head = TargetHead.from_pretrained(target)
    dataset = StoreDataset(HiddenStateStore(data), max_length=2048)
    batches = [Eagle3Collator()([dataset[i] for i in range(start, start + 8)]) for start in (0, 8, 16)]
    parts = {}
    for method in methods:
        args = parse_args(
            ["--data-dir", str(data), "--base-model", str(target), "--use_cpu", "true"]
            + method_flags(method)  # parsed as run_train.py parses them (types, checks)
        )
        draft_ids = torch.arange(head.lm_head.shape[0] if args.draft_type == "dflash" else 256)
        draft = build_draft(args, check_data_against_target(args), head, draft_ids)
        optimizer = torch.optim.AdamW(draft.parameters(), lr=1e-4)
        parts[method] = (draft, optimizer, TargetProjector(head, draft_ids))
    times: dict[str, list[float]] = {method: [] for method in methods}
    for repeat in range(repeats):
        for method in methods:
            draft, optimizer, projector = parts[method]
            batch = batches[repeat % len(batches)]
            started = time.perf_counter()
            target = projector(batch["last_hidden_states"], batch["loss_mask"], batch["input_ids"])
            out = draft(
                input_ids=batch["input_ids"],
                aux_hidden_states=batch["aux_hidden_states"],
                target_probs=target.probs,
                target_pred=target.pred,
                target_valid=target.valid,
                target_assistant=target.assistant,
                target_greedy=target.greedy,
                num_items=count_items(batch["loss_mask"]),
            )
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            times[method].append(time.perf_counter() - started)
    return {method: statistics.median(values[2:]) for method, values in times.items()}  # first two: warm-up


def _layer_flops(hidden: int, inter: int, heads: int, kv_heads: int, head_dim: int, width: int | None = None) -> int:
    """Multiply-adds x 2 of one decoder layer for one token (projections and MLP; attention scores
    are left out: they depend on the context length and are the same order for both drafts)."""
    width = width or hidden
    return 2 * (width * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden + 3 * hidden * inter)


def draft_cost(config: dict, target: dict, k: int, acceptance_length: float) -> dict:
    """What one speculation round costs, per proposed token, relative to one target token (FLOPs),
    and how many sequential draft passes it needs (what decides latency on a GPU, where a forward
    pass of a few tokens costs about as much as one). Shapes from the configs; a round re-reads the
    ``acceptance_length`` tokens the target verified."""
    h, heads, kv = target["hidden_size"], target["num_attention_heads"], target["num_key_value_heads"]
    head_dim = target.get("head_dim") or h // heads
    target_token = target["num_hidden_layers"] * _layer_flops(h, target["intermediate_size"], heads, kv, head_dim)
    target_token += 2 * h * target["vocab_size"]
    inter, layers = config["intermediate_size"], config["num_hidden_layers"]
    if "dflash_config" in config:
        n_aux = len(config["dflash_config"]["target_layer_ids"])
        context = acceptance_length * (2 * n_aux * h * h + layers * 2 * 2 * kv * head_dim * h)
        block = (k + 1) * layers * _layer_flops(h, inter, heads, kv, head_dim) + k * 2 * h * config["vocab_size"]
        flops, passes = context + block, 1
    else:
        n_aux = len(config.get("eagle_aux_hidden_state_layer_ids") or [0, 0, 0])
        step = _layer_flops(h, inter, heads, kv, head_dim, width=2 * h) + 2 * h * config["draft_vocab_size"]
        step += (layers - 1) * _layer_flops(h, inter, heads, kv, head_dim)
        flops, passes = acceptance_length * 2 * n_aux * h * h + k * step, k
    return {"flops_per_proposed_token_vs_target": flops / k / target_token, "sequential_draft_passes": passes}


def heldout_prompts(out: Path, target: Path, count: int) -> tuple[Path, list[list[int]]]:
    from transformers import AutoTokenizer

    from eagle3.evaluate.run import load_prompts, parse_args
    from eagle3.testing import synthetic_conversations, write_jsonl

    path = write_jsonl(out / "heldout.jsonl", synthetic_conversations(count, seed=12345))
    args = parse_args(["--model", str(target), "--draft", "-", "--dataset", str(path), "--enable-thinking", "false"])
    return path, load_prompts(args, AutoTokenizer.from_pretrained(target))


def measure_vllm(
    out: Path,
    target: Path,
    drafts: dict[str, Path],
    prompts,
    k: int,
    max_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    draft_sample_method: str = "greedy",
) -> dict:
    tag = f"k{k}" if temperature == 0 else f"k{k}_t{temperature:g}"
    if temperature and (top_p, top_k) != (1.0, 0):
        tag += f"_p{top_p:g}_k{top_k}"
    if temperature and draft_sample_method != "greedy":
        tag += f"_{draft_sample_method}"
    result_file = out / f"vllm_{tag}.json"
    results = json.loads(result_file.read_text()) if result_file.exists() else {"drafts": {}}
    missing = [path for path in drafts.values() if str(path) not in results["drafts"]]
    if missing:
        print(f"vLLM {tag}: {len(missing)} draft(s) in one process", flush=True)
        (out / "prompts.json").write_text(json.dumps(prompts))
        command = [sys.executable, "-m", "eagle3.evaluate.vllm_bench", "--model", str(target)]
        command += [arg for path in missing for arg in ("--draft", str(path))]
        command += ["--num-speculative-tokens", str(k), "--max-tokens", str(max_tokens)]
        command += ["--temperature", str(temperature), "--top-p", str(top_p), "--top-k", str(top_k)]
        command += ["--draft-sample-method", draft_sample_method, "--max-model-len", "2048"]
        command += ["--prompts", str(out / "prompts.json"), "--json", str(out / f"vllm_{tag}.part.json")]
        run(command, out / f"vllm_{tag}.log")
        results["drafts"].update(json.loads((out / f"vllm_{tag}.part.json").read_text())["drafts"])
        result_file.write_text(json.dumps(results))
    return {name: results["drafts"][str(path)]["acceptance_length"] for name, path in drafts.items()}


def measure_hf(
    out: Path, target: Path, drafts: dict[str, Path], prompts_file: Path, k: int, max_tokens: int, extra=()
) -> dict:
    from eagle3.evaluate.run import evaluate, parse_args

    views = {}
    for name, path in drafts.items():
        report_file = out / "hf" / f"{name}{'_'.join(['', *extra]).replace('-', '')}.json"
        if not report_file.exists():
            report_file.parent.mkdir(parents=True, exist_ok=True)
            args = ["--model", str(target), "--draft", str(path), "--dataset", str(prompts_file), "-k", str(k)]
            args += ["--max-new-tokens", str(max_tokens), "--no-baseline", "--output", str(report_file), *extra]
            args += ["--enable-thinking", "false"]  # as collect() rendered the training data
            evaluate(parse_args(args))
        report = json.loads(report_file.read_text())
        views[name] = {
            "hf": report["acceptance_length"],
            "teacher_forced": report.get("teacher_forced_acceptance_length"),
        }
    return views


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and half the range (max - min) / 2 over seeds."""
    return statistics.fmean(values), (max(values) - min(values)) / 2


def table(methods: list[str], seeds: list[int], rows: dict, keys: dict[str, str]) -> str:
    """One row per method: mean ± half-range over seeds of each key, and its ratio to the baseline."""
    base = {key: spread([rows["baseline"][s][key] for s in seeds])[0] for key in keys}
    lines = ["| method | " + " | ".join(f"{label} | x baseline" for label in keys.values()) + " |"]
    lines.append("|---|" + "---|---|" * len(keys))
    for method in methods:
        cells = [method]
        for key in keys:
            mean, half = spread([rows[method][s][key] for s in seeds])
            fmt = "{:.0f} ± {:.0f}" if key == "seconds" else "{:.3f} ± {:.3f}"
            cells += [fmt.format(mean, half), f"{mean / base[key]:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_methods_out")
    parser.add_argument(
        "--methods",
        default="baseline,eagle3.1,eagle3.1+lk_lambda,dflash,dflash-b6",
        help=f"comma-separated, from {', '.join(METHODS)}",
    )
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--conversations", type=int, default=160, help="training conversations (synthetic, seed 0)")
    parser.add_argument("--collect-max-new-tokens", type=int, default=40, help="answer length at collection")
    parser.add_argument("--data-dir", help="reuse this collected store instead of collecting")
    parser.add_argument("--prompts", type=int, default=24, help="held-out prompts (synthetic, seed 12345)")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens generated per held-out prompt")
    parser.add_argument("--epochs", default="4")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or "baseline" not in methods:
        parser.error(f"--methods: unknown {unknown}; known {list(METHODS)}; baseline is required (ratios)")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)

    from eagle3.testing import tiny_target

    target = tiny_target(trained=True)
    data = (
        Path(args.data_dir) if args.data_dir else collect(out, target, args.conversations, args.collect_max_new_tokens)
    )
    # One budget for all (the tests' short training): same data, epochs, batch, lr, TTT steps.
    budget = ["--epochs", args.epochs, "--batch-size", "8", "--lr", "3e-3"]
    budget += ["--eval-ratio", "0.1", "--save_total_limit", "1", "--report_to", "none"]
    budget += ["--disable_tqdm", "true", "--dataloader_num_workers", "0"]
    # Seed-major order: a run cut short still has every method at the first seed.
    trained = {(m, s): train(out, target, data, m, s, budget) for s in seeds for m in methods}
    drafts = {f"{m}-seed{s}": out / "runs" / f"{m}-seed{s}" / "best_model" for m in methods for s in seeds}

    prompts_file, prompts = heldout_prompts(out, target, args.prompts)
    vllm = {k: measure_vllm(out, target, drafts, prompts, k, args.max_tokens) for k in (3, 5)}
    sampled = {
        (k, mode): measure_vllm(
            out, target, drafts, prompts, k, args.max_tokens, **QWEN3_SAMPLING, draft_sample_method=mode
        )
        for k in (3, 5)
        for mode in ("greedy", "probabilistic")
    }
    # The in-process views cost a hf speculation per draft: first seed only.
    hf = measure_hf(
        out,
        target,
        {f"{m}-seed{seeds[0]}": drafts[f"{m}-seed{seeds[0]}"] for m in methods},
        prompts_file,
        3,
        args.max_tokens,
    )
    rows: dict = {m: {} for m in methods}
    for m in methods:
        for s in seeds:
            name = f"{m}-seed{s}"
            rows[m][s] = {
                "vllm_k3": vllm[3][name],
                "vllm_k5": vllm[5][name],
                **{f"t06_{mode}_k{k}": sampled[(k, mode)][name] for k, mode in sampled},
                "hf_k3": hf[name]["hf"] if name in hf else None,
                "teacher_forced_k3": hf[name]["teacher_forced"] if name in hf else None,
                "train_eval_accept_len_k3": trained[(m, s)]["eval_accept_len_k3"],
                "seconds": trained[(m, s)]["seconds"],
            }
    print(
        f"\n{args.prompts} held-out prompts, seeds {seeds}, {args.conversations} conversations, "
        f"{args.epochs} epochs; vLLM acceptance length, mean ± half-range over seeds\n"
    )
    print("T=0:\n" + table(methods, seeds, rows, {"vllm_k3": "k=3", "vllm_k5": "k=5"}))
    labels = {f"t06_{mode}_k{k}": f"k={k}, {mode} draft" for k, mode in sorted(sampled, key=lambda km: (km[1], km[0]))}
    print("\nT=0.6, top-p 0.95, top-k 20 (Qwen3's sampling):\n" + table(methods, seeds, rows, labels))
    for method in methods:
        first = rows[method][seeds[0]]
        print(
            f"  {method} seed {seeds[0]}: hf AL k=3 {first['hf_k3']:.3f}, teacher-forced {first['teacher_forced_k3']:.3f}"
        )
    target_config = json.loads((target / "config.json").read_text())
    print("\ndraft cost per round at k=3 (FLOPs per proposed token / target FLOPs per token; sequential draft passes):")
    costs = {}
    for method in methods:
        config = json.loads((drafts[f"{method}-seed{seeds[0]}"] / "config.json").read_text())
        costs[method] = draft_cost(config, target_config, 3, rows[method][seeds[0]]["vllm_k3"])
        print(
            f"  {method:<22} {costs[method]['flops_per_proposed_token_vs_target']:.3f}  "
            f"{costs[method]['sequential_draft_passes']} pass(es); tokens per target step {rows[method][seeds[0]]['vllm_k3']:.3f}"
        )
    step_seconds = time_methods(target, data, methods)
    (out / "results.json").write_text(
        json.dumps(
            {"settings": vars(args), "rows": rows, "step_seconds": step_seconds, "draft_cost_k3": costs}, indent=1
        )
    )
    print("\ntraining step time (median, methods interleaved, same batches):")
    for method, seconds in step_seconds.items():
        print(f"  {method:<22} {seconds * 1000:7.1f} ms  x{seconds / step_seconds['baseline']:.3f}")
    print(f"\nall numbers: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
