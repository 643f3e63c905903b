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

EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


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
    try:
        config = AutoConfig.from_pretrained(str(model))
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"cannot read the target config of {model!r}: {error}. Pass a local model folder or a Hub id."
        ) from None
    return getattr(config, "text_config", config)


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


def final_norm(last_hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The target's final RMSNorm on pre-norm last hidden states (in fp32, as Qwen3's is)."""
    hidden = last_hidden_states.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight.float() * hidden


@dataclass
class TargetHead:
    """Frozen target pieces: embedding [V, H], final norm [H], lm_head [V, H]."""

    config: PretrainedConfig
    embed_tokens: torch.Tensor
    norm: torch.Tensor
    lm_head: torch.Tensor

    @classmethod
    def from_pretrained(cls, model: str | Path) -> TargetHead:
        config = load_target_config(model)
        tensors = read_target_tensors(model, [EMBED, NORM, LM_HEAD])
        missing = [name for name in (EMBED, NORM) if name not in tensors]
        if missing:
            raise FileNotFoundError(f"{model}: tensors {missing} not found; is this a Qwen3 causal LM checkpoint?")
        lm_head = tensors.get(LM_HEAD)
        if lm_head is None:
            if not getattr(config, "tie_word_embeddings", False):
                raise FileNotFoundError(f"{model}: {LM_HEAD} not found and tie_word_embeddings is false")
            lm_head = tensors[EMBED]
        return cls(config=config, embed_tokens=tensors[EMBED], norm=tensors[NORM], lm_head=lm_head)
