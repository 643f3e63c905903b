"""Eagle3Qwen3Config: the draft's configuration, readable by transformers' AutoConfig and vLLM.

The config keeps ``model_type: "qwen3"`` so that ``AutoConfig`` (which vLLM uses to parse
the draft's ``config.json``) reads it without remote code. EAGLE-3 specific keys are plain
extra attributes that vLLM reads by name (see the contract in docs/DESIGN.md).

The one layer-numbering convention (see README "Layer numbers"):

* command line (``--layers``/``--target-layers``): 0-based decoder layer index ``i``; the
  captured state is the OUTPUT of layer ``i``.
* vLLM (``eagle_aux_hidden_state_layer_ids``): the residual stream ENTERING layer ``j``,
  so the same state has id ``j = i + 1``.

``to_vllm_layer_ids`` is the only place that converts between the two.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import Qwen3Config

from eagle3.families import family_of

# One --max-length default for collecting and training (tokens per sample): collecting longer
# samples than training reads only stores states that training cuts off.
DEFAULT_MAX_LENGTH = 2048

# What vLLM needs copied verbatim from the target so that positions and vocab line up.
_COPIED_FROM_TARGET = (
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "hidden_act",
    "rms_norm_eps",
    "max_position_embeddings",
    "vocab_size",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "attention_bias",
)

# Rope keys that describe the TARGET's attention, not the draft's. Qwen3-Next / Qwen3.5 rotate a
# quarter of each head (partial_rotary_factor 0.25) and Qwen3-VL / Qwen3.5 split the rotary
# dimensions into multimodal sections. The draft is one plain attention layer that only ever
# sees text positions: it rotates every dimension of its heads with the target's rope_theta (and
# scaling), as the field's Qwen3.5 drafts do (SpecForge's qwen3.5-4b-eagle3: full rotary, theta
# 1e7). Writing them into the draft's config.json would make vLLM build a partial rope for it
# (rotary_dim = head_dim x 0.25) that training never used. `eagle3 check` verifies numerically
# that the rope vLLM builds from the saved config is the one training used.
TARGET_ONLY_ROPE_KEYS = ("partial_rotary_factor", "mrope_section", "mrope_interleaved")


def draft_rope_parameters(target_config) -> dict[str, Any]:
    """The draft's rope: the target's theta and scaling, every head dimension rotated."""
    rope = dict(getattr(target_config, "rope_parameters", None) or {})
    if not rope:
        rope = {"rope_type": "default", "rope_theta": getattr(target_config, "rope_theta", 10000.0)}
    for key in TARGET_ONLY_ROPE_KEYS:
        rope.pop(key, None)
    rope.setdefault("rope_type", "default")
    return rope


def draft_intermediate_size(target_config, override: int | None = None) -> int:
    """The draft's dense MLP width: ``override`` (--draft-intermediate-size), else the target's
    ``intermediate_size`` (dense Qwen3 and Qwen3-30B-A3B publish one: 6144, as SpecForge's
    Qwen3-MoE drafts use a dense MLP of that order), else, for MoE text configs without one
    (Qwen3.5-MoE), 3 x hidden_size rounded up to 256 (dense Qwen3's ratio at 1.7B and 8B)."""
    if override is not None:
        if override < 1:
            raise Eagle3ConfigError(f"--draft-intermediate-size must be positive, got {override}.")
        return int(override)
    size = getattr(target_config, "intermediate_size", None)
    if size:
        return int(size)
    return (3 * int(target_config.hidden_size) + 255) // 256 * 256


# --draft-arch: which vLLM/SGLang class serves the draft. "qwen3" keeps Qwen3's q/k norms
# (vLLM >= 0.25); "llama" drops them (SGLang and older vLLM only know this one).
DRAFT_ARCHITECTURES = {
    "qwen3": {"model_type": "qwen3", "architectures": ["Eagle3Qwen3ForCausalLM"]},
    "llama": {"model_type": "llama", "architectures": ["LlamaForCausalLMEagle3"]},
}


# --draft-variant: named bundles of vLLM's EAGLE-3 norm switches (each also a flag of its own).
# vLLM 0.32 reads these four config keys in both qwen3_eagle3.py and llama_eagle3.py:
#   fc_norm               one RMSNorm per aux layer chunk before ``fc`` (weights fc_norm.{i}.weight)
#   norm_before_fc        one RMSNorm over the whole concatenated aux vector (weight input_norm.weight)
#   norm_output           the next draft step is fed the POST-norm hidden state instead of the pre-norm one
#   norm_before_residual  layer 0's residual is hidden_norm(h) instead of h
# EAGLE-3.1 (speculators) = fc_norm + norm_output.
# Qwen3's published configs (hidden, layers, heads, KV heads, head_dim, MLP, vocab, tied): the shapes
# the memory model's budget table, the benches and the full-shape rehearsal use.
QWEN3_CONFIGS: dict[str, dict] = {
    "qwen3-1.7b": dict(
        hidden_size=2048,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=6144,
        vocab_size=151936,
        max_position_embeddings=40960,
        tie_word_embeddings=True,
    ),
    "qwen3-4b": dict(
        hidden_size=2560,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=9728,
        vocab_size=151936,
        max_position_embeddings=40960,
        tie_word_embeddings=True,
    ),
    "qwen3-8b": dict(
        hidden_size=4096,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=12288,
        vocab_size=151936,
        max_position_embeddings=40960,
        tie_word_embeddings=False,
    ),
}


NORM_FIELDS = ("fc_norm", "norm_before_fc", "norm_output", "norm_before_residual")
DRAFT_VARIANTS: dict[str, dict[str, bool]] = {
    "eagle3": {name: False for name in NORM_FIELDS},
    "eagle3.1": {"fc_norm": True, "norm_before_fc": False, "norm_output": True, "norm_before_residual": False},
}


def variant_fields(variant: str | None, **overrides: bool | None) -> dict[str, bool]:
    """The four norm switches of ``variant`` with any explicitly given ones (not None) on top."""
    variant = variant or "eagle3"
    if variant not in DRAFT_VARIANTS:
        raise Eagle3ConfigError(f"--draft-variant must be one of {sorted(DRAFT_VARIANTS)}, got {variant!r}.")
    fields = dict(DRAFT_VARIANTS[variant])
    for name, value in overrides.items():
        if name not in fields:
            raise Eagle3ConfigError(f"unknown norm switch {name!r}; known: {', '.join(NORM_FIELDS)}")
        if value is not None:
            fields[name] = bool(value)
    return fields


def variant_name(fields: dict[str, Any]) -> str:
    """``eagle3`` / ``eagle3.1`` when the switches match a named variant, else ``custom``."""
    values = {name: bool(fields.get(name, False)) for name in NORM_FIELDS}
    return next((name for name, preset in DRAFT_VARIANTS.items() if preset == values), "custom")


class Eagle3ConfigError(ValueError):
    """A draft configuration that would silently produce a broken draft."""


def default_target_layers(num_target_layers: int) -> list[int]:
    """EAGLE-3's default aux layers in command-line numbering: (1, L//2 - 1, L - 4).

    These are vLLM's default ids (2, L//2, L - 3) written as "output of 0-based layer i".
    """
    layers = sorted({1, num_target_layers // 2 - 1, num_target_layers - 4})
    return [layer for layer in layers if 0 <= layer < num_target_layers]


def validate_target_layers(layers: Sequence[int], num_target_layers: int, flag: str = "--layers") -> list[int]:
    """Check command-line layer numbers against the target; return them sorted ascending.

    vLLM concatenates aux states in ascending id order, so we always store them that way.
    """
    layers = [int(layer) for layer in layers]
    if not layers:
        raise Eagle3ConfigError(
            f"{flag}: give at least one layer (e.g. 1,{num_target_layers // 2},{num_target_layers - 4})."
        )
    out_of_range = [layer for layer in layers if not 0 <= layer < num_target_layers]
    if out_of_range:
        raise Eagle3ConfigError(
            f"{flag}: layer(s) {out_of_range} out of range; the target has {num_target_layers} "
            f"decoder layers, numbered 0..{num_target_layers - 1} (layer i = output of layer i)."
        )
    duplicates = sorted({layer for layer in layers if layers.count(layer) > 1})
    if duplicates:
        raise Eagle3ConfigError(f"{flag}: layer(s) {duplicates} given more than once; each layer may appear once.")
    return sorted(layers)


def to_vllm_layer_ids(layers: Sequence[int]) -> list[int]:
    """Command-line layer numbers (output of layer i) -> vLLM aux ids (input of layer i+1)."""
    return [int(layer) + 1 for layer in layers]


DFLASH_LAYERS = "dflash"  # --layers dflash[:N]: DFlash's default N target layers
DFLASH_DEFAULT_LAYER_COUNT = 5  # the published Qwen3 DFlash drafts: 5 draft layers reading 5 target layers


def default_dflash_layers(num_target_layers: int, count: int = DFLASH_DEFAULT_LAYER_COUNT) -> list[int]:
    """DFlash's default target layers: ``count`` layers spread evenly from layer 1 to L - 3
    (Qwen3-8B, 36 layers, 5 layers: 1, 9, 17, 25, 33, as the published draft reads)."""
    if count == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    layers = [round(start + i * (end - start) / (count - 1)) for i in range(count)]
    return sorted({min(max(layer, 0), num_target_layers - 1) for layer in layers})


def parse_layers(text: str | Sequence[int] | None, flag: str = "--layers") -> list[int] | str | None:
    """Parse "0,13,27" (or a list) into ints with a message that names the flag. ``dflash`` or
    ``dflash:N`` stays a preset (normalised to "dflash:N") until the target's depth is known:
    ``resolve_layers`` turns it into DFlash's default layers."""
    if text is None or text == "":
        return None
    if not isinstance(text, str):
        return [int(x) for x in text]
    preset = text.strip().lower()
    if preset.startswith(DFLASH_LAYERS):
        count = preset.removeprefix(DFLASH_LAYERS).removeprefix(":") or str(DFLASH_DEFAULT_LAYER_COUNT)
        if not count.isdigit() or int(count) < 1:
            raise Eagle3ConfigError(f"{flag}: expected dflash or dflash:N with N >= 1 (e.g. dflash:5), got {text!r}.")
        return f"{DFLASH_LAYERS}:{int(count)}"
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part != ""]
    except ValueError:
        raise Eagle3ConfigError(
            f"{flag}: expected comma-separated integers like 0,13,27 (or dflash[:N]), got {text!r}."
        ) from None


def resolve_layers(layers: list[int] | str | None, num_target_layers: int, flag: str = "--layers") -> list[int]:
    """Layers for a target of ``num_target_layers``: given ones checked, a ``dflash:N`` preset
    expanded, none = EAGLE-3's default."""
    if layers is None:
        layers = default_target_layers(num_target_layers)
    elif isinstance(layers, str):
        layers = default_dflash_layers(num_target_layers, int(parse_layers(layers, flag).split(":")[1]))
    return validate_target_layers(layers, num_target_layers, flag=flag)


class Eagle3Qwen3Config(Qwen3Config):
    """Configuration of an EAGLE-3 draft for a Qwen3 target.

    ``num_hidden_layers`` is the number of DRAFT layers. ``vocab_size`` stays the
    target's; ``draft_vocab_size`` is the size of the draft's ``lm_head``.
    """

    # Keep qwen3 so AutoConfig (and thus vLLM) can read it; the architecture name selects
    # vLLM's Eagle3Qwen3ForCausalLM.
    model_type = "qwen3"

    def __init__(
        self,
        draft_vocab_size: int | None = None,
        target_hidden_size: int | None = None,
        target_num_hidden_layers: int | None = None,
        target_layers: Sequence[int] | None = None,
        eagle_aux_hidden_state_layer_ids: Sequence[int] | None = None,
        target_model_name_or_path: str | None = None,
        norm_before_residual: bool = False,
        fc_norm: bool = False,
        norm_before_fc: bool = False,
        norm_output: bool = False,
        draft_arch: str | None = None,
        target_final_norm: str | None = None,
        **kwargs: Any,
    ) -> None:
        if draft_arch is None:  # a saved llama-format draft says so through its architectures
            draft_arch = "llama" if "LlamaForCausalLMEagle3" in (kwargs.get("architectures") or []) else "qwen3"
        if draft_arch not in DRAFT_ARCHITECTURES:
            raise Eagle3ConfigError(f"--draft-arch must be one of {sorted(DRAFT_ARCHITECTURES)}, got {draft_arch!r}.")
        self.draft_arch = draft_arch
        kwargs["architectures"] = DRAFT_ARCHITECTURES[draft_arch]["architectures"]
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        self.draft_vocab_size = draft_vocab_size if draft_vocab_size is not None else self.vocab_size
        self.target_hidden_size = target_hidden_size if target_hidden_size is not None else self.hidden_size
        self.target_num_hidden_layers = target_num_hidden_layers
        if target_layers is None and eagle_aux_hidden_state_layer_ids is not None:
            target_layers = [int(i) - 1 for i in eagle_aux_hidden_state_layer_ids]
        if target_layers is None and target_num_hidden_layers is not None:
            target_layers = default_target_layers(target_num_hidden_layers)
        self.target_layers = list(target_layers) if target_layers is not None else None
        self.eagle_aux_hidden_state_layer_ids = (
            to_vllm_layer_ids(self.target_layers) if self.target_layers is not None else None
        )
        if (
            eagle_aux_hidden_state_layer_ids is not None
            and list(eagle_aux_hidden_state_layer_ids) != self.eagle_aux_hidden_state_layer_ids
        ):
            raise Eagle3ConfigError(
                f"config: target_layers {self.target_layers} (output of layer i) and "
                f"eagle_aux_hidden_state_layer_ids {list(eagle_aux_hidden_state_layer_ids)} (vLLM ids = i + 1) "
                "disagree; fix one of them."
            )
        self.target_model_name_or_path = target_model_name_or_path
        self.norm_before_residual = bool(norm_before_residual)
        self.fc_norm = bool(fc_norm)
        self.norm_before_fc = bool(norm_before_fc)
        self.norm_output = bool(norm_output)
        # How training read the target's final norm ("standard": x * w, "zero_centred": x * (1 + w)):
        # `eagle3 check` compares it with the target's (None: a draft from before it was recorded).
        self.target_final_norm = target_final_norm
        self.validate_eagle3()

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        # save_pretrained stamps the Python class name into `architectures`; vLLM picks its
        # draft class from this field, so it must name the served format instead.
        output.update(DRAFT_ARCHITECTURES[self.draft_arch])
        output.pop("eagle_config", None)  # rebuilt below from target_layers, never carried over stale
        if self.draft_arch == "llama" and self.target_layers is not None:
            # SGLang (the llama format's main user) ignores the top-level key: its model runner
            # reads hf_config.eagle_config["eagle_aux_hidden_state_layer_ids"]
            # (sgl-project/sglang python/sglang/srt/model_executor/model_runner.py) and hands the
            # list to set_eagle3_layers_to_capture, which adds 1 itself ("for the ith layer, it
            # takes the output of the (i-1)th layer", models/llama.py and qwen3.py). So SGLang's
            # ids are OUTPUT-of-layer indices, i.e. our target_layers, not vLLM's i + 1. Without
            # this key SGLang silently captures its defaults [1, L//2-1, L-4]. vLLM reads the
            # top-level key first and falls back to eagle_config only when it is missing
            # (vllm/v1/worker/gpu_model_runner.py), so the two conventions never meet.
            output["eagle_config"] = {
                "eagle_aux_hidden_state_layer_ids": list(self.target_layers),
                "use_aux_hidden_state": True,
            }
        return output

    @property
    def num_aux_layers(self) -> int:
        return len(self.target_layers or [])

    @property
    def draft_variant(self) -> str:
        return variant_name(vars(self))

    def validate_eagle3(self) -> None:
        """Raise Eagle3ConfigError on anything that would give a silently broken draft."""
        if self.draft_vocab_size > self.vocab_size:
            raise Eagle3ConfigError(
                f"draft_vocab_size={self.draft_vocab_size} is larger than the target vocabulary "
                f"({self.vocab_size}); use --draft-vocab-size <= {self.vocab_size}."
            )
        if self.draft_vocab_size < 1:
            raise Eagle3ConfigError(f"draft_vocab_size must be positive, got {self.draft_vocab_size}.")
        if self.target_layers is not None and self.target_num_hidden_layers is not None:
            validate_target_layers(self.target_layers, self.target_num_hidden_layers, flag="target_layers")
            if list(self.target_layers) != sorted(self.target_layers):
                raise Eagle3ConfigError(
                    f"target_layers {self.target_layers} must be ascending (vLLM concatenates in id order)."
                )

    @classmethod
    def from_target_config(
        cls,
        target_config: Qwen3Config,
        target_layers: Sequence[int] | None = None,
        num_draft_layers: int = 1,
        draft_vocab_size: int | None = None,
        target_model_name_or_path: str | None = None,
        draft_arch: str = "qwen3",
        draft_variant: str = "eagle3",
        intermediate_size: int | None = None,
        **norm_overrides: bool | None,
    ) -> Eagle3Qwen3Config:
        """Build a draft config whose sizes, rope and vocab come from the target's (a TEXT config:
        ``eagle3.target.load_target_config``)."""
        num_target_layers = target_config.num_hidden_layers
        if target_layers is None:
            target_layers = default_target_layers(num_target_layers)
        target_layers = validate_target_layers(target_layers, num_target_layers, flag="--target-layers")
        if num_draft_layers < 1:
            raise Eagle3ConfigError(f"--num-draft-layers must be >= 1, got {num_draft_layers}.")
        copied = {key: getattr(target_config, key) for key in _COPIED_FROM_TARGET if hasattr(target_config, key)}
        copied["intermediate_size"] = draft_intermediate_size(target_config, intermediate_size)
        copied["rope_parameters"] = draft_rope_parameters(target_config)
        if copied.get("head_dim") is None:
            copied["head_dim"] = target_config.hidden_size // target_config.num_attention_heads
        vocab_size = target_config.vocab_size
        family = family_of(target_config, source=target_model_name_or_path or "the target")
        return cls(
            **copied,
            num_hidden_layers=num_draft_layers,
            layer_types=["full_attention"] * num_draft_layers,
            use_sliding_window=False,
            draft_vocab_size=draft_vocab_size or vocab_size,
            draft_arch=draft_arch,
            **variant_fields(draft_variant, **norm_overrides),
            target_hidden_size=target_config.hidden_size,
            target_num_hidden_layers=num_target_layers,
            target_layers=target_layers,
            target_model_name_or_path=target_model_name_or_path
            or getattr(target_config, "_name_or_path", None)
            or None,
            target_final_norm=family.final_norm,
            dtype=str(getattr(target_config, "dtype", None) or "float32").replace("torch.", ""),
        )
