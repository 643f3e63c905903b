"""Entry point of run_eval.py and the ``eagle3-eval`` console script."""

from __future__ import annotations

import sys
import time

from eagle3.argparsing import EXIT_USAGE, prog_name
from eagle3.evaluate.args import parse_args
from eagle3.evaluate.run import EvalInputError, evaluate


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        report = evaluate(args)
    except EvalInputError as error:
        print(f"{prog_name('run_eval.py')}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print("\n" + report.table())
    written = [path for path in (args.output, args.plot) if path]
    print(f"\ndone in {time.perf_counter() - start:.0f} s" + (f"; wrote {', '.join(written)}" if written else ""))
    if report.lossless is False:
        print("error: speculative output differs from target-only output at temperature 0", file=sys.stderr)
        return 1
    return 0
