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
from transformers.trainer_pt_utils import BatchRebalanceSampler, LengthGroupedSampler

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


def padded(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


class TokenBudgetBatchSampler(BatchRebalanceSampler):
    """Micro-batches of at most ``max_tokens`` padded tokens (samples x longest), per device.

    Each epoch (seed + epoch): samples are shuffled, sorted by length (ties stay shuffled) and
    packed greedily, so a batch holds samples of similar length and little padding; the batch
    order is shuffled, except that the ``world_size`` batches with the most tokens come first:
    if the budget does not fit the device, step 1 says so, not step 30 000.

    Every rank computes the same batches and takes every ``world_size``-th one; the list is
    padded with batches from its start to a multiple of ``world_size``, so all ranks run the
    same number of steps (as DistributedSampler pads). Subclassing transformers'
    ``BatchRebalanceSampler`` is what makes the Trainer pass it as a rank-aware batch sampler
    (accelerate does not shard it again); its own balancing is not used.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        seed: int = 0,
        world_size: int = 1,
        rank: int = 0,
        pad_to_multiple_of: int = 1,
    ) -> None:
        self.lengths = list(lengths)
        self.max_tokens = max_tokens
        self.seed = seed
        self.world_size = max(1, world_size)
        self.rank = rank
        self.pad_to_multiple_of = pad_to_multiple_of
        self.epoch = 0
        longest = padded(max(self.lengths), pad_to_multiple_of)
        if longest > max_tokens:
            raise ValueError(
                f"--max-tokens-per-batch {max_tokens} is smaller than the longest sample ({longest} tokens, padded); "
                f"raise it to at least {longest} or lower --max-length."
            )
        self.num_batches = len(self._global_batches(0))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        order.sort(key=lambda i: self.lengths[i], reverse=True)  # stable: equal lengths stay shuffled
        batches: list[list[int]] = []
        for index in order:
            if batches:
                width = padded(self.lengths[batches[-1][0]], self.pad_to_multiple_of)  # longest first
                if (len(batches[-1]) + 1) * width <= self.max_tokens:
                    batches[-1].append(index)
                    continue
            batches.append([index])
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        cost = [len(b) * padded(self.lengths[b[0]], self.pad_to_multiple_of) for b in shuffled]
        first = sorted(range(len(shuffled)), key=lambda i: (-cost[i], -self.lengths[shuffled[i][0]]))
        first = first[: self.world_size]
        batches = [shuffled[i] for i in first] + [b for i, b in enumerate(shuffled) if i not in set(first)]
        short = -len(batches) % self.world_size
        return batches + [batches[i % len(batches)] for i in range(short)]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._global_batches(self.epoch)[self.rank :: self.world_size]

    def __len__(self) -> int:
        return self.num_batches // self.world_size


class Eagle3Collator:
    """Right-pad to the batch's longest sample (rounded up to ``pad_to_multiple_of``)."""

    def __init__(self, pad_to_multiple_of: int = 1) -> None:
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        lengths = torch.tensor([len(f["input_ids"]) for f in features])
        length = padded(int(lengths.max()), self.pad_to_multiple_of)
        batch = {}
        for key in features[0]:  # ids, mask, and the states as stored (maybe fp8 + scales, maybe none)
            first = features[0][key]
            out = first.new_zeros((len(features), length, *first.shape[1:]))
            for row, feature in enumerate(features):
                out[row, : len(feature[key])] = feature[key]
            batch[key] = out
        batch["lengths"] = lengths
        return batch
