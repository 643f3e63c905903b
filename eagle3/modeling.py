"""Eagle3Qwen3ForCausalLM: the EAGLE-3 draft, with tensor names exactly as vLLM loads them.

Layout (no ``model.`` prefix, see vLLM's ``qwen3_eagle3.py``)::

    fc                      Linear(n_aux * target_H -> H), fuses the target's aux states
    fc_norm.{i}             (fc_norm, EAGLE-3.1) RMSNorm of aux chunk i before fc
    input_norm              (norm_before_fc) RMSNorm over the whole aux vector before fc
    midlayer.*              decoder layer 0: q/k/v read [input_layernorm(embed), hidden_norm(h)] (2H)
    layers.{i}.*            extra decoder layers (i >= 1, --num-draft-layers > 1), H inputs,
                            fused add-norm on (hidden, residual) as in vLLM
    norm, lm_head           final norm and the head over the draft vocabulary
    d2t, t2d                draft -> target id offsets, target-vocab membership mask
                            (only when the draft vocabulary is reduced: vLLM rejects d2t otherwise)
    embed_tokens            frozen copy of the target's embedding; never saved (vLLM shares the target's)

One draft *step* maps (hidden state, next-token embedding) at each position to the draft's
pre-norm hidden state there (the post-norm one with ``norm_output``, EAGLE-3.1). Training
unrolls several steps (training-time test) through ``Eagle3Cache`` in "ttt" mode; speculative decoding appends to it in "append" mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3MLP,
    Qwen3RMSNorm,
    Qwen3RotaryEmbedding,
    apply_rotary_pos_emb,
)
from transformers.utils import ModelOutput

from eagle3.config import Eagle3Qwen3Config


class Eagle3Cache:
    """Keys/values of earlier draft passes, per draft layer.

    * ``context`` keys are seen causally by every later query (the prefix; step 0 of TTT).
    * ``diagonal`` keys are seen only by the query at the same position: they are what
      training-time test step i adds (each position's own keys from steps 1..i), so the
      attention pattern never needs a dense (k*T)^2 mask.

    mode "append": every pass extends ``context`` (incremental decoding).
    mode "ttt": the first pass fills ``context``, later passes add ``diagonal`` entries.
    """

    def __init__(self, num_layers: int, mode: str = "append") -> None:
        if mode not in ("append", "ttt"):
            raise ValueError(f"Eagle3Cache mode must be 'append' or 'ttt', got {mode!r}")
        self.mode = mode
        self.context: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.diagonal: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(num_layers)]

    def seq_length(self) -> int:
        first = self.context[0]
        return 0 if first is None else first[0].shape[-2]

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        previous = self.context[layer]
        if previous is None:
            self.context[layer] = (key, value)
        elif self.mode == "ttt":
            self.diagonal[layer].append((key, value))
        else:
            self.context[layer] = (torch.cat([previous[0], key], dim=-2), torch.cat([previous[1], value], dim=-2))

    def crop(self, length: int) -> None:
        """Drop context entries past ``length`` (rejected draft tokens in speculative decoding)."""
        for layer, entry in enumerate(self.context):
            if entry is not None:
                self.context[layer] = (entry[0][..., :length, :], entry[1][..., :length, :])


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def eagle3_attention(
    query: torch.Tensor,
    context: tuple[torch.Tensor, torch.Tensor],
    diagonal: list[tuple[torch.Tensor, torch.Tensor]],
    scale: float,
) -> torch.Tensor:
    """Attention of ``query`` [B, h, Tq, d] over causal context keys plus diagonal keys.

    Query j sits at absolute index ``Tk - Tq + j`` of the context and sees context keys up to
    that index; diagonal key set n ([B, hk, Tq, d]) is seen by query j at index j only.
    """
    key, value = context
    n_rep = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    q_len, k_len = query.shape[-2], key.shape[-2]
    if not diagonal:
        if q_len == k_len:
            return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale)
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)

    # Causal scores over the context ([Tq, Tk]) plus one score per diagonal key set;
    # softmax over their union, in fp32 for stability.
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    scores = scores.masked_fill(~causal, float("-inf"))
    diagonal_keys = [_repeat_kv(k, n_rep) for k, _ in diagonal]
    diagonal_values = [_repeat_kv(v, n_rep) for _, v in diagonal]
    diagonal_scores = [(query * k).sum(-1, keepdim=True) * scale for k in diagonal_keys]
    probs = torch.cat([scores, *diagonal_scores], dim=-1).float().softmax(dim=-1).to(query.dtype)
    output = torch.matmul(probs[..., :k_len], value)
    for n, v in enumerate(diagonal_values):
        output = output + probs[..., k_len + n : k_len + n + 1] * v
    return output


class Eagle3Attention(nn.Module):
    """Qwen3 attention (q/k RMSNorm per head) whose first layer reads 2H inputs."""

    def __init__(self, config: Eagle3Qwen3Config, layer_idx: int) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scale = self.head_dim**-0.5
        input_size = 2 * config.hidden_size if layer_idx == 0 else config.hidden_size
        bias = bool(config.attention_bias)
        self.q_proj = nn.Linear(input_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(input_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(input_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        # The llama-style draft (for SGLang / vLLM < 0.25) has no q/k norm.
        self.use_qk_norm = config.draft_arch == "qwen3"
        if self.use_qk_norm:
            self.q_norm = Qwen3RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = Qwen3RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: Eagle3Cache,
        layer: int,
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(batch, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden_states).view(batch, length, self.num_kv_heads, self.head_dim)
        if self.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        cache.update(layer, k, v)
        if cache.diagonal[layer] and torch.is_grad_enabled():
            # Training-time test steps >= 1: the explicit [T, T] scores would be kept for backward
            # at every step (GiBs at T=2048); recompute them in backward instead.
            # (A copy of the diagonal list: later steps append to the cache's own.)
            attn = checkpoint(
                eagle3_attention, q, cache.context[layer], list(cache.diagonal[layer]), self.scale, use_reentrant=False
            )
        else:
            attn = eagle3_attention(q, cache.context[layer], cache.diagonal[layer], self.scale)
        return self.o_proj(attn.transpose(1, 2).reshape(batch, length, -1))


class Eagle3DecoderLayer(nn.Module):
    """vLLM's Qwen3Eagle3DecoderLayer in plain PyTorch (same math, same tensor names)."""

    def __init__(self, config: Eagle3Qwen3Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.norm_before_residual = bool(getattr(config, "norm_before_residual", False))
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if layer_idx == 0:
            self.hidden_norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Eagle3Attention(config, layer_idx)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = Qwen3MLP(config)

    def forward(
        self,
        embeds: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: Eagle3Cache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.layer_idx == 0:
            if self.norm_before_residual:
                hidden_states = residual = self.hidden_norm(hidden_states)
            else:
                residual = hidden_states
                hidden_states = self.hidden_norm(hidden_states)
            hidden_states = torch.cat([self.input_layernorm(embeds), hidden_states], dim=-1)
        else:
            # vLLM's fused add + RMSNorm: residual absorbs the previous layer's output.
            residual = hidden_states + residual
            hidden_states = self.input_layernorm(residual)
        hidden_states = self.self_attn(hidden_states, position_embeddings, cache, self.layer_idx)
        residual = hidden_states + residual
        hidden_states = self.mlp(self.post_attention_layernorm(residual))
        return hidden_states, residual


@dataclass
class Eagle3Output(ModelOutput):
    """One draft step: ``logits`` over the draft vocab, ``hidden_states`` = what the next step
    consumes (pre-norm output; post-norm with ``norm_output``), and the cache to continue from."""

    logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    cache: Eagle3Cache | None = None


class Eagle3Qwen3ForCausalLM(PreTrainedModel):
    config_class = Eagle3Qwen3Config
    config: Eagle3Qwen3Config
    base_model_prefix = ""
    main_input_name = "input_ids"
    _no_split_modules = ["Eagle3DecoderLayer"]
    _supports_sdpa = True
    # The embedding is the target's: vLLM shares it, so shipping a copy only risks a mismatch.
    _keys_to_ignore_on_save = ["embed_tokens.weight"]
    _keys_to_ignore_on_load_missing = [r"embed_tokens\.weight"]

    def __init__(self, config: Eagle3Qwen3Config) -> None:
        super().__init__(config)
        hidden = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden)
        self.embed_tokens.weight.requires_grad_(False)
        fc_input = config.num_aux_layers * config.target_hidden_size
        # vLLM applies input_norm first, then fc_norm per chunk (combine_hidden_states).
        self.input_norm = Qwen3RMSNorm(fc_input, eps=config.rms_norm_eps) if config.norm_before_fc else None
        self.fc_norm = (
            nn.ModuleList(
                Qwen3RMSNorm(config.target_hidden_size, eps=config.rms_norm_eps) for _ in range(config.num_aux_layers)
            )
            if config.fc_norm
            else None
        )
        self.fc = nn.Linear(fc_input, hidden, bias=False)
        self.midlayer = Eagle3DecoderLayer(config, 0)
        # Extra layers are named layers.1, layers.2, ... which is what vLLM's mapper expects
        # (it renames midlayer. to layers.0.).
        self.layers = nn.ModuleDict({str(i): Eagle3DecoderLayer(config, i) for i in range(1, config.num_hidden_layers)})
        self.norm = Qwen3RMSNorm(hidden, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, config.draft_vocab_size, bias=False)
        self.rotary_emb = Qwen3RotaryEmbedding(config)
        if config.draft_vocab_size < config.vocab_size:
            self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
            self.register_buffer("t2d", torch.zeros(config.vocab_size, dtype=torch.bool))
        else:
            self.d2t = None
            self.t2d = None
        self.post_init()

    # ----------------------------------------------------------------- vocab mapping
    @property
    def has_reduced_vocab(self) -> bool:
        return self.d2t is not None

    def set_draft_vocab(self, draft_to_target: torch.Tensor) -> None:
        """Install the draft vocabulary: ``draft_to_target[i]`` = target id of draft id i."""
        draft_to_target = draft_to_target.to(torch.long)
        if not self.has_reduced_vocab:
            if not torch.equal(draft_to_target.cpu(), torch.arange(self.config.vocab_size)):
                raise ValueError("a full-size draft vocabulary must be the identity mapping")
            return
        if draft_to_target.numel() != self.config.draft_vocab_size:
            raise ValueError(
                f"draft vocabulary has {draft_to_target.numel()} ids, config.draft_vocab_size is "
                f"{self.config.draft_vocab_size}"
            )
        offsets = draft_to_target - torch.arange(draft_to_target.numel())
        self.d2t.copy_(offsets.to(self.d2t.device))
        self.t2d.zero_()
        self.t2d[draft_to_target.to(self.t2d.device)] = True

    def draft_to_target_ids(self) -> torch.Tensor:
        """Target id of every draft id ([draft_vocab], long)."""
        ids = torch.arange(self.config.draft_vocab_size, device=self.lm_head.weight.device)
        return ids if self.d2t is None else ids + self.d2t

    def load_target_embeddings(self, weight: torch.Tensor) -> None:
        """Copy the target's (frozen) input embedding into the draft."""
        if tuple(weight.shape) != tuple(self.embed_tokens.weight.shape):
            raise ValueError(
                f"target embedding has shape {tuple(weight.shape)}, the draft expects "
                f"{tuple(self.embed_tokens.weight.shape)} (vocab_size, hidden_size)"
            )
        with torch.no_grad():
            self.embed_tokens.weight.copy_(weight.to(self.embed_tokens.weight.dtype))
        self.embed_tokens.weight.requires_grad_(False)

    # ----------------------------------------------------------------- forward
    def combine_hidden_states(self, aux_hidden_states: torch.Tensor) -> torch.Tensor:
        """fc over the concatenated aux states [.., n_aux * target_H] (vLLM's name and order:
        input_norm, then one fc_norm per aux chunk, then fc)."""
        hidden = aux_hidden_states.to(self.fc.weight.dtype)
        if self.input_norm is not None:
            hidden = self.input_norm(hidden)
        if self.fc_norm is not None:
            chunks = hidden.chunk(len(self.fc_norm), dim=-1)
            hidden = torch.cat([norm(chunk) for norm, chunk in zip(self.fc_norm, chunks, strict=True)], dim=-1)
        return self.fc(hidden)

    def draft_step(
        self,
        hidden_states: torch.Tensor,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Eagle3Cache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft step. Returns (normed hidden for lm_head, hidden for the next step): the
        pre-norm state, or with ``norm_output`` (EAGLE-3.1) the normed one, as vLLM feeds back."""
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        residual = None
        for layer in [self.midlayer, *self.layers.values()]:
            hidden_states, residual = layer(inputs_embeds, hidden_states, residual, position_embeddings, cache)
        prenorm = hidden_states + residual
        normed = self.norm(prenorm)
        return normed, normed if self.config.norm_output else prenorm

    def compute_logits(self, normed_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(normed_hidden_states)

    def new_cache(self, mode: str = "append") -> Eagle3Cache:
        return Eagle3Cache(self.config.num_hidden_layers, mode)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        aux_hidden_states: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Eagle3Cache | None = None,
    ) -> Eagle3Output:
        """One draft step from either the target's aux states or a previous step's hidden states.

        ``input_ids`` at position t must hold token t+1 (EAGLE's shift): the draft sees the
        target's state at t and the token that follows it, and predicts the token after that.
        """
        if (aux_hidden_states is None) == (hidden_states is None):
            raise ValueError("pass exactly one of aux_hidden_states (target aux states) or hidden_states")
        if hidden_states is None:
            hidden_states = self.combine_hidden_states(aux_hidden_states)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        inputs_embeds = inputs_embeds.to(hidden_states.dtype)
        cache = cache if cache is not None else self.new_cache()
        if position_ids is None:
            start = cache.seq_length()
            position_ids = torch.arange(start, start + hidden_states.shape[1], device=hidden_states.device)
            position_ids = position_ids.unsqueeze(0).expand(hidden_states.shape[0], -1)
        normed, next_hidden = self.draft_step(hidden_states, inputs_embeds, position_ids, cache)
        return Eagle3Output(logits=self.compute_logits(normed), hidden_states=next_hidden, cache=cache)
