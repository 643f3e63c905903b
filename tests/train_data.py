"""Collected training data for the training tests, built straight from the tiny target.

Mirrors what run_collect.py stores (same manifest keys, same tensors): the target regenerates
each answer greedily, so the draft learns the target's own distribution, then one forward pass
captures the aux states (output of CLI layer i = HF ``hidden_states[i + 1]``) and the last
layer's pre-norm output (a hook: HF's last ``hidden_states`` entry is after the final norm).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainerCallback

from eagle3.config import default_target_layers, to_vllm_layer_ids
from eagle3.data.store import Sample, StoreWriter
from eagle3.target import config_hash
from eagle3.testing import synthetic_conversations


def _regenerate(model, tokenizer, conversations: list[dict], max_new_tokens: int, batch_size: int = 32):
    """(prompt ids, answer ids) per conversation, the answer generated greedily by the target."""
    tokenizer.padding_side = "left"
    pairs = []
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start : start + batch_size]
        prompts = [
            tokenizer.apply_chat_template(
                c["messages"][:1], add_generation_prompt=True, enable_thinking=False, tokenize=False
            )
            for c in chunk
        ]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False)
        for row, prompt in enumerate(prompts):
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            answer = out[row, encoded["input_ids"].shape[1] :].tolist()
            ends = [i for i, t in enumerate(answer) if t == tokenizer.eos_token_id]
            answer = answer[: ends[0] + 1] if ends else answer
            answer = [t for t in answer if t != tokenizer.pad_token_id]
            pairs.append((prompt_ids, answer))
    return pairs


def build_store(
    target_dir: str | Path,
    output_dir: str | Path,
    num_samples: int = 160,
    layers: list[int] | None = None,
    seed: int = 0,
    max_new_tokens: int = 40,
    hidden_dtype: str = "bf16",
) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output_dir = Path(output_dir)
    if (output_dir / "manifest.json").exists():
        return output_dir
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    num_layers = model.config.num_hidden_layers
    layers = sorted(layers or default_target_layers(num_layers))
    header = {
        "layers": layers,
        "vllm_layer_ids": to_vllm_layer_ids(layers),
        "hidden_size": model.config.hidden_size,
        "hidden_dtype": hidden_dtype,
        "target": {"name_or_path": str(target_dir), "config_hash": config_hash(model.config)},
    }
    writer = StoreWriter(output_dir, header, rank=0, shard_max_tokens=4096)
    captured: dict[str, torch.Tensor] = {}
    hook = model.model.layers[-1].register_forward_hook(
        lambda module, args, output: captured.__setitem__("last", output[0] if isinstance(output, tuple) else output)
    )
    conversations = synthetic_conversations(num_samples, seed=seed)
    for key, (prompt_ids, answer) in enumerate(_regenerate(model, tokenizer, conversations, max_new_tokens)):
        ids = torch.tensor(prompt_ids + answer)
        with torch.no_grad():
            out = model(input_ids=ids[None], output_hidden_states=True)
        aux = torch.cat([out.hidden_states[layer + 1][0] for layer in layers], dim=-1)
        loss_mask = torch.zeros(len(ids), dtype=torch.bool)
        loss_mask[len(prompt_ids) :] = True
        writer.add(
            Sample(
                input_ids=ids,
                loss_mask=loss_mask,
                aux_hidden_states=aux,
                last_hidden_states=captured["last"][0],
                key=key,
            )
        )
    writer.close()
    hook.remove()
    return output_dir


def cached_store(target_dir: str | Path, num_samples: int = 160, seed: int = 0) -> Path:
    """build_store once per target and settings, shared by all test modules (atomic rename)."""
    import hashlib
    import shutil
    import tempfile

    from eagle3.testing import cache_dir

    key = hashlib.sha256(f"v1|{Path(target_dir).name}|{num_samples}|{seed}".encode()).hexdigest()[:10]
    final = cache_dir() / f"train-data-{key}"
    if (final / "manifest.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
    build_store(target_dir, staging / "data", num_samples=num_samples, seed=seed)
    try:
        (staging / "data").rename(final)
    except OSError:  # built concurrently by another worker: identical
        pass
    shutil.rmtree(staging, ignore_errors=True)
    return final


def wandb_offline_records(run_file: str | Path):
    """Records of an offline W&B run (``run-*.wandb``): wandb >= 0.2x writes them from its Go core
    and has no Python reader any more. Format: 7-byte file header, then LevelDB-log style 32 KiB
    blocks of [crc32 u32, length u16, type u8] + protobuf ``Record`` chunks (1 full, 2-4 pieces)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending = Path(run_file).read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def assert_resumed_equals_straight(straight_dir: Path, resumed_dir: Path, checkpoint: Path) -> None:
    """The resumed run's final model equals the uninterrupted run's, tensor for tensor, and the
    resume trained further than its checkpoint."""
    from safetensors.torch import load_file

    straight = load_file(straight_dir / "final_model" / "model.safetensors")
    resumed = load_file(resumed_dir / "final_model" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], atol=1e-5, rtol=1e-4, msg=name)
    assert not torch.allclose(load_file(checkpoint / "model.safetensors")["fc.weight"], straight["fc.weight"])


class StopAt(TrainerCallback):
    """Save and stop after ``step`` optimizer steps (an interrupted run to resume)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_save = True
            control.should_training_stop = True


class Losses(TrainerCallback):
    """Records every logged training loss."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])
