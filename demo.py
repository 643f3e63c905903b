"""End-to-end demo on CPU with a tiny local Qwen3 target (`make demo`).

Builds (and briefly trains) the tiny target, then saves a fresh EAGLE-3 draft for it and
checks it against the vLLM contract. Everything lands in ./demo_output.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from eagle3.cli import new_draft
from eagle3.export.check import check_draft, errors, format_report
from eagle3.testing import build_tiny_target

OUT = Path("demo_output")


def main() -> int:
    start = time.perf_counter()
    target = OUT / "tiny-qwen3"
    if not (target / "model.safetensors").exists():
        print("[1/2] building and briefly training the tiny Qwen3 target (about a minute) ...")
        build_tiny_target(target, trained=True)
    draft = OUT / "fresh-draft"
    print("[2/2] saving a fresh draft and checking it against the vLLM contract ...")
    new_draft(target, draft)
    problems = check_draft(draft, target)
    print(format_report(draft, target, problems))
    print(f"\nsummary: target {target}, draft {draft}, {time.perf_counter() - start:.0f} s")
    return 1 if errors(problems) else 0


if __name__ == "__main__":
    sys.exit(main())
