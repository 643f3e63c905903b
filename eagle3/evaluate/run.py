"""run_eval.py's library side: prompts, input checks, the two backends, the report.

Three views of one quantity (see README "Three views of one number"):
* training's simulated acceptance length (teacher-forced, from stored target states); the hf
  backend also computes it on the very prompts and answers it evaluates (T=0), as
  ``teacher_forced_acceptance_length``,
* ``--backend hf``: real chain speculation in this process,
* ``--backend vllm``: vLLM's own spec-decode counters.
All three count 1 + accepted draft tokens per target step; hf and vLLM run the same
algorithm (first answer token from the target, k chained proposals, greedy verification at
temperature 0), so at temperature 0 they should agree up to numerics.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm.auto import tqdm

from eagle3.evaluate.args import EvalArgs, parse_args
from eagle3.evaluate.report import AcceptanceReport

__all__ = ["EvalArgs", "EvalInputError", "evaluate", "parse_args"]


class EvalInputError(ValueError):
    """Bad input for run_eval.py, found before any model is loaded."""


def validate(args: EvalArgs) -> None:
    """Everything that can be wrong before loading a model, with what to do about it."""
    from eagle3.export.check import check_draft, errors

    draft = Path(args.draft)
    if not (draft / "config.json").exists():
        raise EvalInputError(
            f"--draft {args.draft}: no draft there (config.json missing); pass the folder run_train.py "
            "wrote, e.g. OUTPUT_DIR/best_model."
        )
    from eagle3.device import DeviceError, select_device, vllm_build

    try:  # says the device now; a GPU machine that would run on CPU stops here
        select_device(
            args.device if args.backend == "hf" else None, note=vllm_build() if args.backend == "vllm" else ""
        )
    except DeviceError as error:
        raise EvalInputError(str(error)) from None
    if args.device is not None and args.backend == "hf":
        import torch

        try:
            torch.empty(0, device=args.device)
        except (RuntimeError, AssertionError) as error:
            raise EvalInputError(f"--device {args.device}: not usable here ({error}).") from None
    problems = errors(check_draft(draft, args.model))
    if problems:
        listed = "\n".join(f"  - {problem}" for problem in problems)
        raise EvalInputError(
            f"--draft {args.draft} does not fit --model {args.model} (is it a draft for another target?):\n{listed}"
        )


def load_prompts(args: EvalArgs, tokenizer) -> list[list[int]]:
    """Token ids of each conversation's messages before its first answer, as served."""
    from eagle3.data.sources import SourceError, load_conversations
    from eagle3.data.template import ChatRenderer, resolve_thinking

    try:
        conversations, _ = load_conversations(args.dataset, split=args.dataset_split)
    except SourceError as error:
        raise EvalInputError(str(error)) from None
    thinking, statement = resolve_thinking(args.enable_thinking, tokenizer)
    print(f"run_eval.py: {statement}", file=sys.stderr)
    renderer = ChatRenderer(tokenizer, enable_thinking=thinking)
    prompts = []
    for conversation in conversations:
        messages = []
        for message in conversation.messages:
            if message["role"] == "assistant":
                break
            messages.append(message)
        if messages and messages[-1]["role"] == "user" and messages[-1]["content"].strip():
            prompts.append(renderer.prompt_ids(messages))
    if args.num_prompts is not None:
        prompts = prompts[: args.num_prompts]
    if not prompts:
        raise EvalInputError(f"--dataset {' '.join(args.dataset)}: no prompt with a non-empty user turn.")
    return prompts


def evaluate_hf(args: EvalArgs, prompts: list[list[int]]) -> AcceptanceReport:
    import torch

    from eagle3.device import resolve_device
    from eagle3.evaluate.sampling import filter_target_logits
    from eagle3.families import load_text_model
    from eagle3.target import load_target_config, target_family

    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    # Straight onto the device: no full copy of the target in host memory first.
    named = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtype = named.get(args.dtype, "auto" if device.type == "cuda" else torch.float32)
    family = target_family(load_target_config(args.model))
    target = load_text_model(args.model, family, dtype=dtype, device_map=device)
    draft, decoder_class = load_draft(args.draft, target, device)
    filter_target_logits(target, args.temperature, args.top_p, args.top_k)  # vLLM's top-k/top-p, target only
    decoder = decoder_class(
        target, draft, args.num_speculative_tokens, args.temperature, seed=args.seed, draft_sampling=args.draft_sampling
    )
    report = AcceptanceReport(
        backend="hf",
        device=str(device),
        model=args.model,
        draft=args.draft,
        num_speculative_tokens=args.num_speculative_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        draft_sampling=args.draft_sampling,
        num_prompts=len(prompts),
        rounds=0,
        accepted_tokens=0,
        accepted_per_position=[0] * args.num_speculative_tokens,
        generated_tokens=0,
        seconds_speculative=0.0,
        seconds_baseline=None if args.no_baseline else 0.0,
        lossless=None if args.no_baseline or args.temperature > 0 else True,
    )
    teacher_forced = None
    for prompt in tqdm(prompts, desc="speculative decoding (hf)", unit="prompt"):
        result = decoder.generate(prompt, args.max_new_tokens)
        if args.temperature == 0:  # the estimate assumes greedy answers
            stats = decoder.teacher_forced_stats(prompt, result.output_ids)
            teacher_forced = stats if teacher_forced is None else teacher_forced + stats
        report.rounds += result.rounds
        report.accepted_tokens += result.accepted
        report.accepted_per_position = [
            a + b for a, b in zip(report.accepted_per_position, result.accepted_per_position, strict=True)
        ]
        report.generated_tokens += len(result.output_ids)
        report.seconds_speculative += result.seconds
        if not args.no_baseline:
            baseline, seconds = decoder.generate_target_only(prompt, args.max_new_tokens)
            report.seconds_baseline += seconds
            if report.lossless is not None and baseline != result.output_ids:
                report.lossless = False
    decoder.close()
    if teacher_forced is not None:
        from eagle3.train.loss import metrics_from_stats

        steps = decoder.stats_steps  # DFlash: the block's positions, whatever k decoding used
        metrics = metrics_from_stats(teacher_forced, steps)
        key = "accept_len_rounds" if steps == args.num_speculative_tokens else "accept_len_rounds_k3"
        if steps == args.num_speculative_tokens or args.num_speculative_tokens == 3:
            report.teacher_forced_acceptance_length = metrics.get(key)
    return report


def load_draft(path: str, target, device):
    """The draft in ``path`` (EAGLE-3 or DFlash, from its config.json) on the target's device and
    dtype, holding the target's embedding (and, for DFlash, its lm_head), with its decoder class."""
    import json

    from eagle3.dflash import DFlashQwen3ForCausalLM, is_dflash_config

    if is_dflash_config(json.loads((Path(path) / "config.json").read_text())):
        from eagle3.evaluate.dflash_speculative import DFlashSpeculativeDecoder

        draft = DFlashQwen3ForCausalLM.from_pretrained(path, dtype=target.dtype, device_map=device)
        draft.load_target_embeddings(target.get_input_embeddings().weight, target.get_output_embeddings().weight)
        return draft, DFlashSpeculativeDecoder
    from eagle3.evaluate.speculative import SpeculativeDecoder
    from eagle3.modeling import Eagle3Qwen3ForCausalLM

    draft = Eagle3Qwen3ForCausalLM.from_pretrained(path, dtype=target.dtype, device_map=device)
    draft.load_target_embeddings(target.get_input_embeddings().weight)
    return draft, SpeculativeDecoder


def evaluate_vllm(args: EvalArgs, prompts: list[list[int]]) -> AcceptanceReport:
    from eagle3.evaluate.vllm_bench import run_vllm_in_subprocess

    # One process per engine: a finished engine's GPU memory is only given back when its
    # process ends, and the second engine would otherwise start on what the first left.
    common = dict(
        max_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        max_model_len=max(len(p) for p in prompts) + args.max_new_tokens + 8,
        tensor_parallel_size=args.tensor_parallel_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        dtype={"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(args.dtype, "auto"),
    )
    speculative = run_vllm_in_subprocess(
        args.model,
        prompts,
        draft=args.draft,
        num_speculative_tokens=args.num_speculative_tokens,
        draft_sample_method=args.draft_sampling,
        **common,
    )
    baseline = None if args.no_baseline else run_vllm_in_subprocess(args.model, prompts, **common)
    per_position = (speculative.accepted_per_position + [0] * args.num_speculative_tokens)[
        : args.num_speculative_tokens
    ]
    return AcceptanceReport(
        backend="vllm",
        device=speculative.device,
        model=args.model,
        draft=args.draft,
        num_speculative_tokens=args.num_speculative_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        draft_sampling=args.draft_sampling,
        num_prompts=len(prompts),
        rounds=speculative.num_drafts,
        accepted_tokens=speculative.num_accepted_tokens,
        accepted_per_position=per_position,
        generated_tokens=speculative.generated_tokens,
        seconds_speculative=speculative.seconds,
        seconds_baseline=baseline.seconds if baseline else None,
        lossless=(baseline.token_ids == speculative.token_ids) if baseline and args.temperature == 0 else None,
        speculative_config=speculative.speculative_config,
    )


def evaluate(args: EvalArgs) -> AcceptanceReport:
    from transformers import AutoTokenizer

    validate(args)
    if args.num_speculative_tokens is None:  # what the draft is served with (eagle3.export.serving)
        from eagle3.export.serving import speculative_config_of

        args.num_speculative_tokens = speculative_config_of(args.draft)["num_speculative_tokens"]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompts = load_prompts(args, tokenizer)
    report = evaluate_hf(args, prompts) if args.backend == "hf" else evaluate_vllm(args, prompts)
    if args.output:
        report.write_json(args.output)
    if args.plot:
        report.plot(args.plot)
    return report
