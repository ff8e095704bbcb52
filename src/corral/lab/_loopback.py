"""What the lab's servers share: listening on loopback, and stopping at once.

:class:`~corral.lab.server.TargetServer` and
:class:`~corral.lab.llm_server.LLMServer` model different APIs, but live the
same life: checked arguments, one start, a base URL, and a stop that does not
wait out the requests they are holding (a 30 s stall, a long generation).
Every such wait goes through :meth:`LoopbackServer._sleep`, whose futures
:meth:`LoopbackServer.stop` resolves before it closes the socket.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, TypeVar

from aiohttp import web

from ._options import LOOPBACK_RULE, loopback_host, show_number

#: How long stop() lets aiohttp wait for handlers; they are woken at once, so
#: this is only a backstop.
_SHUTDOWN_TIMEOUT = 5.0

_Server = TypeVar("_Server", bound="LoopbackServer")


def check_host(host: object) -> str:
    """The address to bind: loopback only, ``localhost`` meaning 127.0.0.1."""
    address = loopback_host(host) if isinstance(host, str) else None
    if address is None:
        raise ValueError(f"host must be {LOOPBACK_RULE}; got host={host!r}")
    return address


def check_number(name: str, value: object, meaning: str, *, maximum: float | None = None) -> float:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and value >= 0
        and (maximum is None or value <= maximum)
    )
    if not ok:
        bound = f"between 0 and {show_number(maximum)}" if maximum is not None else ">= 0"
        raise ValueError(f"{name} must be a number {bound} ({meaning}); got {name}={value!r}")
    return float(value)  # type: ignore[arg-type]


def check_port(port: object) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(
            f"port must be an int from 0 to 65535 (0 picks a free port); got port={port!r}"
        )
    return port


def check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int; got seed={seed!r}")
    return seed


class Phase(enum.Enum):
    NEW = "new"  # constructed, not listening
    RUNNING = "running"  # listening, answering
    STOPPING = "stopping"  # sleepers woken, waiting for handlers to answer
    STOPPED = "stopped"  # socket closed; stats still readable


class LoopbackServer(abc.ABC):
    """An aiohttp server on a loopback address that :meth:`stop` ends at once."""

    def __init__(self, *, host: str, port: int) -> None:
        self._host = check_host(host)
        self._port = check_port(port)
        self._phase = Phase.NEW
        self._url: str | None = None
        self._runner: web.ServerRunner | None = None
        # Futures of the sleeps in progress, resolved early when stopping so
        # that a 30 s stall does not hold up stop().
        self._sleeps: set[asyncio.Future[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped_at: float | None = None  # freezes elapsed times once stopped

    @abc.abstractmethod
    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Answer one request."""

    # Hooks for what a server does around its lifecycle; by default, nothing.

    def _starting(self) -> None:  # noqa: B027
        """Called on the loop, just before the server listens."""

    def _listening(self) -> None:  # noqa: B027
        """Called once the server listens."""

    async def _stopping(self) -> None:  # noqa: B027
        """Called when stop() begins, before the sleeps are woken."""

    async def start(self) -> str:
        """Listen and return the base URL, like ``http://127.0.0.1:54321``."""
        if self._phase is not Phase.NEW:
            name = type(self).__name__
            raise RuntimeError(f"a {name} starts once; this one is {self._phase.value}")
        self._loop = asyncio.get_running_loop()
        self._starting()
        runner = web.ServerRunner(
            web.Server(self._handle, access_log=None), shutdown_timeout=_SHUTDOWN_TIMEOUT
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        host, port = runner.addresses[0][:2]
        self._url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        self._phase = Phase.RUNNING
        self._listening()
        return self._url

    async def stop(self) -> None:
        """Answer every pending request at once, then close the socket. Idempotent."""
        if self._phase is not Phase.RUNNING:
            if self._phase is Phase.NEW:
                self._phase = Phase.STOPPED
            return
        self._phase = Phase.STOPPING
        assert self._loop is not None
        self._stopped_at = self._loop.time()
        await self._stopping()
        for sleep in self._sleeps:
            if not sleep.done():
                sleep.set_result(None)
        assert self._runner is not None
        try:
            await self._runner.cleanup()
        finally:
            self._phase = Phase.STOPPED

    async def __aenter__(self: _Server) -> _Server:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        """The base URL, like ``http://127.0.0.1:54321`` (no trailing slash)."""
        if self._url is None:
            raise RuntimeError("the server has no URL before start(); await server.start() first")
        return self._url

    def _stopping_now(self) -> bool:
        # A method, not an inline test: the phase changes across awaits.
        return self._phase is not Phase.RUNNING

    async def _sleep(self, seconds: float) -> None:
        """asyncio.sleep that stop() can end early."""
        assert self._loop is not None
        if self._stopping_now():
            return  # stop() has begun: nothing waits any more
        done = self._loop.create_future()
        timer = self._loop.call_later(seconds, _resolve, done)
        self._sleeps.add(done)
        try:
            await done
        finally:
            timer.cancel()
            self._sleeps.discard(done)


def _resolve(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def json_response(status: int, payload: dict[str, Any]) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(payload).encode(), content_type="application/json"
    )


@asynccontextmanager
async def serving(server: LoopbackServer) -> AsyncIterator[str]:
    """The server listening for the body of an ``async with``; yields its base URL."""
    url = await server.start()
    try:
        yield url
    finally:
        await server.stop()
