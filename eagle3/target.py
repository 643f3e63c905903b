"""The target pieces a draft needs, read straight from the target's safetensors.

Training and checking need only the target's config, its input embedding, its final norm
and its lm_head, never the whole model: for Qwen3-1.7B that is ~0.6 GB instead of 3.4 GB,
and for a 235B target it is the difference between fitting and not. Works on a local folder
or a Hub id (only the shards holding these tensors are downloaded).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from eagle3.families import (
    LM_HEAD as LM_HEAD,  # re-exported: the head's name is the same in every layout
)
from eagle3.families import (
    TargetFamily,
    checkpoint_dtype,
    family_of,
    tensor_names,
    text_config,
    tie_word_embeddings,
)
from eagle3.families import final_norm as family_final_norm

# The flat layout's names (Qwen3*ForCausalLM); nested checkpoints are read through
# eagle3.families.tensor_names.
EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"


def _resolve(model: str | Path, filename: str) -> Path | None:
    """Path of ``filename`` in a local folder, or downloaded from the Hub; None if absent."""
    local = Path(model)
    if local.is_dir():
        path = local / filename
        return path if path.exists() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(str(model), filename))
    except EntryNotFoundError:
        return None


def resolve_model(model: str | Path) -> str:
    """A local model folder as an absolute path (``./x``, ``x`` and ``/abs/x`` are one model,
    and what is stored still points at it from another directory); a Hub id as given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else str(model)


def load_target_config(model: str | Path) -> PretrainedConfig:
    """The target's TEXT config (``text_config`` of a multimodal checkpoint), refused with a clear
    message for an architecture outside the Qwen3 family. What a nested text config lacks and
    the wrapper has is filled in from the top level: the checkpoint dtype (the draft is exported
    in it), the tied-head flag and the name."""
    try:
        config = AutoConfig.from_pretrained(str(model))
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"cannot read the target config of {model!r}: {error}. Pass a local model folder or a Hub id."
        ) from None
    family_of(config, source=str(model))
    text = text_config(config)
    if text is not config:
        text.dtype = checkpoint_dtype(config)
        text.tie_word_embeddings = tie_word_embeddings(config)
        text._name_or_path = config._name_or_path
    return text


def target_family(config: PretrainedConfig) -> TargetFamily:
    """The family of a target's (text or top-level) config."""
    return family_of(config, source=getattr(config, "_name_or_path", None) or "the target")


def config_hash(config: PretrainedConfig) -> str:
    """Hash of what decides the target's hidden states (sizes, layers, rope, vocab)."""
    keys = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "intermediate_size",
        "vocab_size",
        "rms_norm_eps",
        "rope_parameters",
    )
    data = {key: getattr(config, key, None) for key in keys}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def target_tensor_names(model: str | Path) -> list[str]:
    """Every tensor name the target's checkpoint holds (the index's, or the single file's)."""
    index_path = _resolve(model, "model.safetensors.index.json")
    if index_path is not None:
        return list(json.loads(index_path.read_text())["weight_map"])
    path = _resolve(model, "model.safetensors")
    if path is None:
        raise FileNotFoundError(f"{model}: no model.safetensors or model.safetensors.index.json")
    with safe_open(path, framework="pt") as handle:
        return list(handle.keys())


def read_target_tensors(model: str | Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Read the named tensors from the target's (possibly sharded) safetensors.

    A name the checkpoint does not hold is left out of the result (the caller decides whether
    that is an error). With a ``model.safetensors.index.json`` only the index's names count:
    a tied checkpoint sharded by the Hub (Qwen3-4B) lists no ``lm_head.weight`` and has no
    ``model.safetensors`` at all, so a name missing from the index is simply absent.
    """
    index_path = _resolve(model, "model.safetensors.index.json")
    by_file: dict[str, list[str]] = {}
    if index_path is not None:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        for name in names:
            if name in weight_map:
                by_file.setdefault(weight_map[name], []).append(name)
    else:
        by_file["model.safetensors"] = list(names)
    tensors: dict[str, torch.Tensor] = {}
    for filename, wanted in by_file.items():
        path = _resolve(model, filename)
        if path is None:
            raise FileNotFoundError(f"{model}: {filename} not found (needed for {wanted})")
        with safe_open(path, framework="pt") as handle:
            present = set(handle.keys())
            for name in wanted:
                if name in present:
                    tensors[name] = handle.get_tensor(name)
    return tensors


def final_norm(
    last_hidden_states: torch.Tensor, weight: torch.Tensor, eps: float, zero_centred: bool = False
) -> torch.Tensor:
    """The target's final RMSNorm on pre-norm last hidden states (fp32); ``zero_centred`` for
    Qwen3-Next / Qwen3.5 (``x * (1 + w)``): ask ``TargetHead.zero_centred_norm``."""
    return family_final_norm(last_hidden_states, weight, eps, zero_centred)


@dataclass
class TargetHead:
    """Frozen target pieces: embedding [V, H], final norm [H], lm_head [V, H], and the norm's
    convention (its family's): together they are the target's own next-token distribution."""

    config: PretrainedConfig
    embed_tokens: torch.Tensor
    norm: torch.Tensor
    lm_head: torch.Tensor
    zero_centred_norm: bool = False

    @classmethod
    def from_pretrained(cls, model: str | Path) -> TargetHead:
        config = load_target_config(model)
        names = tensor_names(target_tensor_names(model), config.tie_word_embeddings, source=str(model))
        wanted = [names.embed, names.norm] + ([names.lm_head] if names.lm_head else [])
        tensors = read_target_tensors(model, wanted)
        return cls(
            config=config,
            embed_tokens=tensors[names.embed],
            norm=tensors[names.norm],
            lm_head=tensors[names.lm_head] if names.lm_head else tensors[names.embed],
            zero_centred_norm=target_family(config).zero_centred_norm,
        )

    def final_norm(self, last_hidden_states: torch.Tensor) -> torch.Tensor:
        return final_norm(last_hidden_states, self.norm, float(self.config.rms_norm_eps), self.zero_centred_norm)

    def logits(self, last_hidden_states: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary fp32 logits from pre-norm last hidden states [..., H]."""
        return self.final_norm(last_hidden_states) @ self.lm_head.float().T
