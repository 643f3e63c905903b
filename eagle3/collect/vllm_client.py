"""vLLM backend: an aiohttp client against one or more vLLM servers.

Each server runs the target with vLLM's ``extract_hidden_states`` speculative method and our
hidden-states connector (``eagle3.collect.vllm_connector``); ``eagle3.collect.server_commands``
builds the exact command, ``eagle3.collect.capture_files`` reads the files it writes.
Per conversation:

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

With ``--generate-url`` step 1 goes to plain OpenAI-compatible servers of the target
(``eagle3.collect.generation_servers``: their own pool, start-up check and failover) and the
extraction servers only capture. With ``--no-states`` only step 1 runs (ids and masks are stored).
``states_for`` is step 2 alone, for a batch of token ids: online training from servers
(eagle3.train.server_states) uses it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shlex
import sys
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from eagle3.collect.args import CollectArgs
from eagle3.collect.capture_files import (
    LockTimeout,
    LostFile,
    capture_bytes_in_flight,
    client_tag,
    read_hidden_states,
    remove_orphans,
    space_note,
)
from eagle3.collect.common import cut_at_stop, decode_answer, generation_slots, set_answer, to_sample
from eagle3.collect.generation_servers import GenerationCheck
from eagle3.collect.server_commands import SKIP_SAVE, capture_layer_ids, generate_command_for, server_command
from eagle3.collect.server_pool import RequestFailed, Server, ServerDown, ServerError, ServerPool
from eagle3.config import to_vllm_layer_ids
from eagle3.data.sources import Conversation
from eagle3.data.store import Sample
from eagle3.data.template import ChatRenderer

T = TypeVar("T")


def _capture_name(key: int | str) -> str:
    return f"capture of conversation {key}" if isinstance(key, int) else f"capture of {key}"


@dataclass
class _Captured:
    """A conversation whose capture is done: its file is read when its turn in the output comes."""

    key: int
    rendered: Any  # template.Rendered
    path: str | None  # None: --no-states, nothing was captured
    server: Server | None = None  # the server that wrote the file


# The next conversations in output order (the head included) whose capture files are read ahead while
# the caller stores earlier ones: their states wait in memory (at most this many samples), the rest of
# the window waits as file paths.
READ_AHEAD = 4


def client_cpu_threads() -> int:
    """Torch threads for a collection client: a quarter of the CPUs, at least one, unless
    OMP_NUM_THREADS says otherwise. Its tensor work per sample is small (split a file's states,
    encode, check them finite), and torch's spinning pool threads take the CPUs that vLLM servers
    on the same machine need: on 2 cores, 2 client threads used 3x the CPU of 1 per captured token
    and captured ~20% slower (py-spy, bench/bench_collect.py --vllm)."""
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // 4))


@dataclass
class _InFlight:
    captured: concurrent.futures.Future  # of _process: the _Captured (None: nothing to store)
    sample: concurrent.futures.Future | None = None  # of _sample_after, once within READ_AHEAD of the head


class VllmBackend:
    def __init__(
        self,
        args: CollectArgs,
        renderer: ChatRenderer,
        layers: list[int],
        num_layers: int,
        hidden_size: int,
        rank: int = 0,
    ):
        self.args = args
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
        self.tag = client_tag(args.output_dir, rank)
        self.orphans_removed = remove_orphans(args.hidden_states_dir, self.tag)
        if args.server_url and args.hidden_dtype != "none":
            servers = len(args.server_url) + len(args.generate_url)  # both set the window, see samples()
            needed = capture_bytes_in_flight(
                args.concurrent_requests, servers, args.max_length, len(self.capture_ids), hidden_size
            )
            if (note := space_note(args.hidden_states_dir, needed)) is not None:
                tqdm.write(f"run_collect.py: warning: {note}", file=sys.stderr)
        # The extraction servers capture (and regenerate, without --generate-url); None: --no-states
        # on --generate-url servers alone.
        self.pool: ServerPool | None = None
        if args.server_url:
            self.pool = self._new_pool(args.server_url, self._check, self._command_hint())
        self.generators = self.pool
        if args.generate_url:
            plain = shlex.join(generate_command_for(args))
            hint = f"start one with (see also --print-server-command generate):\n  {plain}"
            check = GenerationCheck(args.generate_model or args.model, renderer, args.max_length, hint)
            self.generators = self._new_pool(args.generate_url, check, hint, kind="generation server")
        # The requests run on an event loop of their own thread, so that they keep flowing while the
        # caller stores a sample (encoding; at every --shard-tokens a shard write and its checksum, 1 GiB
        # for 65536 tokens of Qwen3-1.7B): with the loop in the caller's thread no request was sent meanwhile.
        self.loop = asyncio.new_event_loop()
        self._tasks: set[asyncio.Task] = set()  # this client's conversations in flight (cancelled at the end)
        self._thread = threading.Thread(target=self.loop.run_forever, name="eagle3-vllm-client", daemon=True)
        self._thread.start()
        try:
            # generation servers first: their check is cheap, the extraction servers' one captures
            for pool in self._pools():
                self.run(pool.start())
        except BaseException:
            self.close()
            raise

    def run(self, coroutine: Awaitable[T]) -> T:
        """Run ``coroutine`` on the client's event loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def _submit(self, coroutine: Awaitable[T]) -> concurrent.futures.Future[T]:
        """Start ``coroutine`` on the client's loop as a task it can cancel (see ``_cancel_tasks``)."""

        async def tracked() -> T:
            task = asyncio.current_task()
            self._tasks.add(task)
            try:
                return await coroutine
            finally:
                self._tasks.discard(task)

        return asyncio.run_coroutine_threadsafe(tracked(), self.loop)

    async def _cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _new_pool(self, urls: list[str], check, hint: str, kind: str = "vLLM server") -> ServerPool:
        args = self.args
        return ServerPool(
            urls,
            capacity=args.concurrent_requests,
            request_timeout=args.request_timeout,
            max_retries=args.max_retries,
            check=check,
            hint=hint,
            kind=kind,
        )

    def _pools(self) -> list[ServerPool]:
        """Every distinct pool, generation first."""
        pools = [self.generators] if self.generators is not None else []
        return pools + [self.pool] if self.pool is not None and self.pool is not self.generators else pools

    @classmethod
    def from_args(cls, args, renderer, layers, num_layers, hidden_size, rank: int = 0) -> VllmBackend:
        return cls(args, renderer, layers, num_layers, hidden_size, rank=rank)

    def _command_hint(self) -> str:
        from eagle3.target import load_target_config, target_family

        command = server_command(
            self.args.model,
            self.capture_ids,
            self.args.hidden_states_dir,
            port=self.args.port,
            extra_args=self.args.server_args,
            max_model_len=self.args.max_length + 1,
            hybrid=target_family(load_target_config(self.args.model)).hybrid,
        )
        return f"start it with (see also --print-server-command):\n  {shlex.join(command)}"

    # ------------------------------------------------------------------ start-up (and rejoin) check
    async def _check(self, server: Server, send: Callable[..., Awaitable[dict[str, Any]]]) -> None:
        """It serves --model with room for --max-length, and a probe capture has the expected shape."""
        models = (await send("GET", "/v1/models"))["data"]
        match = [m for m in models if self.args.model in (m.get("id"), m.get("root"))]
        if not match:
            served = [m.get("root") or m.get("id") for m in models]
            raise ServerError(
                f"vLLM server {server.url} serves {served}, not --model {self.args.model}; {self._command_hint()}"
            )
        max_model_len = match[0].get("max_model_len")
        needed = self.args.max_length + 1  # a capture of max_length tokens also generates one
        if max_model_len is not None and max_model_len < needed:
            raise ServerError(
                f"vLLM server {server.url} has max_model_len {max_model_len} but --max-length "
                f"{self.args.max_length} needs {needed}; lower --max-length or raise the server's --max-model-len."
            )
        server.served_name, server.max_model_len = match[0]["id"], max_model_len
        ids = self.renderer.prompt_ids([{"role": "user", "content": "Hello."}])
        response = await send("POST", "/v1/completions", self._capture_payload(server, ids, "probe"))
        path = (response.get("kv_transfer_params") or {}).get("hidden_states_path")
        if path is None:
            raise ServerError(
                f"vLLM server {server.url} returned no hidden states: it was not started for collection; "
                f"{self._command_hint()}"
            )
        try:
            states = (await asyncio.to_thread(read_hidden_states, path, self.args.request_timeout))["hidden_states"]
        except (LostFile, LockTimeout) as error:  # like an unanswered request: probed again later
            raise TimeoutError(f"probe capture lost ({error})") from None
        expected = (len(ids), len(self.capture_ids), self.hidden_size)
        if tuple(states.shape) != expected:
            raise ServerError(
                f"vLLM server {server.url} captures states of shape {tuple(states.shape)} for a {len(ids)}-token "
                f"prompt, but --layers {self.layers} need [tokens, {len(self.capture_ids)} (vLLM ids "
                f"{self.capture_ids}), hidden size {self.hidden_size}]; {self._command_hint()}"
            )

    # ------------------------------------------------------------------ requests through the pool
    def _capture_payload(self, server: Server, ids: list[int], request: str) -> dict[str, Any]:
        return {
            "model": server.served_name,
            "prompt": ids,
            "max_tokens": 1,
            "temperature": 0.0,
            "request_id": self.tag + request,  # names the connector's file: see client_tag
        }

    async def _on_a_server(
        self,
        pool: ServerPool,
        payload: Callable[[Server], dict[str, Any]],
        what: str,
        prefer: Server | None = None,
        failed_on: set[Server] | None = None,
    ) -> tuple[Server, dict[str, Any]]:
        """POST /v1/completions on the preferred (or least-loaded) live server; again elsewhere when
        that server goes down or fails this request while healthy, at most --max-request-attempts
        times in all. ``NoServerLive`` when no server is left; the ``RequestFailed`` error once the
        request failed on every live server (``failed_on``: where it failed already, updated)."""
        failed_on = set() if failed_on is None else failed_on
        failures: list[str] = []
        while True:
            server = await pool.acquire(prefer, exclude=frozenset(failed_on))
            try:
                return server, await pool.request(server, "POST", "/v1/completions", payload(server), what)
            except ServerDown:
                failures.append(f"{server.url} went down ({server.last_error})")
                prefer = None
            except RequestFailed as error:
                failures.append(f"{server.url} failed it")
                self._failed_on_every_live_server(pool, error, failed_on)
                prefer = None
            finally:
                await pool.release(server)
            if len(failures) >= self.args.max_request_attempts:
                raise self._gave_up(pool, what, failures)

    @staticmethod
    def _failed_on_every_live_server(pool: ServerPool, error: RequestFailed, failed_on: set[Server]) -> None:
        """Note where a request failed; raise ``error`` once that is every live server (``NoServerLive``
        when none is live any more: the run then stops the way it does for that)."""
        failed_on.add(error.server)
        if not any(s.live for s in pool.servers):
            raise pool.no_server_live()
        if all(s in failed_on for s in pool.servers if s.live):
            raise error
        tqdm.write(f"run_collect.py: {error} Trying another server.", file=sys.stderr)

    def _gave_up(self, pool: ServerPool, what: str, failures: list[str]) -> ServerError:
        """The error for a request sent --max-request-attempts times: ``NoServerLive`` when no server is
        live (that is what stops the run), else one naming the request and each failure."""
        if not any(s.live for s in pool.servers):
            return pool.no_server_live()
        return ServerError(
            f"{what} was sent {len(failures)} times (--max-request-attempts {self.args.max_request_attempts}) and "
            f"failed every time: {'; '.join(failures)}. This request may be what makes the servers fail: see "
            "their logs (or raise --max-request-attempts). Everything completed is stored; rerunning the same "
            "command resumes (and sends this request again)."
        )

    async def _generate(
        self, prompt: list[int], key: int, turn: int, prefer: Server | None
    ) -> tuple[Server, list[int]]:
        # Never longer than what --max-length keeps (the rest would be cut away): this also keeps
        # every answer independent of the serving server's max_model_len.
        max_tokens = min(self.args.max_new_tokens, self.args.max_length - len(prompt))

        plain = self.generators is not self.pool

        def payload(server: Server) -> dict[str, Any]:
            request = {
                "model": server.served_name,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": self.args.temperature,
                "top_p": self.args.top_p,
                "seed": self.args.seed + key * 1000 + turn,  # per request: same answer on any server, any batch
                "stop_token_ids": sorted(self.stop_ids),
                "return_token_ids": True,  # vLLM's; other servers answer text, tokenised again below
            }
            if plain:  # an OpenAI-style server: nothing of our connector's
                return request
            return request | {"kv_transfer_params": {SKIP_SAVE: True}, "request_id": f"{self.tag}{key}-g{turn}"}

        server, response = await self._on_a_server(
            self.generators, payload, f"regeneration of conversation {key}", prefer
        )
        choice = response["choices"][0]
        ids = choice.get("token_ids")
        if ids is None:  # older servers: re-tokenise the text
            ids = self.renderer.tokenizer(choice["text"], add_special_tokens=False)["input_ids"]
            if choice.get("finish_reason") == "stop":
                ids.append(self.renderer.end_of_turn_id)
        return server, cut_at_stop(list(ids), self.stop_ids)

    async def _capture(
        self, key: int | str, ids: list[int], prefer: Server | None, failed_on: set[Server] | None = None
    ) -> tuple[str, Server]:
        """(path of the capture file, the server that writes it)."""
        server, response = await self._on_a_server(
            self.pool, lambda s: self._capture_payload(s, ids, f"{key}-c"), _capture_name(key), prefer, failed_on
        )
        path = (response.get("kv_transfer_params") or {}).get("hidden_states_path")
        if path is None:
            raise ServerError(f"vLLM server {server.url} stopped returning hidden states; {self._command_hint()}")
        return path, server

    async def _process(self, conversation: Conversation) -> _Captured | None:
        messages = list(conversation.messages)
        server: Server | None = None  # later turns prefer the server holding the earlier ones in its cache
        last_ids, final_slot = None, None
        for turn, slot in enumerate(generation_slots(messages, self.args.regenerate)):
            prompt = self.renderer.prompt_ids(messages[:slot])
            if len(prompt) >= self.args.max_length:  # the answer would be truncated away
                break
            server, last_ids = await self._generate(prompt, conversation.key, turn, server)
            messages = set_answer(messages, slot, decode_answer(self.renderer, last_ids, self.stop_ids))
            final_slot = slot
        if final_slot is not None:
            messages = messages[: final_slot + 1]
        rendered = self.renderer.render(messages, last_ids)
        if rendered is None or rendered.num_assistant_tokens == 0:
            return None
        if self.args.hidden_dtype == "none":  # --no-states: ids and masks are the whole sample
            return _Captured(conversation.key, rendered, None)
        if self.generators is not self.pool:  # the capture servers have none of it cached: least loaded
            server = None
        path, server = await self._capture(conversation.key, rendered.input_ids, server)
        return _Captured(conversation.key, rendered, path, server)

    async def _read_states(
        self, key: int | str, ids: list[int], path: str, server: Server
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(aux [T, n_aux * H], last [T, H]) from a capture's file, captured again if its server
        died while writing it, or elsewhere when the file stayed locked past --request-timeout
        (a frozen writer or a stalled filesystem: that request failed on that server)."""
        failed_on: set[Server] = set()
        for _ in range(3):
            try:
                data = await asyncio.to_thread(read_hidden_states, path, self.args.request_timeout)
            except LostFile:
                path, server = await self._capture(key, ids, None)
                continue
            except LockTimeout as error:
                await self._locked_out(server, key, str(error), failed_on)
                path, server = await self._capture(key, ids, None, failed_on)
                continue
            if data["token_ids"].tolist() != ids:
                raise ServerError(f"a vLLM server returned states for other tokens than sent ({path}).")
            states = data["hidden_states"]
            return states[:, self.aux_index].reshape(len(ids), -1), states[:, self.last_index].contiguous()
        raise ServerError(f"the capture of {key} was lost 3 times ({path}).")

    async def _locked_out(self, server: Server, key: int | str, reason: str, failed_on: set[Server]) -> None:
        """A capture whose file stayed locked counts as a request that failed on its server: that
        server is marked down unless it answers /health; ``RequestFailed`` once every live server failed it."""
        try:
            await self.pool.give_up(
                server,
                f"capture file locked: {reason}",
                f"{_capture_name(key)}: the file vLLM server {server.url} wrote stayed locked by its writer past "
                f"--request-timeout {self.args.request_timeout:g} s ({reason}), although the server answers "
                "/health: a stalled filesystem at --hidden-states-dir, or a stuck writer thread in the server? "
                "See the server's log.",
            )
        except ServerDown:
            pass  # its requests go to the other servers
        except RequestFailed as error:
            self._failed_on_every_live_server(self.pool, error, failed_on)

    async def _to_sample(self, captured: _Captured) -> Sample:
        if captured.path is None:
            return to_sample(captured.key, captured.rendered, None, None)
        aux, last = await self._read_states(captured.key, captured.rendered.input_ids, captured.path, captured.server)
        return to_sample(captured.key, captured.rendered, aux, last)

    def states_for(self, batch: list[list[int]], name: str = "batch") -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Capture only: (aux, last) states of each token sequence, all in flight at once over the
        pool (failover included). Each file is read and deleted as soon as it is written."""

        async def one(position: int, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            key = f"{name}-{position}"
            return await self._read_states(key, ids, *await self._capture(key, ids, None))

        async def every() -> list[tuple[torch.Tensor, torch.Tensor]]:
            return list(await asyncio.gather(*(one(i, ids) for i, ids in enumerate(batch))))

        return self.run(every())

    # ------------------------------------------------------------------ the backend interface
    def samples(self, conversations: list[Conversation]) -> Iterator[Sample | None]:
        """Samples in input order, with up to 2 x (slots of all servers) conversations in flight.

        Finished conversations wait for their turn as a file path, not in memory, except the next
        ``READ_AHEAD`` in order, whose files are read (and split) while the caller stores the ones
        before them. When no server is left (or a request fails for good), the finished ones are
        still yielded (in order) before the error (``NoServerLive``, or the one naming the request)."""
        window = 2 * self.args.concurrent_requests * sum(len(pool.servers) for pool in self._pools())
        pending: deque[_InFlight] = deque()
        remaining = iter(conversations)
        try:
            while True:
                while len(pending) < window and (conversation := next(remaining, None)) is not None:
                    pending.append(_InFlight(self._submit(self._process(conversation))))
                if not pending:
                    return
                for item in list(pending)[:READ_AHEAD]:
                    if item.sample is None:
                        item.sample = self._submit(self._sample_after(item.captured))
                try:
                    yield pending.popleft().sample.result()
                except ServerError:  # no server left, or a request no server answers: the run stops
                    yield from self._finished(pending)  # after storing what is finished
                    raise
        finally:
            if pending:
                self.run(self._cancel_tasks())

    async def _sample_after(self, captured: concurrent.futures.Future[_Captured | None]) -> Sample | None:
        done = await asyncio.wrap_future(captured)
        return None if done is None else await self._to_sample(done)

    def _finished(self, pending: deque[_InFlight]) -> Iterator[Sample | None]:
        for item in pending:
            future = item.captured
            if not future.done() or future.cancelled() or future.exception() is not None:
                continue
            try:
                yield (item.sample or self._submit(self._sample_after(future))).result()
            except ServerError:
                continue  # e.g. its file was lost with the last server: the rerun collects it

    def summary_lines(self) -> list[str]:
        lines = []
        for pool in self._pools():
            servers = ", ".join(
                f"{s.url} {s.requests_done} requests{'' if s.live else ' (down: ' + s.last_error + ')'}"
                for s in pool.servers
            )
            lines.append(f"{'generation servers' if pool is not self.pool else 'vLLM servers'}: {servers}")
        if self.orphans_removed:
            lines.append(
                f"removed {self.orphans_removed} files this client's earlier run left in {self.args.hidden_states_dir}"
            )
        return lines

    def close(self) -> None:
        if hasattr(self, "loop") and not self.loop.is_closed():
            for pool in self._pools():
                self.run(pool.close())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self.loop.close()
        # Files of requests abandoned in flight (a server went down, Ctrl-C): ours alone, by tag.
        remove_orphans(self.args.hidden_states_dir, self.tag)
