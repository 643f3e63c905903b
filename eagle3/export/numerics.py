"""Numerical checks behind ``eagle3 check``: what names and shapes cannot show.

A draft can match vLLM's contract tensor for tensor and still be trained against the wrong
thing. Two such errors are silent everywhere else:

* the target distribution: training computes the target's next-token distribution from the
  stored last hidden state with its own copy of the final norm and head. If that copy differs
  from the model (Qwen3-Next / Qwen3.5 compute ``x * (1 + w)``, not ``x * w``), training
  distils a distribution the target never produces. Checked by comparing training's norm +
  head with the target's own norm module (transformers' class for its architecture, built
  from its config) and head on synthetic positions; and by the convention the draft records
  (``target_final_norm``) having been the right one.
* the rope: the draft's attention is trained with the rotary embedding of our modeling code,
  vLLM serves it with the one ``get_rope`` builds from the saved config.json. Checked by
  rotating the same queries and keys both ways.
"""

from __future__ import annotations

from pathlib import Path

import torch

from eagle3.export.problem import Problem

POSITIONS = 24  # synthetic positions per check
LOGIT_TOLERANCE = 1e-3  # max abs logit error in fp32 (relative to the largest logit, at least 1)
ROPE_TOLERANCE = 1e-4


def _reference_final_norm(target: str | Path, family, hidden_size: int, eps: float) -> torch.nn.Module:
    """The target's own final-norm module: transformers' class for its architecture (found on a
    meta-device instance of the whole model, so nothing is allocated), with the checkpoint's weight
    loaded by the caller."""
    from eagle3.families import final_norm_module, meta_model

    return type(final_norm_module(meta_model(str(target), family)))(hidden_size, eps)


def target_distribution_problems(draft_config: dict, target: str | Path, head=None) -> list[Problem]:
    """(a) training's final norm + head reproduce the target model's own logits, and (b) the
    draft was trained with that convention (its config records it)."""
    from eagle3.target import TargetHead, target_family

    head = head or TargetHead.from_pretrained(target)
    config = head.config
    family = target_family(config)
    hidden_size, eps = int(config.hidden_size), float(config.rms_norm_eps)
    reference = _reference_final_norm(target, family, hidden_size, eps)
    with torch.no_grad():
        reference.weight.copy_(head.norm.float())
        generator = torch.Generator().manual_seed(0)
        # Pre-norm states have large, uneven magnitudes; the norm makes the scale irrelevant.
        hidden = torch.randn(POSITIONS, hidden_size, generator=generator) * 8.0
        lm_head = head.lm_head.float()
        theirs = reference(hidden) @ lm_head.T
        ours = head.logits(hidden)
    agree = float((theirs.argmax(-1) == ours.argmax(-1)).float().mean())
    error = float((theirs - ours).abs().max())
    scale = max(1.0, float(theirs.abs().max()))
    problems = []
    if agree < 1.0 or error > LOGIT_TOLERANCE * scale:
        convention = "x * (1 + w)" if head.zero_centred_norm else "x * w"
        problems.append(
            Problem(
                f"training's target distribution differs from the target model's own logits on {POSITIONS} "
                f"synthetic positions (argmax agreement {agree:.2f}, max abs logit error {error:.3g}): training "
                f"applies the final norm as {convention}, the target's {type(reference).__name__} does not",
                f"the target family {family.name!r} is described wrongly in eagle3/families.py; fix it and retrain",
            )
        )
    recorded = draft_config.get("target_final_norm")
    expected = family.final_norm
    if recorded is None and family.zero_centred_norm:
        problems.append(
            Problem(
                f"the draft does not record which final-norm convention it was trained with, and this "
                f"{family.name} target uses a zero-centred norm (x * (1 + w)): drafts from eagle3-qwen3 before "
                "that was known were trained against a different distribution than the target's",
                "retrain the draft with this version (it records target_final_norm in config.json)",
            )
        )
    elif recorded is not None and recorded != expected:
        problems.append(
            Problem(
                f"the draft was trained with the target's final norm taken as {recorded!r}, but this {family.name} "
                f"target's is {expected!r}: it learned a different distribution than the target's",
                "retrain the draft against this target",
            )
        )
    return problems


def _vllm_rope(head_dim: int, max_position: int, rope_parameters: dict):
    """vLLM's rotary embedding for these settings, as its draft attention builds it."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):
        return get_rope(head_dim, max_position=max_position, rope_parameters=dict(rope_parameters))


def rope_problems(draft_config: dict) -> list[Problem]:
    """The draft's rope as trained (our modeling's rotary embedding from its saved config) equals
    the rope vLLM builds from the same config.json, on random queries and keys."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return [
            Problem(
                "vLLM is not installed here, so the rope it would build from config.json was not compared "
                "with training's",
                "run eagle3 check where vLLM is installed",
                severity="warning",
            )
        ]
    from transformers import Qwen3Config

    from eagle3.modeling import Qwen3RotaryEmbedding, apply_rotary_pos_emb

    # Only what the rope reads, as the draft's modeling reads it (a config with other faults
    # still gets its rope checked).
    keys = ("hidden_size", "num_attention_heads", "head_dim", "max_position_embeddings", "rope_parameters")
    config = Qwen3Config(**{key: draft_config[key] for key in keys if draft_config.get(key) is not None})
    head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
    heads = 2
    positions = torch.tensor([0, 1, 7, 100, 1000, min(4095, config.max_position_embeddings - 1)])
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(len(positions), heads, head_dim, generator=generator)
    key = torch.randn(len(positions), 1, head_dim, generator=generator)
    with torch.no_grad():
        rotary = Qwen3RotaryEmbedding(config)
        cos, sin = rotary(query.transpose(0, 1)[None], positions[None])
        trained_q, trained_k = apply_rotary_pos_emb(query.transpose(0, 1)[None], key.transpose(0, 1)[None], cos, sin)
        trained_q, trained_k = trained_q[0].transpose(0, 1), trained_k[0].transpose(0, 1)
        try:
            served = _vllm_rope(head_dim, config.max_position_embeddings, config.rope_parameters)
            served_q, served_k = served.forward_native(
                positions, query.reshape(len(positions), -1).clone(), key.reshape(len(positions), -1).clone()
            )
        except Exception as error:  # e.g. multimodal sections that need 3-D positions
            return [
                Problem(
                    f"vLLM cannot apply the rope of config.json (rope_parameters {config.rope_parameters}) to a "
                    f"text-only draft: {type(error).__name__}: {error}",
                    "retrain with this version (the draft's own rope, without the target's mrope/partial keys)",
                )
            ]
    error = max(
        float((served_q.reshape_as(query) - trained_q).abs().max()),
        float((served_k.reshape_as(key) - trained_k).abs().max()),
    )
    if error <= ROPE_TOLERANCE:
        return []
    return [
        Problem(
            f"the rope vLLM builds from config.json (rotary_dim {served.rotary_dim} of head_dim {head_dim}, "
            f"rope_parameters {config.rope_parameters}) differs from the one the draft was trained with "
            f"(all {head_dim} dimensions rotated; max abs difference {error:.3g} on rotated queries/keys)",
            "retrain with this version (it writes the draft's own rope into config.json: no "
            "partial_rotary_factor / mrope_section copied from the target)",
        )
    ]
