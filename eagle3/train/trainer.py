"""Eagle3Trainer: transformers' Trainer with the EAGLE-3 training-time-test loss.

What it changes, and nothing else (so DeepSpeed, resume, W&B, bf16 ... keep working):

* ``_prepare_inputs``: the hidden states on the device (fp8 dequantized there; with
  ``--online`` computed by the frozen target, eagle3.train.online).
* ``compute_loss``: target distribution on the fly (frozen norm + lm_head), then one forward
  of ``Eagle3DraftForTraining`` that unrolls the TTT steps; per-step statistics accumulate
  in a small tensor per mode ("train" / "eval").
* ``log``: turns the accumulated train statistics into loss_i, acc_i, cum_acc_i,
  accept_len (consecutive run) and accept_len_product, summed over processes first.
* ``evaluation_loop``: the same for eval, added to the metrics ``evaluate`` returns, so
  ``metric_for_best_model`` (default ``accept_len``) sees them.
* ``_save``: ``save_pretrained`` of the draft (vLLM-native files only).
* the Hub: checkpoints are not pushed during training; ``push_to_hub`` uploads
  ``best_model/`` with its model card (eagle3.export.hub).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from eagle3.data.codecs import decode_batch
from eagle3.train.dataset import LengthGroupedEpochSampler, TokenBudgetBatchSampler
from eagle3.train.loss import TargetProjector, count_items, metrics_from_stats, stats_size
from eagle3.train.online import OnlineTarget

BEST_MODEL_DIR = "best_model"
FINAL_MODEL_DIR = "final_model"
EVAL_METRICS_FILE = "eagle3_eval.json"


class Eagle3Trainer(Trainer):
    # compute_loss divides by num_items_in_batch (the whole optimizer step's token count), so the
    # Trainer must not divide by the accumulation steps again.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        *args: Any,
        target: TargetProjector,
        data_stats: dict | None = None,
        online_target: OnlineTarget | None = None,
        export_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.export_dtype = export_dtype  # best_model/ and final_model/ weights (None: as trained)
        self.target = target.to(self.args.device)
        self.online_target = online_target  # --online: the frozen target computes the states per batch
        self.data_stats = data_stats or {}
        self.data_wait_seconds = 0.0  # time the training loop spent waiting for its next batches
        # Positions a round drafts: the TTT steps (EAGLE-3) or block_size - 1 (DFlash).
        self.stats_steps = int(getattr(self.model, "stats_steps", self.args.ttt_steps))
        # Per mode: per-position stats, then [real tokens, padded slots].
        size = stats_size(self.stats_steps) + 2
        self._stats = {
            mode: torch.zeros(size, dtype=torch.float64, device=self.args.device) for mode in ("train", "eval")
        }
        self.add_callback(BestModelCallback(self))

    # ------------------------------------------------------------------ data order
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        sampler = None
        if self.args.max_tokens_per_batch and hasattr(dataset, "lengths"):
            sampler = TokenBudgetBatchSampler(
                dataset.lengths,
                self.args.max_tokens_per_batch,
                seed=seed,
                world_size=self.args.world_size,
                rank=self.args.process_index,
                pad_to_multiple_of=getattr(self.data_collator, "pad_to_multiple_of", 1),
            )
        elif self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            sampler = LengthGroupedEpochSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps, dataset.lengths, seed
            )
        self._epoch_sampler = sampler
        return sampler if sampler is not None else super()._get_train_sampler(train_dataset)

    def _run_epoch(self, model, epoch, *args, **kwargs):
        # The epoch's order is drawn from seed + epoch. Set it here: on a resume mid-epoch the
        # dataloader is wrapped for skipping and the Trainer's own set_epoch no longer reaches us.
        sampler = getattr(self, "_epoch_sampler", None)
        if sampler is not None:
            sampler.set_epoch(epoch)
        return super()._run_epoch(model, epoch, *args, **kwargs)

    def _get_eval_sampler(self, eval_dataset):
        # The eval split is stored sorted by length already: sequential order pads least.
        return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else super()._get_eval_sampler(eval_dataset)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        started = time.perf_counter()
        try:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        finally:
            self.data_wait_seconds += time.perf_counter() - started

    # ------------------------------------------------------------------ states
    def _prepare_inputs(self, inputs):
        """Hidden states on the device before the usual move/cast: fp8 stores are dequantized
        here (on the device, per batch), and with --online the target computes them."""
        inputs = decode_batch(dict(inputs), self.args.device)
        if self.online_target is not None:
            inputs |= self.online_target(inputs["input_ids"], inputs["lengths"])
        return super()._prepare_inputs(inputs)

    # ------------------------------------------------------------------ loss
    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Tokens the loss counts over all micro-batches of one optimizer step (and all ranks with
        ``average_tokens_across_devices``): the loss is a per-token mean over the whole step, not a
        mean of per-micro-batch means (which over-weights the tokens of short micro-batches)."""
        if not batch_samples or "loss_mask" not in batch_samples[0]:
            return None
        count = sum(count_items(batch["loss_mask"]) for batch in batch_samples).to(device)
        if self.args.world_size > 1 and self.args.average_tokens_across_devices:
            count = self.accelerator.gather(count).sum()
        return count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        target = self.target(inputs["last_hidden_states"], inputs["loss_mask"], inputs["input_ids"])
        if num_items_in_batch is None and model.training:
            # a direct call outside the training loop: this micro-batch is the whole step
            num_items_in_batch = count_items(inputs["loss_mask"])
        outputs = model(
            input_ids=inputs["input_ids"],
            aux_hidden_states=inputs["aux_hidden_states"],
            target_probs=target.probs,
            target_pred=target.pred,
            target_valid=target.valid,
            target_assistant=target.assistant,
            target_greedy=target.greedy,
            num_items=num_items_in_batch if model.training else None,
        )
        mode = "train" if model.training else "eval"
        lengths = inputs["lengths"]
        padding = torch.stack([lengths.sum(), torch.tensor(inputs["input_ids"].numel(), device=lengths.device)])
        self._stats[mode] += torch.cat([outputs.stats.detach().double(), padding.to(self._stats[mode])])
        loss = outputs.loss
        if model.training and self.args.world_size > 1 and self.args.average_tokens_across_devices:
            loss = loss * self.args.world_size  # DDP / DeepSpeed average gradients over ranks
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ------------------------------------------------------------------ metrics
    def _take_metrics(self, mode: str) -> dict[str, float]:
        """Sum the mode's statistics over processes, turn them into metrics, reset them."""
        stats = self._stats[mode].clone()
        if self.args.world_size > 1:
            stats = self.accelerator.reduce(stats, reduction="sum")
        self._stats[mode].zero_()
        if float(stats[-1]) == 0:
            return {}
        metrics = metrics_from_stats(stats[:-2], self.stats_steps)
        metrics["padding_fraction"] = 1.0 - float(stats[-2] / stats[-1])
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: every process gets here together
            logs.update(self._take_metrics("train"))
        super().log(logs, start_time)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        self._stats["eval"].zero_()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in self._take_metrics("eval").items()})
        return output

    # ------------------------------------------------------------------ saving
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        draft = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        checkpoint = Path(output_dir).name.startswith(PREFIX_CHECKPOINT_DIR)
        if not checkpoint and self.export_dtype is not None:
            # Exports (best_model/, final_model/) hold the weights in the dtype vLLM serves the
            # target in (its checkpoint dtype): no cast and no warning per tensor at load, half
            # the file for bf16 targets. Checkpoints keep the fp32 master weights (exact resume).
            state_dict = state_dict if state_dict is not None else draft.state_dict()
            state_dict = {
                name: tensor.to(self.export_dtype) if tensor.is_floating_point() else tensor
                for name, tensor in state_dict.items()
            }
        draft.save_pretrained(output_dir, state_dict=state_dict)
        if checkpoint:
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        elif self.export_dtype is not None:  # save_pretrained wrote the fp32 parameters' dtype
            config_path = Path(output_dir) / "config.json"
            config = json.loads(config_path.read_text())
            config["dtype"] = str(self.export_dtype).removeprefix("torch.")
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def save_draft(self, output_dir: str | Path, metrics: dict[str, float] | None = None) -> Path:
        """Save the draft in vLLM's format (collective under ZeRO-3) plus its eval metrics."""
        output_dir = Path(output_dir)
        self.save_model(str(output_dir), _internal_call=True)
        if self.args.should_save:
            info = {
                "global_step": self.state.global_step,
                "epoch": self.state.epoch,
                "metrics": metrics or {},
                "data": self.data_stats,
            }
            (output_dir / EVAL_METRICS_FILE).write_text(json.dumps(info, indent=1))
        return output_dir

    # ------------------------------------------------------------------ hub
    def init_hf_repo(self, token: str | None = None) -> None:
        """No repo during training: only best_model/ is uploaded, by ``push_to_hub``."""

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Checkpoints stay local (optimizer states are not what users download)."""

    def push_to_hub(
        self,
        commit_message: str | None = "Upload EAGLE-3 draft",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        repo_id: str | None = None,
        **kwargs: Any,
    ) -> str | None:
        """Upload ``output_dir/best_model`` (with its model card) to ``repo_id`` (default: resolved
        from ``--hub_model_id`` / the output directory, see ``resolve_repo_id``)."""
        if not self.is_world_process_zero():
            return None
        from eagle3.export.hub import push_draft, resolve_repo_id

        repo_id = repo_id or resolve_repo_id(self.args.hub_model_id, self.args.output_dir, token or self.args.hub_token)
        return push_draft(
            Path(self.args.output_dir) / BEST_MODEL_DIR,
            repo_id=repo_id,
            token=token or self.args.hub_token,
            private=self.args.hub_private_repo,
            revision=revision or self.args.hub_revision,
            commit_message=commit_message,
        )


class BestModelCallback(TrainerCallback):
    """Saves ``output_dir/best_model`` whenever the eval ``metric_for_best_model`` improves."""

    def __init__(self, trainer: Eagle3Trainer) -> None:
        self.trainer = trainer
        self.best: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.best_metric is not None:  # resumed: the checkpoint knows the best so far
            self.best = state.best_metric
        if args.should_save and "wandb" in args.report_to and self.trainer.data_stats:
            import wandb

            if wandb.run is not None:
                wandb.config.update({"data": self.trainer.data_stats}, allow_val_change=True)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        name = args.metric_for_best_model
        if not name or not metrics:
            return
        value = metrics.get(name if name.startswith("eval_") else f"eval_{name}")
        if value is None:
            return
        better = self.best is None or (value > self.best if args.greater_is_better else value < self.best)
        if better:
            self.best = value
            self.trainer.save_draft(Path(args.output_dir) / BEST_MODEL_DIR, metrics)
