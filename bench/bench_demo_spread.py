"""The spread of `make demo`'s acceptance lengths over fresh builds: the range the README states.

The demo's tiny target is built and briefly trained on the user's machine, so every build is a
slightly different model (float rounding differs between CPUs), and its draft is trained from a
seed. This runs the whole demo (demo.py: build the target, collect, train, check, evaluate in
process and in vLLM) once per seed, each from scratch in its own output folder (``DEMO_SEED=s``:
target built with seed s, draft trained with seed 42 + s; seed 0 is `make demo`'s own build),
and prints each build's numbers and their range. ~5 minutes per build on 2 cores.

    python bench/bench_demo_spread.py --seeds 0,1,2,3,4 [--out demo_spread]
    make demo-spread
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_demo(seed: int, out: Path) -> dict:
    """One demo build (resumed when its reports exist); its acceptance lengths and losslessness."""
    reports = {backend: out / f"eval_{backend}.json" for backend in ("hf", "vllm")}
    started = time.perf_counter()
    if not all(path.exists() for path in reports.values()):
        env = {**os.environ, "DEMO_OUTPUT": str(out), "DEMO_SEED": str(seed)}
        with open(out.with_suffix(".log"), "w") as log:
            subprocess.run(
                [sys.executable, str(ROOT / "demo.py")], cwd=ROOT, env=env, stdout=log, stderr=log, check=True
            )
    row = {"seed": seed, "seconds": time.perf_counter() - started}
    for backend, path in reports.items():
        report = json.loads(path.read_text())
        row[backend] = report["acceptance_length"]
        row[f"{backend}_lossless"] = report["lossless"]
    trained = json.loads((out / "eagle3_model" / "best_model" / "eagle3_eval.json").read_text())["metrics"]
    row["training"] = trained.get("eval_accept_len_rounds_k3")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated DEMO_SEED values, one build each")
    parser.add_argument("--out", default="demo_spread", help="one demo output folder per seed under here")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        print(f"build with seed {seed} ...", flush=True)
        rows.append(run_demo(seed, out / f"seed{seed}"))
        print(json.dumps(rows[-1]), flush=True)
    print(
        f"\n`make demo` over {len(rows)} fresh builds (k=3, T=0, 16 held-out prompts), {time.strftime('%Y-%m-%d')}:\n"
    )
    print("| build (DEMO_SEED) | training estimate | hf | vLLM | lossless (hf, vLLM) |")
    print("|---|---|---|---|---|")
    for row in rows:
        training = "-" if row["training"] is None else f"{row['training']:.2f}"
        print(
            f"| {row['seed']} | {training} | {row['hf']:.2f} | {row['vllm']:.2f} "
            f"| {row['hf_lossless']}, {row['vllm_lossless']} |"
        )
    for backend in ("hf", "vllm"):
        values = [row[backend] for row in rows]
        print(
            f"{backend}: min {min(values):.2f}, median {statistics.median(values):.2f}, max {max(values):.2f}"
            + (f", stdev {statistics.stdev(values):.2f}" if len(values) > 1 else "")
        )
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    if not all(row["hf_lossless"] and row["vllm_lossless"] for row in rows):
        sys.exit("a build was not lossless: that is a bug, not spread")


if __name__ == "__main__":
    main()
