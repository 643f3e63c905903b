"""The draft with a training forward: one call runs the whole training-time-test unroll.

Going through ``forward`` (rather than calling the draft's pieces from the trainer) is what
lets DDP and DeepSpeed see a single forward per micro-batch, as they require. The class adds
no weights: it saves exactly what ``Eagle3Qwen3ForCausalLM`` saves and loads back as one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from eagle3.dflash import DFlashQwen3ForCausalLM
from eagle3.modeling import Eagle3Qwen3ForCausalLM
from eagle3.train.dflash_loss import block_loss
from eagle3.train.loss import TargetBatch, ttt_loss


@dataclass
class Eagle3TrainingOutput(ModelOutput):
    loss: torch.Tensor | None = None
    stats: torch.Tensor | None = None  # see eagle3.train.loss.stats_size


class TrainingForward:
    """The training ``forward`` both drafts share: the Trainer's inputs in, (loss, stats) out,
    the draft type's own loss in ``training_loss``."""

    loss_type: str = "soft_ce"
    lk_eta: float = 1.0  # lk_lambda's KL weight exp(-lk_eta * mean acceptance)

    def training_loss(self, input_ids, aux_hidden_states, target: TargetBatch, num_items):
        raise NotImplementedError

    def forward(
        self,
        input_ids: torch.Tensor,
        aux_hidden_states: torch.Tensor,
        target_probs: torch.Tensor,
        target_pred: torch.Tensor,
        target_valid: torch.Tensor,
        target_assistant: torch.Tensor,
        target_greedy: torch.Tensor | None = None,
        num_items: torch.Tensor | None = None,
    ) -> Eagle3TrainingOutput:
        target = TargetBatch(
            probs=target_probs, pred=target_pred, valid=target_valid, assistant=target_assistant, greedy=target_greedy
        )
        loss, stats = self.training_loss(input_ids, aux_hidden_states, target, num_items)
        return Eagle3TrainingOutput(loss=loss, stats=stats)


class Eagle3DraftForTraining(TrainingForward, Eagle3Qwen3ForCausalLM):
    ttt_steps: int = 7
    ttt_decay: float = 0.8
    head_checkpointing: bool = False

    @property
    def stats_steps(self) -> int:
        """Positions each round drafts (the statistics' "steps"): the TTT steps."""
        return self.ttt_steps

    def training_loss(self, input_ids, aux_hidden_states, target: TargetBatch, num_items):
        return ttt_loss(
            self,
            input_ids,
            aux_hidden_states,
            target,
            self.ttt_steps,
            self.ttt_decay,
            self.head_checkpointing,
            loss_type=self.loss_type,
            num_items=num_items,
            lk_eta=self.lk_eta,
        )


class DFlashDraftForTraining(TrainingForward, DFlashQwen3ForCausalLM):
    """The DFlash draft with its block-wise training loss in ``forward`` (one forward per micro-batch,
    same inputs as ``Eagle3DraftForTraining``, so the Trainer drives both the same way)."""

    num_anchors: int = 512
    loss_decay: float = 7.0

    @property
    def stats_steps(self) -> int:
        """Positions each round drafts (the statistics' "steps"): block_size - 1."""
        return self.config.block_size - 1

    def training_loss(self, input_ids, aux_hidden_states, target: TargetBatch, num_items):
        return block_loss(
            self,
            input_ids,
            aux_hidden_states,
            target,
            num_anchors=self.num_anchors,
            decay_gamma=self.loss_decay,
            loss_type=self.loss_type,
            num_items=num_items,
            lk_eta=self.lk_eta,
        )
