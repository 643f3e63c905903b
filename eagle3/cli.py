"""The ``eagle3`` console command: small tools around a draft.

eagle3 env                                   versions, devices, and whether torch / vLLM / DeepSpeed fit (run first)
eagle3 check DRAFT_DIR --model TARGET       strict vLLM contract check (exit 1 on problems)
eagle3 new-draft --model TARGET --output DIR [--layers 1,3,4] [--draft-arch qwen3|llama]
                 [--draft-variant eagle3|eagle3.1]
eagle3 tiny-target DIR [--trained]           build the tiny local Qwen3 used by tests and the demo
eagle3 push DRAFT_DIR --repo-id OWNER/NAME   upload a saved draft (e.g. OUTPUT_DIR/best_model) with its
            [--private] [--revision BRANCH]  model card to the Hugging Face Hub (--dry-run: only list)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eagle3.config import DRAFT_VARIANTS, Eagle3ConfigError, parse_layers


def new_draft(
    target: str | Path,
    output_dir: str | Path,
    target_layers: list[int] | None = None,
    num_draft_layers: int = 1,
    draft_vocab_size: int | None = None,
    draft_arch: str = "qwen3",
    seed: int = 0,
    draft_variant: str = "eagle3",
    intermediate_size: int | None = None,
) -> Path:
    """Save an untrained draft for ``target``: sizes from its config, lm_head from its rows.

    A reduced draft vocabulary here is simply the lowest ids; training builds the real one
    from token counts.
    """
    import torch

    from eagle3.config import Eagle3Qwen3Config
    from eagle3.modeling import Eagle3Qwen3ForCausalLM
    from eagle3.target import TargetHead, resolve_model

    torch.manual_seed(seed)
    head = TargetHead.from_pretrained(target)
    config = Eagle3Qwen3Config.from_target_config(
        head.config,
        target_layers=target_layers,
        num_draft_layers=num_draft_layers,
        draft_vocab_size=draft_vocab_size,
        target_model_name_or_path=resolve_model(target),
        draft_arch=draft_arch,
        draft_variant=draft_variant,
        intermediate_size=intermediate_size,
    )
    model = Eagle3Qwen3ForCausalLM(config)
    draft_ids = torch.arange(config.draft_vocab_size)
    model.set_draft_vocab(draft_ids)
    with torch.no_grad():
        model.lm_head.weight.copy_(head.lm_head[draft_ids].to(model.lm_head.weight.dtype))
    model.save_pretrained(output_dir)
    return Path(output_dir)


def _cmd_env(args: argparse.Namespace) -> int:
    from eagle3.env import run

    return run()


def _cmd_check(args: argparse.Namespace) -> int:
    from eagle3.export.check import check_draft, errors, format_report

    problems = check_draft(args.draft_dir, args.model)
    print(format_report(args.draft_dir, args.model, problems))
    if errors(problems):
        return 1
    print(serving_recommendation(args.draft_dir))
    return 0


def serving_recommendation(draft_dir: str | Path) -> str:
    """What to put in vLLM's speculative config for this draft, printed after a passing check:
    the one setting the contract check cannot see but that decides acceptance above temperature 0."""
    import json

    from eagle3.export.serving import sampling_advice, speculative_config_of

    vocab_size = json.loads((Path(draft_dir) / "config.json").read_text()).get("vocab_size")
    config = speculative_config_of(draft_dir)
    return "\n".join(
        [
            "",
            "Serve it with:",
            f"  speculative_config={json.dumps(config)}",
            sampling_advice(vocab_size, config["num_speculative_tokens"]),
        ]
    )


def _cmd_new_draft(args: argparse.Namespace) -> int:
    path = new_draft(
        args.model,
        args.output,
        target_layers=parse_layers(args.layers, "--layers"),
        num_draft_layers=args.num_draft_layers,
        draft_vocab_size=args.draft_vocab_size,
        draft_arch=args.draft_arch,
        draft_variant=args.draft_variant,
        intermediate_size=args.draft_intermediate_size,
    )
    print(f"saved an untrained draft to {path}")
    return 0


def _cmd_tiny_target(args: argparse.Namespace) -> int:
    from eagle3.testing import build_tiny_target

    path = build_tiny_target(args.output_dir, trained=args.trained)
    print(f"tiny Qwen3 target written to {path}")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from eagle3.export.hub import check_repo_id, push_draft, render_model_card, require_token, upload_files

    draft_dir = Path(args.draft_dir)
    for name in ("config.json", "model.safetensors"):
        if not (draft_dir / name).is_file():
            raise FileNotFoundError(
                f"{draft_dir}: no {name}; pass a folder run_train.py saved, e.g. OUTPUT_DIR/best_model."
            )
    if "/" not in args.repo_id:  # a bare name would need the network (whoami) to find its owner
        raise Eagle3ConfigError(f"--repo-id {args.repo_id}: give OWNER/NAME, e.g. you/{args.repo_id}.")
    try:
        check_repo_id(args.repo_id, "--repo-id")
        token = None if args.dry_run else require_token(args.token, "eagle3 push")
    except ValueError as error:
        raise Eagle3ConfigError(str(error)) from None
    # The card names the repo in its serving snippet, so it is written for this repo id; the
    # training metrics it shows come from eagle3_eval.json, which training saved next to the weights.
    card = None if args.keep_card else render_model_card(draft_dir, _training_info(draft_dir), args.repo_id)
    if args.dry_run:
        names = {path.name for path in upload_files(draft_dir)}
        if card is not None:
            names.add("README.md")  # the card written for this repo id
        print(f"would upload to https://huggingface.co/{args.repo_id} (dry run: nothing sent, nothing written):")
        for name in sorted(names):
            print(f"  {name}")
        return 0
    if card is not None:
        (draft_dir / "README.md").write_text(card)
    url = push_draft(
        draft_dir, args.repo_id, token=token, private=args.private, revision=args.revision, commit_message=args.message
    )
    print(f"uploaded {draft_dir} to https://huggingface.co/{args.repo_id}: {url}")
    return 0


def _training_info(draft_dir: Path) -> dict:
    import json

    from eagle3.train.trainer import EVAL_METRICS_FILE

    path = draft_dir / EVAL_METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _add_model(parser: argparse.ArgumentParser) -> None:
    # The same name as run_collect/run_train/run_eval; --target is this command's original spelling.
    parser.add_argument(
        "--model", "--target", "--base-model", dest="model", required=True, help="target model folder or Hub id"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eagle3", description="EAGLE-3 draft tools for Qwen3 targets", allow_abbrev=False
    )
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = argparse.ArgumentDefaultsHelpFormatter

    env = commands.add_parser(
        "env",
        help="print versions and devices, and whether torch, vLLM and DeepSpeed fit together (exit 1 on problems)",
        formatter_class=defaults,
    )
    env.set_defaults(run=_cmd_env)

    check = commands.add_parser(
        "check", help="check a saved draft against what vLLM expects for a target", formatter_class=defaults
    )
    check.add_argument("draft_dir", help="the draft folder, e.g. OUTPUT_DIR/best_model")
    _add_model(check)
    check.set_defaults(run=_cmd_check)

    draft = commands.add_parser("new-draft", help="save an untrained draft for a target", formatter_class=defaults)
    _add_model(draft)
    draft.add_argument("--output", required=True, help="folder to save the draft in")
    draft.add_argument(
        "--layers",
        "--target-layers",
        dest="layers",
        help="0-based layer indices whose OUTPUT feeds the draft, e.g. 1,13,24 (default: EAGLE-3's)",
    )
    draft.add_argument("--num-draft-layers", type=int, default=1, help="decoder layers in the draft")
    draft.add_argument("--draft-vocab-size", type=int, help="draft lm_head size (default: the target's vocabulary)")
    draft.add_argument("--draft-arch", choices=["qwen3", "llama"], default="qwen3", help="vLLM class of the draft")
    draft.add_argument(
        "--draft-intermediate-size",
        type=int,
        help="the draft's MLP width (default: the target's intermediate_size, else 3 x hidden for MoE targets)",
    )
    draft.add_argument(
        "--draft-variant",
        choices=sorted(DRAFT_VARIANTS),
        default="eagle3",
        help="eagle3, or eagle3.1 (fc_norm + norm_output)",
    )
    draft.set_defaults(run=_cmd_new_draft)

    tiny = commands.add_parser(
        "tiny-target", help="build the tiny local Qwen3 target used by tests and the demo", formatter_class=defaults
    )
    tiny.add_argument("output_dir", help="folder to write the target to")
    tiny.add_argument("--trained", action="store_true", help="train it briefly on synthetic chats (~1 min)")
    tiny.set_defaults(run=_cmd_tiny_target)

    push = commands.add_parser(
        "push", help="upload a saved draft with its model card to the Hugging Face Hub", formatter_class=defaults
    )
    push.add_argument("draft_dir", help="the draft folder run_train.py saved, e.g. OUTPUT_DIR/best_model")
    push.add_argument("--repo-id", required=True, help="Hub repo OWNER/NAME (created if missing)")
    push.add_argument("--token", help="Hub token (default: the one saved by `huggingface-cli login`, or HF_TOKEN)")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--revision", help="branch to push to (created if missing; default: main)")
    push.add_argument("--message", default="Upload EAGLE-3 draft", help="commit message")
    push.add_argument(
        "--keep-card", action="store_true", help="upload the folder's README.md as it is instead of writing the card"
    )
    push.add_argument("--dry-run", action="store_true", help="check and list what would be uploaded; send nothing")
    push.set_defaults(run=_cmd_push)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (Eagle3ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
