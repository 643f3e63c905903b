"""Online training from vLLM servers: the hidden states stream from running servers, never stored.

``run_train.py --online --server-url URL ... --data-dir IDS`` (a ``run_collect.py --backend vllm
--no-states`` store: the servers regenerated the answers; or ``--dataset``, which makes that
store first) trains while the inference GPUs compute the states:

* ``ServerStatesDataset`` wraps the ids-only ``StoreDataset``; ``__getitems__`` sends one
  capture request per sample of the batch, all at once, through the collection client
  (``VllmBackend.states_for``: the same server pool, failover, start-up check and per-request
  connector files, each read and deleted as soon as it is written). Nothing accumulates on disk.
* The DataLoader's workers are the bounded prefetch queue: each worker process holds its own
  client and fetches whole batches; at most ``dataloader_num_workers x dataloader_prefetch_factor``
  batches wait in memory while the trainer trains. The trainer's time spent waiting for a batch
  is measured (``Eagle3Trainer.data_wait_seconds``) and printed in the summary: when it is a
  large share of the training time, add servers or workers.
* Shutdown leaves nothing behind: a worker closes its client when it exits, and ``close()`` (in
  the main process, when training ends or fails) removes every file of this dataset's clients
  left in ``--hidden-states-dir``: those of captures still in flight when the DataLoader
  stopped its workers mid-epoch (it terminates a worker busy with a batch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from multiprocessing.util import Finalize
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, get_worker_info

from eagle3.train.dataset import StoreDataset


@dataclass(frozen=True)
class ServerSource:
    """What a client needs to capture this run's states (picklable: sent to every DataLoader worker)."""

    model: str
    server_urls: tuple[str, ...]
    hidden_states_dir: str
    layers: tuple[int, ...]
    num_layers: int
    hidden_size: int
    max_length: int
    concurrent_requests: int
    run_dir: str  # names this run's connector files (with rank, split and worker): see client_tag
    rank: int = 0

    def connect(self, client_name: str = "main"):
        """A started ``VllmBackend`` (servers checked: model, length, layers and hidden size)."""
        from transformers import AutoTokenizer

        from eagle3.collect.args import CollectArgs
        from eagle3.collect.vllm_client import VllmBackend
        from eagle3.data.template import ChatRenderer

        args = CollectArgs(
            model=self.model,
            output_dir=self._client_dir(client_name),  # only hashed into the request ids: see tag()
            dataset=["(online training)"],
            backend="vllm",
            server_url=list(self.server_urls),
            hidden_states_dir=self.hidden_states_dir,
            layers=",".join(map(str, self.layers)),
            max_length=self.max_length,
            concurrent_requests=self.concurrent_requests,
            quiet=True,
        )
        renderer = ChatRenderer(AutoTokenizer.from_pretrained(self.model), max_length=self.max_length)
        return VllmBackend(args, renderer, list(self.layers), self.num_layers, self.hidden_size, rank=self.rank)

    def _client_dir(self, client_name: str) -> str:
        return str(Path(self.run_dir) / client_name)

    def tag(self, client_name: str) -> str:
        """What the files of client ``client_name``'s captures are named with (see ``client_tag``)."""
        from eagle3.collect.capture_files import client_tag

        return client_tag(self._client_dir(client_name), self.rank)

    def check(self) -> None:
        """Fail before training when no server serves this target as needed (the client's start-up check)."""
        self.connect("check").close()


class ServerStatesDataset(Dataset):
    """An ids-only ``StoreDataset`` whose items gain the states a vLLM server computes for them."""

    def __init__(self, base: StoreDataset, source: ServerSource, split: str, num_workers: int = 0) -> None:
        if base.states:
            raise ValueError("ServerStatesDataset wraps an ids-only StoreDataset (states=False)")
        self.base, self.source, self.split = base, source, split
        self.num_workers = num_workers  # the DataLoader's: whose files close() removes
        self.lengths = base.lengths  # the samplers group by length without any request
        self._client: Any = None
        self._client_pid: int | None = None

    def __len__(self) -> int:
        return len(self.base)

    def token_ids_and_masks(self):
        return self.base.token_ids_and_masks()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None, "_client_pid": None}  # each process opens its own

    def _client_name(self, worker_id: int | None) -> str:
        return f"{self.split}-w{'main' if worker_id is None else worker_id}"

    def _connection(self):
        if self._client is None or self._client_pid != os.getpid():
            worker = get_worker_info()
            self._client = self.source.connect(self._client_name(worker.id if worker is not None else None))
            self._client_pid = os.getpid()
            if worker is not None:  # run when the worker process exits normally (end of epoch, shutdown)
                Finalize(self, self._client.close, exitpriority=10)
        return self._client

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list[int]) -> list[dict[str, torch.Tensor]]:
        features = [self.base[item] for item in items]
        states = self._connection().states_for([f["input_ids"].tolist() for f in features], name=self.split)
        for feature, (aux, last) in zip(features, states, strict=True):
            feature["aux_hidden_states"], feature["last_hidden_states"] = aux, last
        return features

    def close(self) -> None:
        """Close this process's client, then remove the files every client of this dataset left
        (call it in the main process once the DataLoader's workers are gone)."""
        from eagle3.collect.capture_files import remove_orphans

        if self._client is not None and self._client_pid == os.getpid():
            self._client.close()
        self._client = None
        for worker_id in [None, *range(self.num_workers)]:
            remove_orphans(self.source.hidden_states_dir, self.source.tag(self._client_name(worker_id)))
