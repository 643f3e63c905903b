"""The files of a saved draft and facts about its target, shared by the EAGLE-3 and DFlash checks."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from eagle3.export.problem import Problem

FLOAT_DTYPES = {torch.float32, torch.bfloat16, torch.float16}


def weight_files(draft_dir: Path, problems: list[Problem]) -> list[Path]:
    """The safetensors files vLLM will load, flagging strays (vLLM loads every *.safetensors)."""
    found = sorted(draft_dir.glob("*.safetensors"))
    index_path = draft_dir / "model.safetensors.index.json"
    if index_path.exists():
        listed = set(json.loads(index_path.read_text())["weight_map"].values())
        wanted = [draft_dir / name for name in sorted(listed)]
    else:
        wanted = [draft_dir / "model.safetensors"]
    for path in wanted:
        if not path.exists():
            problems.append(Problem(f"{path} is missing", "save the draft with save_pretrained (model.safetensors)"))
    for path in found:
        if path not in wanted:
            problems.append(
                Problem(
                    f"stray weights file {path.name}: vLLM loads every *.safetensors in the folder",
                    f"delete {path} (or move it out of {draft_dir})",
                )
            )
    for path in sorted(draft_dir.glob("*.bin")) + sorted(draft_dir.glob("*.pt")):
        problems.append(Problem(f"stray file {path.name} beside the safetensors weights", f"delete {path}"))
    return [path for path in wanted if path.exists()]


def same_json(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def tensor_index(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], torch.dtype]]:
    """name -> (file, shape, dtype) of every tensor in ``files``, read from the headers only."""
    tensors: dict[str, tuple[Path, tuple[int, ...], torch.dtype]] = {}
    for path in files:
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                tensors[name] = (path, tuple(piece.get_shape()), slice_dtype(piece))
    return tensors


def slice_dtype(piece) -> torch.dtype:
    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64, "BOOL": torch.bool}
    return names.get(piece.get_dtype(), torch.float64)


def target_architecture_problems(target: str | Path, problems: list[Problem]) -> None:
    """vLLM picks the target's class from config.json's ``architectures``; without it vLLM 0.32
    resolves ``Qwen3Model`` (an embedding model) and eagle3 fails at start-up on a meta lm_head."""
    from eagle3.target import _resolve

    path = _resolve(target, "config.json")
    if path is not None and not json.loads(path.read_text()).get("architectures"):
        problems.append(
            Problem(
                f'the target\'s {path} has no "architectures": vLLM serves it as an embedding model '
                "(Qwen3Model) and speculative decoding fails at start-up",
                'add "architectures": ["Qwen3ForCausalLM"] to it, or pass vLLM '
                'hf_overrides={"architectures": ["Qwen3ForCausalLM"]} (--hf-overrides on vllm serve)',
                severity="warning",
            )
        )
