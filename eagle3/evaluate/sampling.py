"""Top-k / top-p for the in-process (hf) evaluator, as vLLM applies them.

vLLM filters the TARGET's distribution with top-k then top-p (on the temperature-scaled logits)
both when sampling and when verifying draft tokens; the draft's own proposal distribution uses
the temperature only (``compute_probs_and_sample_next_token`` in vLLM's proposer). The hf
evaluator gets the same behaviour by masking the target's logits where they are produced, its
output layer, so every consumer (sampling, verification, target-only decoding) sees the
filtered distribution and the draft stays untouched.
"""

from __future__ import annotations

import torch
from torch import nn


def top_k_top_p_mask(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """``logits`` with -inf outside vLLM's top-k (0 = off) then top-p set, computed at ``temperature``."""
    scaled = logits.float() / temperature
    remove = torch.zeros_like(scaled, dtype=torch.bool)
    if 0 < top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[..., -1:]
        remove |= scaled < kth
    if top_p < 1.0:
        # vLLM's rule: sort ascending, drop tokens whose cumulative mass stays <= 1 - p, keep the top one.
        ordered, order = scaled.masked_fill(remove, float("-inf")).sort(dim=-1)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - top_p
        drop[..., -1] = False
        remove |= torch.zeros_like(drop).scatter(-1, order, drop)
    return logits.masked_fill(remove, float("-inf"))


def filter_target_logits(target: nn.Module, temperature: float, top_p: float, top_k: int):
    """Hook the target's output layer so its logits carry vLLM's top-k/top-p; returns the hook
    handle (``.remove()`` it), or None when there is nothing to filter (greedy, or both off)."""
    if temperature == 0 or (top_p >= 1.0 and top_k <= 0):
        return None

    def mask(_module, _inputs, logits):
        return top_k_top_p_mask(logits, temperature, top_p, top_k)

    return target.get_output_embeddings().register_forward_hook(mask)
