"""Entry of run_train.py and ``eagle3-train``: parse, train, and turn known user errors into one clear line."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch
import transformers

from eagle3.argparsing import EXIT_USAGE, prog_name
from eagle3.collect.common import CollectError
from eagle3.config import Eagle3ConfigError
from eagle3.data.sources import SourceError
from eagle3.data.store import StoreError
from eagle3.train.args import parse_args
from eagle3.train.main import train
from eagle3.train.trainer import BEST_MODEL_DIR, EVAL_METRICS_FILE


def _summary(output_dir: Path, seconds: float, metrics: dict) -> str:
    best = output_dir / BEST_MODEL_DIR
    lines = [f"training done in {seconds:.0f} s", f"best_model: {best}  (pass this to vLLM as the draft)"]
    loop, wait = metrics.get("train_runtime"), metrics.get("train_data_wait_seconds")
    if loop and wait is not None:
        lines.append(
            f"data wait: the training loop waited {wait:.1f} s of its {loop:.0f} s for batches ({100 * wait / loop:.0f}%)"
        )
    info_path = best / EVAL_METRICS_FILE
    if info_path.exists():
        info = json.loads(info_path.read_text())
        metrics, data = info.get("metrics", {}), info.get("data", {})
        if "eval_accept_len" in metrics:
            lines.append(
                f"eval simulated acceptance length: {metrics['eval_accept_len']:.3f} over all drafted positions (TTT steps or DFlash block), "
                f"{metrics.get('eval_accept_len_k3', float('nan')):.3f} at k=3 (step {info.get('global_step')})"
            )
        if "eval_accept_len_rounds_k3" in metrics:
            lines.append(
                f"counted over decoding's rounds (compare with vLLM): {metrics['eval_accept_len_rounds_k3']:.3f} "
                f"at k=3, {metrics['eval_accept_len_rounds']:.3f} over all drafted positions"
            )
        if data:
            lines.append(
                f"data: {data.get('num_train_samples')} train / {data.get('num_eval_samples')} eval samples, "
                f"{data.get('num_train_tokens')} train tokens, draft vocab {data.get('draft_vocab_size')} "
                f"(covers {100 * data.get('draft_vocab_coverage', 0):.1f}% of assistant tokens)"
            )
    return "\n".join(lines)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _setup_logging(args) -> None:
    """INFO on the main process, warnings only on the others (--log_level / --log_level_replica)."""
    level = args.get_process_log_level()
    if args.should_log and args.log_level == "passive":
        level = logging.INFO  # "passive" means transformers' verbosity (warning); our progress lines are INFO
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    logging.getLogger("eagle3").setLevel(level)
    if args.log_level != "passive":  # transformers' own INFO logs only when asked for (--log_level info)
        transformers.utils.logging.set_verbosity(level)


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)  # a bad flag or value exits 2 here, before any work
    _setup_logging(args)
    try:
        metrics = train(args)
        if _distributed():
            torch.distributed.barrier()  # every rank finished saving
    except (Eagle3ConfigError, StoreError, SourceError, CollectError, FileNotFoundError) as error:
        # SourceError / CollectError: --online --dataset's collection (bad records, nothing stored); their
        # messages name run_collect.py's flags, which run_train.py takes too
        print(f"{prog_name('run_train.py')}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        # Tear the process group down before interpreter exit: a gloo group left to the
        # destructors can abort one rank at exit ("terminate called without an active exception").
        if _distributed():
            torch.distributed.destroy_process_group()
    if args.should_save:
        print("\n" + _summary(Path(args.output_dir), time.perf_counter() - start, metrics))
    return 0
