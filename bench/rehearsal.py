"""Full-shape rehearsal: the documented command lines on a random-weight Qwen3-1.7B-shaped target.

Everything so far is proven on a 6-layer toy; users run Qwen3-1.7B and up. This drives the
exact commands of README.md / docs/ on a target with Qwen3-1.7B's config (28 layers, hidden
2048, 16/8 heads, head_dim 128, vocab 151936, rope theta 1e6, 40960 positions), saved sharded
with an index as the Hub does, in the chosen lm_head layout (tied without a head tensor by
default: Qwen3-4B's, the one that used to break training). The tiny tokenizer serves it.

Stages, each a subprocess whose wall time and peak memory (resident set of its whole process
tree, sampled every 0.2 s; pages shared between processes are counted once per process) are
printed:

1. collect (hf)            python run_collect.py --model T --dataset chats.jsonl --output-dir D ...
2. collect (vLLM server)   run_collect.py --print-server-command ..., that server, then
                           run_collect.py --backend vllm --server-url ...
3. train                   python run_train.py --data-dir D --model T --max-tokens-per-batch ... (default
                           32k draft vocab, 7 TTT steps, max length 2048) for a few steps
4. check                   eagle3 check best_model --model T
5. vLLM eagle3, k=3        python run_eval.py --backend vllm -k 3 (lossless vs target-only or exit 1)

    python bench/rehearsal.py                    # or: make rehearsal
    python bench/rehearsal.py --layout untied --work-dir /tmp/rehearsal --keep

The target (~3.4 GB bf16) is cached in ~/.cache/eagle3-qwen3 after the first build. CPU:
about 20-30 minutes on 2 cores and 24 GiB; on a GPU machine the same commands use the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


class TreePeak:
    """Peak summed RSS of a process and its descendants, sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval, self.peak, self.running = pid, interval, 0, True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            try:
                root = psutil.Process(self.pid)
                total = 0
                for process in [root, *root.children(recursive=True)]:
                    try:
                        total += process.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            time.sleep(self.interval)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return self.peak / 2**30


class Rehearsal:
    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.results: list[dict] = []
        self.env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

    def run(self, stage: str, command: list[str], extra_peak: TreePeak | None = None, timeout: float = 1800) -> str:
        """Run one documented command line; record its wall time and peak memory; stop on failure."""
        printable = " ".join(shlex.quote(str(part)) for part in command)
        print(f"\n=== {stage}\n$ {printable}", flush=True)
        log_path = self.work_dir / f"{stage.split()[0]}-{len(self.results)}.log"
        start = time.perf_counter()
        with open(log_path, "w") as log:
            process = subprocess.Popen([str(c) for c in command], stdout=log, stderr=subprocess.STDOUT, env=self.env)
            peak = TreePeak(process.pid)
            try:
                code = process.wait(timeout=timeout)
            finally:
                gib = peak.stop()
        seconds = time.perf_counter() - start
        entry = {"stage": stage, "seconds": round(seconds, 1), "peak_gib": round(gib, 2), "exit": code}
        if extra_peak is not None:
            entry["server_peak_gib"] = round(extra_peak.peak / 2**30, 2)
        self.results.append(entry)
        output = log_path.read_text()
        print("\n".join(output.rstrip().splitlines()[-8:]))
        print(f"--- {stage}: {seconds:.0f} s, peak {gib:.2f} GiB, exit {code}", flush=True)
        if code != 0:
            raise SystemExit(f"rehearsal failed at '{stage}' (log: {log_path})")
        return output

    def table(self) -> str:
        lines = ["| stage | wall time | peak memory (process tree RSS) |", "|---|---|---|"]
        for entry in self.results:
            memory = f"{entry['peak_gib']:.2f} GiB"
            if "server_peak_gib" in entry:
                memory += f" (+ vLLM server {entry['server_peak_gib']:.2f} GiB)"
            lines.append(f"| {entry['stage']} | {entry['seconds']:.0f} s | {memory} |")
        return "\n".join(lines)


def _write_data(work_dir: Path, long_tokens: int) -> tuple[Path, Path]:
    """Chats for collection (short ones plus one near --max-length) and held-out prompts for eval."""
    from eagle3.testing import _WORDS, synthetic_conversations, write_jsonl

    chats = synthetic_conversations(6, seed=1)
    # One long user turn so training sees a sample close to the documented max length.
    long_text = " ".join(_WORDS[i % len(_WORDS)] for i in range(long_tokens))
    chats.append({"messages": [{"role": "user", "content": "Repeat after me: " + long_text}]})
    prompts = synthetic_conversations(2, seed=99)
    return write_jsonl(work_dir / "chats.jsonl", chats), write_jsonl(work_dir / "prompts.jsonl", prompts)


def vllm_cannot_run(target: Path) -> str | None:
    """Why this vLLM install cannot load the target's architecture here, or None."""
    from eagle3.target import load_target_config, target_family

    model_type = target_family(load_target_config(target)).name
    if model_type.startswith(("qwen3_5", "qwen3_vl")):
        try:
            import torchvision  # noqa: F401
        except ImportError:
            return (
                f"vLLM's {model_type} model imports transformers' Qwen2-VL image processor, which needs a "
                "torchvision built for this torch (see docs/TRAIN.md, 'Targets beyond dense Qwen3')"
            )
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shape",
        default="qwen3-1.7b",
        help="a key of eagle3.testing.QWEN3_SHAPES, or of FAMILY_SHAPES (qwen3.5-4b: Qwen3.5-4B's published "
        "text config in its nested multimodal layout; qwen3-30b-a3b-4l: Qwen3-30B-A3B's widths, all experts, 4 layers)",
    )
    parser.add_argument("--layout", default="tied", choices=["tied", "tied-head-copy", "untied"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--work-dir", help="default: a temporary folder, removed at the end unless --keep")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--max-new-tokens", type=int, default=12, help="answer tokens per chat (CPU is slow)")
    parser.add_argument("--long-tokens", type=int, default=1900, help="words in the one long chat")
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--max-tokens-per-batch", type=int, default=2048)
    parser.add_argument("--skip-vllm", action="store_true", help="hf stages only (no vLLM installed)")
    parser.add_argument("--json", help="write the stage table as JSON here")
    args = parser.parse_args()

    from eagle3.testing import FAMILY_SHAPES, family_shape_target, free_port, qwen3_target, vllm_server

    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="eagle3-rehearsal-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    rehearsal = Rehearsal(work_dir)
    python = sys.executable
    start = time.perf_counter()
    print(f"building / reusing the {args.shape} target ({args.layout}, {args.dtype}) ...", flush=True)
    if args.shape in FAMILY_SHAPES:
        target = family_shape_target(args.shape, dtype=args.dtype)
        args.layout = "as published"
        skip = vllm_cannot_run(target)
        if skip and not args.skip_vllm:
            print(f"vLLM stages skipped: {skip}", flush=True)
            args.skip_vllm = True
    else:
        target = qwen3_target(args.shape, args.layout, dtype=args.dtype)
    rehearsal.results.append({"stage": "target ready", "seconds": round(time.perf_counter() - start, 1)})
    rehearsal.results[-1]["peak_gib"] = 0.0
    chats, prompts = _write_data(work_dir, args.long_tokens)
    collect = [python, REPO / "run_collect.py", "--model", target, "--dataset", chats]
    collect += ["--max-new-tokens", args.max_new_tokens, "--max-length", 2048]
    try:
        rehearsal.run(
            "collect (hf)", [*collect, "--output-dir", work_dir / "data_hf", "--batch-size", 4, "--dtype", args.dtype]
        )
        if not args.skip_vllm:
            port = str(free_port())
            import torch

            # On the CPU vLLM would torch.compile the model first (many minutes on 2 cores).
            eager = "" if torch.cuda.is_available() else " --enforce-eager"
            hidden_dir = work_dir / "hidden-states"
            printed = rehearsal.run(
                "print-server-command",
                [*collect, "--print-server-command", "--port", port, "--host", "127.0.0.1"]
                + ["--hidden-states-dir", hidden_dir, f"--server-args=--max-model-len 4096{eager}"],
            )
            command = shlex.split(printed.strip().splitlines()[-1])
            with vllm_server(command, work_dir / "vllm-server.log", timeout=900, env=rehearsal.env) as server:
                server_peak = TreePeak(server["process"].pid)
                rehearsal.run(
                    "collect (vLLM server)",
                    [*collect, "--output-dir", work_dir / "data_vllm", "--backend", "vllm"]
                    + ["--server-url", server["url"], "--hidden-states-dir", hidden_dir],
                    extra_peak=server_peak,
                )
                server_peak.stop()
        output_dir = work_dir / "draft"
        rehearsal.run(
            "train",
            [python, REPO / "run_train.py", "--data-dir", work_dir / "data_hf", "--model", target]
            + ["--output-dir", output_dir, "--max-tokens-per-batch", args.max_tokens_per_batch]
            + ["--max_steps", args.train_steps, "--eval-ratio", "0", "--save_strategy", "no"]
            + ["--report_to", "none", "--logging_steps", "1", "--dataloader_num_workers", "0"],
        )
        best = output_dir / "best_model"
        rehearsal.run("eagle3 check", [python, "-m", "eagle3.cli", "check", best, "--model", target])
        if not args.skip_vllm:
            report = work_dir / "eval.json"
            rehearsal.run(
                "vLLM eagle3 k=3 vs target-only",
                [python, REPO / "run_eval.py", "--model", target, "--draft", best, "--dataset", prompts]
                + ["--backend", "vllm", "-k", 3, "--max-new-tokens", 16, "--output", report]
                # Random weights give near-uniform logits: in bf16, batched verification and
                # one-token decoding round differently and flip argmax near-ties, so the
                # lossless check of the algorithm runs in fp32 (bf16 serving: make demo / tests).
                + ["--dtype", "fp32"],
            )
            data = json.loads(report.read_text())
            print(f"lossless: {data['lossless']}, acceptance length {data['acceptance_length']:.2f} (random draft)")
    finally:
        total = time.perf_counter() - start
        print(f"\n## rehearsal: {args.shape} ({args.layout}, {args.dtype}), {total / 60:.1f} min in all\n")
        print(rehearsal.table())
        if args.json:
            Path(args.json).write_text(json.dumps({"total_s": total, "stages": rehearsal.results}, indent=1))
        if not args.keep and not args.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
