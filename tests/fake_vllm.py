"""A tiny stand-in for a collection vLLM server that misbehaves on demand (no vLLM, starts in ms).

It speaks the part of vLLM's API the collection client uses: ``GET /health``, ``GET /v1/models``
and ``POST /v1/completions``. A regeneration request (``eagle3_skip_save``) gets ``answer_ids``;
a capture writes a safetensors file the way our connector does (``hidden_states`` [T, n_ids, H]
and ``token_ids``, plus an empty ``.lock`` file) into ``hidden_dir`` and returns its path in
``kv_transfer_params``. The states are a function of the token ids, so runs are comparable.

Faults, switched by the test:

* ``hook(server, payload)``: an async callable run before a completion is answered; it may sleep,
  call ``server.crash(seconds)`` or return a ``web.Response`` to send instead;
* ``crash(seconds)``: for that long every request, ``/health`` included, answers HTTP 500 (a
  server that died and is restarted);
* ``frozen_locks``: each capture's lock file is locked exclusively by another process that never
  lets go (a frozen writer, or a stalled network filesystem).
* ``write_delay``: the capture file is written at once but the answer waits this long;
* ``edit_states(request_id, states)``: changes a capture's float32 states in place before they
  are written (bf16, as vLLM serves): e.g. values fp16 cannot hold, or a NaN.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch
from aiohttp import web
from safetensors.torch import save_file

from eagle3.testing import free_port

_HOLD_LOCK = (
    "import fcntl, sys, time\n"
    "handle = open(sys.argv[1], 'a')\n"
    "fcntl.flock(handle, fcntl.LOCK_EX)\n"
    "print('locked', flush=True)\n"
    "time.sleep(3600)\n"
)


def fake_states(token_ids: list[int], num_ids: int, hidden_size: int) -> torch.Tensor:
    ids = torch.tensor(token_ids, dtype=torch.float32)
    layer = torch.arange(1, num_ids + 1, dtype=torch.float32)
    channel = torch.linspace(-1, 1, hidden_size)
    return ((ids % 13)[:, None, None] * 0.1 + layer[None, :, None]) * channel[None, None, :]


class FakeVllm:
    def __init__(
        self,
        model: str,
        hidden_dir: str | Path,
        num_ids: int,
        hidden_size: int,
        max_model_len: int = 2048,
        answer_ids: list[int] | None = None,
        hook: Callable[[FakeVllm, dict], Awaitable[web.Response | None]] | None = None,
        write_delay: float = 0.0,
    ) -> None:
        self.model, self.hidden_dir = model, Path(hidden_dir)
        self.num_ids, self.hidden_size, self.max_model_len = num_ids, hidden_size, max_model_len
        self.answer_ids = answer_ids or [5, 6, 7]
        self.hook = hook
        self.write_delay = write_delay
        self.frozen_locks = False
        self.edit_states: Callable[[str, torch.Tensor], None] | None = None
        self.captures = 0  # capture files written
        self.completions = 0  # POST /v1/completions received
        self._down_until = 0.0
        self._holders: list[subprocess.Popen] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> FakeVllm:
        self._thread.start()
        assert self._ready.wait(30), "fake vLLM server did not start"
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)
        for holder in self._holders:
            holder.kill()
            holder.wait()

    def crash(self, seconds: float) -> None:
        self._down_until = time.monotonic() + seconds

    # ------------------------------------------------------------------ serving
    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def _down(self) -> bool:
        return time.monotonic() < self._down_until

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=500 if self._down() else 200)

    async def _models(self, request: web.Request) -> web.Response:
        if self._down():
            return web.Response(status=500, text="restarting")
        model = {"id": self.model, "root": self.model, "max_model_len": self.max_model_len}
        return web.json_response({"data": [model]})

    async def _completions(self, request: web.Request) -> web.Response:
        payload = await request.json()
        self.completions += 1
        if self.hook is not None:
            response = await self.hook(self, payload)
            if response is not None:
                return response
        if self._down():
            return web.Response(status=500, text="restarting")
        if (payload.get("kv_transfer_params") or {}).get("eagle3_skip_save"):
            choice = {"text": "", "token_ids": self.answer_ids, "finish_reason": "length"}
            return web.json_response({"choices": [choice]})
        path = await asyncio.to_thread(self._write_capture, payload)
        await asyncio.sleep(self.write_delay)
        choice = {"text": "", "token_ids": [self.answer_ids[0]], "finish_reason": "length"}
        return web.json_response({"choices": [choice], "kv_transfer_params": {"hidden_states_path": path}})

    def _write_capture(self, payload: dict[str, Any]) -> str:
        ids = list(payload["prompt"])
        path = self.hidden_dir / f"cmpl-{payload['request_id']}-{uuid.uuid4().hex[:8]}.safetensors"
        lock = str(path) + ".lock"
        Path(lock).write_bytes(b"")
        if self.frozen_locks:  # another process takes the lock and never lets go
            holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, lock], stdout=subprocess.PIPE, text=True)
            self._holders.append(holder)
            assert holder.stdout.readline().strip() == "locked"
        states = fake_states(ids, self.num_ids, self.hidden_size)
        if self.edit_states is not None:
            self.edit_states(payload["request_id"], states)
        tensors = {
            "hidden_states": states.to(torch.bfloat16),
            "token_ids": torch.tensor(ids, dtype=torch.long),
        }
        save_file(tensors, str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)
        self.captures += 1
        return str(path)
