"""Measure an EAGLE-3 draft's acceptance length, in-process (--backend hf) or in vLLM.

    python run_eval.py --model TARGET --draft DRAFT_DIR --dataset prompts.jsonl \
        --num-speculative-tokens 3 --backend hf|vllm [--temperature 0] \
        [--max-new-tokens 256] [--output report.json] [--plot report.png]
"""

from __future__ import annotations

import sys
import time

from eagle3.evaluate.run import EvalInputError, evaluate, parse_args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        report = evaluate(args)
    except EvalInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n" + report.table())
    written = [path for path in (args.output, args.plot) if path]
    print(f"\ndone in {time.perf_counter() - start:.0f} s" + (f"; wrote {', '.join(written)}" if written else ""))
    if report.lossless is False:
        print("error: speculative output differs from target-only output at temperature 0", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # vLLM spawns worker processes: keep the guard
    sys.exit(main())
