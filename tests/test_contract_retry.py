"""The retry contract of DESIGN.md ("Details every capability keeps to", Retries),
checked sentence by sentence from the outside: through ``corral.gather``/``map``
on the virtual clock, and over real aiohttp and httpx on loopback.

The HTTP cases run in two ways. Which failures are retried is a count of the
calls corral made against a loopback server (no wait involved: ``backoff=0``),
on every loop kind. How long a server-directed wait lasts is measured on the virtual
clock: the exceptions aiohttp and httpx really raised against the server are
collected on a real loop first, then raised again by a function corral calls on
a virtual one, so the schedule is asserted exactly with no real sleeping.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import math
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from fractions import Fraction
from typing import Any

import aiohttp
import httpx
import multidict
import pytest
from aiohttp import web

import corral
from _loops import run
from corral._retry import Retry, RetryAfter, retry_after_seconds, transient

# --- what the tests share ---------------------------------------------------------------


class Calls:
    """An async fn that fails with ``errors[i]`` on its i-th call, and records when it ran."""

    def __init__(self, *errors: BaseException, value: Any = "ok") -> None:
        self.errors = list(errors)
        self.value = value
        self.times: list[float] = []

    @property
    def count(self) -> int:
        return len(self.times)

    async def __call__(self, item: Any) -> Any:
        self.times.append(asyncio.get_running_loop().time())
        if self.count <= len(self.errors):
            raise self.errors[self.count - 1]
        return self.value


def always(error: BaseException, times: int = 10_000) -> list[BaseException]:
    """The same failure, for every call a test can make."""
    return [error] * times


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


@asynccontextmanager
async def serve(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """An aiohttp.web server on 127.0.0.1 (port 0) answering every path with ``handler``."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def raw_server(
    answer: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[tuple[str, list[int]]]:
    """A TCP server on loopback that reads a request's head, then lets ``answer`` misbehave.

    Yields the base URL and a list with one entry per request received.
    """
    seen: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            seen.append(1)
            await answer(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}", seen
    finally:
        server.close()
        await server.wait_closed()


@contextmanager
def refusing_port() -> Iterator[str]:
    """A loopback port that is bound but not listening: every connect is refused at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


Getter = Callable[[str], Awaitable[Any]]


@asynccontextmanager
async def client(kind: str, *, read_timeout: float | None = None) -> AsyncIterator[Getter]:
    """A GET through aiohttp or httpx that raises the client's own error for a bad status."""
    if kind == "aiohttp":
        timeout = aiohttp.ClientTimeout(sock_read=read_timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:

            async def get_aiohttp(url: str) -> Any:
                async with session.get(url) as response:
                    response.raise_for_status()
                    return await response.read()

            yield get_aiohttp
    else:
        async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=read_timeout)) as http:

            async def get_httpx(url: str) -> Any:
                response = await http.get(url)
                response.raise_for_status()
                return response.content

            yield get_httpx


CLIENTS = ["aiohttp", "httpx"]


def counting(attempts: int) -> Retry:
    """``attempts`` calls with no wait and no budget: for tests that count calls, which
    must neither take time nor depend on how many retries a budget allows."""
    return Retry(attempts=attempts, backoff=0.0, max_backoff=0.0, budget=None)


async def failure_of(get: Getter, url: str) -> Exception:
    """What one call of ``get`` raised (it must raise)."""
    try:
        await get(url)
    except Exception as exc:
        return exc
    raise AssertionError(f"GET {url} succeeded")


# --- retries=N is N + 1 calls; Retry(attempts=N) is N calls in all ---------------------


@pytest.mark.virtual_time
@pytest.mark.parametrize("retries", [0, 1, 2, 5, 9])
async def test_retries_n_makes_n_plus_one_calls_then_raises_the_last_failure(
    retries: int,
) -> None:
    failures = [ConnectionResetError(f"call {i}") for i in range(1, 20)]
    fn = Calls(*failures)
    async with corral.map(fn, ["x"], retries=retries, return_exceptions=True) as results:
        (outcome,) = [r async for r in results]
    assert fn.count == retries + 1
    assert outcome is failures[retries]  # the last call's own failure, not the first
    assert results.stats.retried == retries
    assert (results.stats.started, results.stats.failed) == (1, 1)


@pytest.mark.virtual_time
@pytest.mark.parametrize("attempts", [1, 2, 3, 7])
async def test_retry_attempts_n_makes_n_calls_in_all(attempts: int) -> None:
    failures = [TimeoutError(f"call {i}") for i in range(1, 20)]
    fn = Calls(*failures)
    retry = Retry(attempts=attempts, backoff=0.01, budget=None)
    with pytest.raises(TimeoutError) as raised:
        await corral.gather(fn, ["x"], retries=retry)
    assert fn.count == attempts
    assert raised.value is failures[attempts - 1]


@pytest.mark.virtual_time
@pytest.mark.parametrize("retries", [1, 4])
async def test_the_last_allowed_call_may_succeed(retries: int) -> None:
    """retries=N: N failures then a success is a success, on call N + 1."""
    fn = Calls(*[OSError("blip")] * retries, value=42)
    assert await corral.gather(fn, ["x"], retries=retries) == [42]
    assert fn.count == retries + 1
    as_policy = Calls(*[OSError("blip")] * retries, value=42)
    assert await corral.gather(as_policy, ["x"], retries=Retry(attempts=retries + 1)) == [42]
    assert as_policy.count == retries + 1


# --- the wait before retry k, and none after the last attempt ---------------------------


@pytest.mark.virtual_time
async def test_unjittered_waits_are_exactly_the_capped_doubling_and_none_follows_the_last() -> None:
    """backoff 0.5 capped at 3: waits 0.5, 1, 2, 3, 3; the failure surfaces at the 6th call."""
    loop = asyncio.get_running_loop()
    fn = Calls(*always(ConnectionError("down")))
    retry = Retry(attempts=6, backoff=0.5, max_backoff=3.0, jitter=False, budget=None)
    began = loop.time()
    with pytest.raises(ConnectionError):
        await corral.gather(fn, ["x"], retries=retry)
    assert gaps(fn.times) == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert loop.time() - began == fn.times[-1] - began == 9.5  # nothing after the last call


@pytest.mark.virtual_time
async def test_jittered_waits_are_drawn_from_zero_to_the_bound() -> None:
    """Full jitter: every wait lies in [0, min(max_backoff, backoff * 2**(k-1))], and they vary."""
    retry = Retry(attempts=5, backoff=1.0, max_backoff=3.0, budget=None)
    fns = [Calls(*always(OSError("down"))) for _ in range(30)]

    async def call(i: int) -> Any:
        return await fns[i](i)

    outcomes = await corral.gather(call, range(30), retries=retry, return_exceptions=True)
    assert all(isinstance(o, OSError) for o in outcomes)
    bounds = [1.0, 2.0, 3.0, 3.0]
    waits = [gaps(fn.times) for fn in fns]
    for item_waits in waits:
        assert len(item_waits) == 4
        assert all(0.0 <= w <= b for w, b in zip(item_waits, bounds, strict=True))
    # Uniform on [0, b]: some waits fall in the lower half of their bound, and
    # the items do not all retry at the same moments.
    flat = [(w, b) for item_waits in waits for w, b in zip(item_waits, bounds, strict=True)]
    assert any(w < b / 2 for w, b in flat)
    assert any(w > b / 2 for w, b in flat)
    assert len({tuple(item_waits) for item_waits in waits}) > 1


@pytest.mark.virtual_time
@pytest.mark.parametrize("jitter", [False, True])
async def test_thousands_of_retries_never_overflow(jitter: bool) -> None:
    """Past retry 1024, 2**(k-1) is no float: the engine must keep waiting max_backoff."""
    loop = asyncio.get_running_loop()
    fn = Calls(*always(ConnectionResetError("reset"), 1_500))
    retry = Retry(attempts=1_200, backoff=1e-3, max_backoff=1e-3, jitter=jitter, budget=None)
    began = loop.time()
    with pytest.raises(ConnectionResetError):
        await corral.gather(fn, ["x"], retries=retry)
    assert fn.count == 1_200
    assert all(0.0 <= gap <= 1e-3 * (1 + 1e-9) for gap in gaps(fn.times))
    if not jitter:
        assert loop.time() - began == pytest.approx(1_199e-3)


@pytest.mark.virtual_time
async def test_a_tiny_backoff_doubles_exactly_past_the_float_exponent_range() -> None:
    """backoff 2**-1074 (the smallest float) needs ~1100 doublings to reach 1 ms: each wait
    is exact, where 2.0 ** (k - 1) alone would overflow at k = 1026."""
    fn = Calls(*always(OSError("down"), 1_200))
    backoff = math.ldexp(1.0, -1074)
    retry = Retry(attempts=1_100, backoff=backoff, max_backoff=1e-3, jitter=False, budget=None)
    with pytest.raises(OSError):
        await corral.gather(fn, ["x"], retries=retry)
    expected = [min(1e-3, float(Fraction(backoff) * 2 ** (k - 1))) for k in range(1, fn.count)]
    # The virtual clock adds each wait to a growing float: compare each gap to its wait.
    assert gaps(fn.times) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert gaps(fn.times)[-1] == pytest.approx(1e-3)


@pytest.mark.parametrize("k", [1, 2, 1_023, 1_024, 1_025, 1_100, 10**6, 10**100])
@pytest.mark.parametrize(
    ("backoff", "max_backoff"),
    [(1.0, 30.0), (1e308, 1.7976931348623157e308), (5e-324, 5e-324), (0.0, 0.0), (2.0, 2.0)],
)
def test_the_bound_before_retry_k_is_exact_for_any_k(
    k: int, backoff: float, max_backoff: float
) -> None:
    policy = Retry(attempts=k + 1, backoff=backoff, max_backoff=max_backoff, jitter=False)
    exact = Fraction(backoff) * 2 ** min(k - 1, 5_000)
    expected = max_backoff if exact >= Fraction(max_backoff) else float(exact)
    assert policy.next_wait(OSError(), k, random.Random(0)) == expected
    jittered = Retry(attempts=k + 1, backoff=backoff, max_backoff=max_backoff)
    for seed in range(20):
        wait = jittered.next_wait(OSError(), k, random.Random(seed))
        assert wait is not None
        assert 0.0 <= wait <= expected


# --- on=: a type, a tuple of types, a predicate --------------------------------------------


class Stale(Exception):
    """A domain failure the default does not retry."""


class VeryStale(Stale):
    pass


@pytest.mark.virtual_time
async def test_on_a_type_retries_it_and_its_subclasses_and_nothing_else() -> None:
    retry = Retry(attempts=3, on=Stale, backoff=0.0, budget=None)
    sub = Calls(*always(VeryStale()))
    with pytest.raises(VeryStale):
        await corral.gather(sub, ["x"], retries=retry)
    assert sub.count == 3
    # A custom on replaces the default: a network error is not retried now.
    network = Calls(*always(ConnectionResetError()))
    with pytest.raises(ConnectionResetError):
        await corral.gather(network, ["x"], retries=retry)
    assert network.count == 1


@pytest.mark.virtual_time
async def test_on_a_tuple_retries_any_of_its_types() -> None:
    retry = Retry(attempts=4, on=(KeyError, Stale), backoff=0.0, budget=None)
    fn = Calls(KeyError("a"), VeryStale(), KeyError("b"), value=1)
    assert await corral.gather(fn, ["x"], retries=retry) == [1]
    assert fn.count == 4
    other = Calls(KeyError("a"), ValueError("bug"))
    with pytest.raises(ValueError, match="bug"):
        await corral.gather(other, ["x"], retries=retry)
    assert other.count == 2


@pytest.mark.virtual_time
async def test_on_a_predicate_sees_each_failure_itself() -> None:
    seen: list[BaseException] = []

    def retry_stale(exc: BaseException) -> bool:
        seen.append(exc)
        return isinstance(exc, Stale)

    first, second = Stale("first"), ValueError("second")
    fn = Calls(first, second)
    with pytest.raises(ValueError, match="second"):
        await corral.gather(fn, ["x"], retries=Retry(on=retry_stale, backoff=0.0, budget=None))
    assert seen == [first, second]
    assert seen[0] is first
    assert seen[1] is second
    assert fn.count == 2


@pytest.mark.virtual_time
async def test_a_predicate_that_raises_fails_its_item_with_its_own_error_and_no_retry() -> None:
    """A bug in on= surfaces, chained to the failure it judged; the item is not called again,
    and with return_exceptions the other items are untouched."""

    def broken(exc: BaseException) -> bool:
        raise LookupError("bug in the predicate")

    original = ConnectionResetError("reset")
    fn = Calls(original)
    retry = Retry(attempts=5, on=broken, backoff=0.0, budget=None)
    with pytest.raises(LookupError, match="bug in the predicate") as raised:
        await corral.gather(fn, ["x"], retries=retry)
    assert fn.count == 1
    assert raised.value.__context__ is original

    async def some_fail(item: int) -> int:
        if item == 1:
            raise ConnectionResetError("reset")
        return item

    outcomes: list[Any] = await corral.gather(
        some_fail, range(3), retries=retry, return_exceptions=True
    )
    assert outcomes[0] == 0
    assert outcomes[2] == 2
    assert isinstance(outcomes[1], LookupError)


@pytest.mark.virtual_time
@pytest.mark.parametrize(
    "error",
    [TypeError("bug"), ValueError("bad"), KeyError("k"), AttributeError("a"), RuntimeError("r")],
    ids=repr,
)
async def test_programming_errors_fail_at_once(error: Exception) -> None:
    loop = asyncio.get_running_loop()
    fn = Calls(*always(error))
    with pytest.raises(type(error)):
        await corral.gather(fn, ["x"], retries=5)
    assert fn.count == 1
    assert loop.time() == 0.0


# --- which failures the default retries: real clients over loopback -------------------------

# 529 is Anthropic's "overloaded", retried as its SDK does (README, "Overloaded").
RETRIED_STATUSES = [408, 429, 500, 502, 503, 504, 529]
FINAL_STATUSES = [400, 401, 403, 404, 405, 409, 410, 422, 501, 505]


@pytest.mark.parametrize("kind", CLIENTS)
async def test_the_transient_http_statuses_are_retried_and_no_others(kind: str) -> None:
    """A 408/429/500/502/503/504 (or 529) answer costs two calls under Retry(attempts=2);
    any other error status one. The statuses are read from aiohttp's .status and httpx's
    .response.status_code, as raise_for_status() leaves them."""
    hits: dict[int, int] = {}

    async def handler(request: web.Request) -> web.Response:
        status = int(request.match_info["tail"])
        hits[status] = hits.get(status, 0) + 1
        return web.Response(status=status, text="no")

    retry = counting(2)
    async with serve(handler) as base, client(kind) as get:
        urls = [f"{base}/{s}" for s in RETRIED_STATUSES + FINAL_STATUSES]
        outcomes = await corral.gather(get, urls, retries=retry, return_exceptions=True)
    for status, outcome in zip(RETRIED_STATUSES + FINAL_STATUSES, outcomes, strict=True):
        error = aiohttp.ClientResponseError if kind == "aiohttp" else httpx.HTTPStatusError
        assert isinstance(outcome, error), (status, outcome)
    assert {s: hits[s] for s in RETRIED_STATUSES} == dict.fromkeys(RETRIED_STATUSES, 2)
    assert {s: hits[s] for s in FINAL_STATUSES} == dict.fromkeys(FINAL_STATUSES, 1)


async def _close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read the request, answer nothing, hang up: the server "disconnected"."""


async def _cut_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Promise 1000 bytes, send 10, hang up: a payload cut short."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
    await writer.drain()


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize(
    ("answer", "families"),
    [
        (_close_at_once, (aiohttp.ClientConnectionError, httpx.TransportError)),
        (_cut_body, (aiohttp.ClientPayloadError, httpx.TransportError)),
    ],
    ids=["disconnected", "body-cut-short"],
)
async def test_transport_failures_are_retried(
    kind: str,
    answer: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    families: tuple[type[BaseException], type[BaseException]],
) -> None:
    """A server that hangs up, or cuts a body short: the clients' transport errors
    (aiohttp's ClientConnectionError/ClientPayloadError, httpx's TransportError)."""
    retry = counting(3)
    calls = 0
    async with raw_server(answer) as (base, seen), client(kind) as get:

        async def counted(url: str) -> Any:
            nonlocal calls
            calls += 1
            return await get(url)

        raised = await failure_of(get, f"{base}/probe")
        seen.clear()
        (outcome,) = await corral.gather(
            counted, [f"{base}/x"], retries=retry, return_exceptions=True
        )
    family = families[0] if kind == "aiohttp" else families[1]
    assert isinstance(raised, family), raised
    assert type(outcome) is type(raised)
    assert calls == 3
    # aiohttp may try a request twice on its own when the server hangs up: at
    # least one request per call reached the server.
    assert len(seen) >= 3


@pytest.mark.parametrize("kind", CLIENTS)
async def test_a_refused_connection_is_retried(kind: str) -> None:
    retry = counting(3)
    with refusing_port() as base:
        async with client(kind) as get:
            calls = 0

            async def counted(url: str) -> Any:
                nonlocal calls
                calls += 1
                return await get(url)

            (outcome,) = await corral.gather(
                counted, [f"{base}/x"], retries=retry, return_exceptions=True
            )
    assert isinstance(outcome, aiohttp.ClientConnectorError | httpx.ConnectError), outcome
    assert calls == 3


@pytest.mark.parametrize("kind", CLIENTS)
async def test_a_read_timeout_is_retried(kind: str) -> None:
    """A server that never answers: aiohttp's ServerTimeoutError, httpx's ReadTimeout."""
    never = asyncio.Event()
    hits = 0

    async def silent(request: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        await never.wait()
        return web.Response()

    retry = counting(2)
    async with serve(silent) as base, client(kind, read_timeout=0.05) as get:
        (outcome,) = await corral.gather(get, [f"{base}/x"], retries=retry, return_exceptions=True)
        never.set()  # the handlers end before the server does
    assert isinstance(outcome, aiohttp.ServerTimeoutError | httpx.ReadTimeout), outcome
    assert hits == 2


@pytest.mark.parametrize("kind", CLIENTS)
async def test_client_side_mistakes_and_bad_bodies_fail_at_once(kind: str) -> None:
    """A URL no client can use, or a 200 whose body is not the JSON expected: one call."""
    calls: list[str] = []

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="<html>not json</html>", content_type="text/html")

    async with serve(ok) as base:
        if kind == "aiohttp":
            async with aiohttp.ClientSession() as session:

                async def fetch(url: str) -> Any:
                    calls.append(url)
                    async with session.get(url) as response:
                        return await response.json()  # ContentTypeError: status 200

                bad_scheme = "ftp://127.0.0.1/x"
                outcomes = await corral.gather(
                    fetch,
                    [bad_scheme, f"{base}/x"],
                    retries=counting(3),
                    return_exceptions=True,
                )
        else:
            async with httpx.AsyncClient() as http:

                async def fetch(url: str) -> Any:
                    calls.append(url)
                    response = await http.get(url)
                    return response.json()  # a ValueError

                outcomes = await corral.gather(
                    fetch,
                    ["ftp://127.0.0.1/x", f"{base}/x"],
                    retries=counting(3),
                    return_exceptions=True,
                )
    assert all(isinstance(o, Exception) for o in outcomes), outcomes
    assert not any(transient(o) for o in outcomes)
    assert len(calls) == 2  # each URL called once


@pytest.mark.parametrize("kind", CLIENTS)
async def test_an_illegal_request_header_fails_at_once(kind: str) -> None:
    """httpx's LocalProtocolError (a TransportError, but the request's own fault) and
    aiohttp's ValueError: calling again sends the same bad header."""
    calls = 0

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async with serve(ok) as base:
        if kind == "aiohttp":
            async with aiohttp.ClientSession() as session:

                async def send_aiohttp(url: str) -> Any:
                    nonlocal calls
                    calls += 1
                    async with session.get(url, headers={"X-Note": "a\nb"}) as response:
                        return response.status

                outcomes = await corral.gather(
                    send_aiohttp, [f"{base}/x"], retries=counting(3), return_exceptions=True
                )
        else:
            async with httpx.AsyncClient() as http:

                async def send_httpx(url: str) -> Any:
                    nonlocal calls
                    calls += 1
                    return (await http.get(url, headers={"X-Note": "a\nb"})).status_code

                outcomes = await corral.gather(
                    send_httpx, [f"{base}/x"], retries=counting(3), return_exceptions=True
                )
    assert isinstance(outcomes[0], httpx.LocalProtocolError | ValueError), outcomes
    assert calls == 1


# --- only the HTTP clients' classes count, not any class of the same name ------------------


def _foreign(name: str) -> type[Exception]:
    """An exception class of another library that shares a name with aiohttp's or httpx's.

    opensearch-py (like elasticsearch 7) has a TransportError whose subclasses
    are the server's 404, 409 and 400 answers, with the status as ``status_code``.
    """
    return type(name, (Exception,), {"__module__": "opensearchpy.exceptions"})


@pytest.mark.parametrize("name", ["TransportError", "ClientConnectionError", "ClientPayloadError"])
@pytest.mark.parametrize(("status", "expected"), [(404, False), (409, False), (503, True)])
def test_a_status_decides_even_on_a_class_named_like_a_transport_error(
    name: str, status: int, expected: bool
) -> None:
    answer = type("ApiAnswer", (_foreign(name),), {"status_code": status})("index missing")
    assert transient(answer) is expected
    wait = Retry(jitter=False).next_wait(answer, 1, random.Random(0))
    assert wait == (0.1 if expected else None)


@pytest.mark.virtual_time
async def test_a_foreign_404_named_transport_error_is_called_once() -> None:
    not_found = type("NotFoundError", (_foreign("TransportError"),), {"status_code": 404})
    fn = Calls(*always(not_found("no such index")))
    with pytest.raises(not_found):
        await corral.gather(fn, ["x"], retries=3)
    assert fn.count == 1
    # Its connection failures (no status: "N/A") are still transport errors.
    down = type("ConnectionError", (_foreign("TransportError"),), {"status_code": "N/A"})
    fn = Calls(*always(down("refused")))
    with pytest.raises(down):
        await corral.gather(fn, ["x"], retries=3)
    assert fn.count == 4


def test_an_httpx_fork_s_transport_errors_count_by_name() -> None:
    """httpx2 (which the openai and anthropic SDKs may run on) keeps httpx's names."""
    base = type("TransportError", (Exception,), {"__module__": "httpx2"})
    read_timeout = type("ReadTimeout", (base,), {"__module__": "httpx2"})
    bad_scheme = type("UnsupportedProtocol", (base,), {"__module__": "httpx2"})
    assert transient(read_timeout("slow"))
    assert not transient(bad_scheme("ftp"))


def test_subclasses_of_the_clients_errors_still_count() -> None:
    """A user's or a wrapper library's subclass of the clients' errors is theirs too."""

    class MyDisconnect(aiohttp.ServerDisconnectedError):
        pass

    class MyTimeout(httpx.ReadTimeout):
        pass

    class MyCut(aiohttp.ClientPayloadError):
        pass

    assert transient(MyDisconnect())
    assert transient(MyTimeout("slow"))
    assert transient(MyCut("cut"))

    class MyBadScheme(httpx.UnsupportedProtocol):
        pass

    assert not transient(MyBadScheme("ftp"))


# --- the API SDKs' connection errors, with their own retries off -----------------------------

# README ("One retry loop") asks for SDK clients with max_retries=0, so that corral's
# retries are the only ones: what the SDK's own loop retried, corral's default must.
SDKS = ["openai", "anthropic"]


def _sdk_client(name: str, base: str, **options: Any) -> Any:
    module = pytest.importorskip(name)
    if name == "openai":
        return module.AsyncOpenAI(api_key="k", base_url=f"{base}/v1", max_retries=0, **options)
    return module.AsyncAnthropic(api_key="k", base_url=base, max_retries=0, **options)


async def _sdk_calls(sdk: Any, retries: int) -> tuple[int, BaseException]:
    """How many times corral called the SDK for one item, and how the item ended."""
    calls = 0

    async def list_models(item: int) -> Any:
        nonlocal calls
        calls += 1
        return await sdk.models.list()

    retry = counting(retries + 1)
    (outcome,) = await corral.gather(list_models, [0], retries=retry, return_exceptions=True)
    assert isinstance(outcome, BaseException), outcome
    return calls, outcome


@pytest.mark.parametrize("name", SDKS)
async def test_an_sdks_connection_error_is_retried(name: str) -> None:
    """A refused connection reaches fn as the SDK's APIConnectionError (from httpx's
    ConnectError): transient, like the error it wraps."""
    with refusing_port() as base:
        sdk = _sdk_client(name, base)
        try:
            calls, outcome = await _sdk_calls(sdk, retries=2)
        finally:
            await sdk.close()
    assert type(outcome).__name__ == "APIConnectionError"
    # httpx's ConnectError, or that of the httpx fork (httpx2) the SDK may run on.
    assert type(outcome.__cause__).__name__ == "ConnectError"
    assert calls == 3


@pytest.mark.parametrize("name", SDKS)
async def test_an_sdks_timeout_is_retried(name: str) -> None:
    never = asyncio.Event()

    async def silent(request: web.Request) -> web.Response:
        await never.wait()
        return web.Response()

    async with serve(silent) as base:
        sdk = _sdk_client(name, base, timeout=0.05)
        try:
            calls, outcome = await _sdk_calls(sdk, retries=1)
        finally:
            never.set()
            await sdk.close()
    assert type(outcome).__name__ == "APITimeoutError"
    assert calls == 2


@pytest.mark.parametrize("name", SDKS)
async def test_an_sdks_wrapped_client_mistake_is_not_retried(name: str) -> None:
    """The SDK wraps every failure to send in APIConnectionError: one no retry can fix
    (httpx's UnsupportedProtocol, for an "ftp://" base URL) stays final."""
    sdk = _sdk_client(name, "ftp://127.0.0.1:9")
    try:
        calls, outcome = await _sdk_calls(sdk, retries=2)
    finally:
        await sdk.close()
    assert type(outcome.__cause__).__name__ == "UnsupportedProtocol"
    assert calls == 1


def test_a_connection_error_wrapper_is_judged_by_its_cause() -> None:
    class APIConnectionError(Exception):
        """The name the API SDKs give a failure to send a request."""

    def wrapped(cause: BaseException | None) -> APIConnectionError:
        error = APIConnectionError("connection error")
        error.__cause__ = cause
        return error

    assert transient(wrapped(ConnectionRefusedError()))
    assert transient(wrapped(httpx.ReadTimeout("slow")))
    assert transient(wrapped(None))  # no cause: a connection error, by its name
    assert not transient(wrapped(httpx.UnsupportedProtocol("ftp")))
    assert not transient(wrapped(TypeError("a bug in a custom transport")))
    assert transient(wrapped(wrapped(ConnectionResetError())))
    # A cycle of causes ends: no RecursionError, whatever the answer.
    loop_a, loop_b = wrapped(None), wrapped(None)
    loop_a.__cause__, loop_b.__cause__ = loop_b, loop_a
    assert transient(loop_a) in (True, False)


# --- the server's wait, honoured beyond max_backoff (exceptions from real clients) ---------


def _http_date(seconds_from_now: float) -> str:
    return email.utils.formatdate(math.floor(time.time()) + seconds_from_now, usegmt=True)


HEADERS: dict[str, tuple[int, dict[str, str]]] = {
    "seconds": (429, {"Retry-After": "7"}),
    "fraction": (503, {"Retry-After": "2.5"}),
    "ms": (429, {"retry-after-ms": "1500", "Retry-After": "9"}),
}


def _collect(kind: str, status: int, headers: dict[str, str], n: int = 3) -> list[Exception]:
    """What ``kind`` really raises, n times, for ``status`` with ``headers`` from loopback."""

    async def main() -> list[Exception]:
        async def handler(request: web.Request) -> web.Response:
            return web.Response(status=status, headers=headers, text="later")

        async with serve(handler) as base, client(kind) as get:
            return [await failure_of(get, f"{base}/x") for _ in range(n)]

    errors: list[Exception] = run(main)
    return errors


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize(("form", "expected"), [("seconds", 7.0), ("fraction", 2.5), ("ms", 1.5)])
def test_a_servers_retry_after_is_waited_beyond_max_backoff(
    kind: str, form: str, expected: float
) -> None:
    status, headers = HEADERS[form]
    errors = _collect(kind, status, headers)

    async def main() -> list[float]:
        fn = Calls(*errors, value="done")
        retry = Retry(attempts=4, backoff=0.1, max_backoff=1.0, jitter=False)
        assert await corral.gather(fn, ["x"], retries=retry) == ["done"]
        return gaps(fn.times)

    waits = run(main, virtual_time=True)
    assert waits == pytest.approx([expected] * 3)


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize(
    ("repeats", "expected"),
    [
        ([("Retry-After", "soon"), ("Retry-After", "8")], 8.0),
        ([("retry-after-ms", "x"), ("retry-after-ms", "1500"), ("Retry-After", "9")], 1.5),
        ([("Retry-After", "junk"), ("Retry-After", "junk"), ("Retry-After", "4")], 4.0),
    ],
    ids=["retry-after", "retry-after-ms", "third"],
)
def test_a_repeated_retry_after_is_read_alike_by_both_clients(
    kind: str, repeats: list[tuple[str, str]], expected: float
) -> None:
    """The first valid value of a repeated header counts: httpx joins the repeats with
    ", ", aiohttp keeps each; the same answer must give the same wait."""

    async def main() -> list[float]:
        async def handler(request: web.Request) -> web.Response:
            return web.Response(status=429, headers=multidict.CIMultiDict(repeats))

        async with serve(handler) as base, client(kind) as get:
            error = await failure_of(get, f"{base}/x")
        wait = retry_after_seconds(error)
        assert wait == pytest.approx(expected)
        policy = Retry(backoff=0.1, max_backoff=1.0, jitter=False)
        return [policy.next_wait(error, 1, random.Random(0)) or 0.0]

    assert run(main) == pytest.approx([expected])


@pytest.mark.parametrize("kind", CLIENTS)
def test_an_http_date_retry_after_is_waited_until_that_date(kind: str) -> None:
    errors = _collect(kind, 503, {"Retry-After": _http_date(30)}, n=1)

    async def main() -> list[float]:
        fn = Calls(*errors, value="done")
        retry = Retry(attempts=2, backoff=0.1, max_backoff=1.0, jitter=False)
        assert await corral.gather(fn, ["x"], retries=retry) == ["done"]
        return gaps(fn.times)

    (wait,) = run(main, virtual_time=True)
    # Whole seconds on the wire, and the wall clock moved while the test ran.
    assert 25.0 < wait <= 30.0


@pytest.mark.parametrize("kind", CLIENTS)
def test_no_wait_follows_a_last_attempt_that_asked_for_one(kind: str) -> None:
    """The server asks for 60 s on every answer: with the attempts spent, the failure
    is raised at once, not after another 60 s."""
    errors = _collect(kind, 429, {"Retry-After": "60"})

    async def main() -> tuple[list[float], float, BaseException]:
        loop = asyncio.get_running_loop()
        fn = Calls(*errors)
        retry = Retry(attempts=3, backoff=0.1, max_backoff=1.0)
        try:
            await corral.gather(fn, ["x"], retries=retry)
        except Exception as exc:
            return fn.times, loop.time(), exc
        raise AssertionError("the item succeeded")

    times, ended, raised = run(main, virtual_time=True)
    assert gaps(times) == [60.0, 60.0]
    assert ended == times[-1]
    assert raised is errors[2]


@pytest.mark.virtual_time
async def test_retry_after_from_fn_beyond_max_backoff_and_none_after_the_last() -> None:
    loop = asyncio.get_running_loop()
    fn = Calls(RetryAfter(5), RetryAfter(0.25), RetryAfter(40))
    retry = Retry(attempts=3, backoff=2.0, max_backoff=2.0, jitter=False)
    with pytest.raises(RetryAfter) as raised:
        await corral.gather(fn, ["x"], retries=retry)
    # 5 beyond the cap of 2; then the backoff's 2 beats the server's 0.25.
    assert gaps(fn.times) == [5.0, 2.0]
    assert loop.time() == fn.times[-1]
    assert raised.value.seconds == 40.0


@pytest.mark.parametrize("kind", CLIENTS)
def test_a_retry_after_on_a_status_that_is_not_retried_changes_nothing(kind: str) -> None:
    """A 404 with Retry-After is still a 404: one call, no wait."""
    errors = _collect(kind, 404, {"Retry-After": "5"}, n=1)

    async def main() -> tuple[int, float]:
        loop = asyncio.get_running_loop()
        fn = Calls(*errors)
        with pytest.raises(type(errors[0])):
            await corral.gather(fn, ["x"], retries=3)
        return fn.count, loop.time()

    assert run(main, virtual_time=True) == (1, 0.0)


# --- KeyboardInterrupt, SystemExit, cancellation: never captured, never retried ------------


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit], ids=lambda e: e.__name__)
@pytest.mark.parametrize("on", [None, BaseException, "predicate"])
def test_interrupts_from_fn_are_raised_as_themselves_after_one_call(
    error: type[BaseException], on: Any
) -> None:
    asked: list[BaseException] = []
    if on == "predicate":

        def on(exc: BaseException) -> bool:
            asked.append(exc)
            return True

    fn = Calls(*always(error("stop")))

    async def main() -> None:
        retry = Retry(attempts=5, backoff=0.0, on=on, budget=None)
        await corral.gather(fn, ["x"], retries=retry, return_exceptions=True)

    with pytest.raises(error):
        run(main, virtual_time=True)
    assert fn.count == 1
    assert asked == []


@pytest.mark.virtual_time
async def test_a_cancelled_error_from_fn_is_neither_retried_nor_captured() -> None:
    """fn awaited something that was cancelled: not a result, not a retry."""
    calls = 0

    async def awaits_a_cancelled_task(item: int) -> int:
        nonlocal calls
        calls += 1
        doomed = asyncio.ensure_future(asyncio.sleep(10))
        doomed.cancel()
        await doomed
        return item

    retry = Retry(attempts=5, backoff=0.0, on=BaseException, budget=None)
    with pytest.raises(RuntimeError, match="fn raised CancelledError") as raised:
        await corral.gather(awaits_a_cancelled_task, [1], retries=retry, return_exceptions=True)
    assert isinstance(raised.value.__cause__, asyncio.CancelledError)
    assert calls == 1


@pytest.mark.virtual_time
async def test_cancelling_the_caller_mid_call_makes_no_retry() -> None:
    started = asyncio.Event()
    calls = 0

    async def slow(item: int) -> int:
        nonlocal calls
        calls += 1
        started.set()
        await asyncio.sleep(100)
        return item

    retry = Retry(attempts=5, backoff=0.0, on=BaseException, budget=None)
    task = asyncio.ensure_future(corral.gather(slow, [1], retries=retry, return_exceptions=True))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(1_000)  # time for a retry, were one scheduled
    assert calls == 1
    assert asyncio.all_tasks() == {asyncio.current_task()}


# --- bad arguments fail naming the argument and the value --------------------------------


async def _async_predicate(exc: BaseException) -> bool:
    return True


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"attempts": 0}, ValueError, r"^Retry\(attempts=0\): attempts must be an int >= 1"),
        ({"attempts": 1.0}, TypeError, r"^Retry\(attempts=1\.0\): attempts must be an int"),
        ({"attempts": None}, TypeError, r"^Retry\(attempts=None\): attempts must be an int"),
        ({"backoff": -1}, ValueError, r"^Retry\(backoff=-1\): backoff must be a finite"),
        ({"backoff": math.inf}, ValueError, r"^Retry\(backoff=inf\): backoff must be"),
        ({"backoff": 10**400}, ValueError, r"^Retry\(backoff=1000+\): backoff must be"),
        ({"backoff": "0.1"}, TypeError, r"^Retry\(backoff='0\.1'\): backoff must be"),
        ({"max_backoff": math.nan}, ValueError, r"^Retry\(max_backoff=nan\): max_backoff must"),
        (
            {"backoff": 2, "max_backoff": 1},
            ValueError,
            r"^Retry\(backoff=2, max_backoff=1\): max_backoff must be >= backoff",
        ),
        ({"jitter": "yes"}, TypeError, r"^Retry\(jitter='yes'\): jitter must be True or False"),
        ({"jitter": 1}, TypeError, r"^Retry\(jitter=1\): jitter must be True or False"),
        ({"on": [ValueError]}, TypeError, r"^Retry\(on=\[<class 'ValueError'>\]\): on must be"),
        ({"on": ValueError()}, TypeError, r"^Retry\(on=ValueError\(\)\): on must be"),
        ({"on": bool}, TypeError, r"^Retry\(on=<class 'bool'>\): on must be"),
        ({"on": lambda: True}, TypeError, r"^on= is called with the exception, but <lambda>"),
        (
            {"on": _async_predicate},
            TypeError,
            r"^on= must be a plain function .* got the async function on=<function _async",
        ),
        (
            {"max_retry_after": -5},
            ValueError,
            r"^Retry\(max_retry_after=-5\): max_retry_after must be",
        ),
        ({"budget": "lots"}, TypeError, r"budget='lots'"),
    ],
    ids=repr,
)
def test_bad_arguments_are_refused_naming_argument_and_value(
    kwargs: dict[str, Any], error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        Retry(**kwargs)


@pytest.mark.parametrize(
    ("retries", "error", "shown"),
    [(-2, ValueError, "-2"), (2.5, TypeError, r"2\.5"), (False, TypeError, "False")],
)
def test_map_refuses_bad_retries_before_any_call(
    retries: Any, error: type[Exception], shown: str
) -> None:
    calls: list[int] = []

    async def fn(item: int) -> int:
        calls.append(item)
        return item

    with pytest.raises(error, match=rf"got retries={shown}$"):
        corral.map(fn, [1], retries=retries)
    assert calls == []


@pytest.mark.parametrize(
    ("k", "error", "shown"),
    [
        (0, ValueError, "0"),
        (-3, ValueError, "-3"),
        (2.0, TypeError, r"2\.0"),
        (True, TypeError, "True"),
    ],
)
def test_the_bound_is_refused_for_a_retry_number_below_one(
    k: Any, error: type[Exception], shown: str
) -> None:
    """Retry 1 is the first; a "retry 0" is a caller's off-by-one, not a shorter wait."""
    with pytest.raises(
        error, match=rf"^k must be an int >= 1 \(1 for the first retry\); got k={shown}$"
    ):
        Retry().backoff_bound(k)
