"""Storage formats (eagle3.data.codecs): fp8 with per-token scales, and ids-only stores."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from eagle3.data.codecs import bytes_per_token_floor, decode, decode_batch, encode
from eagle3.data.store import HiddenStateStore, Sample, StoreError, StoreWriter
from eagle3.train.dataset import Eagle3Collator, StoreDataset

N_AUX = 3


def _header(hidden_size: int, hidden_dtype: str) -> dict:
    return {
        "layers": [1, 3, 4],
        "vllm_layer_ids": [2, 4, 5],
        "hidden_size": hidden_size,
        "hidden_dtype": hidden_dtype,
        "target": {"name_or_path": "t", "config_hash": "abc"},
    }


def _sample(key: int, length: int, hidden_size: int) -> Sample:
    generator = torch.Generator().manual_seed(key)
    aux = torch.randn(length, N_AUX * hidden_size, generator=generator)
    aux[0, 5] = 3000.0  # a massive activation, as Qwen3's residual stream has on a few positions
    return Sample(
        input_ids=torch.arange(length) + key,
        loss_mask=torch.ones(length, dtype=torch.bool),
        aux_hidden_states=aux.bfloat16(),
        last_hidden_states=torch.randn(length, hidden_size, generator=generator).bfloat16() * 40,
        key=key,
    )


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Per row (token) and per layer block: ||got - want|| / ||want||."""
    got, want = got.float().unflatten(-1, (-1, 64)), want.float().unflatten(-1, (-1, 64))
    return (got - want).norm(dim=-1) / want.norm(dim=-1)


def test_fp8_keeps_every_token_and_layer_accurate_next_to_an_outlier():
    states = torch.randn(6, N_AUX * 64) * torch.tensor([1e-3, 1.0, 50.0]).repeat_interleave(64)
    states[2, 7] = 5000.0
    stored = encode(states, N_AUX, "fp8")
    assert stored[""].dtype == torch.float8_e4m3fn and stored["_scales"].shape == (6, N_AUX)
    error = _relative_error(decode(stored[""], stored["_scales"], torch.float32), states)
    assert error.max() < 0.05, error  # e4m3 keeps 3 mantissa bits: ~2-3 % per block
    # One scale for the whole tensor would crush the small layers and the outlier's neighbours.
    scale = states.abs().max() / 448
    per_tensor = (states / scale).to(torch.float8_e4m3fn).float() * scale
    assert _relative_error(per_tensor, states).max() > 0.5


def test_fp8_store_roundtrip_at_half_the_bf16_floor(tmp_path):
    hidden = 2048
    writer = StoreWriter(tmp_path, _header(hidden, "fp8"), shard_max_tokens=64)
    samples = [_sample(key, 16 + key, hidden) for key in range(6)]
    for sample in samples:
        writer.add(sample)
    writer.close()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    bf16_floor = bytes_per_token_floor("bf16", N_AUX, hidden)
    ratio = manifest["num_bytes"] / manifest["num_tokens"] / bf16_floor
    assert ratio <= 0.51, ratio  # states + scales + ids + mask + the shard's header, against bf16 states alone

    store = HiddenStateStore(tmp_path)
    dataset = StoreDataset(store, max_length=20)
    features = [dataset[i] for i in range(len(dataset))]
    assert features[0]["aux_hidden_states"].dtype == torch.float8_e4m3fn  # the reader hands on what is stored
    batch = decode_batch(Eagle3Collator()(features), "cpu")
    assert set(batch) == {"input_ids", "loss_mask", "aux_hidden_states", "last_hidden_states", "lengths"}
    for row, sample in enumerate(samples):
        n = min(len(sample.input_ids), 20)
        for key in ("aux_hidden_states", "last_hidden_states"):
            got = batch[key][row, :n]
            assert got.dtype == torch.bfloat16
            assert _relative_error(got, getattr(sample, key)[:n]).max() < 0.05
            assert not batch[key][row, n:].any()  # padding decodes to zeros


def test_ids_only_store_has_no_states_and_refuses_offline_training(tmp_path, random_target):
    writer = StoreWriter(tmp_path, _header(64, "none"))
    writer.add(_sample(0, 8, 64))
    writer.close()
    with safe_open(tmp_path / "shard-r00-000000.safetensors", framework="pt") as handle:
        assert set(handle.keys()) == {"input_ids", "loss_mask", "offsets", "sample_keys"}
    sample = HiddenStateStore(tmp_path)[0]
    assert sample.aux_hidden_states is None and torch.equal(sample.input_ids, torch.arange(8))
    assert set(StoreDataset(HiddenStateStore(tmp_path))[0]) == {"input_ids", "loss_mask"}

    from eagle3.train.args import Eagle3TrainingArguments
    from eagle3.train.main import check_data_against_target

    args = Eagle3TrainingArguments(data_dir=str(tmp_path), model=str(random_target), output_dir=str(tmp_path))
    with pytest.raises(Exception, match="--no-states.*--online"):
        check_data_against_target(args)


def test_a_store_with_states_refuses_a_sample_without(tmp_path):
    writer = StoreWriter(tmp_path, _header(64, "fp8"))
    bare = Sample(input_ids=torch.arange(4), loss_mask=torch.ones(4, dtype=torch.bool), aux_hidden_states=None,
                  last_hidden_states=None, key=0)  # fmt: skip
    with pytest.raises(StoreError, match="no hidden states"):
        writer.add(bare)
