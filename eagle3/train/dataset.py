"""From the hidden-state store to padded batches with little padding.

* ``StoreDataset``: one collected sample per item (memory-mapped; nothing is loaded up front),
  truncated to ``max_length``, with ``lengths`` known from the manifest offsets so the sampler
  can group by length without reading a single hidden state.
* ``split_train_eval``: a deterministic held-out split (same seed -> same split on every rank
  and every resume).
* ``LengthGroupedEpochSampler``: transformers' length-grouped order, seeded per epoch, so the
  order does not depend on the global RNG (resume and multi-process need the same order).
* ``Eagle3Collator``: right-pads to the longest sample of the batch; causal attention means
  real positions never see the padding, so no attention mask is needed, only the loss mask.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from safetensors import safe_open
from torch.utils.data import Dataset
from transformers.trainer_pt_utils import LengthGroupedSampler

from eagle3.data.store import HiddenStateStore


class StoreDataset(Dataset):
    def __init__(
        self,
        store: HiddenStateStore,
        indices: Sequence[int] | None = None,
        max_length: int = 2048,
        states: bool = True,
    ) -> None:
        self.store = store
        self.states = states  # False: ids and masks only (online training computes the states)
        self.indices = list(range(len(store))) if indices is None else list(indices)
        self.max_length = max_length
        self.lengths = [min(store.length(i), max_length) for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        sample = self.store.get(self.indices[item], states=self.states)
        n = self.max_length
        # States as stored (fp8 + scales stay encoded: training decodes them on its device).
        features = {"input_ids": sample.input_ids[:n], "loss_mask": sample.loss_mask[:n]}
        return features | {name: tensor[:n] for name, tensor in sample.stored_tensors().items()}

    def token_ids_and_masks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(input_ids, loss_mask) of every sample, read shard by shard without touching hidden states."""
        wanted: dict[int, list[int]] = {}
        for i in self.indices:
            shard_no, j = self.store.index[i]
            wanted.setdefault(shard_no, []).append(j)
        for shard_no, rows in sorted(wanted.items()):
            offsets = self.store._offsets[shard_no]
            with safe_open(self.store.directory / self.store.shards[shard_no]["name"], framework="pt") as handle:
                ids, mask = handle.get_tensor("input_ids"), handle.get_tensor("loss_mask")
            for j in rows:
                start, end = int(offsets[j]), min(int(offsets[j + 1]), int(offsets[j]) + self.max_length)
                yield ids[start:end].long(), mask[start:end].bool()


def split_train_eval(num_samples: int, eval_ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic split; at least one eval sample whenever eval_ratio > 0 and there are 2+ samples."""
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed)).tolist()
    num_eval = 0
    if eval_ratio > 0 and num_samples > 1:
        num_eval = min(num_samples - 1, max(1, round(num_samples * eval_ratio)))
    return sorted(order[num_eval:]), sorted(order[:num_eval])


class LengthGroupedEpochSampler(LengthGroupedSampler):
    """Length-grouped order drawn from ``seed + epoch`` (the Trainer calls ``set_epoch``)."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


class Eagle3Collator:
    """Right-pad to the batch's longest sample (rounded up to ``pad_to_multiple_of``)."""

    def __init__(self, pad_to_multiple_of: int = 1) -> None:
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        lengths = torch.tensor([len(f["input_ids"]) for f in features])
        multiple = self.pad_to_multiple_of
        length = int(-(-int(lengths.max()) // multiple) * multiple)
        batch = {}
        for key in features[0]:  # ids, mask, and the states as stored (maybe fp8 + scales, maybe none)
            first = features[0][key]
            out = first.new_zeros((len(features), length, *first.shape[1:]))
            for row, feature in enumerate(features):
                out[row, : len(feature[key])] = feature[key]
            batch[key] = out
        batch["lengths"] = lengths
        return batch
