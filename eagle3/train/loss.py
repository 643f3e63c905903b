"""EAGLE-3 training-time test (TTT): the unrolled draft, its soft cross-entropy and its metrics.

Indexing (T tokens x_0..x_{T-1}; the target's last hidden state at s predicts x_{s+1}):

* step 0 at position t: hidden = fc(aux_t), input token x_{t+1}, rope position t; it predicts
  x_{t+2}, whose target distribution is the target's at s = t + 1.
* step i: hidden = the draft's own PRE-NORM output of step i - 1 at t (post-norm with
  ``norm_output``), token x_{t+1+i},
  rope position t + i (vLLM drafts token i at position t + i), target at s = t + 1 + i.
  Attention: causal over step-0 keys plus each position's own keys from steps 1..i
  (``Eagle3Cache`` in "ttt" mode, no dense (k*T)^2 mask).
* a position counts at step i when the token it predicts, x_{s+1}, is an assistant token and
  the target's full-vocabulary argmax at s lies in the draft vocabulary (a draft can never
  propose anything else, so training on it only adds noise).

The target distribution is softmax over the draft-vocabulary rows of the target lm_head: we
never build fp32 [B, T, full vocab]; the full-vocab argmax runs in vocab chunks on the
positions that need it, under no_grad.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from eagle3.target import TargetHead, final_norm


@dataclass
class TargetBatch:
    """The target side of one batch, indexed by target position s ([B, T, ...])."""

    probs: torch.Tensor  # [B, T, draft_vocab] float32, softmax over the draft rows
    pred: torch.Tensor  # [B, T] long, draft id of the target's argmax
    valid: torch.Tensor  # [B, T] bool, x_{s+1} is assistant and the argmax is in the draft vocab
    assistant: torch.Tensor  # [B, T] bool, x_{s+1} is an assistant token (in range)
    # [B, T] bool, valid and the data token x_{s+1} IS the target's greedy choice at s (None: assume so)
    greedy: torch.Tensor | None = None


class TargetProjector:
    """Frozen target norm + lm_head, kept out of the trained module (no grads, no DDP broadcast)."""

    def __init__(
        self, head: TargetHead, draft_ids: torch.Tensor, device: torch.device | str = "cpu", vocab_chunk: int = 32768
    ) -> None:
        self.eps = float(head.config.rms_norm_eps)
        self.zero_centred_norm = head.zero_centred_norm  # Qwen3-Next / Qwen3.5: x * (1 + w)
        self.norm = head.norm.to(device)
        self.draft_ids = draft_ids.long().to(device)
        self.draft_rows = head.lm_head[draft_ids.long()].to(device)
        reduced = draft_ids.numel() < head.lm_head.shape[0]
        # The full lm_head only serves the "is the argmax in the draft vocab" test.
        self.full = head.lm_head.to(device) if reduced else None
        self.in_draft = torch.zeros(head.lm_head.shape[0], dtype=torch.bool, device=device)
        self.in_draft[self.draft_ids] = True
        self.vocab_chunk = vocab_chunk

    def to(self, device: torch.device | str) -> TargetProjector:
        for name in ("norm", "draft_ids", "draft_rows", "full", "in_draft"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self

    def normed(self, last_hidden_states: torch.Tensor) -> torch.Tensor:
        return final_norm(last_hidden_states, self.norm, self.eps, self.zero_centred_norm).to(self.draft_rows.dtype)

    def full_argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        """Argmax over the full vocabulary of hidden [N, H] @ lm_head.T, in vocab chunks."""
        best = torch.full((hidden.shape[0],), float("-inf"), device=hidden.device)
        best_id = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
        for start in range(0, self.full.shape[0], self.vocab_chunk):
            values, ids = (hidden @ self.full[start : start + self.vocab_chunk].T).float().max(-1)
            better = values > best
            best = torch.where(better, values, best)
            best_id = torch.where(better, ids + start, best_id)
        return best_id

    @torch.no_grad()
    def __call__(
        self, last_hidden_states: torch.Tensor, loss_mask: torch.Tensor, input_ids: torch.Tensor | None = None
    ) -> TargetBatch:
        hidden = self.normed(last_hidden_states)
        logits = (hidden @ self.draft_rows.T).float()
        pred = logits.argmax(-1)
        probs = logits.softmax(-1)
        assistant = torch.zeros_like(loss_mask, dtype=torch.bool)
        assistant[:, :-1] = loss_mask[:, 1:].bool()
        valid = assistant.clone()
        if self.full is not None and assistant.any():
            valid[assistant] = self.in_draft[self.full_argmax(hidden[assistant])]
        greedy = None
        if input_ids is not None:
            greedy = torch.zeros_like(valid)
            greedy[:, :-1] = valid[:, :-1] & (self.draft_ids[pred[:, :-1]] == input_ids[:, 1:])
        return TargetBatch(probs=probs, pred=pred, valid=valid, assistant=assistant, greedy=greedy)


STATS_PER_STEP = 5
ROUND_STATS = 4  # (accepted, rounds) of the decoding walk at k = min(3, steps) and k = steps


def stats_size(steps: int) -> int:
    """Length of the stats vector: per step (loss_sum, hits, valid, run_i, eligible_i), then
    the decoding walk's (accepted, rounds) at k3 and at all steps, then the assistant positions
    (see ``ttt_loss``)."""
    return STATS_PER_STEP * steps + ROUND_STATS + 1


def decoding_rounds(answer: torch.Tensor, run_length: torch.Tensor, ks: tuple[int, ...]) -> torch.Tensor:
    """(accepted, rounds) per k of the rounds greedy speculative decoding would run over each answer.

    ``answer[b, t]``: step 0 at t predicts an answer token; ``run_length[b, t]``: how many leading
    draft steps from t hit. In decoding the target's prefill writes an answer's first token, so the
    first round starts one position into each answer span; a round at t keeps r = min(run, k)
    tokens plus the target's own, and the next round starts at t + r + 1. This weighs positions as
    decoding visits them (round starts), unlike the per-position average of ``accept_len``: with
    answers the target wrote greedily it is what speculation at T=0 would count.
    """
    out = torch.zeros(2 * len(ks), dtype=torch.float64)
    for flags, runs in zip(answer.tolist(), run_length.tolist(), strict=True):
        t, length = 0, len(flags)
        while t < length:
            if not flags[t]:
                t += 1
                continue
            start = t + 1  # t predicts the answer's first token: the prefill's, never drafted
            end = start
            while end < length and flags[end]:
                end += 1
            for j, k in enumerate(ks):
                position = start
                while position < end:
                    accepted = min(runs[position], k)
                    out[2 * j] += accepted
                    out[2 * j + 1] += 1
                    position += accepted + 1
            t = end
    return out


LOSSES = ("soft_ce", "forward_kl", "lk_lambda")


def step_loss(
    logits: torch.Tensor, probs: torch.Tensor, valid: torch.Tensor, kind: str = "soft_ce", lk_eta: float = 1.0
) -> torch.Tensor:
    """Per-step loss SUMMED over valid positions, against the target distribution ``probs``.

    * ``soft_ce``: -sum_v p log q (the recipe).
    * ``forward_kl``: KL(p || q) = soft_ce - H(p). Same gradient as soft_ce (H(p) is constant);
      its value is 0 for a perfect draft, which makes steps and runs comparable.
    * ``lk_lambda``: the LK loss of arXiv 2602.23881 (SpecForge's ``lk_loss_type="lambda"``):
      w * KL + (1 - w) * (1 - alpha), alpha = sum_v min(p_v, q_v) the expected acceptance of a
      sampled draft token, w = exp(-lk_eta * mean alpha) (detached; the mean is over this step's
      valid positions of this micro-batch). Early in training (alpha ~ 0) it is KL; as the draft
      gets good the weight moves to the acceptance term, which only cares about the overlap of p
      and q. The paper's eta is 3; ``lk_eta`` = 1 (the default) is this toolkit's earlier weight.
    """
    log_q = F.log_softmax(logits.float(), dim=-1)
    ce = -(probs * log_q).sum(-1)
    if kind == "soft_ce":
        per_token = ce
    else:
        kl = ce + torch.special.xlogy(probs, probs).sum(-1)
        if kind == "forward_kl":
            per_token = kl
        elif kind == "lk_lambda":
            alpha = torch.minimum(probs, log_q.exp()).sum(-1)
            mean_alpha = (alpha.detach() * valid).sum() / valid.sum().clamp(min=1)
            weight = torch.exp(-lk_eta * mean_alpha)
            per_token = weight * kl + (1 - weight) * (1 - alpha)
        else:
            raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
    return (per_token * valid).sum()


def _head_loss(
    draft, normed: torch.Tensor, probs: torch.Tensor, valid: torch.Tensor, kind: str = "soft_ce", lk_eta: float = 1.0
):
    """lm_head + the step loss summed over valid positions; also the draft's argmax."""
    logits = draft.compute_logits(normed).float()
    return step_loss(logits, probs, valid, kind, lk_eta), logits.detach().argmax(-1)


def count_items(loss_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count in the loss of a batch: step 0 at t predicts x_{t+2}, an assistant token.

    What ``num_items_in_batch`` counts (the Trainer sums it over gradient accumulation and ranks).
    Steps i > 0 lose i positions at each sample's end and positions whose target argmax is outside
    the draft vocab; dividing every step by this one count keeps the relative weights decay**i.
    """
    return loss_mask[:, 2:].sum()


def ttt_loss(
    draft,
    input_ids: torch.Tensor,
    aux_hidden_states: torch.Tensor,
    target: TargetBatch,
    steps: int,
    decay: float,
    head_checkpointing: bool = False,
    loss_type: str = "soft_ce",
    num_items: torch.Tensor | int | None = None,
    lk_eta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unroll ``steps`` draft steps over a batch; return (loss, stats) — see ``stats_size``.

    loss = sum_i decay**i * (step i's loss summed over its valid positions) / N, with N the
    number of items of the whole optimizer step (``num_items``: all micro-batches of the gradient
    accumulation, all ranks), so long and short micro-batches weigh by their tokens. Without
    ``num_items`` (evaluation), N is step i's own valid count in this batch.
    """
    batch, length = input_ids.shape
    # Token x_{t+1+i} for step i at position t; past the end: a pad id, masked out anyway.
    padded_ids = F.pad(input_ids, (0, steps + 1), value=0)
    embeds = draft.embed_tokens(padded_ids)
    positions = torch.arange(length, device=input_ids.device).unsqueeze(0).expand(batch, -1)
    hidden = draft.combine_hidden_states(aux_hidden_states)
    cache = draft.new_cache("ttt")

    loss = hidden.new_zeros((), dtype=torch.float32)
    stats = torch.zeros(stats_size(steps), device=input_ids.device)
    run = torch.ones(batch, max(length - 1, 0), dtype=torch.bool, device=input_ids.device)
    # Evaluation only: leading hits per position, for the decoding walk (not needed in training steps).
    evaluating = not torch.is_grad_enabled()
    run_length = torch.zeros_like(run, dtype=torch.long) if evaluating else None
    for i in range(steps):
        normed, hidden = draft.draft_step(hidden, embeds[:, 1 + i : 1 + i + length], positions + i, cache)
        # Positions t whose target s = t + 1 + i exists. In a batch shorter than the unroll there are
        # none for the last steps: they still run (on no positions, adding 0 to loss and stats), so
        # every process makes the same module calls whatever its batch (ZeRO-3 gathers the
        # parameters per call and hangs when ranks differ).
        n = max(length - 1 - i, 0)
        probs, valid = target.probs[:, 1 + i : 1 + i + n], target.valid[:, 1 + i : 1 + i + n]
        if head_checkpointing and torch.is_grad_enabled():
            ce_sum, pred = checkpoint(
                _head_loss, draft, normed[:, :n], probs, valid, loss_type, lk_eta, use_reentrant=False
            )
        else:
            ce_sum, pred = _head_loss(draft, normed[:, :n], probs, valid, loss_type, lk_eta)
        count = valid.sum()
        denominator = count.clamp(min=1) if num_items is None else torch.as_tensor(num_items).clamp(min=1)
        loss = loss + decay**i * ce_sum / denominator
        hits = (pred == target.pred[:, 1 + i : 1 + i + n]) & valid
        # Consecutive-run estimator: a position keeps its run while every step so far was a hit.
        # Step i >= 1 was fed the DATA token x_{t+1+i}; speculative decoding would have fed the
        # draft's (accepted = the target's greedy) token. Where the two differ (data not generated
        # greedily by this target) step i is off-policy: such positions are not eligible, and the
        # estimate uses per-step conditional rates over the eligible positions instead.
        if i == 0:
            eligible = target.assistant[:, 1:]
        else:
            eligible = run[:, :n] & (target.greedy[:, i : i + n] if target.greedy is not None else True)
        run[:, :n] = eligible & hits
        run[:, n:] = False
        if evaluating:
            run_length += run
        stats[STATS_PER_STEP * i : STATS_PER_STEP * (i + 1)] = torch.stack(
            [
                ce_sum.detach(),
                hits.sum().float(),
                count.float(),
                run[:, :n].sum().float(),
                eligible.sum().float(),
            ]
        )
    if evaluating:  # the decoding walk (a Python loop, cheap next to evaluation)
        ks = (min(3, steps), steps)
        rounds = decoding_rounds(target.assistant[:, 1:], run_length, ks)
        stats[STATS_PER_STEP * steps : STATS_PER_STEP * steps + ROUND_STATS] = rounds.to(stats)
    stats[-1] = target.assistant[:, 1:].sum()  # positions whose step-0 prediction is an assistant token
    return loss, stats


def metrics_from_stats(stats: torch.Tensor, steps: int) -> dict[str, float]:
    """Per-step loss/acc, cumulative acceptance and the two acceptance-length estimators.

    * ``accept_len_product`` = 1 + sum_k prod_{i<=k} acc_i (the usual formula; overstates
      vLLM because per-step hits are not independent).
    * ``accept_len`` = 1 + sum_k prod_{i<=k} r_i, r_i = runs alive after step i / positions
      eligible for step i (alive after i - 1 and fed the target's greedy token). With data the
      target generated greedily this is exactly 1 + the mean number of leading draft steps that
      hit (the "consecutive run"; tracks vLLM, default ``metric_for_best_model``); with other
      data it does not drift, because off-policy steps are left out rather than counted.
    * ``accept_len_rounds`` (evaluation only) = 1 + accepted / rounds of the decoding walk
      (``decoding_rounds``): the same hits, weighed by the round starts decoding visits rather
      than by every position; on answers the target wrote greedily it is what speculation at
      T=0 counts, and it is the estimate to compare with vLLM.
    ``*_k3`` are the same for 3 speculative tokens, a common serving setting.
    """
    values = stats.double().tolist()
    metrics: dict[str, float] = {}
    cumulative, product_sum, run_sum, run_rate = 1.0, 0.0, 0.0, 1.0
    for i in range(steps):
        ce_sum, hits, count, run_hits, eligible = values[STATS_PER_STEP * i : STATS_PER_STEP * (i + 1)]
        acc = hits / count if count else 0.0
        cumulative *= acc
        product_sum += cumulative
        run_rate *= run_hits / eligible if eligible else 0.0
        run_sum += run_rate
        metrics[f"loss_{i}"] = ce_sum / count if count else 0.0
        metrics[f"acc_{i}"] = acc
        metrics[f"cum_acc_{i}"] = cumulative
        if i == min(steps, 3) - 1:
            metrics["accept_len_product_k3"] = 1.0 + product_sum
            metrics["accept_len_k3"] = 1.0 + run_sum
    metrics["accept_len_product"] = 1.0 + product_sum
    metrics["accept_len"] = 1.0 + run_sum
    accepted_k3, rounds_k3, accepted, rounds = values[STATS_PER_STEP * steps : STATS_PER_STEP * steps + ROUND_STATS]
    if rounds:  # evaluation only
        metrics["accept_len_rounds_k3"] = 1.0 + accepted_k3 / rounds_k3
        metrics["accept_len_rounds"] = 1.0 + accepted / rounds
    return metrics
