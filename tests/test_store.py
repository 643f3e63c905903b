"""Store: manifest fields, resume refusal, atomic shards, disk full, dedup and rank filter."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from eagle3.data.store import HiddenStateStore, Sample, StoreError, StoreWriter, file_sha256

H, N_AUX = 16, 3


def _header(**overrides):
    header = {
        "layers": [1, 3, 4],
        "vllm_layer_ids": [2, 4, 5],
        "hidden_size": H,
        "hidden_dtype": "fp32",
        "target": {"name_or_path": "t", "config_hash": "abc"},
        "tokenizer_hash": "tok",
        "settings": {"seed": 0},
    }
    header.update(overrides)
    return header


def _sample(key, length=5, ids=None):
    generator = torch.Generator().manual_seed(key)
    return Sample(
        input_ids=torch.tensor(ids) if ids is not None else torch.arange(length) + key,
        loss_mask=torch.arange(length) % 2 == 0,
        aux_hidden_states=torch.randn(length, N_AUX * H, generator=generator),
        last_hidden_states=torch.randn(length, H, generator=generator),
        key=key,
    )


def test_roundtrip_and_manifest(tmp_path):
    writer = StoreWriter(tmp_path, _header(), shard_max_tokens=12)
    samples = [_sample(k) for k in range(5)]
    for sample in samples:
        writer.add(sample)
    writer.close()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for key in (
        "format_version",
        "layers",
        "vllm_layer_ids",
        "hidden_size",
        "hidden_dtype",
        "target",
        "tokenizer_hash",
    ):
        assert key in manifest
    assert manifest["num_samples"] == 5 and manifest["num_tokens"] == 25 and manifest["ranks"] == [0]
    assert manifest["num_assistant_tokens"] == 15
    assert [s["num_samples"] for s in manifest["shards"]] == [3, 2]  # a shard closes once it holds >= 12 tokens
    for shard in manifest["shards"]:
        assert shard["sha256"] == file_sha256(tmp_path / shard["name"])
        assert shard["bytes"] == (tmp_path / shard["name"]).stat().st_size
    store = HiddenStateStore(tmp_path, verify_checksums=True)
    assert len(store) == 5
    for i, sample in enumerate(samples):
        got = store[i]
        assert got.key == sample.key and store.length(i) == 5
        assert torch.equal(got.input_ids, sample.input_ids) and torch.equal(got.loss_mask, sample.loss_mask)
        assert torch.equal(got.aux_hidden_states, sample.aux_hidden_states)
        assert torch.equal(got.last_hidden_states, sample.last_hidden_states)


def test_resume_skips_stored_keys_and_refuses_other_settings(tmp_path):
    writer = StoreWriter(tmp_path, _header())
    writer.add(_sample(0))
    writer.close()
    again = StoreWriter(tmp_path, _header())
    assert again.done_keys == {0}
    assert again.add(_sample(0)) is False
    with pytest.raises(StoreError, match=r"other settings \(layers: stored \[1, 3, 4\], now \[0, 3, 4\]"):
        StoreWriter(tmp_path, _header(layers=[0, 3, 4]))
    with pytest.raises(StoreError, match="settings: stored"):
        StoreWriter(tmp_path, _header(settings={"seed": 1}))


def test_unrecorded_shard_is_adopted_and_tmp_dropped(tmp_path):
    writer = StoreWriter(tmp_path, _header())
    writer.add(_sample(0))
    writer.close()
    manifest_before = (tmp_path / "manifest.json").read_text()
    writer.add(_sample(1))
    writer.flush()
    # simulate a kill between the shard rename and the manifest update, plus a half-written shard
    (tmp_path / "manifest.json").write_text(manifest_before)
    (tmp_path / "shard-r00-000009.tmp").write_bytes(b"half")
    resumed = StoreWriter(tmp_path, _header())
    assert resumed.done_keys == {0, 1}
    assert not list(tmp_path.glob("*.tmp"))
    assert len(HiddenStateStore(tmp_path)) == 2


def test_dedup_and_rank_filter(tmp_path):
    for rank in (0, 1):
        writer = StoreWriter(tmp_path, _header(), rank=rank)
        writer.add(_sample(rank * 10, ids=[7, 7, 7, 7, 7]))  # same tokens on both ranks
        writer.add(_sample(rank * 10 + 1))
        writer.close()
    assert len(HiddenStateStore(tmp_path)) == 3
    assert len(HiddenStateStore(tmp_path, deduplicate=False)) == 4
    assert {s.key for s in (HiddenStateStore(tmp_path, ranks=[1])[i] for i in range(2))} == {10, 11}
    with pytest.raises(StoreError, match=r"ranks present: \[0, 1\]"):
        HiddenStateStore(tmp_path, ranks=[5])
    # keys stored by ANY rank count as done, so a restart with another world size never duplicates
    assert StoreWriter(tmp_path, _header(), rank=0).done_keys == {0, 1, 10, 11}


def test_disk_full_keeps_manifest_consistent(tmp_path):
    """A real out-of-space error (file size limit) while writing the second shard."""
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
        from test_store import _header, _sample
        from eagle3.data.store import DiskFullError, StoreWriter
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        writer = StoreWriter({str(tmp_path)!r}, _header(), shard_max_tokens=10)
        writer.add(_sample(0)); writer.add(_sample(1))  # first shard: ~4 KB
        resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))
        try:
            for key in range(2, 40):
                writer.add(_sample(key, length=40))
        except DiskFullError as error:
            print(error)
            sys.exit(3)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    assert "no space left while writing shard-r00-000001" in result.stdout
    assert "lists 2 samples / 10 tokens" in result.stdout and "rerun the same command to resume" in result.stdout
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["num_samples"] == 2 and [s["name"] for s in manifest["shards"]] == ["shard-r00-000000.safetensors"]
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == ["shard-r00-000000.safetensors"]
    assert len(HiddenStateStore(tmp_path, verify_checksums=True)) == 2
    assert StoreWriter(tmp_path, _header()).done_keys == {0, 1}


def test_ranks_writing_concurrently_keep_one_consistent_manifest(tmp_path):
    """Two processes (as under torchrun) append shards to one directory at the same time."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
        from test_store import _header, _sample
        from eagle3.data.store import StoreWriter
        rank = int(sys.argv[1])
        writer = StoreWriter({str(tmp_path)!r}, _header(), rank=rank, shard_max_tokens=1)
        for key in range(rank, 30, 2):
            writer.add(_sample(key))  # one shard per sample: many manifest updates racing
        writer.close()
        """
    )
    processes = [subprocess.Popen([sys.executable, "-c", script, str(rank)]) for rank in (0, 1)]
    assert [p.wait(timeout=120) for p in processes] == [0, 0]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["num_samples"] == 30 and len(manifest["shards"]) == 30 and manifest["ranks"] == [0, 1]
    store = HiddenStateStore(tmp_path, verify_checksums=True)
    assert sorted(store[i].key for i in range(len(store))) == list(range(30))
