"""Strict contract check of a saved draft against its target.

vLLM loads an EAGLE-3 draft without checking it: a misnamed tensor keeps its random init,
missing q/k norms become all-ones, a missing ``d2t`` maps draft id i to target id i, an extra
``*.safetensors`` file is loaded too, wrong aux ids or a short ``max_position_embeddings``
just lower acceptance. Each of those silent failures is a problem here, printed with its fix.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from eagle3.dflash import is_dflash_config
from eagle3.export.dflash_check import check_dflash_config, check_dflash_tensors
from eagle3.export.draft_files import FLOAT_DTYPES, same_json, target_architecture_problems, tensor_index, weight_files
from eagle3.export.numerics import rope_problems, target_distribution_problems
from eagle3.export.problem import Problem
from eagle3.families import UnknownTargetError, tensor_names
from eagle3.target import load_target_config, read_target_tensors, target_tensor_names

KNOWN_ARCHITECTURES = {
    "Eagle3Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLMEagle3": "llama",
    "Eagle3LlamaForCausalLM": "llama",
}


def expected_tensors(config: dict, draft_arch: str) -> dict[str, tuple[int, ...]]:
    """Every tensor vLLM's loader fills, with its shape, derived from the draft's config.json."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    n_aux = len(config.get("eagle_aux_hidden_state_layer_ids") or [None] * 3)
    target_hidden = config.get("target_hidden_size") or hidden
    shapes: dict[str, tuple[int, ...]] = {"fc.weight": (hidden, n_aux * target_hidden), "norm.weight": (hidden,)}
    if config.get("fc_norm"):
        shapes |= {f"fc_norm.{i}.weight": (target_hidden,) for i in range(n_aux)}
    if _norm_before_fc(config):
        shapes["input_norm.weight"] = (n_aux * target_hidden,)
    for layer in range(config.get("num_hidden_layers", 1)):
        prefix = "midlayer." if layer == 0 else f"layers.{layer}."
        qkv_in = 2 * hidden if layer == 0 else hidden
        shapes |= {
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "self_attn.q_proj.weight": (heads * head_dim, qkv_in),
            prefix + "self_attn.k_proj.weight": (kv_heads * head_dim, qkv_in),
            prefix + "self_attn.v_proj.weight": (kv_heads * head_dim, qkv_in),
            prefix + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            prefix + "post_attention_layernorm.weight": (hidden,),
            prefix + "mlp.gate_proj.weight": (inter, hidden),
            prefix + "mlp.up_proj.weight": (inter, hidden),
            prefix + "mlp.down_proj.weight": (hidden, inter),
        }
        if layer == 0:
            shapes[prefix + "hidden_norm.weight"] = (hidden,)
        if draft_arch == "qwen3":
            shapes[prefix + "self_attn.q_norm.weight"] = (head_dim,)
            shapes[prefix + "self_attn.k_norm.weight"] = (head_dim,)
        if config.get("attention_bias"):
            for proj, size in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
                shapes[f"{prefix}self_attn.{proj}_proj.bias"] = (size * head_dim,)
    draft_vocab = config.get("draft_vocab_size") or config["vocab_size"]
    shapes["lm_head.weight"] = (draft_vocab, hidden)
    if draft_vocab < config["vocab_size"]:
        shapes["d2t"] = (draft_vocab,)
    return shapes


def _norm_before_fc(config: dict) -> bool:
    """vLLM reads norm_before_fc from a nested eagle_config first, then the top level."""
    eagle_config = config.get("eagle_config") or {}
    return bool(eagle_config.get("norm_before_fc", config.get("norm_before_fc", False)))


def _check_variant(config: dict, tensors: set[str], problems: list[Problem]) -> None:
    """The norm switches vLLM reads silently change its math: they must match the weights.

    fc_norm.* / input_norm weights without their switch are dropped or rejected by vLLM (and
    with the switch but without weights the norms stay all-ones, caught as missing tensors).
    norm_output and norm_before_residual have no weights; a config that is no known variant
    (EAGLE-3: all off; EAGLE-3.1: fc_norm + norm_output) is most likely a hand edit.
    """
    from eagle3.config import variant_name

    has_fc_norm = any(name.startswith("fc_norm.") for name in tensors)
    if has_fc_norm and not config.get("fc_norm"):
        problems.append(
            Problem(
                "weights hold fc_norm.* (EAGLE-3.1 per-aux-layer norms) but config.json has no fc_norm: true; "
                "vLLM would not apply them",
                'set "fc_norm": true (and "norm_output": true for EAGLE-3.1) in config.json',
            )
        )
    if "input_norm.weight" in tensors and not _norm_before_fc(config):
        problems.append(
            Problem(
                "weights hold input_norm.weight but norm_before_fc is off: vLLM silently drops the norm",
                'set "norm_before_fc": true in config.json',
            )
        )
    eagle_config = config.get("eagle_config") or {}
    if "norm_before_fc" in eagle_config and "norm_before_fc" in config:
        if bool(eagle_config["norm_before_fc"]) != bool(config["norm_before_fc"]):
            problems.append(
                Problem(
                    f"eagle_config.norm_before_fc ({eagle_config['norm_before_fc']}) overrides the top-level "
                    f"norm_before_fc ({config['norm_before_fc']}) in vLLM",
                    "keep one norm_before_fc, at the top level",
                )
            )
    switches = {name: bool(config.get(name, False)) for name in ("fc_norm", "norm_output", "norm_before_residual")}
    switches["norm_before_fc"] = _norm_before_fc(config)
    if variant_name(switches) == "custom":
        on = ", ".join(name for name, value in switches.items() if value)
        problems.append(
            Problem(
                f"norm switches ({on}) are neither EAGLE-3 (all off) nor EAGLE-3.1 (fc_norm + norm_output): vLLM "
                "follows them silently, so they must be exactly what the draft was trained with",
                "compare with the training command (--draft-variant / --fc-norm / --norm-output ...) and fix "
                "config.json if it was edited",
                severity="warning",
            )
        )


def _check_config(config: dict, target, problems: list[Problem]) -> str:
    architectures = config.get("architectures") or []
    arch = next((KNOWN_ARCHITECTURES[a] for a in architectures if a in KNOWN_ARCHITECTURES), None)
    if arch is None:
        problems.append(
            Problem(
                f"architectures {architectures} is not an EAGLE-3 draft vLLM knows",
                'set "architectures": ["Eagle3Qwen3ForCausalLM"] (or ["LlamaForCausalLMEagle3"])',
            )
        )
        arch = "qwen3"
    if config.get("model_type") not in ("qwen3", "llama"):
        problems.append(
            Problem(
                f"model_type {config.get('model_type')!r} cannot be read by transformers' AutoConfig in vLLM",
                'set "model_type": "qwen3" (or "llama" for the llama format)',
            )
        )
    for key in ("max_position_embeddings", "vocab_size"):
        if config.get(key) != getattr(target, key, None):
            problems.append(
                Problem(
                    f"{key} = {config.get(key)} but the target has {getattr(target, key, None)}",
                    f"copy {key} from the target's config (Eagle3Qwen3Config.from_target_config does)",
                )
            )
    from eagle3.config import draft_rope_parameters

    expected_rope = draft_rope_parameters(target)
    if not same_json(config.get("rope_parameters"), expected_rope):
        problems.append(
            Problem(
                f"rope_parameters {config.get('rope_parameters')} are not the draft rope for this target "
                f"{expected_rope} (the target's theta and scaling, every head dimension rotated)",
                "rebuild the draft config with Eagle3Qwen3Config.from_target_config (run_train.py does)",
            )
        )
    if config.get("hidden_size") != target.hidden_size:
        problems.append(
            Problem(
                f"hidden_size {config.get('hidden_size')} differs from the target's {target.hidden_size}; "
                "vLLM feeds the draft the target's embeddings",
                "build the draft with the target's hidden_size",
            )
        )
    if (config.get("target_hidden_size") or config.get("hidden_size")) != target.hidden_size:
        problems.append(
            Problem(
                f"target_hidden_size {config.get('target_hidden_size')} is not the target's hidden size "
                f"{target.hidden_size}",
                "set target_hidden_size to the target's hidden_size",
            )
        )
    draft_vocab = config.get("draft_vocab_size") or config.get("vocab_size")
    if draft_vocab and target.vocab_size and draft_vocab > target.vocab_size:
        problems.append(
            Problem(
                f"draft_vocab_size {draft_vocab} is larger than the target vocab {target.vocab_size}",
                "train with --draft-vocab-size <= the target vocabulary",
            )
        )
    num_layers = target.num_hidden_layers
    ids = config.get("eagle_aux_hidden_state_layer_ids")
    if not ids:
        problems.append(
            Problem(
                "eagle_aux_hidden_state_layer_ids is missing: vLLM then uses its default "
                f"(2, L//2, L-3) = {[2, num_layers // 2, num_layers - 3]}, which may not be the training layers",
                "write the training layers as top-level eagle_aux_hidden_state_layer_ids (vLLM id = layer + 1)",
            )
        )
    else:
        bad = [i for i in ids if not 1 <= int(i) <= num_layers]
        if bad:
            problems.append(
                Problem(
                    f"eagle_aux_hidden_state_layer_ids {ids}: {bad} outside 1..{num_layers} for this "
                    f"{num_layers}-layer target",
                    "use vLLM ids = (0-based layer index) + 1, each within 1..L",
                )
            )
        if len(set(ids)) != len(ids) or list(ids) != sorted(ids):
            problems.append(
                Problem(
                    f"eagle_aux_hidden_state_layer_ids {ids} must be distinct and ascending "
                    "(vLLM concatenates aux states in ascending id order)",
                    "sort the ids and retrain if the training order differed",
                )
            )
    return arch


def _check_tensors(config: dict, arch: str, files: list[Path], target_dir: str | Path, problems: list[Problem]) -> None:
    tensors = tensor_index(files)
    expected = expected_tensors(config, arch)
    _check_variant(config, set(tensors), problems)
    for name, shape in expected.items():
        if name not in tensors:
            fix = "save with Eagle3Qwen3ForCausalLM.save_pretrained (tensor names without a 'model.' prefix)"
            if name == "d2t":
                fix = "the draft vocab is reduced: save d2t (target_id = draft_id + d2t[draft_id])"
            problems.append(Problem(f"tensor {name} {list(shape)} missing: vLLM would keep its random init", fix))
        elif tensors[name][1] != shape:
            problems.append(
                Problem(
                    f"tensor {name} has shape {list(tensors[name][1])}, expected {list(shape)}",
                    "rebuild the draft from this target's config",
                )
            )
    allowed = set(expected) | {"t2d", "embed_tokens.weight"}
    draft_vocab = config.get("draft_vocab_size") or config["vocab_size"]
    if draft_vocab < config["vocab_size"]:
        allowed.add("d2t")
    for name in sorted(set(tensors) - allowed):
        fix = f"remove {name}"
        if name.startswith("model."):
            fix = "drop the 'model.' prefix: vLLM expects midlayer.*, fc, norm, lm_head at top level"
        if name.startswith(("fc_norm.", "input_norm.")):
            continue  # reported by _check_variant with the config switch to set
        if name == "d2t":
            fix = "remove d2t: the draft vocab is the full vocab (vLLM >= 0.33 rejects d2t then)"
        problems.append(Problem(f"unexpected tensor {name}: vLLM ignores or misloads it", fix))
    float_dtypes = {tensors[name][2] for name in expected if name in tensors and name != "d2t"}
    if len(float_dtypes) > 1 or not float_dtypes <= FLOAT_DTYPES:
        problems.append(
            Problem(f"weights mix dtypes {sorted(map(str, float_dtypes))}", "save all weights in one float dtype")
        )
    if "d2t" in tensors:
        _check_vocab_map(tensors, config, problems)
    if "embed_tokens.weight" in tensors:
        path = tensors["embed_tokens.weight"][0]
        with safe_open(path, framework="pt") as handle:
            embed = handle.get_tensor("embed_tokens.weight")
        embed_name = tensor_names(target_tensor_names(target_dir), tied=True).embed
        target_embed = read_target_tensors(target_dir, [embed_name]).get(embed_name)
        if (
            target_embed is None
            or embed.shape != target_embed.shape
            or not torch.equal(embed, target_embed.to(embed.dtype))
        ):
            problems.append(
                Problem(
                    "embed_tokens.weight differs from the target's embedding: vLLM would use the draft's copy",
                    "remove embed_tokens.weight from the draft (vLLM then shares the target's)",
                )
            )


def _check_vocab_map(tensors: dict, config: dict, problems: list[Problem]) -> None:
    with safe_open(tensors["d2t"][0], framework="pt") as handle:
        d2t = handle.get_tensor("d2t")
    t2d = None
    if "t2d" in tensors:
        with safe_open(tensors["t2d"][0], framework="pt") as handle:
            t2d = handle.get_tensor("t2d")
    if d2t.dtype != torch.int64:
        problems.append(Problem(f"d2t has dtype {d2t.dtype}, vLLM expects int64", "save d2t as int64 offsets"))
    target_ids = torch.arange(len(d2t)) + d2t.long()
    vocab = config["vocab_size"]
    if len(target_ids) and (target_ids.min() < 0 or target_ids.max() >= vocab):
        problems.append(
            Problem(f"d2t maps draft ids outside the target vocab 0..{vocab - 1}", "rebuild d2t from the draft vocab")
        )
    elif len(target_ids) > 1 and not bool((target_ids[1:] > target_ids[:-1]).all()):
        problems.append(
            Problem(
                "d2t target ids are not strictly increasing (draft vocab must be sorted by target id, no repeats)",
                "rebuild d2t: sort the kept target ids ascending, d2t[i] = id_i - i",
            )
        )
    if len(d2t) and bool((d2t == 0).all()):
        problems.append(
            Problem(
                "d2t is all zeros: the draft vocab is simply the lowest target ids, not the most frequent ones",
                "build the draft vocab from token counts (run_train.py does)",
                severity="warning",
            )
        )
    if t2d is not None:
        if t2d.dtype != torch.bool or t2d.numel() != vocab:
            problems.append(
                Problem(f"t2d must be bool [{vocab}], got {t2d.dtype} {list(t2d.shape)}", "rebuild t2d from d2t")
            )
        else:
            expected = torch.zeros(vocab, dtype=torch.bool)
            valid = target_ids[(target_ids >= 0) & (target_ids < vocab)]
            expected[valid] = True
            if not torch.equal(expected, t2d):
                problems.append(Problem("t2d does not mark exactly the target ids of d2t", "rebuild t2d from d2t"))


def check_draft(draft_dir: str | Path, target: str | Path, numerics: bool = True) -> list[Problem]:
    """All contract problems of the draft in ``draft_dir`` for ``target`` (empty = vLLM-ready).

    ``numerics``: also verify on synthetic positions that training's target distribution is the
    target model's own and that vLLM's rope for config.json is training's (eagle3.export.numerics)."""
    draft_dir = Path(draft_dir)
    config_path = draft_dir / "config.json"
    if not config_path.exists():
        return [
            Problem(f"{config_path} not found", "pass the folder written by save_pretrained (e.g. output/best_model)")
        ]
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        return [Problem(f"{config_path}: invalid JSON ({error})", "re-save the draft")]
    try:
        target_config = load_target_config(target)
    except FileNotFoundError as error:
        return [Problem(str(error), "pass --target the target model folder or Hub id")]
    except UnknownTargetError as error:
        return [Problem(str(error), "train and serve drafts for Qwen3-family targets (see README, Supported targets)")]
    problems: list[Problem] = []
    for key in ("hidden_size", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in config:
            problems.append(Problem(f"{config_path}: required key {key} missing", "re-save with save_pretrained"))
    if problems:
        return problems
    if is_dflash_config(config):
        return _check_dflash(draft_dir, config, target, target_config, problems, numerics)
    arch = _check_config(config, target_config, problems)
    target_architecture_problems(target, problems)
    files = weight_files(draft_dir, problems)
    if files:
        _check_tensors(config, arch, files, target, problems)
    if numerics:
        problems += target_distribution_problems(config, target)
        problems += rope_problems(config)
    return problems


def _check_dflash(draft_dir: Path, config: dict, target, target_config, problems: list[Problem], numerics: bool):
    from transformers import AutoTokenizer

    try:
        tokenizer_length = len(AutoTokenizer.from_pretrained(str(target)))
    except (OSError, ValueError):  # no tokenizer beside the weights: the mask id is checked against the vocab only
        tokenizer_length = None
    check_dflash_config(config, target_config, problems, tokenizer_length)
    target_architecture_problems(target, problems)
    files = weight_files(draft_dir, problems)
    if files:
        check_dflash_tensors(config, files, target, problems)
    if numerics:
        problems += target_distribution_problems(config, target)
        problems += rope_problems(config)
    return problems


def errors(problems: list[Problem]) -> list[Problem]:
    return [problem for problem in problems if problem.severity == "error"]


def format_report(draft_dir: str | Path, target: str | Path, problems: list[Problem]) -> str:
    lines = []
    if not errors(problems):
        lines.append(f"OK: {draft_dir} matches what vLLM expects for target {target}")
    else:
        lines.append(f"{len(errors(problems))} problem(s) in {draft_dir} (target {target}):")
    lines += [f"  {n}. {problem}" for n, problem in enumerate(problems, 1)]
    return "\n".join(lines)
