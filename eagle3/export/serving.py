"""How to serve a draft above temperature 0: one text for the README, the model card and `eagle3 check`.

vLLM 0.32 drafts greedily by default (``speculative_config.draft_sample_method: "greedy"``): the
draft's argmax is proposed and treated as one-hot, so a sampled target keeps it only with
probability p_target(token) and the rest of what the draft learned about the distribution is
thrown away. ``"probabilistic"`` samples the draft and keeps a token with min(1, p/q). Measured
on our default draft (vLLM, k=3, T=0.6, top-p 0.95, top-k 20): 1.78 greedy, 2.47 probabilistic.
The cost: vLLM keeps the draft's probabilities, k x vocab float32 per running sequence, on the GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

from eagle3.dflash import is_dflash_config

# vLLM's SpeculativeConfig.draft_sample_method values (vllm/config/speculative.py, DraftSampleMethod)
DRAFT_SAMPLE_METHODS = ("greedy", "probabilistic")
# Qwen3's recommended sampling for thinking mode (its model cards): T=0.6, top-p 0.95, top-k 20
QWEN3_SAMPLING = {"temperature": 0.6, "top_p": 0.95, "top_k": 20}


def draft_probs_bytes(vocab_size: int, num_speculative_tokens: int = 3) -> int:
    """GPU bytes vLLM holds per running sequence for probabilistic drafting: k x vocab float32
    (the draft's logits are scattered to the target's full vocabulary before the softmax)."""
    return num_speculative_tokens * vocab_size * 4


def sampling_advice(vocab_size: int | None = None, num_speculative_tokens: int = 3) -> str:
    """A short paragraph (plain text, Markdown-safe) recommending probabilistic drafting above T=0."""
    if vocab_size:
        per_sequence = draft_probs_bytes(vocab_size, num_speculative_tokens) / 2**20
        cost = (
            f"{num_speculative_tokens} x {vocab_size} float32 = {per_sequence:.1f} MiB per running sequence "
            f"({per_sequence * 256 / 1024:.2f} GiB at 256 sequences)"
        )
    else:
        cost = "k x vocab float32 per running sequence (Qwen3, k=3: 1.7 MiB)"
    return (
        'Sampling above temperature 0: add "draft_sample_method": "probabilistic" to the speculative config. '
        "vLLM's default (greedy) proposes the draft's argmax and treats it as one-hot, which throws away most "
        "of what the draft learned (measured, k=3, T=0.6, top-p 0.95, top-k 20: acceptance length 1.78 greedy, "
        f"2.47 probabilistic). Its cost: vLLM keeps the draft's probabilities on the GPU, {cost}. "
        "At temperature 0 both methods are the same."
    )


def speculative_config_for(draft_config: dict, model: str) -> dict:
    """vLLM's speculative config for a saved draft (its config.json as a dict): the method its
    architecture needs, and k = block_size - 1 for DFlash (the blocks it was trained on; fewer masks
    than in training change what its non-causal layers see), 3 for EAGLE-3."""
    if is_dflash_config(draft_config):
        method, k = "dflash", int(draft_config.get("block_size", 16)) - 1
    else:
        method, k = "eagle3", 3
    return {"model": model, "method": method, "num_speculative_tokens": k, "draft_sample_method": "probabilistic"}


def speculative_config_of(draft_dir: str | Path, model: str | None = None) -> dict:
    """``speculative_config_for`` read from ``draft_dir/config.json``."""
    config = json.loads((Path(draft_dir) / "config.json").read_text())
    return speculative_config_for(config, str(model if model is not None else draft_dir))
