"""Entry point of run_collect.py and ``eagle3-collect``: parse, run, and turn known failures into one clear line."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence

from eagle3.argparsing import EXIT_USAGE, prog_name
from eagle3.collect.args import parse_args
from eagle3.collect.common import CollectError
from eagle3.config import Eagle3ConfigError
from eagle3.data.sources import SourceError
from eagle3.data.store import StoreError


def main(argv: Sequence[str] | None = None) -> None:
    try:
        args = parse_args(argv)
        if args.print_server_command:
            from eagle3.collect.vllm_client import server_command_for

            print(shlex.join(server_command_for(args)))
            return
        from eagle3.collect.loop import collect

        summary = collect(args)
    except (SourceError, StoreError, Eagle3ConfigError, CollectError, FileNotFoundError, ValueError) as error:
        print(f"{prog_name('run_collect.py')}: error: {error}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        print(
            f"{prog_name('run_collect.py')}: interrupted; complete shards are kept, rerun the same command to resume.",
            file=sys.stderr,
        )
        sys.exit(130)
    print(summary.text())
