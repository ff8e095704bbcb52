"""What the lab measures: workloads, and the measurements that run them in a child process.

Every number in ``corral demo`` and ``corral bench`` comes from one of the
*measures* below, run in a fresh process by :func:`corral.lab.runner.run_specs`
from a JSON *spec* such as::

    {"measure": "http", "strategy": "gather_all", "limit": null, "n": 10000,
     "url": "http://127.0.0.1:54321", "client": "aiohttp", "retries": 0}

Measures (:data:`MEASURES`), each returning a flat, JSON-serialisable dict
with a ``status`` (``"ok"``, ``"unavailable: ..."``, ``"error: ..."``):

``fanout``
    A strategy of :mod:`corral.lab.strategies` (or ``corral`` with any limit,
    including ``"auto"``) over ``range(n)`` with a local workload: ``noop``,
    ``sleep0`` (seed 002's tiny task), ``sleep3x100ms`` (seed 001's) or
    ``pending`` (sleeps ``sleep_s`` and counts how many calls were pending at
    once). Wall time, µs per item, growth of the RSS high-water mark.
``http``
    The same strategies issuing ``n`` GET requests to a target server with
    aiohttp or httpx. Failed items (by reason), successful requests per
    second, p50/p99 latency of the successful ones, memory. The baselines
    never retry; ``corral`` retries ``retries`` times, honouring Retry-After.
``http_threads``
    ``n`` blocking GETs (``http.client``, one keep-alive connection per
    thread) from a pool of ``threads`` threads: the "parallel solution".
``sweep``
    :func:`corral.lab.tune.sweep` against a URL: throughput, latency and
    errors for each limit of a geometric series.
``cpu``
    ``n`` calls of a pure-Python function taking ``work_ms`` each, run on the
    event loop, in threads or in processes, with the loop's lag measured.
``blocking``
    How long the loop stalls while a coroutine calls ``time.sleep(d)``, and
    while it awaits the same sleep in a thread; with :func:`corral.watch_loop`
    when it exists, to name the culprit.
``llm``
    A strategy of :mod:`corral.lab.llm_bench` sending ``n`` prompts to the
    mock LLM API through the ``openai`` SDK (the ``llm`` extra).

The module imports nothing outside the standard library at import time: the
process pools of the ``cpu`` measure import it in every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

from corral.lab.runner import Result, Spec, raise_open_files_limit

__all__ = [
    "MEASURES",
    "WORKLOADS",
    "LagMeter",
    "child_main",
    "cpu_work",
    "failure_kind",
    "maxrss_mb",
    "noop",
    "percentile",
    "rss_mb",
    "sleep0",
    "sleep3x100ms",
]

Fn = Callable[[Any], Awaitable[Any]]
Runner = Callable[[Fn, Iterable[Any], Any], Coroutine[Any, Any, list[Any]]]


# --------------------------------------------------------------------------------------
# Workloads
#
# Module-level functions, so that they pickle for process pools and read the
# same in every table: seed 002's tiny task, seed 001's three sleeps, a CPU
# loop. Each returns its item, so a strategy's results can be checked.
# --------------------------------------------------------------------------------------


async def noop(x: int) -> int:
    """Never suspends: what is left of the time is pure per-item overhead."""
    return x


async def sleep0(x: int) -> int:
    """Seed 002's tiny task: one trip through the event loop."""
    await asyncio.sleep(0)
    return x


async def sleep3x100ms(x: int) -> int:
    """Seed 001's stand-in for network I/O: three 0.1 s waits, 0.3 s in all."""
    await asyncio.sleep(0.1)
    await asyncio.sleep(0.1)
    await asyncio.sleep(0.1)
    return x


class Pending:
    """Sleeps ``seconds`` per call and records the most calls pending at once."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.pending = 0
        self.peak = 0

    async def __call__(self, x: int) -> int:
        self.pending += 1
        self.peak = max(self.peak, self.pending)
        try:
            await asyncio.sleep(self.seconds)
        finally:
            self.pending -= 1
        return x


def cpu_work(iterations: int) -> int:
    """Pure-Python arithmetic for ``iterations`` rounds: holds the GIL throughout."""
    total = 0
    for k in range(iterations):
        total += k * k % 7
    return total


async def _cpu_on_the_loop(iterations: int) -> int:
    # An async def that never awaits: the way CPU work ends up on the loop.
    return cpu_work(iterations)


WORKLOADS: dict[str, Fn] = {"noop": noop, "sleep0": sleep0, "sleep3x100ms": sleep3x100ms}


# --------------------------------------------------------------------------------------
# Instruments
# --------------------------------------------------------------------------------------


def rss_mb() -> float:
    """The resident set size now; the high-water mark where /proc is missing."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return maxrss_mb()


def maxrss_mb() -> float:
    """The RSS high-water mark of this process (``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # macOS says bytes


def reset_peak_rss() -> None:
    """Make the RSS high-water mark the current RSS, where the OS allows (Linux >= 4.0).

    Without it the mark remembers more than this measurement: the imports'
    peak, an earlier spec's, and even the parent's RSS at fork time, which
    ``ru_maxrss`` carries across ``exec``. Every strategy would then show the
    same "growth", the distance from that old peak down to now.
    """
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_rss_mb() -> float:
    """The RSS high-water mark since :func:`reset_peak_rss` (``VmHWM``), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10
    except (OSError, ValueError, IndexError):
        pass
    return maxrss_mb()


def _start_memory() -> float:
    """Collect garbage, reset the high-water mark; the RSS a measurement starts from."""
    gc.collect()
    reset_peak_rss()
    return rss_mb()


def percentile(ordered: list[float], q: float) -> float | None:
    """Nearest-rank percentile ``q`` (0-100) of an ascending list; ``None`` if empty."""
    if not ordered:
        return None
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def failure_kind(exc: BaseException) -> str:
    """A short reason for a failed request: its HTTP status, ``timeout``, ``connection``."""
    status = getattr(exc, "status", None)
    if not isinstance(status, int):
        status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int):
        return str(status)
    name = type(exc).__name__
    if isinstance(exc, TimeoutError) or "Timeout" in name:
        return "timeout"
    if isinstance(exc, OSError) or "Connect" in name:
        return "connection"
    return name


class LagMeter:
    """How late the event loop runs a callback scheduled every ``interval`` seconds.

    A loop that is free runs it within a millisecond; a loop held by a blocking
    call runs it when the call returns, late by about the call's length.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.lags: list[float] = []
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._due = loop.time() + self.interval
        self._handle = loop.call_at(self._due, self._beat)

    def _beat(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.lags.append(max(0.0, now - self._due))
        self._due = now + self.interval
        self._handle = loop.call_at(self._due, self._beat)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    @property
    def max(self) -> float:
        return max(self.lags, default=0.0)

    def p99(self) -> float:
        return percentile(sorted(self.lags), 99) or 0.0


# --------------------------------------------------------------------------------------
# Talking to the parent
# --------------------------------------------------------------------------------------


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class Tally:
    """Counts a run's outcomes (from the loop or from threads) and reports progress."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self.kinds: dict[str, int] = {}
        self.latencies: list[float] = []
        self._lock = threading.Lock()

    def ok(self, latency: float) -> None:
        with self._lock:
            self.done += 1
            self.latencies.append(latency)

    def fail(self, kind: str) -> None:
        with self._lock:
            self.done += 1
            self.failed += 1
            self.kinds[kind] = self.kinds.get(kind, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        return {"done": self.done, "failed": self.failed, "total": self.total}

    async def report_until_cancelled(self, every: float = 0.1) -> None:
        while True:
            _emit({"progress": self.snapshot()})
            await asyncio.sleep(every)

    def summary(self, wall: float) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        ok = len(ordered)
        p50, p99 = percentile(ordered, 50), percentile(ordered, 99)
        return {
            "wall_s": wall,
            "ok": ok,
            "failed": self.failed,
            "failures": dict(sorted(self.kinds.items(), key=lambda kv: -kv[1])),
            "ok_per_s": ok / wall if wall > 0 else 0.0,
            "p50_ms": None if p50 is None else p50 * 1e3,
            "p99_ms": None if p99 is None else p99 * 1e3,
        }


@contextlib.asynccontextmanager
async def _reporting(tally: Tally) -> Any:
    reporter = asyncio.ensure_future(tally.report_until_cancelled())
    try:
        yield
    finally:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
        _emit({"progress": tally.snapshot()})


# --------------------------------------------------------------------------------------
# Strategies by name
# --------------------------------------------------------------------------------------


async def auto_unavailable() -> str | None:
    """``None`` if ``corral.map(..., limit="auto")`` runs here, else corral's reason.

    Adaptive concurrency is a newer feature than the rest of corral: a build
    without it rejects ``limit="auto"`` with a ``ValueError`` naming it.
    """
    import corral

    auto: Any = "auto"
    try:
        async with corral.map(noop, (), limit=auto) as results:
            async for _ in results:
                pass
    except (ValueError, TypeError) as exc:
        if "auto" not in str(exc):
            raise
        return str(exc)
    return None


def _runner(strategy: str) -> Runner:
    """The strategy ``strategy``: a name from STRATEGIES, or ``corral`` (gather, any limit)."""
    if strategy == "corral":

        async def corral_gather(fn: Fn, items: Iterable[Any], limit: Any) -> list[Any]:
            import corral

            return await corral.gather(fn, items, limit=limit)

        return corral_gather
    from corral.lab import strategies

    return strategies.STRATEGIES[strategy].run


# --------------------------------------------------------------------------------------
# Measures
# --------------------------------------------------------------------------------------


async def measure_fanout(spec: Spec) -> Result:
    """One strategy over ``range(n)`` with a local workload, ``repeat`` times (median wall)."""
    n: int = spec["n"]
    limit = spec.get("limit")
    if limit == "auto" and (why := await auto_unavailable()) is not None:
        return {"status": f"unavailable: {why}"}
    run = _runner(spec["strategy"])
    await run(noop, range(3), limit)  # warm-up: lazy imports, first-call paths
    walls: list[float] = []
    cpu_seconds = 0.0  # process CPU time over all runs: > wall means > 1 core at work
    peak_mb = peak_pending = None
    for _ in range(spec.get("repeat", 1)):
        fn: Fn = (
            WORKLOADS[spec["workload"]]
            if spec["workload"] != "pending"
            else Pending(spec.get("sleep_s", 0.05))
        )
        before = _start_memory()
        cpu_start = time.process_time()
        start = time.perf_counter()
        results = await run(fn, range(n), limit)
        walls.append(time.perf_counter() - start)
        cpu_seconds += time.process_time() - cpu_start
        if peak_mb is None:  # the first run only: later ones reuse freed memory
            peak_mb = max(0.0, peak_rss_mb() - before)
            peak_pending = fn.peak if isinstance(fn, Pending) else None
        if len(results) != n:
            return {"status": f"error: {len(results)} results for {n} items"}
        del results
    wall = statistics.median(walls)
    return {
        "status": "ok",
        "wall_s": wall,
        "walls_s": walls,
        "us_per_item": wall / n * 1e6,
        "peak_mb": peak_mb,
        "peak_pending": peak_pending,
        "threads": threading.active_count(),
        # CPU-seconds per second of wall time: 1.0 is one core busy throughout.
        "cores_busy": cpu_seconds / sum(walls) if sum(walls) > 0 else 0.0,
        # "cpus" in the spec pins the run; this is how many it could use.
        "cpus_allowed": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
    }


def _aiohttp_session(timeout: float) -> Any:
    import aiohttp

    # limit=0: no cap on connections, so that each strategy's own concurrency
    # (10,000 at once for plain gather) is what reaches the server. aiohttp's
    # default of 100 would quietly act as a limit for every strategy.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
        timeout=aiohttp.ClientTimeout(total=timeout),
    )


def _httpx_client(timeout: float) -> Any:
    import httpx

    # httpx's default pool (100 connections, 20 kept alive) as most code uses
    # it: it caps every strategy at 100 in flight, and on this workload it is
    # faster than an unbounded pool, whose bookkeeping grows with its size.
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout))


def _fetcher(client: str, session: Any, url: str) -> Fn:
    """GET ``{url}/item/{i}``; raise the client's HTTP error on a 4xx/5xx (with its headers)."""
    if client == "aiohttp":

        async def fetch_aiohttp(i: int) -> int:
            async with session.get(f"{url}/item/{i}") as response:
                await response.read()
                response.raise_for_status()
            return i

        return fetch_aiohttp

    async def fetch_httpx(i: int) -> int:
        response = await session.get(f"{url}/item/{i}")
        response.raise_for_status()
        return i

    return fetch_httpx


async def measure_http(spec: Spec) -> Result:
    """``n`` GETs to ``url`` with one strategy; failures counted, not raised."""
    n: int = spec["n"]
    url: str = spec["url"]
    strategy: str = spec["strategy"]
    limit = spec.get("limit")
    retries: int = spec.get("retries", 0)
    client: str = spec.get("client", "aiohttp")
    if limit == "auto" and (why := await auto_unavailable()) is not None:
        return {"status": f"unavailable: {why}"}
    open_files = raise_open_files_limit()
    make = _aiohttp_session if client == "aiohttp" else _httpx_client
    tally = Tally(n)
    retried = 0
    async with make(spec.get("timeout", 60.0)) as session:
        fetch = _fetcher(client, session, url)
        await fetch(-1)  # warm-up: one connection, the client's lazy imports
        # perf_counter: uvloop's loop.time() ticks in whole milliseconds.
        clock = time.perf_counter
        before = _start_memory()
        start = time.perf_counter()
        async with _reporting(tally):
            if strategy == "corral":
                retried = await _corral_http(fetch, n, limit, retries, tally, clock)
            else:
                await _baseline_http(fetch, n, limit, strategy, tally, clock)
        wall = time.perf_counter() - start
        peak = max(0.0, peak_rss_mb() - before)
    return {
        "status": "ok",
        **tally.summary(wall),
        "retried": retried,
        "peak_mb": peak,
        "open_files_limit": open_files,
    }


async def _baseline_http(
    fetch: Fn, n: int, limit: Any, strategy: str, tally: Tally, clock: Callable[[], float]
) -> None:
    async def attempt(i: int) -> int | None:
        # The baselines as people write them: one try, the failure kept as data.
        began = clock()
        try:
            await fetch(i)
        except Exception as exc:
            tally.fail(failure_kind(exc))
            return None
        tally.ok(clock() - began)
        return i

    await _runner(strategy)(attempt, range(n), limit)


async def _corral_http(
    fetch: Fn, n: int, limit: Any, retries: int, tally: Tally, clock: Callable[[], float]
) -> int:
    import corral

    first_start: dict[int, float] = {}

    async def call(i: int) -> Any:
        first_start.setdefault(i, clock())  # retries keep the first attempt's start
        return await fetch(i)

    stream: Any = corral.map(
        call, range(n), limit=limit, retries=retries, return_exceptions=True, ordered=False
    )
    async with stream as results:
        async for outcome in results:
            if isinstance(outcome, BaseException):
                tally.fail(failure_kind(outcome))
            else:
                tally.ok(clock() - first_start.pop(outcome))
        retried: int = results.stats.retried
    return retried


async def measure_http_threads(spec: Spec) -> Result:
    """``n`` blocking GETs from ``threads`` threads, each with its own keep-alive connection."""
    import http.client
    import urllib.parse
    from concurrent.futures import ThreadPoolExecutor

    n: int = spec["n"]
    threads: int = spec["threads"]
    parsed = urllib.parse.urlsplit(spec["url"])
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    timeout: float = spec.get("timeout", 60.0)
    raise_open_files_limit()
    tally = Tally(n)
    local = threading.local()

    def get(i: int) -> None:
        connection = getattr(local, "connection", None)
        if connection is None:
            connection = local.connection = http.client.HTTPConnection(host, port, timeout=timeout)
        began = time.perf_counter()
        try:
            connection.request("GET", f"/item/{i}")
            response = connection.getresponse()
            response.read()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            local.connection = None
            tally.fail(failure_kind(exc))
            return
        if response.status >= 400:
            tally.fail(str(response.status))
        else:
            tally.ok(time.perf_counter() - began)

    def run_all() -> None:
        with ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(get, range(n)):
                pass

    before = _start_memory()
    start = time.perf_counter()
    async with _reporting(tally):
        await asyncio.to_thread(run_all)
    wall = time.perf_counter() - start
    return {
        "status": "ok",
        **tally.summary(wall),
        "retried": 0,
        "peak_mb": max(0.0, peak_rss_mb() - before),
    }


async def measure_sweep(spec: Spec) -> Result:
    """Throughput, latency and errors of ``corral.map`` at each limit, against ``url``."""
    from corral.lab import tune

    url: str = spec["url"]
    async with _aiohttp_session(spec.get("timeout", 30.0)) as session:
        raise_open_files_limit()
        fetch = _fetcher("aiohttp", session, url)
        await fetch(-1)

        def progress(trial: tune.Trial) -> None:
            _emit({"progress": {"limit": trial.limit, "ok_per_s": trial.throughput}})

        trials = await tune.sweep(
            fetch,
            range(10**9),
            limits=spec["limits"],
            seconds=spec["seconds"],
            stop_early=False,
            on_trial=progress,
        )
    return {"status": "ok", "trials": [trial.as_dict() for trial in trials]}


def _calibrate(work_ms: float) -> tuple[int, float]:
    """Iterations of :func:`cpu_work` that take about ``work_ms``, and the measured ms."""
    probe = 20_000
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        cpu_work(probe)
        best = min(best, time.perf_counter() - start)
    iterations = max(1, round(probe * work_ms / 1e3 / best))
    start = time.perf_counter()
    cpu_work(iterations)
    return iterations, (time.perf_counter() - start) * 1e3


async def _started_process_pool() -> Any:
    """A process pool with every worker up, as a long-lived pool beside a loop would be."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    workers = os.cpu_count() or 1
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))
    loop = asyncio.get_running_loop()
    # One call per worker at once: the pool starts them all.
    await asyncio.gather(*(loop.run_in_executor(pool, cpu_work, 1) for _ in range(workers)))
    return pool


async def measure_cpu(spec: Spec) -> Result:
    """``n`` CPU-bound calls on the loop, in threads or in processes; the loop's lag meanwhile.

    The process pool is started and warmed before the clock starts: the seed's
    advice is a pool living beside the loop, paid for once. Its start-up time
    is reported on its own (``pool_start_s``).
    """
    import corral

    mode: str = spec["mode"]
    n: int = spec["n"]
    limit: int = spec.get("limit", 64)
    if mode not in ("loop", "thread", "process"):
        raise ValueError(f"mode must be 'loop', 'thread' or 'process'; got mode={mode!r}")
    iterations, item_ms = _calibrate(spec["work_ms"])
    items = [iterations] * n
    pool = None
    pool_start_s = None
    if mode == "process":
        began = time.perf_counter()
        pool = await _started_process_pool()
        pool_start_s = time.perf_counter() - began
    meter = LagMeter(0.005)
    meter.start()
    start = time.perf_counter()
    try:
        if mode == "loop":
            await corral.gather(_cpu_on_the_loop, items, limit=limit)
        elif mode == "thread":
            await corral.gather(cpu_work, items, limit=limit, executor="thread")
        else:
            await corral.gather(cpu_work, items, limit=limit, executor=pool)
        wall = time.perf_counter() - start
    finally:
        meter.stop()
        if pool is not None:
            pool.shutdown(wait=True)
    return {
        "status": "ok",
        "wall_s": wall,
        "items_per_s": n / wall,
        "item_ms": item_ms,
        "max_lag_ms": meter.max * 1e3,
        "p99_lag_ms": meter.p99() * 1e3,
        "pool_start_s": pool_start_s,
        "cpus": os.cpu_count(),
    }


def block_the_loop(seconds: float) -> None:
    """A blocking call made from a coroutine: nothing else runs until it returns."""
    time.sleep(seconds)


async def _blocking_coroutine(seconds: float) -> None:
    block_the_loop(seconds)


async def _offloaded_coroutine(seconds: float) -> None:
    await asyncio.to_thread(block_the_loop, seconds)


def _watch_loop() -> Callable[..., Any] | None:
    """corral's loop watchdog, if this build has it."""
    import corral

    watch = getattr(corral, "watch_loop", None)
    if watch is None:
        try:
            from corral._monitor import watch_loop as watch
        except ImportError:
            return None
    return watch


async def measure_blocking(spec: Spec) -> Result:
    """The loop's lag while a coroutine blocks for each duration, and while it offloads."""
    durations: list[float] = spec["durations"]
    watch_factory = _watch_loop()
    threshold = max(0.02, min(durations) / 2)
    rows: list[dict[str, Any]] = []
    watch_reports: list[dict[str, Any]] = []
    for seconds in durations:
        for how, coroutine in (
            ("blocking", _blocking_coroutine),
            ("to_thread", _offloaded_coroutine),
        ):
            meter = LagMeter(0.002)
            watch = watch_factory(threshold=threshold) if watch_factory is not None else None
            async with contextlib.AsyncExitStack() as stack:
                if watch is not None:
                    await stack.enter_async_context(watch)
                meter.start()
                await asyncio.sleep(0.03)  # a few quiet beats: the baseline lag
                meter.lags.clear()
                await coroutine(seconds)
                await asyncio.sleep(0.03)  # let the first late beat land
                meter.stop()
            blamed = None
            if watch is not None:
                for report in watch.reports:
                    blamed = blamed or report.function
                    watch_reports.append(
                        {
                            "how": how,
                            "seconds": seconds,
                            "function": report.function,
                            "lineno": report.lineno,
                            "duration_s": report.duration,
                        }
                    )
            rows.append({"how": how, "seconds": seconds, "max_lag_s": meter.max, "blamed": blamed})
    return {
        "status": "ok",
        "rows": rows,
        "watchdog": watch_factory is not None,
        "threshold_s": threshold,
        "reports": watch_reports,
    }


async def measure_llm(spec: Spec) -> Result:
    """A strategy against the mock LLM API (see :mod:`corral.lab.llm_bench`)."""
    from corral.lab.llm_bench import measure_llm as measure

    return await measure(spec)


MEASURES: dict[str, Callable[[Spec], Coroutine[Any, Any, Result]]] = {
    "fanout": measure_fanout,
    "http": measure_http,
    "http_threads": measure_http_threads,
    "sweep": measure_sweep,
    "cpu": measure_cpu,
    "blocking": measure_blocking,
    "llm": measure_llm,
}


# --------------------------------------------------------------------------------------
# The child process
# --------------------------------------------------------------------------------------


def _run_one(spec: Spec) -> Result:
    measure = MEASURES.get(spec.get("measure", ""))
    if measure is None:
        return {"status": f"error: no measure named {spec.get('measure')!r}"}
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if spec.get("loop", "asyncio") == "uvloop":
        try:
            import uvloop
        except ImportError:
            return {"status": "unavailable: uvloop is not installed (pip install uvloop)"}
        factory = uvloop.new_event_loop
    affinity = None
    cpus = spec.get("cpus")
    if cpus is not None and hasattr(os, "sched_setaffinity"):
        affinity = os.sched_getaffinity(0)
        os.sched_setaffinity(0, set(cpus))
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(measure(spec))
    except Exception as exc:
        return {"status": f"error: {type(exc).__name__}: {exc}"[:400]}
    finally:
        if affinity is not None:
            os.sched_setaffinity(0, affinity)


def child_main() -> None:
    """Entry point of a measuring child: specs (a JSON list) on stdin, JSON lines out."""
    specs: list[Spec] = json.loads(sys.stdin.read())
    for spec in specs:
        _emit({"result": _run_one(spec)})
