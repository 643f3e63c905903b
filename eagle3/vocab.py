"""The draft vocabulary: which target tokens the draft's lm_head can propose.

EAGLE-3 drafts predict over a reduced vocabulary (32000 of Qwen3's 151936 ids by default):
the most frequent tokens of the data the draft is trained on, counted over loss-masked
(assistant) tokens only, because that is what the draft will be asked to propose.

vLLM maps draft id ``i`` to target id ``i + d2t[i]``; ``t2d`` marks the target ids that
have a draft id. Both are built from one ascending list of target ids.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def count_tokens(samples: Iterable[tuple[torch.Tensor, torch.Tensor]], vocab_size: int) -> torch.Tensor:
    """Token frequencies [vocab_size] over the loss-masked tokens of (input_ids, loss_mask) pairs."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for input_ids, loss_mask in samples:
        ids = input_ids[loss_mask.bool()].long()
        if ids.numel() and int(ids.max()) >= vocab_size:
            raise ValueError(f"token id {int(ids.max())} >= target vocab_size {vocab_size}: data from another target?")
        counts += torch.bincount(ids, minlength=vocab_size)
    return counts


def select_draft_vocab(counts: torch.Tensor, draft_vocab_size: int) -> torch.Tensor:
    """Target ids of the draft vocabulary, ascending: the ``draft_vocab_size`` most frequent ids.

    Ties break towards the lower id (deterministic). When fewer distinct ids were seen than
    requested, the rest is filled with the lowest unused ids, so the vocabulary always has
    exactly ``draft_vocab_size`` distinct entries (SpecForge #76 crashed on this case).
    The size is capped at the target vocabulary.
    """
    vocab_size = counts.numel()
    size = min(int(draft_vocab_size), vocab_size)
    if size == vocab_size:
        return torch.arange(vocab_size)
    seen = torch.nonzero(counts > 0).flatten()
    # Stable sort by descending count keeps ascending ids among equal counts.
    order = torch.sort(counts[seen], descending=True, stable=True).indices
    chosen = seen[order[:size]]
    if chosen.numel() < size:
        unused = torch.ones(vocab_size, dtype=torch.bool)
        unused[chosen] = False
        chosen = torch.cat([chosen, torch.nonzero(unused).flatten()[: size - chosen.numel()]])
    return torch.sort(chosen).values


def d2t_t2d(draft_ids: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's tensors: ``d2t[i] = draft_ids[i] - i`` (int64), ``t2d`` = bool membership over the target vocab."""
    draft_ids = draft_ids.long()
    d2t = draft_ids - torch.arange(draft_ids.numel())
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[draft_ids] = True
    return d2t, t2d


def coverage(counts: torch.Tensor, draft_ids: torch.Tensor) -> float:
    """Fraction of the counted (assistant) tokens that the draft vocabulary can propose."""
    total = int(counts.sum())
    return float(counts[draft_ids].sum()) / total if total else 0.0
