"""On-disk store of collected target states: safetensors shards + manifest.json.

Layout of ``output_dir``::

    manifest.json                       what was collected and how (see ``Manifest``)
    shard-r00-000000.safetensors        one shard = many samples, concatenated along tokens
    ...

Tensors in a shard (T = total tokens of the shard, n = samples in it):

    aux_hidden_states   [T, n_aux * H]  target states at the aux layers, ascending layer order
    last_hidden_states  [T, H]          output of the last layer before the final norm (stored once,
                                        even when the last layer is also an aux layer)
    *_scales            [T, n_aux], [T, 1]  fp8 only: float32 scale per token per layer
    input_ids           [T]   int32
    loss_mask           [T]   uint8     1 = assistant token
    offsets             [n+1] int64     sample i = rows offsets[i]:offsets[i+1]
    sample_keys         [n]   int64     position of the sample in the input stream (resume)

How the states are encoded (``hidden_dtype``: bf16, fp16, fp32, fp8 or none = no states) is
``eagle3.data.codecs``'s business; the store writes and reads through it.

manifest.json (top level): ``format_version``, ``layers`` (command-line numbering: output of
0-based layer i), ``vllm_layer_ids`` (i + 1), ``hidden_size``, ``hidden_dtype``, ``target``
({name_or_path, config_hash, num_hidden_layers, ...}), ``tokenizer_hash``, ``settings`` (the
collection settings a resume must match), ``shards`` (name, rank, samples, tokens, assistant
tokens, bytes, sha256) and the totals ``num_samples``, ``num_tokens``, ``num_assistant_tokens``,
``num_bytes``, ``ranks``.

Durability: a shard is written to ``*.tmp`` and renamed into place, then recorded in the
manifest (also temp + rename, under a file lock so several ranks can share one directory).
A crash loses at most the shard in flight; a shard that was renamed but not yet recorded is
adopted on the next start, so a restart neither loses nor duplicates a sample.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from eagle3.data.codecs import STATE_KEYS, STATE_TENSOR_NAMES, all_finite, encode, has_states

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_GLOB = "shard-r*-*.safetensors"


class StoreError(RuntimeError):
    """The store on disk is missing, inconsistent or was collected with other settings."""


class NonFiniteSampleError(StoreError):
    """A sample whose states would be stored as inf/NaN: refused, nothing of it is stored."""


class DiskFullError(StoreError):
    """No space left while writing a shard; the manifest still describes only complete shards."""


# "No space" comes in several flavours: a full disk, a quota, a file-size limit (ulimit -f).
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _is_no_space(error: Exception) -> bool:
    """OSError with a no-space errno, or safetensors' wrapped "I/O error: ... (os error N)"."""
    if isinstance(error, OSError):
        return error.errno in _NO_SPACE
    return any(f"(os error {code})" in str(error) for code in _NO_SPACE)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as handle:
            json.dump(data, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left behind when something above failed


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    with open(directory / ".manifest.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise StoreError(f"{path} not found: is {directory} a run_collect.py output directory?")
    with open(path) as handle:
        manifest = json.load(handle)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StoreError(
            f"{path}: format_version {manifest.get('format_version')} is not supported "
            f"(this version reads {FORMAT_VERSION}); collect again with this version."
        )
    return manifest


@dataclass
class Sample:
    input_ids: torch.Tensor  # [T] long
    loss_mask: torch.Tensor  # [T] bool
    aux_hidden_states: torch.Tensor | None  # [T, n_aux * H]; None in a store without states
    last_hidden_states: torch.Tensor | None  # [T, H]
    key: int
    # fp8 stores: the per-token, per-layer scales ([T, n_aux], [T, 1]); states are then float8.
    aux_hidden_states_scales: torch.Tensor | None = None
    last_hidden_states_scales: torch.Tensor | None = None

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """The states (and scales) this sample carries, by their names in a shard."""
        return {name: getattr(self, name) for name in STATE_TENSOR_NAMES if getattr(self, name) is not None}


class StoreWriter:
    """Appends samples to one rank's shards; resumable (see module docstring).

    ``header`` holds everything that must match for a resume (target, layers, dtype,
    collection settings). A directory holding data collected with a different header is
    refused with a message listing the differing fields.

    ``done_keys`` are the keys stored by ANY rank, so a restart with another world size
    still never collects a sample twice.
    """

    def __init__(
        self,
        directory: str | Path,
        header: dict[str, Any],
        rank: int = 0,
        shard_max_tokens: int = 1 << 16,
    ) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / f".write-probe-r{rank:02d}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise StoreError(f"--output-dir {self.directory}: cannot write there ({error.strerror}).") from None
        self.rank = rank
        self.shard_max_tokens = shard_max_tokens
        self.header = header
        self._pending: list[Sample] = []
        self._pending_tokens = 0
        with _locked(self.directory):
            manifest = self._open_manifest()
            self._adopt_unrecorded_shards(manifest)
        self.done_keys = self.collected_keys()

    # ------------------------------------------------------------------ manifest
    def _open_manifest(self) -> dict[str, Any]:
        path = self.directory / MANIFEST
        if not path.exists():
            manifest = _with_totals({"format_version": FORMAT_VERSION, **self.header, "shards": []})
            _write_json_atomic(path, manifest)
            return manifest
        manifest = read_manifest(self.directory)
        if not manifest["shards"] and not any(self.directory.glob("shard-*")):
            # Nothing was ever stored (e.g. a run that skipped every conversation): nothing to
            # protect, so the new settings simply replace the old ones.
            manifest = _with_totals({"format_version": FORMAT_VERSION, **self.header, "shards": []})
            _write_json_atomic(path, manifest)
            return manifest
        differing = sorted(
            key
            for key in self.header
            if json.dumps(manifest.get(key), sort_keys=True) != json.dumps(self.header[key], sort_keys=True)
        )
        if differing:
            details = "; ".join(f"{key}: stored {manifest.get(key)!r}, now {self.header[key]!r}" for key in differing)
            raise StoreError(
                f"{self.directory} already holds data collected with other settings ({details}). "
                "Use another --output-dir, or the same settings to resume."
            )
        return manifest

    def _adopt_unrecorded_shards(self, manifest: dict[str, Any]) -> None:
        for tmp in self.directory.glob(f"shard-r{self.rank:02d}-*.tmp"):
            tmp.unlink()  # the shard in flight when a previous run died
        recorded = {shard["name"] for shard in manifest["shards"]}
        adopted = False
        for path in sorted(self.directory.glob(f"shard-r{self.rank:02d}-*.safetensors")):
            if path.name not in recorded:
                manifest["shards"].append(self._shard_entry(path))
                adopted = True
        if adopted:
            _write_json_atomic(self.directory / MANIFEST, _with_totals(manifest))

    def _shard_entry(self, path: Path) -> dict[str, Any]:
        with safe_open(path, framework="pt") as handle:
            offsets = handle.get_tensor("offsets")
            loss_mask = handle.get_tensor("loss_mask")
        return {
            "name": path.name,
            "rank": self.rank,
            "num_samples": len(offsets) - 1,
            "num_tokens": int(offsets[-1]),
            "num_assistant_tokens": int(loss_mask.sum()),
            "bytes": path.stat().st_size,
            "sha256": file_sha256(path),
        }

    def collected_keys(self) -> set[int]:
        keys: set[int] = set()
        for path in sorted(self.directory.glob("shard-r*-*.safetensors")):
            with safe_open(path, framework="pt") as handle:
                keys.update(handle.get_tensor("sample_keys").tolist())
        return keys

    def stored_tokens(self, all_ranks: bool = False) -> int:
        """Tokens in this rank's recorded shards (or every rank's) plus those not yet flushed."""
        manifest = read_manifest(self.directory)
        recorded = sum(s["num_tokens"] for s in manifest["shards"] if all_ranks or s["rank"] == self.rank)
        return recorded + self._pending_tokens

    # ------------------------------------------------------------------ writing
    def add(self, sample: Sample) -> bool:
        """Queue a sample (written with the next shard); False when its key is already stored,
        ``NonFiniteSampleError`` when its stored states would hold inf/NaN."""
        if sample.key in self.done_keys:
            return False
        self._pending.append(self._encoded(sample))  # encoded now: pending fp8 samples take half the memory
        self._pending_tokens += len(sample.input_ids)
        self.done_keys.add(sample.key)
        if self._pending_tokens >= self.shard_max_tokens:
            self.flush()
        return True

    def _encoded(self, sample: Sample) -> Sample:
        """The sample with its states in the stored format (or without states)."""
        hidden_dtype = self.header["hidden_dtype"]
        states: dict[str, torch.Tensor | None] = {"aux_hidden_states": None, "last_hidden_states": None}
        if has_states(hidden_dtype):
            if sample.aux_hidden_states is None or sample.last_hidden_states is None:
                raise StoreError(f"sample {sample.key} has no hidden states to store as {hidden_dtype}")
            num_slots = {"aux_hidden_states": len(self.header["layers"]), "last_hidden_states": 1}
            for key in STATE_KEYS:
                for suffix, tensor in encode(getattr(sample, key), num_slots[key], hidden_dtype).items():
                    states[key + suffix] = tensor
            if not all_finite(t for t in states.values() if t is not None):
                overflow = (
                    " (fp16 overflows above 65504; bf16 and fp8 keep such values)" if hidden_dtype == "fp16" else ""
                )
                raise NonFiniteSampleError(
                    f"sample {sample.key}: its hidden states hold inf/NaN as {hidden_dtype}{overflow}"
                )
        return Sample(input_ids=sample.input_ids, loss_mask=sample.loss_mask, key=sample.key, **states)

    def flush(self) -> None:
        if not self._pending:
            return
        samples, self._pending, self._pending_tokens = self._pending, [], 0
        lengths = torch.tensor([len(s.input_ids) for s in samples])
        offsets = torch.zeros(len(samples) + 1, dtype=torch.long)
        offsets[1:] = lengths.cumsum(0)
        tensors = {
            name: torch.cat([s.stored_tensors()[name] for s in samples]).contiguous()
            for name in samples[0].stored_tensors()
        }
        tensors |= {
            "input_ids": torch.cat([s.input_ids for s in samples]).to(torch.int32),
            "loss_mask": torch.cat([s.loss_mask for s in samples]).to(torch.uint8),
            "offsets": offsets,
            "sample_keys": torch.tensor([s.key for s in samples], dtype=torch.long),
        }
        with _locked(self.directory):
            index = len(list(self.directory.glob(f"shard-r{self.rank:02d}-*.safetensors")))
            path = self.directory / f"shard-r{self.rank:02d}-{index:06d}.safetensors"
            tmp = path.with_suffix(".tmp")
            try:
                save_file(tensors, tmp, metadata={"format_version": str(FORMAT_VERSION)})
                with open(tmp, "rb") as handle:
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
                manifest = read_manifest(self.directory)
                manifest["shards"].append(self._shard_entry(path))
                _write_json_atomic(self.directory / MANIFEST, _with_totals(manifest))
            except (OSError, SafetensorError) as error:
                tmp.unlink(missing_ok=True)
                if not _is_no_space(error):
                    raise
                manifest = read_manifest(self.directory)
                if path.name not in {shard["name"] for shard in manifest["shards"]}:
                    path.unlink(missing_ok=True)  # renamed but not recorded: the manifest stays the truth
                for sample in samples:  # not stored: a resume must collect them again
                    self.done_keys.discard(sample.key)
                raise DiskFullError(
                    f"{self.directory}: no space left while writing {path.name} ({error}). "
                    f"{MANIFEST} is consistent and lists {manifest['num_samples']} samples / "
                    f"{manifest['num_tokens']} tokens in complete shards; the {len(samples)} samples in flight "
                    "were not stored. Free some space and rerun the same command to resume."
                ) from None

    def close(self) -> None:
        self.flush()


def _with_totals(manifest: dict[str, Any]) -> dict[str, Any]:
    shards = manifest["shards"]
    manifest["num_samples"] = sum(s["num_samples"] for s in shards)
    manifest["num_tokens"] = sum(s["num_tokens"] for s in shards)
    manifest["num_assistant_tokens"] = sum(s["num_assistant_tokens"] for s in shards)
    manifest["num_bytes"] = sum(s["bytes"] for s in shards)
    manifest["ranks"] = sorted({s["rank"] for s in shards})
    return manifest


class HiddenStateStore:
    """Random access by sample over the shards (memory-mapped through safetensors).

    ``ranks``: keep only shards written by these ranks (``--filter-rank``).
    ``deduplicate``: drop samples whose token ids repeat an earlier sample's.
    """

    def __init__(
        self,
        directory: str | Path,
        ranks: Sequence[int] | None = None,
        deduplicate: bool = True,
        verify_checksums: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.shards = [s for s in self.manifest["shards"] if ranks is None or s["rank"] in set(ranks)]
        if not self.shards:
            have = sorted({s["rank"] for s in self.manifest["shards"]})
            raise StoreError(
                f"{self.directory}: no shards for ranks {list(ranks) if ranks is not None else 'any'} "
                f"(ranks present: {have}); check --filter-rank, or collect data first."
            )
        self._offsets: list[torch.Tensor] = []
        self.index: list[tuple[int, int]] = []  # (shard, sample within shard)
        seen: set[bytes] = set()
        self.num_duplicates = 0
        for shard_no, shard in enumerate(self.shards):
            path = self.directory / shard["name"]
            if not path.exists():
                raise StoreError(f"{path} is listed in {MANIFEST} but missing; the store is damaged.")
            if verify_checksums and file_sha256(path) != shard["sha256"]:
                raise StoreError(f"{path}: checksum differs from {MANIFEST}; the file is damaged.")
            with safe_open(path, framework="pt") as handle:
                offsets = handle.get_tensor("offsets")
                ids = handle.get_tensor("input_ids") if deduplicate else None
            self._offsets.append(offsets)
            for i in range(len(offsets) - 1):
                if ids is not None:
                    digest = hashlib.blake2b(
                        ids[offsets[i] : offsets[i + 1]].numpy().tobytes(), digest_size=16
                    ).digest()
                    if digest in seen:
                        self.num_duplicates += 1
                        continue
                    seen.add(digest)
                self.index.append((shard_no, i))
        self._handles: dict[int, Any] = {}
        self._handles_pid = os.getpid()

    def __len__(self) -> int:
        return len(self.index)

    def _handle(self, shard_no: int):
        if self._handles_pid != os.getpid():  # a DataLoader worker: open our own handles
            self._handles, self._handles_pid = {}, os.getpid()
        if shard_no not in self._handles:
            self._handles[shard_no] = safe_open(self.directory / self.shards[shard_no]["name"], framework="pt")
        return self._handles[shard_no]

    def length(self, i: int) -> int:
        shard_no, j = self.index[i]
        offsets = self._offsets[shard_no]
        return int(offsets[j + 1] - offsets[j])

    def __getitem__(self, i: int) -> Sample:
        return self.get(i)

    def get(self, i: int, states: bool = True) -> Sample:
        """Sample ``i``; ``states=False`` reads ids and mask only (online training)."""
        shard_no, j = self.index[i]
        start, end = int(self._offsets[shard_no][j]), int(self._offsets[shard_no][j + 1])
        handle = self._handle(shard_no)
        names = set(handle.keys()) if states else set()
        tensors = {name: handle.get_slice(name)[start:end] if name in names else None for name in STATE_TENSOR_NAMES}
        return Sample(
            input_ids=handle.get_slice("input_ids")[start:end].long(),
            loss_mask=handle.get_slice("loss_mask")[start:end].bool(),
            key=int(handle.get_slice("sample_keys")[j : j + 1][0]),
            **tensors,
        )
