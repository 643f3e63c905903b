"""A hidden-states KV connector for vLLM's ``extract_hidden_states`` method, on CUDA and CPU.

Loaded INSIDE the vLLM server through ``kv_connector_module_path`` (see
``eagle3.collect.server_commands.server_command``). vLLM's stock ``ExampleHiddenStatesConnector``
copies the captured states with CUDA streams, events and pinned memory, so it fails on a
CPU build. This subclass keeps the stock behaviour on CUDA and, on CPU, copies the states
synchronously and hands the file write to the same writer threads (the client still waits
on the per-file flock, exactly as with the stock connector).

One addition for the collection client: a request whose ``kv_transfer_params`` hold
``{"eagle3_skip_save": true}`` (the regeneration requests) is not saved at all, so answers
can be generated on the same server without writing the prompt's states to disk.
"""

from __future__ import annotations

import fcntl
import os
from functools import partial
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
    ExampleHiddenStatesConnector,
    PendingSave,
    extract_from_kv_cache,
)

from eagle3.collect.server_commands import SKIP_SAVE


class _DoneEvent:
    """Stands in for a CUDA event: a CPU copy is complete when it returns."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


class Eagle3HiddenStatesConnector(ExampleHiddenStatesConnector):
    def _submit_async_write(self, pending: PendingSave) -> None:
        if not self._is_tp_rank_zero:
            return
        assert self._kv_cache is not None
        if self._kv_cache.is_cuda:
            return super()._submit_async_write(pending)
        block_ids = torch.tensor(pending.block_ids, dtype=torch.long)
        offsets = torch.arange(self._block_size, dtype=torch.long)
        slot_mapping = (offsets.reshape(1, -1) + block_ids.reshape(-1, 1) * self._block_size).flatten()
        # clone(): the KV cache blocks are freed (and reused) once this request reports done.
        hidden_states = extract_from_kv_cache(self._kv_cache, slot_mapping, pending.token_ids.shape[0]).clone()
        tensors = {"hidden_states": hidden_states, "token_ids": pending.token_ids.clone()}
        os.makedirs(os.path.dirname(pending.filename), exist_ok=True)
        lock_fd = self._lock_fds.pop(pending.req_id, None)
        if lock_fd is None and self.use_lock:
            lock_fd = os.open(pending.filename + ".lock", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        done = _DoneEvent()
        future = self._executor.submit(self._write_tensors, tensors, done, pending.filename, lock_fd)
        self._req_copy_events[pending.req_id] = done
        self._req_futures[pending.req_id] = future
        future.add_done_callback(partial(self._on_write_done, pending.req_id))

    def build_connector_meta(self, scheduler_output):
        meta = super().build_connector_meta(scheduler_output)
        for new_req in scheduler_output.scheduled_new_reqs:
            if _skips_save(new_req.sampling_params):
                # No lock file for the worker to pre-create: nothing will be written.
                meta.new_req_filenames.pop(new_req.req_id, None)
        return meta

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if (request.kv_transfer_params or {}).get(SKIP_SAVE):
            self._request_filenames.pop(request.request_id, None)
            return False, None  # free the blocks now, report no file
        return super().request_finished(request, block_ids)


def _skips_save(sampling_params) -> bool:
    extra = getattr(sampling_params, "extra_args", None) or {}
    return bool((extra.get("kv_transfer_params") or {}).get(SKIP_SAVE))
