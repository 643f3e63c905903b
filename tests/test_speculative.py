"""Verification rules of the in-process speculative decoder above temperature 0 (no models needed)."""

from __future__ import annotations

import pytest
import torch

from eagle3.evaluate.speculative import SpeculativeDecoder

P = torch.tensor([0.1, 0.3, 0.45, 0.15])


def _decoder(draft_sampling: str) -> SpeculativeDecoder:
    decoder = object.__new__(SpeculativeDecoder)  # only the verification state, no target/draft
    decoder.temperature, decoder.draft_sampling = 1.0, draft_sampling
    decoder.generator = torch.Generator().manual_seed(0)
    return decoder


@pytest.mark.parametrize("draft_sampling", ["greedy", "probabilistic"])
def test_verification_keeps_the_target_distribution(draft_sampling):
    """vLLM's default (greedy draft, q one-hot): the draft token is kept with probability p(token).
    Either rule leaves the first output token distributed as p (lossless sampling)."""
    decoder = _decoder(draft_sampling)
    logits = P.log().expand(2, -1)  # target logits at the proposal and the bonus position
    q = torch.tensor([0.4, 0.4, 0.1, 0.1])
    counts, kept, n = torch.zeros(4), 0, 5000
    for _ in range(n):
        token = 1 if draft_sampling == "greedy" else int(torch.multinomial(q, 1, generator=decoder.generator))
        out = decoder._verify([token], [q], logits)
        kept += len(out) == 2
        counts[out[0]] += 1
    expected_kept = float(P[1]) if draft_sampling == "greedy" else float(torch.minimum(P, q).sum())
    assert abs(kept / n - expected_kept) < 0.025
    assert torch.allclose(counts / n, P, atol=0.025)
