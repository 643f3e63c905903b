"""Entry point of run_collect.py and ``eagle3-collect``: parse, run, and turn known failures into one clear line."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from eagle3.argparsing import EXIT_USAGE, prog_name
from eagle3.collect.args import parse_args
from eagle3.collect.common import CollectError
from eagle3.config import Eagle3ConfigError
from eagle3.data.sources import SourceError
from eagle3.data.store import StoreError


def announce_device(args) -> None:
    """Say where the target runs, and stop now if a GPU machine would run it on CPU (hf backend)."""
    from eagle3.device import select_device

    if args.backend == "hf":
        select_device(args.device, flag="--device")
    else:
        from eagle3.collect.vllm_client import client_cpu_threads

        print(
            "device: the vLLM servers run the target (--backend vllm: this process only sends requests; "
            f"{client_cpu_threads()} CPU thread(s) for its tensor work)",
            file=sys.stderr,
        )


def main(argv: Sequence[str] | None = None) -> None:
    try:
        args = parse_args(argv)
        if args.print_server_command:
            from eagle3.collect.server_commands import printed_server_commands

            print(printed_server_commands(args))
            return
        from eagle3.collect.loop import collect

        announce_device(args)
        if args.backend == "vllm":
            import torch

            from eagle3.collect.vllm_client import client_cpu_threads

            torch.set_num_threads(client_cpu_threads())
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
