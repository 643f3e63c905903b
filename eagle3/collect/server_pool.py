"""A pool of vLLM servers for the collection client: least-loaded dispatch, failover, rejoin.

Every request takes a slot on a LIVE server (``--concurrent-requests`` slots per server): the
server the conversation used last when it has a free slot (its prefix cache holds the earlier
turns), else the live server with the fewest requests in flight. A request is retried on its
server (``--max-retries``, exponential backoff) on connection errors, timeouts and 5xx. When
the retries are exhausted the server is asked ``/health``:

- it does not answer healthy: the server is marked DOWN; every request in flight on it is
  abandoned at once (``ServerDown``) and the callers send it again elsewhere; a background
  task probes the server (the same start-up check: model, length, a real capture) with growing
  intervals and it rejoins when healthy;
- it answers healthy: the REQUEST is what fails there (e.g. it takes longer than
  ``--request-timeout`` on a busy server): ``RequestFailed``; the caller tries it on the other
  live servers, and stops the run when it failed on every one (a request no server answers
  would otherwise take every server down in turn).

When the last live server goes down, ``NoServerLive`` names every server and its last error.
Callers bound how often one request is sent again (``--max-request-attempts``): a request that
makes every server fail, even servers that restart and rejoin, must not be resent forever.
Callers keep answers independent of the server (per-request seeds, run-wide length limits),
so where a request ran never changes what is stored.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import aiohttp
from tqdm.auto import tqdm

from eagle3.collect.common import CollectError

PROBE_INTERVALS = (1.0, 2.0, 5.0, 10.0, 30.0)  # seconds between probes of a down server (then 30 s)
HEALTH_TIMEOUT = 10.0


class ServerError(CollectError):
    """A vLLM server that cannot be used, or a request no server can answer; the message says what to do."""


class NoServerLive(ServerError):
    """Every server is down: the run stops (what is complete is stored; a rerun resumes)."""


class RequestFailed(ServerError):
    """A request failed all its retries on a server that still answers /health."""

    def __init__(self, message: str, server: Server):
        super().__init__(message)
        self.server = server


class RefusedRequest(ServerError):
    """HTTP 4xx: the server refused this request (retrying will not help); ``status`` says which."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class ServerDown(Exception):
    """The server a request was on went down: send the request again on another server."""


class _Retryable(Exception):
    pass


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, _Retryable):  # already says what came back ("HTTP 500: ...")
        return str(error)
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


@dataclass(eq=False)
class Server:
    url: str
    served_name: str = ""
    max_model_len: int | None = None
    live: bool = False
    in_flight: int = 0
    requests_done: int = 0
    last_error: str = "never checked"
    # Set while the server is down: requests in flight on it stop waiting at once.
    down: asyncio.Event = field(default_factory=asyncio.Event)
    prober: asyncio.Task | None = None


class ServerPool:
    """``check(server, send)`` is the start-up check, run again by the probes before a server rejoins:
    it fills ``served_name``/``max_model_len`` through ``send(method, path, payload)`` and raises
    ``ServerError`` for a misconfigured server (any other exception: unreachable)."""

    def __init__(
        self,
        urls: list[str],
        capacity: int,
        request_timeout: float,
        max_retries: int,
        check: Callable[[Server, Callable[..., Awaitable[dict[str, Any]]]], Awaitable[None]],
        hint: str = "",
        kind: str = "vLLM server",
    ) -> None:
        self.servers = [Server(url.rstrip("/")) for url in urls]
        self.capacity = capacity
        self.request_timeout = request_timeout
        self.max_retries = max_retries
        self.check = check
        self.kind = kind  # how messages name these servers ("generation server" for --generate-url)
        self.hint = hint  # how to start a server: part of the message when none is reachable at start
        self.session: aiohttp.ClientSession | None = None
        self._changed: asyncio.Condition | None = None
        self.events: list[str] = []  # what happened to servers, for the summary and the tests

    # ------------------------------------------------------------------ life cycle
    async def start(self) -> None:
        """Check every server (with retries, so servers may still be starting); a misconfigured one
        stops the run, an unreachable one is probed in the background, none reachable stops it."""
        self.session = aiohttp.ClientSession()
        self._changed = asyncio.Condition()
        results = await asyncio.gather(
            *(self.check(server, self._sender(server, self.max_retries + 1)) for server in self.servers),
            return_exceptions=True,
        )
        for server, result in zip(self.servers, results, strict=True):
            server.down.set()
            if isinstance(result, ServerError):
                raise result
            if isinstance(result, BaseException):
                if not isinstance(result, (TimeoutError, aiohttp.ClientError, _Retryable)):
                    raise result
                server.last_error = _describe(result)
                self._log(f"{self.kind} {server.url} not reachable at start ({server.last_error}); probing it")
                server.prober = asyncio.get_running_loop().create_task(self._probe(server))
            else:
                self._set_live(server)
        if not any(s.live for s in self.servers):
            states = "; ".join(f"{s.url} ({s.last_error})" for s in self.servers)
            raise NoServerLive(
                f"{self.kind}(s) unreachable after {self.max_retries + 1} attempts: {states}. {self.hint}".strip()
            )

    def _sender(self, server: Server, attempts: int) -> Callable[..., Awaitable[dict[str, Any]]]:
        """``send(method, path, payload)`` on this one server, with retries, whatever its state (checks)."""

        async def send(method: str, path: str, payload: dict | None = None) -> dict[str, Any]:
            for attempt in range(attempts):
                try:
                    return await self._send(server, method, path, payload)
                except (TimeoutError, aiohttp.ClientError, _Retryable):
                    if attempt + 1 == attempts:
                        raise
                    await asyncio.sleep(min(0.5 * 2**attempt, 30.0))
            raise AssertionError("unreachable")

        return send

    async def close(self) -> None:
        for server in self.servers:
            if server.prober is not None:
                server.prober.cancel()
        probers = [s.prober for s in self.servers if s.prober is not None]
        if probers:
            await asyncio.gather(*probers, return_exceptions=True)
        if self.session is not None:
            await self.session.close()
            self.session = None

    def _log(self, message: str) -> None:
        self.events.append(message)  # printed even with --quiet: a server going down is news
        tqdm.write(f"run_collect.py: {message}", file=sys.stderr)

    def no_server_live(self) -> NoServerLive:
        states = "; ".join(f"{s.url}: {s.last_error}" for s in self.servers)
        return NoServerLive(
            f"no {self.kind} is live ({states}). Everything completed is stored; start or fix the "
            "servers and rerun the same command to resume."
        )

    # ------------------------------------------------------------------ up / down
    def _set_live(self, server: Server) -> None:
        server.live = True
        server.down = asyncio.Event()
        server.prober = None

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _mark_down(self, server: Server, error: str) -> None:
        if not server.live:
            return
        server.live = False
        server.last_error = error
        server.down.set()
        live = sum(s.live for s in self.servers)
        self._log(
            f"{self.kind} {server.url} is down ({error}); its requests go to the {live} live server(s), "
            "it is probed in the background"
        )
        server.prober = asyncio.get_running_loop().create_task(self._probe(server))
        await self._notify()

    async def _probe(self, server: Server) -> None:
        attempt = 0
        while True:
            await asyncio.sleep(PROBE_INTERVALS[min(attempt, len(PROBE_INTERVALS) - 1)])
            attempt += 1
            try:
                await self.check(server, self._sender(server, 1))
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - any failure keeps it down, with its reason
                server.last_error = str(error) if isinstance(error, ServerError) else _describe(error)
                continue
            self._set_live(server)
            self._log(f"{self.kind} {server.url} is healthy again and rejoins")
            await self._notify()
            return

    async def _healthy(self, server: Server) -> bool:
        try:
            async with self.session.get(
                server.url + "/health", timeout=aiohttp.ClientTimeout(total=min(HEALTH_TIMEOUT, self.request_timeout))
            ) as response:
                return response.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False

    # ------------------------------------------------------------------ dispatch
    async def acquire(self, prefer: Server | None = None, exclude: frozenset[Server] = frozenset()) -> Server:
        """A slot on a live server: ``prefer`` when it is live with a free slot, else the least loaded
        (servers in ``exclude`` only when no other is live)."""
        async with self._changed:
            while True:
                live = [s for s in self.servers if s.live]
                if not live:
                    raise self.no_server_live()
                live = [s for s in live if s not in exclude] or live
                if prefer is not None and prefer.live and prefer.in_flight < self.capacity:
                    server = prefer
                else:
                    server = min(live, key=lambda s: s.in_flight)
                if server.in_flight < self.capacity:
                    server.in_flight += 1
                    return server
                await self._changed.wait()

    async def release(self, server: Server) -> None:
        server.in_flight -= 1
        await self._notify()

    async def request(
        self, server: Server, method: str, path: str, payload: dict | None = None, what: str = "request"
    ) -> dict[str, Any]:
        """JSON answer of ``server``; ``ServerDown`` when it is (or goes) down meanwhile."""
        attempts = self.max_retries + 1
        last_error: BaseException | None = None
        for attempt in range(attempts):
            if not server.live:
                raise ServerDown(server.url)
            try:
                answer = await self._until_down(server, self._send(server, method, path, payload))
                server.requests_done += 1
                return answer
            except (TimeoutError, aiohttp.ClientError, _Retryable) as error:
                last_error = error
                if attempt + 1 < attempts:
                    await self._until_down(server, asyncio.sleep(min(0.5 * 2**attempt, 30.0)))
        reason = _describe(last_error)
        await self.give_up(
            server,
            reason,
            f"{what} failed {attempts} times on {self.kind} {server.url} ({reason}), although the server "
            "answers /health: the request itself fails there (a request that takes longer than "
            "--request-timeout? raise it; see the server's log otherwise).",
        )

    async def give_up(self, server: Server, reason: str, failed_there: str) -> NoReturn:
        """A request failed on ``server`` for good: ``RequestFailed(failed_there)`` when the server
        still answers /health (the request is what fails there), else the server is marked down
        (its requests go elsewhere) and ``ServerDown``."""
        if server.live and await self._healthy(server):
            raise RequestFailed(failed_there, server)
        await self._mark_down(server, reason)
        raise ServerDown(server.url)

    async def _send(self, server: Server, method: str, path: str, payload: dict | None) -> dict[str, Any]:
        url = server.url + path
        async with self.session.request(
            method, url, json=payload, timeout=aiohttp.ClientTimeout(total=self.request_timeout)
        ) as response:
            if response.status >= 500:
                raise _Retryable(f"HTTP {response.status}: {(await response.text())[:300]}")
            if response.status >= 400:  # our request is wrong: retrying will not help
                raise RefusedRequest(f"{url}: HTTP {response.status}: {(await response.text())[:500]}", response.status)
            return await response.json()

    @staticmethod
    async def _until_down(server: Server, awaitable: Awaitable) -> Any:
        """Await ``awaitable`` unless the server goes down first (then ``ServerDown``)."""
        work = asyncio.ensure_future(awaitable)
        down = asyncio.ensure_future(server.down.wait())
        try:
            await asyncio.wait({work, down}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # we are cancelled: so is the work
            work.cancel()
            down.cancel()
            raise
        down.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            raise ServerDown(server.url)
        return work.result()
