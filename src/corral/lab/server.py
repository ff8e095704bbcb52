"""A local HTTP server that behaves like a real API under load.

Benchmarks that call ``asyncio.sleep(0.1)`` and call it "I/O" miss what makes
concurrency hard: a real service has a *capacity*. Send it more requests than
it can work on at once and they wait in its queue, so latency grows with
concurrency while throughput stays flat; send more than its queue holds and it
answers ``429 Too Many Requests`` (or ``503``) with a ``Retry-After`` header.
Some requests hang, some fail. This module is that service, on loopback, for
the demo, the tests and the lab::

    import corral.lab

    async with corral.lab.serve(capacity=64, service_ms=10) as url:
        ...   # GET f"{url}/anything" -> {"ok": true, "path": "/anything", "served_ms": 10.2}

The model, per request, in arrival order::

                       queue full?  -> 429/503 + Retry-After, at once
    arrival -> [ FIFO queue (<= queue) ] -> [ capacity slots ] -> service_ms -> 200
                                                                           \\-> 500 (fail_fraction)
       \\-> stall_fraction: hang stall_s seconds apart from the queue, then 200

- ``capacity`` requests are in service at once, each for ``service_ms``
  milliseconds (times ``1 +/- jitter``, drawn uniformly);
- the others wait in arrival order; at most ``queue`` of them, and one more is
  refused at once with ``status`` and ``Retry-After: retry_after``;
- ``stall_fraction`` of requests hang for ``stall_s`` seconds, to provoke
  client timeouts. They do not hold a service slot, so a stall does not also
  shrink the capacity: the two effects stay separate knobs;
- ``fail_fraction`` of the admitted requests answer ``500`` after their service.

All randomness comes from one ``random.Random(seed)``, drawn at arrival, so a
run with the same arrivals makes the same choices. The capacity can change
during a run, from a ``schedule`` (relative to the start), from
:meth:`TargetServer.set_capacity` or from ``POST /_corral/capacity?value=N``:
growing it admits queued requests at once; shrinking it lets the requests in
service finish and admits fewer from then on.

Admin paths (everything else is the model, whatever the method):

- ``GET /_corral/stats``: the :class:`ServerStats` fields as JSON;
- ``POST /_corral/capacity?value=N``: change the capacity;
- ``POST /_corral/reset``: zero the counters and the latency window.

A wrong method on one of them is ``405`` with an ``Allow`` header; any other
``/_corral/...`` path is ``404``.

This is a lab instrument, not a production server: it listens on loopback
addresses only and refuses any other host.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import deque
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web

from corral.lab._loopback import (
    LoopbackServer,
    check_number,
    check_seed,
    json_response,
    serving,
)
from corral.lab._options import DAY_MS, DAY_S

__all__ = ["ServerStats", "TargetServer", "serve"]

#: Served latencies kept for the percentiles: the most recent ones, so memory
#: stays bounded in a server left running for hours.
LATENCY_WINDOW = 100_000

#: The longest Retry-After a refusal may ask for: a day. Its header is whole
#: seconds as an integer, and no client waits out a longer one anyway.
MAX_RETRY_AFTER = DAY_S

_ADMIN_PREFIX = "/_corral"
_ADMIN_HELP = "GET /_corral/stats, POST /_corral/capacity?value=N, POST /_corral/reset"


# --------------------------------------------------------------------------
# Arguments
#
# Every knob is checked once, in TargetServer.__init__, so a bad value fails
# where it was written, with its name, its value and what would be right.
# --------------------------------------------------------------------------


def _check_int(name: str, value: object, minimum: int, meaning: str) -> int:
    # bool is an int subclass; capacity=True is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum} ({meaning}); got {name}={value!r}")
    return value


def _check_schedule(schedule: object) -> list[tuple[float, int]]:
    if schedule is None:
        return []
    shape = "a list of (t_seconds, capacity) pairs, like [(5.0, 32)]"
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence):
        raise ValueError(f"schedule must be {shape}; got schedule={schedule!r}")
    steps: list[tuple[float, int]] = []
    for entry in schedule:
        if not isinstance(entry, Sequence) or isinstance(entry, (str, bytes)) or len(entry) != 2:
            raise ValueError(f"schedule must be {shape}; got the entry {entry!r}")
        t, capacity = entry
        t = check_number("schedule time", t, "seconds after the start", maximum=DAY_S)
        capacity = _check_int("schedule capacity", capacity, 1, "requests served in parallel")
        steps.append((t, capacity))
    # sorted() is stable: two steps at the same time apply in the order given.
    return sorted(steps, key=lambda step: step[0])


# --------------------------------------------------------------------------
# The admission gate
#
# A FIFO semaphore whose size can change while requests wait, with a bounded
# waiting room. asyncio.Semaphore cannot shrink below the permits it has
# handed out, nor say how many wait; this one can.
# --------------------------------------------------------------------------


class _Gate:
    """Capacity slots handed out in arrival order, with at most ``bound`` waiting."""

    def __init__(self, capacity: int, bound: int) -> None:
        self.capacity = capacity
        self.bound = bound
        # Invariant: in_service <= capacity, except just after the capacity is
        # lowered: requests in service finish, none is admitted until below it.
        self.in_service = 0
        self.peak_in_service = 0
        self.peak_concurrency = 0
        self.open = False  # True while stopping: admit everyone at once
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def _note_peaks(self) -> None:
        if self.open:
            # Stopping: waiters are let through only to be answered at once,
            # not served, and must not show as more than the capacity in service.
            return
        self.peak_in_service = max(self.peak_in_service, self.in_service)
        self.peak_concurrency = max(self.peak_concurrency, self.in_service + len(self._waiters))

    async def acquire(self) -> bool:
        """Take a slot, waiting in line if needed; ``False`` if the line is full."""
        if self.open or (self.in_service < self.capacity and not self._waiters):
            self.in_service += 1
            self._note_peaks()
            return True
        if len(self._waiters) >= self.bound:
            return False
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._note_peaks()
        try:
            await waiter
        except BaseException:
            if waiter.cancelled():
                # _wake skips cancelled waiters, so it may already have
                # dropped this one from the line.
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
            else:
                # Granted a slot and cancelled in the same step: pass it on.
                self.release()
            raise
        return True

    def release(self) -> None:
        self.in_service -= 1
        self._wake()

    def resize(self, capacity: int) -> None:
        self.capacity = capacity
        self._wake()

    def open_all(self) -> None:
        """Admit every waiter now: the server is stopping and nothing should wait."""
        self.open = True
        self._wake()

    def reset_peaks(self) -> None:
        self.peak_in_service = self.in_service
        self.peak_concurrency = self.in_service + len(self._waiters)

    def _wake(self) -> None:
        while self._waiters and (self.open or self.in_service < self.capacity):
            waiter = self._waiters.popleft()
            if not waiter.done():  # a cancelled waiter gives its place up
                waiter.set_result(None)
                self.in_service += 1
        self._note_peaks()


# --------------------------------------------------------------------------
# Stats
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerStats:
    """A snapshot of the server's counters since its start or last reset.

    Counts: ``served`` (answered 200 after service), ``rejected`` (refused with
    the queue full), ``stalled`` (hung for ``stall_s``), ``failed`` (answered
    500). Now: ``in_service``, ``queued``, ``capacity``. Peaks:
    ``peak_concurrency`` (in service + queued) and ``peak_in_service``.
    Latencies of served requests, arrival to answer, in milliseconds, over the
    last :data:`LATENCY_WINDOW` of them (``None`` before the first).
    ``elapsed_s``: seconds since the start or the last reset.
    """

    served: int
    rejected: int
    stalled: int
    failed: int
    in_service: int
    queued: int
    peak_concurrency: int
    peak_in_service: int
    capacity: int
    latency_p50_ms: float | None
    latency_p90_ms: float | None
    latency_p99_ms: float | None
    elapsed_s: float

    def as_dict(self) -> dict[str, Any]:
        """The fields as a flat, JSON-serialisable dict (what ``/_corral/stats`` returns)."""
        return asdict(self)


def _percentile(ordered: list[float], p: float) -> float | None:
    """Nearest-rank percentile of an ascending list (an observed value, never interpolated)."""
    if not ordered:
        return None
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return round(ordered[rank - 1], 3)


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------


class TargetServer(LoopbackServer):
    """The modelled API as an object: start it, read its stats, change its capacity.

    :func:`serve` is the short form for code that needs only the URL. Use this
    class when the test or the lab also needs the counters without HTTP::

        async with TargetServer(capacity=8, service_ms=20, queue=16) as server:
            ...   # requests to server.url
            server.set_capacity(4)
            print(server.stats().peak_in_service)

    Args:
        capacity: requests in service at once (int >= 1).
        service_ms: milliseconds each request spends in service (0 to a day).
        queue: requests that may wait for a slot (int >= 0); one more is refused.
        status: the refusal's status, 429 or 503.
        retry_after: seconds the refusal asks clients to wait (at most a day). ``Retry-After``
            carries it rounded up to whole seconds (the header allows no
            fraction); ``retry-after-ms`` carries it in milliseconds.
        jitter: service time varies uniformly by +/- this fraction (0 to 1).
        stall_fraction: share of requests that hang ``stall_s`` seconds (0 to 1).
        stall_s: how long a stalled request hangs before answering 200 (0 to a day).
        fail_fraction: share of admitted requests answered 500 (0 to 1).
        schedule: ``[(t_seconds, capacity), ...]``: set the capacity at those
            times after the start, at most a day (steps at t=0 apply before the
            first request).
        host: a loopback address; anything else raises ``ValueError``.
        port: 0 picks a free port; read it back from :attr:`url`.
        seed: seeds the one ``random.Random`` behind jitter, stalls and failures.

    Raises:
        ValueError: an argument is out of range; the message names it.

    Call every method from the loop the server runs on.
    """

    def __init__(
        self,
        *,
        capacity: int = 64,
        service_ms: float = 10.0,
        queue: int = 256,
        status: int = 429,
        retry_after: float = 1.0,
        jitter: float = 0.0,
        stall_fraction: float = 0.0,
        stall_s: float = 30.0,
        fail_fraction: float = 0.0,
        schedule: Sequence[tuple[float, int]] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 0,
    ) -> None:
        capacity = _check_int("capacity", capacity, 1, "requests served in parallel")
        # Waits are at most a day: a longer one is a typo, and would hold its
        # request (and, for service_ms, its slot) until stop().
        self._service_s = (
            check_number("service_ms", service_ms, "milliseconds per request", maximum=DAY_MS) / 1e3
        )
        queue = _check_int("queue", queue, 0, "requests that may wait for a slot")
        if isinstance(status, bool) or status not in (429, 503):
            raise ValueError(f"status must be 429 or 503; got status={status!r}")
        self._status = status
        retry = check_number(
            "retry_after", retry_after, "seconds clients are asked to wait", maximum=MAX_RETRY_AFTER
        )
        self._jitter = check_number("jitter", jitter, "fraction of service_ms", maximum=1)
        self._stall_fraction = check_number(
            "stall_fraction", stall_fraction, "share of requests that hang", maximum=1
        )
        self._stall_s = check_number(
            "stall_s", stall_s, "seconds a stalled request hangs", maximum=DAY_S
        )
        self._fail_fraction = check_number(
            "fail_fraction", fail_fraction, "share of requests answered 500", maximum=1
        )
        self._schedule = _check_schedule(schedule)
        super().__init__(host=host, port=port)
        self._rng = random.Random(check_seed(seed))

        # The refusal is the same every time: build its parts once.
        self._reject_headers = {
            "Retry-After": str(math.ceil(retry)),
            "retry-after-ms": str(round(retry * 1e3)),
        }
        self._reject_body = json.dumps(
            {"ok": False, "error": "over capacity", "retry_after": retry}
        ).encode()

        self._gate = _Gate(capacity, queue)
        self._schedule_task: asyncio.Task[None] | None = None
        self._started_at = 0.0
        self._zero_counters()

    def _zero_counters(self) -> None:
        self._served = self._rejected = self._stalled = self._failed = 0
        self._latencies_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._counting_since = self._loop.time() if self._loop is not None else 0.0

    # -- lifecycle -------------------------------------------------------

    def _starting(self) -> None:
        assert self._loop is not None
        self._started_at = self._counting_since = self._loop.time()
        while self._schedule and self._schedule[0][0] <= 0:
            self._gate.resize(self._schedule.pop(0)[1])

    def _listening(self) -> None:
        assert self._loop is not None
        if self._schedule:
            self._schedule_task = self._loop.create_task(self._follow_schedule())

    async def _stopping(self) -> None:
        if self._schedule_task is not None:
            self._schedule_task.cancel()
            # wait() never raises: the task's CancelledError stays inside it.
            await asyncio.wait([self._schedule_task])
        self._gate.open_all()

    # -- control ---------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Requests in service at once, from now on."""
        return self._gate.capacity

    def set_capacity(self, capacity: int) -> None:
        """Change the capacity: growing admits queued requests now; shrinking
        lets those in service finish and admits fewer from then on."""
        self._gate.resize(_check_int("capacity", capacity, 1, "requests served in parallel"))

    def reset(self) -> None:
        """Zero the counters, the peaks (to what is in the server now) and the latencies."""
        self._zero_counters()
        self._gate.reset_peaks()

    def stats(self) -> ServerStats:
        """A frozen snapshot of the counters (see :class:`ServerStats`)."""
        ordered = sorted(self._latencies_ms)
        if self._stopped_at is not None:
            now = self._stopped_at
        else:
            now = self._loop.time() if self._loop is not None else 0.0
        gate = self._gate
        return ServerStats(
            served=self._served,
            rejected=self._rejected,
            stalled=self._stalled,
            failed=self._failed,
            in_service=gate.in_service,
            queued=gate.queued,
            peak_concurrency=gate.peak_concurrency,
            peak_in_service=gate.peak_in_service,
            capacity=gate.capacity,
            latency_p50_ms=_percentile(ordered, 50),
            latency_p90_ms=_percentile(ordered, 90),
            latency_p99_ms=_percentile(ordered, 99),
            elapsed_s=round(max(0.0, now - self._counting_since), 6),
        )

    async def _follow_schedule(self) -> None:
        assert self._loop is not None
        for at, capacity in self._schedule:
            delay = self._started_at + at - self._loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self._gate.resize(capacity)

    # -- requests --------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if path == _ADMIN_PREFIX or path.startswith(_ADMIN_PREFIX + "/"):
            return self._admin(request, path)
        return await self._model(path)

    async def _model(self, path: str) -> web.StreamResponse:
        assert self._loop is not None
        # perf_counter, not loop.time(): uvloop's clock ticks in whole
        # milliseconds and is read once per loop iteration, so a 1 ms service
        # read as 1 or 2 ms and the percentiles came out in whole milliseconds.
        arrived = time.perf_counter()
        if self._stopping_now():
            return _stopping()
        # Every draw happens here, at arrival, in a fixed order, and only for
        # the knobs in use: the same arrivals make the same choices.
        rng = self._rng
        if self._stall_fraction and rng.random() < self._stall_fraction:
            self._stalled += 1
            await self._sleep(self._stall_s)
            if self._stopping_now():
                return _stopping()
            return json_response(200, {"ok": True, "path": path, "stalled": True})
        fail = bool(self._fail_fraction) and rng.random() < self._fail_fraction
        service_s = self._service_s
        if self._jitter:
            service_s *= 1.0 + self._jitter * (2.0 * rng.random() - 1.0)

        gate = self._gate
        if not await gate.acquire():
            self._rejected += 1
            return web.Response(
                status=self._status,
                body=self._reject_body,
                headers=self._reject_headers,
                content_type="application/json",
            )
        try:
            if service_s > 0:
                await self._sleep(service_s)
        finally:
            gate.release()
        if self._stopping_now():
            return _stopping()
        served_ms = (time.perf_counter() - arrived) * 1e3
        if fail:
            self._failed += 1
            return json_response(500, {"ok": False, "path": path, "error": "modelled failure"})
        self._served += 1
        self._latencies_ms.append(served_ms)
        # The hot path: formatting by hand costs a fifth of json.dumps(dict).
        body = f'{{"ok": true, "path": {json.dumps(path)}, "served_ms": {served_ms:.3f}}}'
        return web.Response(body=body.encode(), content_type="application/json")

    def _admin(self, request: web.BaseRequest, path: str) -> web.StreamResponse:
        method = request.method
        if path == "/_corral/stats":
            if method != "GET":
                return _not_allowed("GET", path)
            return json_response(200, self.stats().as_dict())
        if path == "/_corral/reset":
            if method != "POST":
                return _not_allowed("POST", path)
            self.reset()
            return json_response(200, {"ok": True})
        if path == "/_corral/capacity":
            if method != "POST":
                return _not_allowed("POST", path)
            raw = request.query.get("value", "")
            try:
                value = int(raw)
            except ValueError:
                value = 0
            if value < 1:
                error = f"value must be an int >= 1 (the new capacity); got value={raw!r}"
                return json_response(400, {"ok": False, "error": error})
            self._gate.resize(value)
            return json_response(200, {"ok": True, "capacity": value})
        error = f"no admin path {path!r}; try {_ADMIN_HELP}"
        return json_response(404, {"ok": False, "error": error})


def _not_allowed(allowed: str, path: str) -> web.Response:
    response = json_response(405, {"ok": False, "error": f"{path} takes {allowed} only"})
    response.headers["Allow"] = allowed
    return response


def _stopping() -> web.Response:
    return json_response(503, {"ok": False, "error": "server stopping"})


# --------------------------------------------------------------------------
# The short form
# --------------------------------------------------------------------------


def serve(
    *,
    capacity: int = 64,
    service_ms: float = 10.0,
    queue: int = 256,
    status: int = 429,
    retry_after: float = 1.0,
    jitter: float = 0.0,
    stall_fraction: float = 0.0,
    stall_s: float = 30.0,
    fail_fraction: float = 0.0,
    schedule: Sequence[tuple[float, int]] | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    seed: int = 0,
) -> AbstractAsyncContextManager[str]:
    """Run the modelled API for the body of an ``async with``; yields its base URL.

    ::

        async with corral.lab.serve(capacity=64, service_ms=10) as url:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{url}/item/1") as response:
                    ...

    The arguments are :class:`TargetServer`'s, checked here, at the call.
    Leaving the block answers any pending request and closes the socket.
    """
    server = TargetServer(
        capacity=capacity,
        service_ms=service_ms,
        queue=queue,
        status=status,
        retry_after=retry_after,
        jitter=jitter,
        stall_fraction=stall_fraction,
        stall_s=stall_s,
        fail_fraction=fail_fraction,
        schedule=schedule,
        host=host,
        port=port,
        seed=seed,
    )
    return serving(server)
