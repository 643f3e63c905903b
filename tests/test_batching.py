"""Batches sized by tokens (--max-tokens-per-batch) and the memory model behind the budget."""

from __future__ import annotations

import random

import pytest

from eagle3.train.dataset import TokenBudgetBatchSampler, padded
from eagle3.train.memory_model import estimate_peak_memory, max_tokens_per_batch

LENGTHS = [random.Random(0).randrange(5, 300) for _ in range(200)]


def _cost(batch, multiple=1):
    return len(batch) * padded(max(LENGTHS[i] for i in batch), multiple)


@pytest.mark.parametrize("multiple", [1, 8])
def test_batches_fit_the_budget_cover_every_sample_and_start_with_the_largest(multiple):
    sampler = TokenBudgetBatchSampler(LENGTHS, 1200, seed=3, pad_to_multiple_of=multiple)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))
    assert all(_cost(b, multiple) <= 1200 for b in batches)
    assert _cost(batches[0], multiple) == max(_cost(b, multiple) for b in batches)
    # Similar lengths share a batch: little padding overall.
    padding = 1 - sum(LENGTHS) / sum(_cost(b, multiple) for b in batches)
    assert padding < 0.1
    # Seeded per epoch: the same epoch gives the same batches, another epoch another order.
    assert list(sampler) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches and len(list(sampler)) == len(batches)


def test_every_rank_gets_as_many_batches_and_a_largest_one_first():
    ranks = [TokenBudgetBatchSampler(LENGTHS, 1000, seed=1, world_size=3, rank=r) for r in range(3)]
    per_rank = [list(s) for s in ranks]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(ranks[0])
    seen = {i for batches in per_rank for b in batches for i in b}
    assert seen == set(range(len(LENGTHS)))
    everything = [b for batches in per_rank for b in batches]
    top = sorted((_cost(b) for b in everything), reverse=True)[:3]
    assert sorted(_cost(batches[0]) for batches in per_rank) == sorted(top)


def test_budget_below_the_longest_sample_is_refused():
    with pytest.raises(ValueError, match="--max-tokens-per-batch 100 is smaller than the longest sample"):
        TokenBudgetBatchSampler(LENGTHS, 100)


QWEN3_1_7B_DRAFT = dict(
    hidden_size=2048,
    intermediate_size=6144,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    draft_vocab_size=32000,
)


def test_memory_model_parts_scale_as_they_should():
    base = estimate_peak_memory(tokens_per_batch=2048, **QWEN3_1_7B_DRAFT)
    double = estimate_peak_memory(tokens_per_batch=4096, **QWEN3_1_7B_DRAFT)
    assert double.activations == 2 * base.activations and double.total - base.total == base.activations
    assert estimate_peak_memory(tokens_per_batch=2048, mixed_precision=True, **QWEN3_1_7B_DRAFT).total < base.total
    lighter = estimate_peak_memory(tokens_per_batch=2048, head_checkpointing=True, **QWEN3_1_7B_DRAFT)
    assert lighter.activations < base.activations
    zero2 = estimate_peak_memory(tokens_per_batch=2048, zero_stage=2, world_size=8, **QWEN3_1_7B_DRAFT)
    assert zero2.optimizer_states == base.optimizer_states // 8 and zero2.gradients == base.gradients // 8
    # ~137 M trainable parameters in a Qwen3-1.7B draft (fc 12.6 M, layer 50 M, lm_head 65.5 M).
    assert 130e6 < base.trainable_weights / 4 < 145e6
    assert "estimated peak per device" in base.table()


def test_token_budget_from_memory_fits():
    budget = max_tokens_per_batch(24 * 2**30, **QWEN3_1_7B_DRAFT, mixed_precision=True)
    assert budget % 64 == 0 and budget > 2048
    fits = estimate_peak_memory(tokens_per_batch=budget, mixed_precision=True, **QWEN3_1_7B_DRAFT)
    over = estimate_peak_memory(tokens_per_batch=budget + 64, mixed_precision=True, **QWEN3_1_7B_DRAFT)
    assert fits.total <= 24 * 2**30 < over.total + 64 * (over.activations // over.tokens_per_batch)
