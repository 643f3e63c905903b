"""A real HTTP proxy in front of a real vLLM server that injects one fault for a while.

It forwards every request unchanged, until ``after`` POST /v1/completions have passed; then, for
``duration`` seconds, it answers every request (``/health`` and ``/v1/models`` too, as a
server in trouble does) with HTTP 500 (``fault="500"``) or holds it without answering
(``fault="hang"``); afterwards it forwards again. ``fault=None``: only forwards (``failing``
can be switched by the test). It runs an aiohttp server on its own event loop in a thread.
"""

from __future__ import annotations

import asyncio
import threading
import time

import aiohttp
from aiohttp import web

from eagle3.testing import free_port


class FaultProxy:
    def __init__(self, target: str, fault: str | None = None, after: int = 0, duration: float = 0.0):
        self.target = target.rstrip("/")
        self.fault, self.after, self.duration = fault, after, duration
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.completions = 0  # POST /v1/completions forwarded
        self.faulted = 0  # requests answered with the fault
        self.failing = False  # switched by the test when fault is None: answer 500
        self._fault_until: float | None = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        self._ready.wait(30)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)  # a daemon thread: held (hanging) requests need not finish

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        async with aiohttp.ClientSession() as self._session:
            self._ready.set()
            await self._stop.wait()
        await runner.cleanup()

    def _in_fault(self) -> bool:
        if self.failing:
            return True
        if self.fault is None or self.completions < self.after:
            return False
        if self._fault_until is None:
            self._fault_until = time.monotonic() + self.duration
        return time.monotonic() < self._fault_until

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self._in_fault():
            self.faulted += 1
            if self.fault == "hang":
                await asyncio.sleep(max(self._fault_until - time.monotonic(), 0) + 1)
            return web.Response(status=500, text="injected fault")
        body = await request.read()
        if request.method == "POST" and request.path == "/v1/completions":
            self.completions += 1
        async with self._session.request(
            request.method, self.target + request.path_qs, data=body, headers={"Content-Type": "application/json"}
        ) as upstream:
            return web.Response(status=upstream.status, body=await upstream.read(), content_type=upstream.content_type)
