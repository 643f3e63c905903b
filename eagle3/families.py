"""Target families: how each Qwen3-family architecture is laid out, in one place.

"Qwen3" is several architectures that vLLM speculates for with ``method: "eagle3"``. They differ
in exactly the things a draft trainer reads from a target, and a wrong guess here does not
crash: it trains the draft against a different distribution. So every place that reads a
target (collection, training's norm + head, online training, the in-process evaluator,
``new-draft``, ``check``, the memory model) asks the family, and none branches on
``model_type`` itself:

* where the text config lives (top level, or ``text_config`` of a multimodal checkpoint);
* the tensor names of embedding, final norm and head in each published layout (flat
  ``model.``, nested ``model.language_model.``; the head tied or not);
* the final norm's convention: Qwen3/Qwen3-MoE/Qwen3-VL compute ``x * w``; Qwen3-Next and
  Qwen3.5 store ``w`` centred on 0 and compute ``x * (1 + w)``;
* the checkpoint dtype (the top-level config's when the text config has none);
* how the hf backend loads the text model, and where its decoder layers are (hybrid linear
  attention layers count like any other, as vLLM counts them);
* whether the target is hybrid (recurrent linear-attention state: a cache that cannot be
  cropped, and vLLM settings of its own).

An architecture not listed here is refused with a message that says what is known.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig


class UnknownTargetError(ValueError):
    """A target whose architecture this toolkit does not know how to read."""


@dataclass(frozen=True)
class TargetFamily:
    name: str
    # config.json's model_type values of this family: the top level, and the nested text config's
    model_types: tuple[str, ...]
    zero_centred_norm: bool = False  # final RMSNorm is x * (1 + w) instead of x * w
    hybrid: bool = False  # linear-attention (Gated DeltaNet) layers beside full attention
    # transformers' Auto class that loads a checkpoint of this family with its text model
    # and lm_head: "causal_lm" (AutoModelForCausalLM, also for Qwen3.5's multimodal
    # checkpoints: transformers maps model.language_model.* onto the text-only class and
    # skips the vision tower) or "image_text_to_text" (Qwen3-VL has no text-only class).
    auto_class: str = "causal_lm"

    @property
    def final_norm(self) -> str:
        """The convention's name as a draft's config.json records it (``target_final_norm``)."""
        return "zero_centred" if self.zero_centred_norm else "standard"


FAMILIES: tuple[TargetFamily, ...] = (
    TargetFamily("qwen3", ("qwen3",)),  # Qwen/Qwen3-8B
    TargetFamily("qwen3_moe", ("qwen3_moe",)),  # Qwen/Qwen3-30B-A3B
    TargetFamily("qwen3_next", ("qwen3_next",), zero_centred_norm=True, hybrid=True),  # Qwen3-Next-80B-A3B
    TargetFamily("qwen3_5", ("qwen3_5", "qwen3_5_text"), zero_centred_norm=True, hybrid=True),  # Qwen3.5-4B
    TargetFamily("qwen3_5_moe", ("qwen3_5_moe", "qwen3_5_moe_text"), zero_centred_norm=True, hybrid=True),
    TargetFamily("qwen3_vl", ("qwen3_vl", "qwen3_vl_text"), auto_class="image_text_to_text"),
    TargetFamily("qwen3_vl_moe", ("qwen3_vl_moe", "qwen3_vl_moe_text"), auto_class="image_text_to_text"),
)
_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}

# Where a published checkpoint keeps the text model's weights: flat (Qwen3*ForCausalLM) or
# nested under the multimodal wrapper (Qwen3_5ForConditionalGeneration, Qwen3VL...).
TEXT_PREFIXES = ("model.", "model.language_model.")
EMBED_SUFFIX = "embed_tokens.weight"
NORM_SUFFIX = "norm.weight"
LM_HEAD = "lm_head.weight"


def family_of(config: PretrainedConfig | dict, source: str = "the target") -> TargetFamily:
    """The family of a target config (top-level or text config); UnknownTargetError if none."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    family = _BY_MODEL_TYPE.get(model_type)
    if family is None:
        known = ", ".join(sorted(_BY_MODEL_TYPE))
        raise UnknownTargetError(
            f"{source}: model_type {model_type!r} is not a Qwen3-family architecture this toolkit knows "
            f"(known: {known}). Its final norm, tensor names and rope decide what the draft is trained "
            "against, so it is not guessed: open an issue with the target's config.json."
        )
    return family


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The decoder's config: ``text_config`` of a multimodal checkpoint, else the config itself."""
    return getattr(config, "text_config", None) or config


def checkpoint_dtype(config: PretrainedConfig) -> str:
    """The dtype the checkpoint is stored (and served) in, as a name: the text config's, else the
    top-level config's (a nested ``text_config`` usually has none), else float32."""
    for candidate in (text_config(config), config):
        dtype = getattr(candidate, "dtype", None)
        if dtype is not None:
            return str(dtype).replace("torch.", "")
    return "float32"


def tie_word_embeddings(config: PretrainedConfig) -> bool:
    """Tied head: the top-level flag decides for a multimodal wrapper (it owns the lm_head)."""
    if getattr(config, "text_config", None) is not None and getattr(config, "tie_word_embeddings", None) is not None:
        return bool(config.tie_word_embeddings)
    return bool(getattr(text_config(config), "tie_word_embeddings", False))


@dataclass(frozen=True)
class TensorNames:
    embed: str
    norm: str
    lm_head: str | None  # None: tied to the embedding


def tensor_names(available: set[str] | list[str], tied: bool, source: str = "the target") -> TensorNames:
    """Embedding / final norm / head names in this checkpoint's layout (flat or nested)."""
    available = set(available)
    for prefix in TEXT_PREFIXES:
        embed, norm = prefix + EMBED_SUFFIX, prefix + NORM_SUFFIX
        if embed in available and norm in available:
            if LM_HEAD in available:
                return TensorNames(embed, norm, LM_HEAD)
            if tied:
                return TensorNames(embed, norm, None)
            raise FileNotFoundError(
                f"{source}: {LM_HEAD} not found and tie_word_embeddings is false; is the checkpoint complete?"
            )
    wanted = " or ".join(f"{p}{EMBED_SUFFIX} + {p}{NORM_SUFFIX}" for p in TEXT_PREFIXES)
    raise FileNotFoundError(
        f"{source}: no {wanted} in the checkpoint's tensors; is this a complete Qwen3-family checkpoint "
        "(not a quantised or adapter-only one)?"
    )


def final_norm(last_hidden_states: torch.Tensor, weight: torch.Tensor, eps: float, zero_centred: bool) -> torch.Tensor:
    """The target's final RMSNorm on pre-norm last hidden states, in fp32 as every Qwen3 computes it.

    ``zero_centred``: Qwen3-Next / Qwen3.5 (``x * (1 + w)``, ``w`` stored near 0)."""
    hidden = last_hidden_states.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    scale = weight.float() + 1.0 if zero_centred else weight.float()
    return scale * hidden


# ------------------------------------------------------------------------- the loaded text model
@contextlib.contextmanager
def without_zero3_init() -> Iterator[None]:
    """Build or load a full, unpartitioned model even inside a ZeRO-3 run: transformers would
    otherwise partition it with ``zero.Init`` (the frozen target is never handed to DeepSpeed, so
    nobody would gather it; a meta-device instance cannot be initialised that way at all)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def _auto_class_and_config(model: str, family: TargetFamily):
    """transformers' Auto class for this family's text model and the config to build it with:
    the text config for the text-only classes (its tie flag taken from the wrapper, which owns
    the head), the whole config for the image-text ones."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model)
    if family.auto_class != "causal_lm":
        return AutoModelForImageTextToText, config
    text = text_config(config)
    if text is not config:
        text.tie_word_embeddings = tie_word_embeddings(config)
    return AutoModelForCausalLM, text


def load_text_model(model: str, family: TargetFamily, **kwargs) -> torch.nn.Module:
    """The target with its lm_head, for generation and capture (``from_pretrained`` kwargs pass on).

    Qwen3.5's multimodal checkpoints load into the text-only class with the TEXT config, whose
    own ``tie_word_embeddings`` is not the checkpoint's (the wrapper's is): without setting it,
    a tied checkpoint (Qwen3.5-4B) would get a randomly initialised lm_head and generate noise.
    A checkpoint that leaves any weight of the loaded model uninitialised is refused."""
    auto, config = _auto_class_and_config(model, family)
    kwargs.setdefault("config", config)
    loaded, info = auto.from_pretrained(model, output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise FileNotFoundError(
            f"{model}: the checkpoint has no weights for {missing[:5]}{' ...' if len(missing) > 5 else ''} "
            f"of {type(loaded).__name__}; they would be random. Is the checkpoint complete?"
        )
    return loaded


def meta_model(model: str, family: TargetFamily) -> torch.nn.Module:
    """The model ``load_text_model`` loads, instantiated on the meta device (nothing allocated,
    no weights read): for its parameter counts and its module classes."""
    auto, config = _auto_class_and_config(model, family)
    with without_zero3_init(), torch.device("meta"):
        return auto.from_config(config)


def text_backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack without the head: ``model.model`` (text-only classes) or
    ``model.model.language_model`` (multimodal wrappers), called with ``input_ids`` alone."""
    backbone = model.model
    return getattr(backbone, "language_model", None) or backbone


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """Every decoder layer in order, linear-attention ones included (vLLM numbers them the same)."""
    return text_backbone(model).layers


def final_norm_module(model: torch.nn.Module) -> torch.nn.Module:
    return text_backbone(model).norm


def parameter_counts(model: str, family: TargetFamily) -> tuple[int, int]:
    """(total, active per token) parameters of the model ``load_text_model`` loads, counted on a
    meta-device instance (nothing allocated). MoE: only ``num_experts_per_tok`` of
    ``num_experts`` routed experts are active; the memory a loaded target takes is the total."""
    instance = meta_model(model, family)
    total = routed = 0
    for name, parameter in instance.named_parameters():
        total += parameter.numel()
        if ".experts." in name or name.endswith(".experts"):
            routed += parameter.numel()
    text = instance.config.get_text_config()
    experts = getattr(text, "num_experts", None) or 0
    active_share = (getattr(text, "num_experts_per_tok", 0) or 0) / experts if experts else 1.0
    return total, total - routed + int(routed * active_share)
