"""DFlash's block-wise training objective: random anchors, masked blocks, decayed soft cross-entropy.

Indexing (tokens x_0..x_{T-1}; the target's last hidden state at s predicts x_{s+1}):

* a block anchored at ``a`` holds x_a (the token the target verified last) and masks at
  a+1 .. a+bs-1; it sees the target's states at positions < a. Block position k >= 1 predicts
  x_{a+k}, whose target distribution is the target's at s = a + k - 1.
* anchors are drawn among positions whose token and next token are answer tokens (decoding only
  ever drafts after a token the target produced), ``num_anchors`` per sample at most, without
  replacement. Evaluation takes every such position (up to ``num_anchors``) with a fixed seed.
* position k weighs exp(-(k - 1) / gamma) (the paper's decay: early positions decide acceptance).

Statistics use ``eagle3.train.loss``'s layout with "steps" = block positions 1..bs-1, so the
Trainer's metrics (acc_i, accept_len, accept_len_rounds) read the same for both drafts. A block
position k is eligible when the block's earlier positions all hit (and, where the data was not
generated greedily, the data token there is the target's greedy one); ``accept_len`` is then 1 +
the expected run of leading hits, as for EAGLE-3.
"""

from __future__ import annotations

import math

import torch

from eagle3.train.loss import ROUND_STATS, STATS_PER_STEP, TargetBatch, decoding_rounds, stats_size, step_loss

EVAL_ANCHOR_SEED = 1234


def sample_anchors(
    assistant: torch.Tensor, num_anchors: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchors [B, N] (sorted) and which of them are real [B, N].

    ``assistant[b, s]`` is True when x_{s+1} is an answer token, so an anchor a is allowed when
    x_a and x_{a+1} both are: assistant[a - 1] and assistant[a] (a >= 1).
    """
    batch, length = assistant.shape
    allowed = torch.zeros_like(assistant)
    allowed[:, 1:] = assistant[:, :-1] & assistant[:, 1:]
    counts = allowed.sum(1)
    n = max(1, min(num_anchors, int(counts.max()) if counts.numel() else 0))
    noise = torch.rand(batch, length, generator=generator, device="cpu" if generator is not None else None)
    noise = noise.to(assistant.device)
    noise = torch.where(allowed, noise, torch.full_like(noise, 2.0))  # disallowed sort last
    chosen = noise.argsort(dim=1)[:, :n]
    keep = torch.arange(n, device=assistant.device).unsqueeze(0) < counts.clamp(max=n).unsqueeze(1)
    anchors = torch.where(keep, chosen, torch.zeros_like(chosen))
    order = torch.where(keep, anchors, torch.full_like(anchors, length)).argsort(dim=1)
    return anchors.gather(1, order), keep.gather(1, order)


def block_loss(
    draft,
    input_ids: torch.Tensor,
    aux_hidden_states: torch.Tensor,
    target: TargetBatch,
    num_anchors: int = 512,
    decay_gamma: float = 7.0,
    loss_type: str = "soft_ce",
    num_items: torch.Tensor | int | None = None,
    lk_eta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DFlash pass over a batch; returns (loss, stats) — see ``eagle3.train.loss.stats_size``.

    loss = sum over (block, k) of w_k * loss / sum of w_k over this micro-batch's labels, scaled by
    this micro-batch's share of the optimizer step's items (``num_items``: all micro-batches and
    ranks, counted as for EAGLE-3), so micro-batches weigh by their tokens. Without ``num_items``
    (evaluation) it is the plain weighted mean.
    """
    size = draft.config.block_size
    steps = size - 1
    batch, length = input_ids.shape
    evaluating = not torch.is_grad_enabled()
    generator = torch.Generator().manual_seed(EVAL_ANCHOR_SEED) if evaluating else None
    anchors, keep = sample_anchors(target.assistant, num_anchors, generator)
    count = anchors.shape[1]
    normed = draft.block_forward(input_ids, aux_hidden_states, anchors, keep)
    normed = normed.view(batch, count, size, -1)[:, :, 1:]  # position 0 is the given anchor token

    # Target position s = a + k - 1 for block position k = 1..bs-1 (clamped; out of range is invalid).
    offsets = torch.arange(steps, device=anchors.device)
    source = anchors.unsqueeze(-1) + offsets  # [B, N, steps]
    in_range = source < length - 1
    source = source.clamp(max=length - 1)
    flat = source.view(batch, -1)

    def at(values: torch.Tensor) -> torch.Tensor:
        return values.gather(1, flat).view(batch, count, steps)

    valid = at(target.valid) & in_range & keep.unsqueeze(-1)
    greedy = at(target.greedy) if target.greedy is not None else valid
    target_pred = at(target.pred)
    vocab = target.probs.shape[-1]
    weights = torch.tensor([math.exp(-k / decay_gamma) for k in range(steps)], device=normed.device)

    loss = normed.new_zeros((), dtype=torch.float32)
    stats = torch.zeros(stats_size(steps), device=input_ids.device)
    run = keep.clone()  # [B, N] blocks whose positions so far all hit
    run_length = torch.zeros_like(anchors)
    total_weight = (valid * weights).sum()
    for k in range(steps):
        logits = draft.compute_logits(normed[:, :, k]).float()
        # Gathered per position: the target's [B, N, V] for this k only, never [B, N, steps, V].
        probs = target.probs.gather(1, source[:, :, k].unsqueeze(-1).expand(-1, -1, vocab))
        ce_sum = step_loss(logits, probs, valid[:, :, k], loss_type, lk_eta)
        pred = logits.detach().argmax(-1)
        loss = loss + weights[k] * ce_sum
        hits = (pred == target_pred[:, :, k]) & valid[:, :, k]
        eligible = run & valid[:, :, k] & (greedy[:, :, k - 1] if k > 0 else True)
        run = eligible & hits
        run_length += run
        stats[STATS_PER_STEP * k : STATS_PER_STEP * (k + 1)] = torch.stack(
            [
                ce_sum.detach(),
                hits.sum().float(),
                valid[:, :, k].sum().float(),
                run.sum().float(),
                eligible.sum().float(),
            ]
        )
    loss = loss / total_weight.clamp(min=1e-6)
    if num_items is not None:  # this micro-batch's share of the step (count_items' count)
        local = target.assistant[:, 1:].sum()
        loss = loss * local / torch.as_tensor(num_items, device=loss.device).clamp(min=1)
    allowed = (target.assistant[:, :-1] & target.assistant[:, 1:]).sum()
    if evaluating and int(keep.sum()) == int(allowed):  # every block of the walk was drafted
        # The decoding walk wants the run at every position; the block at a predicts x_{a+1}, as
        # EAGLE-3's step 0 at t = a - 1 does.
        runs = torch.zeros(batch, max(length - 1, 0), dtype=torch.long, device=input_ids.device)
        index = (anchors - 1).clamp(min=0)
        runs.scatter_(1, index, torch.where(keep, run_length, torch.zeros_like(run_length)))
        ks = (min(3, steps), steps)
        rounds = decoding_rounds(target.assistant[:, 1:], runs, ks)
        stats[STATS_PER_STEP * steps : STATS_PER_STEP * steps + ROUND_STATS] = rounds.to(stats)
    stats[-1] = target.assistant[:, 1:].sum()
    return loss, stats
