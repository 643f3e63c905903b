"""Command-line entry of run_train.py: parse, train, and turn known user errors into one clear line."""

from __future__ import annotations

import logging
import sys

from eagle3.config import Eagle3ConfigError
from eagle3.data.store import StoreError
from eagle3.train.args import parse_args
from eagle3.train.main import train


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        train(parse_args(argv))
    except (Eagle3ConfigError, StoreError, FileNotFoundError) as error:
        print(f"run_train.py: error: {error}", file=sys.stderr)
        return 2
    return 0
