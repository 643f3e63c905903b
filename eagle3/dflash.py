"""DFlashQwen3ForCausalLM: a DFlash block-diffusion draft, saved exactly as vLLM 0.32 loads it.

DFlash (arXiv 2602.06036) drafts a whole block in ONE forward pass. The block is the last
verified token followed by ``block_size - 1`` mask tokens at the next positions; a few
non-causal decoder layers read it, attending to (a) the target's context, i.e. keys/values
projected from the target's hidden states at ``target_layer_ids`` for every position before the
block, and (b) the block itself, in both directions. The output at each mask position predicts
the token AT that position, through the target's own lm_head.

Layout (vLLM's ``qwen3_dflash.py``; vLLM prefixes every name but ``lm_head`` with ``model.``)::

    fc                 Linear(n_layers * target_H -> H): fuses the target's states at target_layer_ids
    hidden_norm        RMSNorm of fc's output: the context every layer projects to K/V
    layers.{i}.*       Qwen3 decoder layers (q/k norms), non-causal
    norm               final RMSNorm
    embed_tokens, lm_head   frozen copies of the TARGET's; never saved (vLLM shares the target's)

Per layer, the context keys are k_norm(k_proj(hidden_norm(fc(aux)))) with rope at the context
positions, values v_proj(...): no input_layernorm, as in vLLM's
``precompute_and_store_context_kv``. The block goes through the usual pre-norm layer.

config.json: ``architectures: ["DFlashDraftModel"]``, ``model_type: "qwen3"``, ``block_size``,
``dflash_config: {mask_token_id, target_layer_ids}``. DFlash's ``target_layer_ids`` use this
toolkit's command-line numbering (layer i = OUTPUT of 0-based decoder layer i); vLLM adds 1 itself
(``get_eagle3_aux_layers_from_config``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3MLP,
    Qwen3RMSNorm,
    Qwen3RotaryEmbedding,
    apply_rotary_pos_emb,
    rotate_half,
)

from eagle3.config import (
    _COPIED_FROM_TARGET,
    DFLASH_DEFAULT_LAYER_COUNT,
    Eagle3ConfigError,
    draft_intermediate_size,
    draft_rope_parameters,
    validate_target_layers,
)
from eagle3.families import family_of

DFLASH_ARCHITECTURE = "DFlashDraftModel"
DEFAULT_BLOCK_SIZE = 16  # the published Qwen3 DFlash drafts (z-lab/Qwen3-*-DFlash-b16)
DEFAULT_NUM_DRAFT_LAYERS = DFLASH_DEFAULT_LAYER_COUNT  # ... with 5 draft layers reading 5 target layers


def default_loss_decay(block_size: int) -> float:
    """The paper's position decay gamma: 7 for blocks of 16, 5 for 10, 4 for 8 (about block / 2.2)."""
    return {16: 7.0, 10: 5.0, 8: 4.0}.get(block_size, max(1.0, block_size / 2.2))


def mask_token_for(tokenizer_length: int, vocab_size: int, override: int | None = None) -> int:
    """The id fed at the block's masked slots: ``override`` (--mask-token-id), else the first
    embedding row no token uses (Qwen3: 151669, as the published drafts), which only the draft reads."""
    if override is not None:
        if not 0 <= override < vocab_size:
            raise Eagle3ConfigError(
                f"--mask-token-id {override} is outside the target vocabulary (0..{vocab_size - 1})."
            )
        return int(override)
    if tokenizer_length < vocab_size:
        return int(tokenizer_length)
    raise Eagle3ConfigError(
        f"the target's tokenizer uses every one of its {vocab_size} embedding rows, so there is no free row for "
        "DFlash's mask token; pass --mask-token-id with a token id the answers never contain."
    )


class DFlashQwen3Config(Qwen3Config):
    """Configuration of a DFlash draft for a Qwen3-family target (``num_hidden_layers`` = DRAFT layers)."""

    model_type = "qwen3"  # so AutoConfig (and vLLM) read it without remote code

    def __init__(
        self,
        block_size: int = DEFAULT_BLOCK_SIZE,
        dflash_config: dict | None = None,
        target_hidden_size: int | None = None,
        num_target_layers: int | None = None,
        target_model_name_or_path: str | None = None,
        target_final_norm: str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs["architectures"] = [DFLASH_ARCHITECTURE]
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        self.block_size = int(block_size)
        self.dflash_config = dict(dflash_config or {})
        self.target_hidden_size = target_hidden_size if target_hidden_size is not None else self.hidden_size
        self.num_target_layers = num_target_layers
        self.target_model_name_or_path = target_model_name_or_path
        self.target_final_norm = target_final_norm
        self.validate_dflash()

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["architectures"] = [DFLASH_ARCHITECTURE]  # not the Python class name save_pretrained stamps
        return output

    @property
    def target_layers(self) -> list[int]:
        return [int(i) for i in self.dflash_config.get("target_layer_ids") or []]

    @property
    def mask_token_id(self) -> int | None:
        value = self.dflash_config.get("mask_token_id")
        return None if value is None else int(value)

    @property
    def num_aux_layers(self) -> int:
        return len(self.target_layers)

    def validate_dflash(self) -> None:
        if self.block_size < 2:
            raise Eagle3ConfigError(
                f"--block-size must be at least 2 (one verified token + masks), got {self.block_size}."
            )
        if self.num_target_layers is not None and self.target_layers:
            validate_target_layers(self.target_layers, self.num_target_layers, flag="dflash_config.target_layer_ids")
        mask = self.mask_token_id
        if mask is not None and not 0 <= mask < self.vocab_size:
            raise Eagle3ConfigError(
                f"dflash_config.mask_token_id {mask} is outside the vocabulary (0..{self.vocab_size - 1})."
            )

    @classmethod
    def from_target_config(
        cls,
        target_config,
        target_layers: Sequence[int],
        mask_token_id: int,
        num_draft_layers: int = DEFAULT_NUM_DRAFT_LAYERS,
        block_size: int = DEFAULT_BLOCK_SIZE,
        target_model_name_or_path: str | None = None,
        intermediate_size: int | None = None,
    ) -> DFlashQwen3Config:
        """A draft whose widths, heads, rope and vocab are the target's (a TEXT config): it reads the
        target's embeddings and lm_head, so its hidden size must be the target's."""
        if num_draft_layers < 1:
            raise Eagle3ConfigError(f"--num-draft-layers must be >= 1, got {num_draft_layers}.")
        layers = validate_target_layers(target_layers, target_config.num_hidden_layers, flag="--layers")
        copied = {key: getattr(target_config, key) for key in _COPIED_FROM_TARGET if hasattr(target_config, key)}
        copied["intermediate_size"] = draft_intermediate_size(target_config, intermediate_size)
        copied["rope_parameters"] = draft_rope_parameters(target_config)
        if copied.get("head_dim") is None:
            copied["head_dim"] = target_config.hidden_size // target_config.num_attention_heads
        family = family_of(target_config, source=target_model_name_or_path or "the target")
        return cls(
            **copied,
            num_hidden_layers=num_draft_layers,
            layer_types=["full_attention"] * num_draft_layers,  # full and non-causal in vLLM
            use_sliding_window=False,
            block_size=block_size,
            dflash_config={"mask_token_id": int(mask_token_id), "target_layer_ids": layers},
            target_hidden_size=target_config.hidden_size,
            num_target_layers=target_config.num_hidden_layers,
            target_model_name_or_path=target_model_name_or_path
            or getattr(target_config, "_name_or_path", None)
            or None,
            target_final_norm=family.final_norm,
            dtype=str(getattr(target_config, "dtype", None) or "float32").replace("torch.", ""),
        )


def is_dflash_config(config: dict | Any) -> bool:
    """Whether a draft's config (dict or config object) describes a DFlash draft (by its
    architecture, or by a ``dflash_config`` when the architecture is wrong: the checker says so)."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    return DFLASH_ARCHITECTURE in (get("architectures") or []) or get("dflash_config") is not None


class DFlashAttention(nn.Module):
    """Qwen3 attention whose keys/values are [context from the target; the block itself]."""

    def __init__(self, config: DFlashQwen3Config) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scale = self.head_dim**-0.5
        bias = bool(config.attention_bias)
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)  # vLLM: bias iff attention_bias
        self.q_norm = Qwen3RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = Qwen3RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def _kv(
        self, states: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length, _ = states.shape
        k = self.k_norm(self.k_proj(states).view(batch, length, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(states).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos_sin
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        k = k * cos + rotate_half(k) * sin
        return k, v

    def context_kv(self, context: torch.Tensor, cos_sin) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of the context states [B, C, H] (already hidden_norm(fc(aux)))."""
        return self._kv(context, cos_sin)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        context_kv: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """``mask`` [B, 1, Q, C + Q] (True = attend) or None (every query sees everything)."""
        batch, length, _ = hidden_states.shape
        q = self.q_norm(self.q_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim)).transpose(1, 2)
        cos, sin = cos_sin
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        k_block, v_block = self._kv(hidden_states, cos_sin)
        key = torch.cat([context_kv[0], k_block], dim=-2)
        value = torch.cat([context_kv[1], v_block], dim=-2)
        out = F.scaled_dot_product_attention(
            q, key, value, attn_mask=mask, scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class DFlashDecoderLayer(nn.Module):
    """vLLM's DFlashQwen3DecoderLayer in plain PyTorch (pre-norm, residuals, Qwen3 MLP)."""

    def __init__(self, config: DFlashQwen3Config) -> None:
        super().__init__()
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = DFlashAttention(config)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = Qwen3MLP(config)

    def forward(self, hidden_states, cos_sin, context_kv, mask) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), cos_sin, context_kv, mask)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class DFlashQwen3ForCausalLM(PreTrainedModel):
    config_class = DFlashQwen3Config
    config: DFlashQwen3Config
    base_model_prefix = ""
    main_input_name = "input_ids"
    _no_split_modules = ["DFlashDecoderLayer"]
    _supports_sdpa = True
    # The embedding and the head are the target's: vLLM shares both when the checkpoint has none.
    _keys_to_ignore_on_save = ["embed_tokens.weight", "lm_head.weight"]
    _keys_to_ignore_on_load_missing = [r"embed_tokens\.weight", r"lm_head\.weight"]

    def __init__(self, config: DFlashQwen3Config) -> None:
        super().__init__(config)
        hidden = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden)
        self.fc = nn.Linear(config.num_aux_layers * config.target_hidden_size, hidden, bias=False)
        self.hidden_norm = Qwen3RMSNorm(hidden, eps=config.rms_norm_eps)
        self.layers = nn.ModuleList(DFlashDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = Qwen3RMSNorm(hidden, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, config.vocab_size, bias=False)
        self.rotary_emb = Qwen3RotaryEmbedding(config)
        self.post_init()
        self.embed_tokens.weight.requires_grad_(False)
        self.lm_head.weight.requires_grad_(False)

    # ----------------------------------------------------------------- the target's pieces
    def load_target_embeddings(self, embed_tokens: torch.Tensor, lm_head: torch.Tensor) -> None:
        """Copy the target's (frozen) input embedding and lm_head into the draft."""
        for module, weight, name in (
            (self.embed_tokens, embed_tokens, "embedding"),
            (self.lm_head, lm_head, "lm_head"),
        ):
            if tuple(weight.shape) != tuple(module.weight.shape):
                raise ValueError(
                    f"target {name} has shape {tuple(weight.shape)}, the draft expects {tuple(module.weight.shape)}"
                )
            with torch.no_grad():
                module.weight.copy_(weight.to(module.weight.dtype))
            module.weight.requires_grad_(False)

    def draft_to_target_ids(self) -> torch.Tensor:
        """The draft predicts over the target's whole vocabulary (identity map)."""
        return torch.arange(self.config.vocab_size, device=self.lm_head.weight.device)

    def compute_logits(self, normed_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(normed_hidden_states)

    # ----------------------------------------------------------------- forward pieces
    def context_states(self, aux_hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_norm(fc(aux)): what every layer projects to context keys/values."""
        return self.hidden_norm(self.fc(aux_hidden_states.to(self.fc.weight.dtype)))

    def context_kv(self, context: torch.Tensor, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the context keys/values of ``context`` [B, C, H] at ``positions`` [B, C]."""
        cos_sin = self.rotary_emb(context, positions)
        return [layer.self_attn.context_kv(context, cos_sin) for layer in self.layers]

    def blocks(
        self,
        block_ids: torch.Tensor,
        positions: torch.Tensor,
        context_kv: list[tuple[torch.Tensor, torch.Tensor]],
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The normed output [B, Q, H] of the block tokens ``block_ids`` at ``positions`` [B, Q]."""
        hidden = self.embed_tokens(block_ids).to(self.fc.weight.dtype)
        cos_sin = self.rotary_emb(hidden, positions)
        for layer, kv in zip(self.layers, context_kv, strict=True):
            hidden = layer(hidden, cos_sin, kv, mask)
        return self.norm(hidden)

    def block_inputs(self, input_ids: torch.Tensor, anchors: torch.Tensor, keep: torch.Tensor):
        """Token ids and positions of the blocks anchored at ``anchors`` [B, N]: the anchor's own
        token, then mask tokens (all masks for blocks not kept)."""
        size, mask_id = self.config.block_size, self.config.mask_token_id
        batch, count = anchors.shape
        ids = torch.full((batch, count, size), mask_id, dtype=torch.long, device=input_ids.device)
        ids[:, :, 0] = torch.where(keep, input_ids.gather(1, anchors), torch.full_like(anchors, mask_id))
        positions = anchors.unsqueeze(-1) + torch.arange(size, device=anchors.device)
        return ids.view(batch, -1), positions.view(batch, -1)

    def block_attention_mask(self, anchors: torch.Tensor, length: int) -> torch.Tensor:
        """[B, 1, N*bs, T + N*bs]: a block sees the context strictly before its anchor (the target
        has not read the anchor token yet when it drafts) and its own block in both directions;
        blocks never see each other."""
        size = self.config.block_size
        batch, count = anchors.shape
        device = anchors.device
        query_anchor = anchors.repeat_interleave(size, dim=1)  # [B, Q]
        sees_context = torch.arange(length, device=device).view(1, 1, -1) < query_anchor.unsqueeze(-1)
        block_of = torch.arange(count * size, device=device) // size
        sees_block = (block_of.view(-1, 1) == block_of.view(1, -1)).unsqueeze(0).expand(batch, -1, -1)
        return torch.cat([sees_context, sees_block], dim=-1).unsqueeze(1)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """``block_forward`` (the training subclass's ``forward`` computes the loss around it)."""
        return self.block_forward(*args, **kwargs)

    def block_forward(
        self,
        input_ids: torch.Tensor,
        aux_hidden_states: torch.Tensor,
        anchors: torch.Tensor,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Training view: the normed outputs [B, N * block_size, H] of N blocks per sample, all in
        one pass (the context is the target's states at every position, each block masked to the
        part before its anchor)."""
        batch, length = input_ids.shape
        keep = keep if keep is not None else torch.ones_like(anchors, dtype=torch.bool)
        context = self.context_states(aux_hidden_states)
        positions = torch.arange(length, device=input_ids.device).unsqueeze(0).expand(batch, -1)
        kv = self.context_kv(context, positions)
        block_ids, block_positions = self.block_inputs(input_ids, anchors, keep)
        return self.blocks(block_ids, block_positions, kv, self.block_attention_mask(anchors, length))
