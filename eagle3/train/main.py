"""The training entry point behind run_train.py: check, build, train, save, share.

Order matters for the user's time: everything that can be wrong with the command line or the
data (layers, target, hidden size) is checked from the manifest and the target's config.json
before any tensor is read.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import set_seed
from transformers.trainer_utils import get_last_checkpoint

from eagle3.config import (
    NORM_FIELDS,
    Eagle3ConfigError,
    Eagle3Qwen3Config,
    parse_layers,
    resolve_layers,
    to_vllm_layer_ids,
)
from eagle3.data.codecs import has_states
from eagle3.data.store import HiddenStateStore, read_manifest
from eagle3.device import select_device
from eagle3.dflash import DFlashQwen3Config, mask_token_for
from eagle3.families import parameter_counts
from eagle3.target import TargetHead, config_hash, load_target_config, resolve_model, target_family
from eagle3.train.args import Eagle3TrainingArguments
from eagle3.train.dataset import Eagle3Collator, StoreDataset, padded, split_train_eval
from eagle3.train.loss import TargetProjector
from eagle3.train.memory_model import estimate_dflash_peak_memory, estimate_peak_memory, target_shape
from eagle3.train.model import DFlashDraftForTraining, Eagle3DraftForTraining
from eagle3.train.online import OnlineTarget, online_dtype, prepare_online_data
from eagle3.train.server_states import ServerSource, ServerStatesDataset
from eagle3.train.trainer import BEST_MODEL_DIR, EVAL_METRICS_FILE, FINAL_MODEL_DIR, Eagle3Trainer
from eagle3.vocab import count_tokens, coverage, select_draft_vocab

logger = logging.getLogger(__name__)


@dataclass
class Plan:
    """What the data and the command line agree on, established before any heavy work."""

    base_model: str
    target_config: object
    target_layers: list[int]


def check_data_against_target(args: Eagle3TrainingArguments) -> Plan:
    """Compare --data-dir's manifest with --model / --layers; raise Eagle3ConfigError."""
    if not args.data_dir:
        raise Eagle3ConfigError("--data-dir: give the run_collect.py output directory.")
    manifest = read_manifest(args.data_dir)
    if not has_states(manifest["hidden_dtype"]) and not args.online:
        raise Eagle3ConfigError(
            f"--data-dir {args.data_dir} holds token ids and masks only (collected with --no-states): "
            "add --online to compute the hidden states with the target during training."
        )
    recorded = manifest.get("target") or {}
    base_model = args.model or recorded.get("name_or_path")
    if base_model:  # the draft's config and model card name it: absolute when local
        base_model = resolve_model(base_model)
    else:
        raise Eagle3ConfigError(
            "--model: not given and the data manifest does not name the target; pass the target's folder or Hub id."
        )
    target_config = load_target_config(base_model)
    if manifest.get("hidden_size") is not None and int(manifest["hidden_size"]) != target_config.hidden_size:
        raise Eagle3ConfigError(
            f"--model {base_model} has hidden size {target_config.hidden_size}, but the data in --data-dir "
            f"{args.data_dir} holds hidden states of size {manifest['hidden_size']} (collected from "
            f"{recorded.get('name_or_path')!r}). Pass the --model the data was collected with, or collect again."
        )
    if recorded.get("config_hash") and recorded["config_hash"] != config_hash(target_config):
        raise Eagle3ConfigError(
            f"--model {base_model} is not the model the data in --data-dir {args.data_dir} was collected with "
            f"({recorded.get('name_or_path')!r}; config hash {recorded['config_hash']} != {config_hash(target_config)}). "
            "Pass that model as --model, or collect data with this one."
        )
    stored = [int(x) for x in manifest["layers"]]
    given = parse_layers(args.layers, "--layers")
    if given is not None:
        given = resolve_layers(given, target_config.num_hidden_layers, flag="--layers")
        if given != stored:
            raise Eagle3ConfigError(
                f"--layers {','.join(map(str, given))} does not match the layers the data in --data-dir was "
                f"collected at: {','.join(map(str, stored))} (vLLM ids {to_vllm_layer_ids(stored)}). Drop "
                f"--layers to use the manifest's, or collect again with --layers {','.join(map(str, given))}."
            )
    return Plan(base_model=str(base_model), target_config=target_config, target_layers=stored)


def build_draft(args: Eagle3TrainingArguments, plan: Plan, head: TargetHead, draft_ids: torch.Tensor):
    if args.draft_type == "dflash":
        return build_dflash_draft(args, plan, head)
    config = Eagle3Qwen3Config.from_target_config(
        plan.target_config,
        target_layers=plan.target_layers,
        num_draft_layers=args.num_draft_layers,
        draft_vocab_size=draft_ids.numel(),
        target_model_name_or_path=plan.base_model,
        draft_arch=args.draft_arch,
        draft_variant=args.draft_variant,
        intermediate_size=args.draft_intermediate_size,
        **{name: getattr(args, name) for name in NORM_FIELDS},
    )
    config.dtype = str(export_dtype(plan.target_config)).removeprefix("torch.")
    set_seed(args.seed)
    draft = Eagle3DraftForTraining(config).float()  # fp32 master weights; bf16/fp16 via the Trainer
    draft.set_draft_vocab(draft_ids)
    draft.load_target_embeddings(head.embed_tokens)
    if args.init_lm_head_from_target:
        with torch.no_grad():
            draft.lm_head.weight.copy_(head.lm_head[draft_ids].float())
    draft.ttt_steps, draft.ttt_decay, draft.head_checkpointing = args.ttt_steps, args.ttt_decay, args.head_checkpointing
    draft.loss_type, draft.lk_eta = args.loss, args.lk_eta
    return draft


def build_dflash_draft(args: Eagle3TrainingArguments, plan: Plan, head: TargetHead) -> DFlashDraftForTraining:
    """A DFlash draft reading the data's target layers, with the target's embedding and lm_head."""
    config = DFlashQwen3Config.from_target_config(
        plan.target_config,
        target_layers=plan.target_layers,
        mask_token_id=dflash_mask_token(args, plan),
        num_draft_layers=args.num_draft_layers,
        block_size=args.block_size,
        target_model_name_or_path=plan.base_model,
        intermediate_size=args.draft_intermediate_size,
    )
    config.dtype = str(export_dtype(plan.target_config)).removeprefix("torch.")
    set_seed(args.seed)
    draft = DFlashDraftForTraining(config).float()
    draft.load_target_embeddings(head.embed_tokens, head.lm_head)
    draft.num_anchors, draft.loss_decay = args.num_anchors, args.dflash_loss_decay
    draft.loss_type, draft.lk_eta = args.loss, args.lk_eta
    return draft


def dflash_mask_token(args: Eagle3TrainingArguments, plan: Plan) -> int:
    """--mask-token-id, else the first embedding row the target's tokenizer leaves unused."""
    if args.mask_token_id is not None:
        return mask_token_for(0, plan.target_config.vocab_size, args.mask_token_id)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(plan.base_model)
    return mask_token_for(len(tokenizer), plan.target_config.vocab_size)


def export_dtype(target_config) -> torch.dtype:
    """The dtype the saved draft's weights take: the target's checkpoint dtype, which vLLM serves
    the draft in (float32 when the target's config names none)."""
    dtype = getattr(target_config, "dtype", None) or torch.float32
    return getattr(torch, dtype.removeprefix("torch.")) if isinstance(dtype, str) else dtype


def memory_estimate(
    args: Eagle3TrainingArguments, plan: Plan, draft_vocab_size: int, tokens: int, longest: int | None = None
):
    """The memory model for this run's shapes, aux layers, precision and ZeRO settings, and the
    frozen target itself when it runs in this process (``--online`` without servers)."""
    target_config = plan.target_config
    online_target_bytes = 0
    if args.online and not args.server_url:
        total, _ = parameter_counts(plan.base_model, target_family(target_config))
        online_target_bytes = total * torch.finfo(online_dtype(args.online_dtype, args.device)).bits // 8
    ds = getattr(getattr(args, "hf_deepspeed_config", None), "config", None) or {}
    zero = ds.get("zero_optimization", {})
    offload = (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme")
    # What both drafts' estimates take: the target's shapes, the batch, precision and ZeRO settings.
    common = dict(
        **target_shape(target_config, draft_intermediate_size=args.draft_intermediate_size),
        tokens_per_batch=tokens,
        num_aux=len(plan.target_layers),
        num_draft_layers=args.num_draft_layers,
        mixed_precision=bool(args.bf16 or args.fp16),
        online_target_bytes=online_target_bytes,
        target_dtype_bytes=2
        if str(getattr(target_config, "dtype", "bfloat16")).endswith(("bfloat16", "float16"))
        else 4,
        zero_stage=int(zero.get("stage", 0) or 0),
        world_size=args.world_size,
        offload_optimizer=offload,
    )
    if args.draft_type == "dflash":
        return estimate_dflash_peak_memory(
            **common, max_length=longest or tokens, num_anchors=args.num_anchors, block_size=args.block_size
        )
    return estimate_peak_memory(
        **common,
        draft_vocab_size=draft_vocab_size,
        max_length=longest,
        ttt_steps=args.ttt_steps,
        head_checkpointing=args.head_checkpointing,
        loss=args.loss,
    )


def check_one_process_per_device(args: Eagle3TrainingArguments) -> None:
    """Refuse several GPUs in one process: transformers would wrap the draft in nn.DataParallel,
    which cannot split the step's token count (a 0-dim tensor) and concatenates the per-replica
    statistics, so the loss scale and every metric would be wrong."""
    if args.n_gpu > 1:
        raise Eagle3ConfigError(
            f"{args.n_gpu} GPUs are visible to this single process, and transformers would train with "
            "nn.DataParallel, which EAGLE-3 training does not support. Start one process per GPU: "
            f"`torchrun --nproc_per_node {args.n_gpu} run_train.py ...` or `accelerate launch --num_processes "
            f"{args.n_gpu} run_train.py ...`; for one GPU, run with CUDA_VISIBLE_DEVICES=0."
        )


LAST_CHECKPOINT = ("true", "last")  # --resume_from_checkpoint values meaning "the newest in --output-dir"


def resolve_resume(args: Eagle3TrainingArguments) -> str | None:
    """The checkpoint folder to resume from, checked now: transformers would only find a wrong one
    after the data is read, and with ``last`` and no checkpoint it would silently start at step 0."""
    resume = args.resume_from_checkpoint
    if resume is None or resume is False or resume == "":
        return None
    flag = f"--resume_from_checkpoint {resume}"
    if resume is True or str(resume).lower() in LAST_CHECKPOINT:
        output_dir = Path(args.output_dir)
        last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if last is None:
            raise Eagle3ConfigError(
                f"{flag}: no checkpoint-N folder in --output-dir {output_dir} to resume from. Drop "
                "--resume_from_checkpoint to start a new run, or pass the --output-dir of the run to continue "
                "(or a checkpoint folder itself)."
            )
        return last
    if not (Path(resume) / "trainer_state.json").is_file():
        raise Eagle3ConfigError(
            f"{flag}: not a Trainer checkpoint folder (no trainer_state.json there). Pass a checkpoint-N folder "
            "of an earlier run, or `last` for the newest one in --output-dir."
        )
    return str(resume)


def hub_repo_id(args: Eagle3TrainingArguments) -> str | None:
    """With --push_to_hub, the repo the draft goes to, settled before training: the card names it,
    and a missing login or a malformed id fails now, not after hours of training. Only the main
    process talks to the Hub."""
    if not (args.push_to_hub and args.should_save):
        return args.hub_model_id
    from eagle3.export.hub import require_token, resolve_repo_id

    try:
        token = require_token(args.hub_token, "--push_to_hub")
        return resolve_repo_id(args.hub_model_id, args.output_dir, token)
    except ValueError as error:
        raise Eagle3ConfigError(str(error)) from None


def train(args: Eagle3TrainingArguments, callbacks: list | None = None) -> dict:
    """Run one training job; returns the final eval metrics (none without an eval split), the training
    loop's seconds and how many of them it waited for data (``train_data_wait_seconds``)."""
    # Says the device; a GPU machine whose torch sees no GPU stops here, before any data is read.
    select_device(
        "cpu" if getattr(args, "cpu_requested", args.use_cpu) else None, flag="--use_cpu", cpu_flag="--use_cpu"
    )
    check_one_process_per_device(args)  # before the online answers or any data is read
    resume = resolve_resume(args)
    repo_id = hub_repo_id(args)
    if args.online and args.dataset:
        args.data_dir = prepare_online_data(args)
    plan = check_data_against_target(args)
    if "wandb" in args.report_to:  # keep the (offline) run next to the model it describes
        os.environ.setdefault("WANDB_DIR", str(Path(args.output_dir).absolute()))
        Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
    store = HiddenStateStore(args.data_dir, ranks=args.filter_ranks, deduplicate=args.deduplicate)
    if len(store) == 0:
        raise Eagle3ConfigError(f"--data-dir {args.data_dir}: no samples after --filter-rank / deduplication.")
    present = sorted({shard["rank"] for shard in store.manifest["shards"]})
    if args.filter_ranks is not None and set(present) - set(args.filter_ranks):
        # After `torchrun ... run_collect.py` every rank wrote its own share: filtering drops data.
        logger.warning(
            "--filter-rank %s: training on the shards of collector ranks %s only, of ranks %s present "
            "(%d samples kept). Leave --filter-rank out to train on all the collected data.",
            args.filter_rank,
            sorted(set(args.filter_ranks) & set(present)),
            present,
            len(store),
        )
    seed = args.data_seed if args.data_seed is not None else args.seed
    train_ids, eval_ids = split_train_eval(len(store), args.eval_ratio, seed)
    states = not args.online  # online: the target computes them; stored ones are not even read
    train_set = StoreDataset(store, train_ids, args.max_length, states=states)
    eval_ids = sorted(eval_ids, key=store.length)  # sequential eval order then pads little
    eval_set = StoreDataset(store, eval_ids, args.max_length, states=states) if eval_ids else None
    if args.online and args.server_url:  # the states stream from vLLM servers (checked now, before training)
        source = server_source(args, plan)
        source.check()
        workers = args.dataloader_num_workers
        train_set = ServerStatesDataset(train_set, source, "train", workers)
        eval_set = ServerStatesDataset(eval_set, source, "eval", workers) if eval_set is not None else None
    try:
        pad_multiple = 8 if (args.bf16 or args.fp16) else 1
        longest = padded(max(train_set.lengths), pad_multiple)
        if args.max_tokens_per_batch is not None and args.max_tokens_per_batch < longest:
            raise Eagle3ConfigError(
                f"--max-tokens-per-batch {args.max_tokens_per_batch} is smaller than the longest training sample "
                f"({longest} tokens, padded; --max-length {args.max_length}). Raise it to at least {longest}, or lower "
                "--max-length."
            )

        vocab_size = plan.target_config.vocab_size
        counts = count_tokens(train_set.token_ids_and_masks(), vocab_size)
        # A DFlash draft predicts through the target's own lm_head: its vocabulary is the target's.
        draft_ids = (
            torch.arange(vocab_size)
            if args.draft_type == "dflash"
            else select_draft_vocab(counts, args.draft_vocab_size)
        )
        data_stats = {
            "hidden_states": (
                ("online from vLLM servers" if args.server_url else "online")
                if args.online
                else store.manifest["hidden_dtype"]
            ),
            "num_train_samples": len(train_set),
            "num_eval_samples": len(eval_set or []),
            "num_train_tokens": int(sum(train_set.lengths)),
            "num_train_assistant_tokens": int(counts.sum()),
            "num_duplicates_dropped": store.num_duplicates,
            "distinct_assistant_tokens": int((counts > 0).sum()),
            "draft_vocab_size": int(draft_ids.numel()),
            "draft_vocab_coverage": coverage(counts, draft_ids),
        }
        logger.info("data: %s", data_stats)
        tokens = args.max_tokens_per_batch or args.per_device_train_batch_size * longest
        estimate = memory_estimate(args, plan, int(draft_ids.numel()), tokens, longest)
        if args.should_log:
            print(f"estimated peak memory per device (eagle3.train.memory_model):\n{estimate.table()}", flush=True)

        head = TargetHead.from_pretrained(plan.base_model)
        draft = build_draft(args, plan, head, draft_ids)
        target = TargetProjector(head, draft_ids)
        del head  # the draft and the projector hold what they need; the rest would only take memory
        trainer = Eagle3Trainer(
            model=draft,
            args=args,
            train_dataset=train_set,
            eval_dataset=eval_set,
            data_collator=Eagle3Collator(pad_to_multiple_of=pad_multiple),
            target=target,
            data_stats=data_stats,
            callbacks=callbacks,
            export_dtype=export_dtype(plan.target_config),
            online_target=(
                OnlineTarget(
                    plan.base_model, plan.target_layers, args.device, online_dtype(args.online_dtype, args.device)
                )
                if args.online and not args.server_url
                else None
            ),
        )
        train_output = trainer.train(resume_from_checkpoint=resume)
        timing = {
            "train_runtime": train_output.metrics.get("train_runtime", 0.0),
            "data_wait": trainer.data_wait_seconds,
        }

        output_dir = Path(args.output_dir)
        metrics = trainer.evaluate() if eval_set is not None else {}
        trainer.save_draft(output_dir / FINAL_MODEL_DIR, metrics)
        best = output_dir / BEST_MODEL_DIR
        if args.should_save:
            if not (best / "model.safetensors").exists():  # no eval split: the final model is the best we know
                shutil.copytree(output_dir / FINAL_MODEL_DIR, best, dirs_exist_ok=True)
            from eagle3.export.hub import write_model_card

            info = json.loads((best / EVAL_METRICS_FILE).read_text())
            write_model_card(best, info, repo_id=repo_id)
        if args.push_to_hub:
            trainer.push_to_hub(repo_id=repo_id)
        return metrics | {"train_runtime": timing["train_runtime"], "train_data_wait_seconds": timing["data_wait"]}
    finally:  # also when training fails: no client left open, no capture file left behind
        for dataset in (train_set, eval_set):
            if isinstance(dataset, ServerStatesDataset):
                dataset.close()


def server_source(args: Eagle3TrainingArguments, plan: Plan) -> ServerSource:
    return ServerSource(
        model=plan.base_model,
        server_urls=tuple(args.server_url),
        hidden_states_dir=args.hidden_states_dir,
        layers=tuple(plan.target_layers),
        num_layers=plan.target_config.num_hidden_layers,
        hidden_size=plan.target_config.hidden_size,
        max_length=args.max_length,
        concurrent_requests=16,
        run_dir=str(Path(args.output_dir).resolve()),
        rank=args.process_index,
    )
