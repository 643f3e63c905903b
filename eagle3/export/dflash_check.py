"""Contract check of a saved DFlash draft against its target (vLLM 0.32's ``qwen3_dflash``).

vLLM loads a DFlash draft as leniently as an EAGLE-3 one, and its silent failures are its own:
``target_layer_ids`` outside the target feed it other states (or, past the last layer, fail only
at the first request), a top-level ``eagle_aux_hidden_state_layer_ids`` silently wins over them,
a sliding ``layer_types`` entry or ``causal: true`` makes layers causal that were trained
bidirectional, a shipped ``lm_head``/``embed_tokens`` replaces the target's that training used,
a ``mask_embedding.pt`` replaces the mask token's embedding, a mask id outside the vocabulary
crashes. Each is a problem here, with its fix; the numeric checks (target distribution, rope)
are the EAGLE-3 checker's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from eagle3.export.draft_files import FLOAT_DTYPES, same_json, tensor_index
from eagle3.export.problem import Problem
from eagle3.target import TargetHead

SLIDING = "sliding_attention"


def expected_dflash_tensors(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor vLLM's DFlash loader fills, with its shape, from the draft's config.json."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    n_aux = len((config.get("dflash_config") or {}).get("target_layer_ids") or [])
    target_hidden = config.get("target_hidden_size") or hidden
    shapes: dict[str, tuple[int, ...]] = {
        "fc.weight": (hidden, n_aux * target_hidden),
        "hidden_norm.weight": (hidden,),
        "norm.weight": (hidden,),
    }
    for layer in range(config.get("num_hidden_layers", 1)):
        prefix = f"layers.{layer}."
        shapes |= {
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            prefix + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            prefix + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            prefix + "self_attn.q_norm.weight": (head_dim,),
            prefix + "self_attn.k_norm.weight": (head_dim,),
            prefix + "post_attention_layernorm.weight": (hidden,),
            prefix + "mlp.gate_proj.weight": (inter, hidden),
            prefix + "mlp.up_proj.weight": (inter, hidden),
            prefix + "mlp.down_proj.weight": (hidden, inter),
        }
        if config.get("attention_bias"):
            for proj, size in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
                shapes[f"{prefix}self_attn.{proj}_proj.bias"] = (size * head_dim,)
            shapes[f"{prefix}self_attn.o_proj.bias"] = (hidden,)
    return shapes


def _check_layers_and_mask(config: dict, target, problems: list[Problem], tokenizer_length: int | None) -> None:
    dflash = config.get("dflash_config")
    if not isinstance(dflash, dict):
        problems.append(
            Problem(
                "dflash_config is missing: vLLM then has no target layers and no mask token for the draft",
                'write "dflash_config": {"target_layer_ids": [...], "mask_token_id": N} (run_train.py does)',
            )
        )
        return
    num_layers = target.num_hidden_layers
    layers = dflash.get("target_layer_ids")
    if not isinstance(layers, list) or not layers or not all(isinstance(i, int) for i in layers):
        problems.append(
            Problem(
                f"dflash_config.target_layer_ids {layers!r} is not a non-empty list of layer indices",
                "list the 0-based target layers whose outputs the draft reads, e.g. [1, 9, 17, 25, 33]",
            )
        )
    else:
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            problems.append(
                Problem(
                    f"dflash_config.target_layer_ids {layers}: {bad} outside 0..{num_layers - 1} for this "
                    f"{num_layers}-layer target (DFlash ids are 0-based layer outputs; vLLM adds 1)",
                    "use the layers the data was collected at (manifest.json's layers)",
                )
            )
        if len(set(layers)) != len(layers) or layers != sorted(layers):
            problems.append(
                Problem(
                    f"dflash_config.target_layer_ids {layers} must be distinct and ascending (vLLM concatenates "
                    "the states in ascending order, as training did)",
                    "sort the ids and retrain if the training order differed",
                )
            )
        aux_ids = config.get("eagle_aux_hidden_state_layer_ids")
        if aux_ids is not None and list(aux_ids) != [i + 1 for i in layers]:
            problems.append(
                Problem(
                    f"eagle_aux_hidden_state_layer_ids {aux_ids} wins over dflash_config.target_layer_ids {layers} in "
                    f"vLLM and disagrees with them (it would need {[i + 1 for i in layers]})",
                    "remove eagle_aux_hidden_state_layer_ids from config.json",
                )
            )
    mask = dflash.get("mask_token_id")
    vocab = config.get("vocab_size")
    if not isinstance(mask, int) or not 0 <= mask < (vocab or 0):
        problems.append(
            Problem(
                f"dflash_config.mask_token_id {mask!r} is not a token id of the vocabulary (0..{(vocab or 1) - 1})",
                "set it to the id training fed at the masked slots (the draft's config as run_train.py saved it)",
            )
        )
    elif tokenizer_length is not None and mask < tokenizer_length:
        problems.append(
            Problem(
                f"dflash_config.mask_token_id {mask} is a real token of the target's tokenizer: where answers contain "
                "it, the draft cannot tell a mask from that token",
                "train with the default (the first unused embedding row), unless that token never occurs",
                severity="warning",
            )
        )


def _check_attention(config: dict, problems: list[Problem]) -> None:
    """Training's layers are full and bidirectional within the block: vLLM must build them so."""
    layer_types = config.get("layer_types") or []
    dflash = config.get("dflash_config") or {}
    if SLIDING in layer_types or dflash.get("use_swa"):
        problems.append(
            Problem(
                f"layer_types {layer_types} / use_swa make vLLM build sliding (and causal) draft layers; training "
                "used full, non-causal attention",
                'set every layer_types entry to "full_attention" and drop use_swa',
            )
        )
    if config.get("is_causal") or dflash.get("causal"):
        problems.append(
            Problem(
                "is_causal / dflash_config.causal make vLLM run the block causally; training attended both ways",
                "remove is_causal and dflash_config.causal",
            )
        )
    block_size = config.get("block_size")
    if not isinstance(block_size, int) or block_size < 2:
        problems.append(
            Problem(
                f"block_size {block_size!r}: the training block size is not recorded",
                "write block_size (serve with num_speculative_tokens = block_size - 1)",
            )
        )


def check_dflash_config(config: dict, target, problems: list[Problem], tokenizer_length: int | None = None) -> None:
    if config.get("architectures") != ["DFlashDraftModel"]:
        problems.append(
            Problem(
                f"architectures {config.get('architectures')} is not vLLM's DFlash draft class for Qwen3",
                'set "architectures": ["DFlashDraftModel"]',
            )
        )
    if config.get("model_type") != "qwen3":
        problems.append(
            Problem(
                f"model_type {config.get('model_type')!r}: vLLM reads a DFlash draft's config with Qwen3Config",
                'set "model_type": "qwen3"',
            )
        )
    from eagle3.config import draft_rope_parameters

    for key in ("hidden_size", "vocab_size", "max_position_embeddings"):
        if config.get(key) != getattr(target, key, None):
            problems.append(
                Problem(
                    f"{key} = {config.get(key)} but the target has {getattr(target, key, None)}: the draft reads the "
                    "target's embedding and lm_head",
                    f"build the draft from the target's config (DFlashQwen3Config.from_target_config copies {key})",
                )
            )
    if (config.get("target_hidden_size") or config.get("hidden_size")) != target.hidden_size:
        problems.append(
            Problem(
                f"target_hidden_size {config.get('target_hidden_size')} is not the target's {target.hidden_size}",
                "set target_hidden_size to the target's hidden_size",
            )
        )
    if config.get("draft_vocab_size") not in (None, config.get("vocab_size")):
        problems.append(
            Problem(
                f"draft_vocab_size {config.get('draft_vocab_size')}: a reduced vocabulary needs a d2t map and an own "
                "lm_head, which this draft (trained through the target's lm_head) does not have",
                "remove draft_vocab_size (or set it to vocab_size)",
            )
        )
    if config.get("num_target_layers") not in (None, target.num_hidden_layers):
        problems.append(
            Problem(
                f"num_target_layers {config.get('num_target_layers')} but the target has {target.num_hidden_layers} "
                "layers: a draft for another target?",
                "train the draft against this target",
            )
        )
    expected_rope = draft_rope_parameters(target)
    if not same_json(config.get("rope_parameters"), expected_rope):
        problems.append(
            Problem(
                f"rope_parameters {config.get('rope_parameters')} are not the draft rope for this target {expected_rope}",
                "rebuild the draft config with DFlashQwen3Config.from_target_config (run_train.py does)",
            )
        )
    _check_layers_and_mask(config, target, problems, tokenizer_length)
    _check_attention(config, problems)


def check_dflash_tensors(config: dict, files: list[Path], target_dir: str | Path, problems: list[Problem]) -> None:
    tensors = tensor_index(files)
    expected = expected_dflash_tensors(config)
    for name, shape in expected.items():
        if name not in tensors:
            problems.append(
                Problem(
                    f"tensor {name} {list(shape)} missing: vLLM would keep its random init",
                    "save with DFlashQwen3ForCausalLM.save_pretrained (names without a 'model.' prefix)",
                )
            )
        elif tensors[name][1] != shape:
            problems.append(
                Problem(
                    f"tensor {name} has shape {list(tensors[name][1])}, expected {list(shape)}",
                    "rebuild the draft from this target's config",
                )
            )
    shared = ("embed_tokens.weight", "lm_head.weight")
    for name in sorted(set(tensors) - set(expected) - set(shared)):
        fix = f"remove {name}"
        if name.startswith("model."):
            fix = "drop the 'model.' prefix: vLLM adds it to every name but lm_head itself"
        if "mask_hidden" in name:
            fix = "remove it: vLLM refuses a mask_hidden weight (masked slots embed mask_token_id)"
        problems.append(Problem(f"unexpected tensor {name}: vLLM ignores or misloads it", fix))
    float_dtypes = {tensors[name][2] for name in expected if name in tensors}
    if len(float_dtypes) > 1 or not float_dtypes <= FLOAT_DTYPES:
        problems.append(
            Problem(f"weights mix dtypes {sorted(map(str, float_dtypes))}", "save all weights in one float dtype")
        )
    present = [name for name in shared if name in tensors]
    if present:
        from safetensors import safe_open

        head = TargetHead.from_pretrained(target_dir)
        reference = {"embed_tokens.weight": head.embed_tokens, "lm_head.weight": head.lm_head}
        for name in present:
            with safe_open(tensors[name][0], framework="pt") as handle:
                ours = handle.get_tensor(name)
            theirs = reference[name]
            if theirs is None or ours.shape != theirs.shape or not torch.equal(ours, theirs.to(ours.dtype)):
                problems.append(
                    Problem(
                        f"{name} differs from the target's: vLLM would use the draft's copy, training used the target's",
                        f"remove {name} from the draft (vLLM then shares the target's)",
                    )
                )
