"""``corral bench``: the seeds' experiments, re-run on this machine, with a verdict per claim.

The posts corral comes from (``seeds/``) time a few scripts by hand and draw
rules of thumb from them: batch your coroutines, use a queue of 10 workers,
start with as many tasks as CPU cores, too many tasks raise MemoryError. This
command runs those experiments properly (each measurement in a fresh process,
several strategies side by side, on the default loop and uvloop, against a
real HTTP server with a capacity) and lets :mod:`corral.lab.report` decide,
from this run's numbers only, which claims hold::

    corral bench --quick                    # about a minute
    corral bench                            # the full run, up to 15 minutes
    corral bench --only http,capacity --out /tmp/bench

Parts (``--only`` takes their names):

``overhead``
    Seed 002's tiny tasks (``await asyncio.sleep(0)``) through every strategy,
    on asyncio and uvloop; the cost per item as concurrency grows; the same
    run pinned to one CPU and on all of them.
``seed001``
    Seed 001's ``3 x sleep(0.1)`` at 10,000 and 100,000 coroutines: all at
    once, and in five batches.
``http``
    Real GET requests to :func:`corral.lab.serve` (capacity 64, 10 ms +/- 50%,
    256 waiting, then 429): a sweep of the limit, every strategy on the same
    job (aiohttp, and httpx as seed 001 used), and a thread pool of blocking
    requests.
``capacity``
    A target with a hard cap, like seed 001's PostgreSQL refusing connection
    101: capacity 100, nobody waiting, 503 beyond. 1,000 calls, as in seed 001.
``cpu``
    CPU-bound calls (5 ms and 0.05 ms each) on the loop, in threads and in
    processes, with the loop's lag measured meanwhile (seed 003).
``memory``
    Memory against the number of pending tasks, all at once (``gather``) or
    bounded (corral), up to 1,000,000 where memory allows.
``blocking``
    How long the loop stalls while one coroutine makes a blocking call, and
    while it offloads the same call to a thread (seed 003).
``llm``
    The same prompts (5,000; 1,000 with ``--quick``) to a mock LLM API with
    hidden per-minute limits on requests, input and output tokens, through the
    ``openai`` SDK: semaphore + gather + tenacity, the cookbook processor's
    pause after a 429, the SDK's own retries, and corral (see
    :mod:`corral.lab.llm_bench`). Needs the ``llm`` extra.

Output, in ``--out`` (default ``./corral-bench/``): ``results.json`` (every
measurement with its spec), PNG plots, and ``report.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.lab.console import Board, Display
from corral.lab.runner import (
    Result,
    Spec,
    prepare_out,
    raise_open_files_limit,
    run_main,
    run_specs,
    write_text_whole,
)

__all__ = ["FULL", "PARTS", "QUICK", "Profile", "bench_command", "run_bench"]

PARTS: dict[str, str] = {
    "overhead": "tiny tasks: cost per item by strategy, loop, concurrency, CPUs",
    "seed001": "seed 001: 3 x sleep(0.1), all at once vs five batches",
    "http": "real HTTP: limit sweep, strategies, httpx, threads",
    "capacity": "a hard capacity (like Postgres' 100 connections)",
    "cpu": "CPU-bound calls: loop, threads, processes",
    "memory": "memory per pending task",
    "blocking": "a blocking call on the loop",
    "llm": "a rate-limited LLM API: tenacity, cookbook, SDK retries, corral",
}

#: The HTTP part's API: like the demo's, with service times varying +/- 50%.
HTTP_SERVER: dict[str, Any] = {
    "capacity": 64,
    "service_ms": 10.0,
    "queue": 256,
    "jitter": 0.5,
    "retry_after": 1.0,
}
#: The capacity part's API: a hard cap of 100 and no waiting room, like a database.
CAPACITY_SERVER: dict[str, Any] = {
    "capacity": 100,
    "service_ms": 20.0,
    "queue": 0,
    "status": 503,
    "jitter": 0.5,
    "retry_after": 1.0,
}


#: The capacity part sends at least this many times what its target holds at once.
OVERLOAD = 3


def _holds(server: dict[str, Any]) -> int:
    """Calls ``server`` takes at once without refusing any: in service plus waiting."""
    return int(server["capacity"]) + int(server.get("queue", 0))


@dataclass(frozen=True)
class Profile:
    """The sizes of one kind of run."""

    name: str
    repeat: int  #: timing runs per measurement (the median is kept)
    tiny_n: int  #: seed 002's tiny tasks
    seed001_sizes: tuple[int, ...]
    http_n: int
    trial_s: float  #: seconds per limit in the HTTP sweep
    sweep_max: int
    httpx_n: int
    capacity_n: int
    cpu_heavy_n: int
    cpu_light_n: int
    memory_sizes: tuple[int, ...]
    semaphore_memory_max: int  #: Task-per-item + Semaphore only up to this size
    blocking_s: tuple[float, ...]
    timeout: float  #: seconds for one child process
    llm_n: int = 5_000  #: prompts sent to the mock LLM API

    def scaled(self, factor: float) -> Profile:
        """Every size and the trial time times ``factor`` (minimums keep each run meaningful)."""
        if factor == 1.0:
            return self

        def n(value: int, least: int = 20) -> int:
            return max(least, round(value * factor))

        return dataclasses.replace(
            self,
            name=f"{self.name} x{factor:g}",
            tiny_n=n(self.tiny_n, 200),
            seed001_sizes=tuple(n(s, 50) for s in self.seed001_sizes),
            http_n=n(self.http_n, 50),
            trial_s=max(0.05, self.trial_s * factor),
            sweep_max=max(8, round(self.sweep_max * min(1.0, factor * 4))),
            httpx_n=n(self.httpx_n),
            # Claim 6 is about more calls at once than the target holds: fewer
            # would only measure a target that is never overloaded.
            capacity_n=n(self.capacity_n, OVERLOAD * _holds(CAPACITY_SERVER)),
            cpu_heavy_n=n(self.cpu_heavy_n, 4),
            cpu_light_n=n(self.cpu_light_n, 50),
            memory_sizes=tuple(n(s, 100) for s in self.memory_sizes),
            semaphore_memory_max=n(self.semaphore_memory_max, 100),
            blocking_s=tuple(s for s in self.blocking_s if s <= 0.2) or (0.05,),
            llm_n=n(self.llm_n, 100),
        )


FULL = Profile(
    name="full",
    repeat=3,
    tiny_n=100_000,
    seed001_sizes=(10_000, 100_000),
    http_n=10_000,
    trial_s=1.5,
    sweep_max=1024,
    httpx_n=2_000,
    capacity_n=1_000,
    cpu_heavy_n=400,
    cpu_light_n=40_000,
    memory_sizes=(10_000, 100_000, 1_000_000),
    semaphore_memory_max=100_000,
    blocking_s=(0.001, 0.01, 0.1, 0.5),
    timeout=600.0,
)
QUICK = Profile(
    name="quick",
    repeat=1,
    tiny_n=20_000,
    seed001_sizes=(10_000, 100_000),
    http_n=2_000,
    trial_s=0.4,
    sweep_max=1024,
    httpx_n=300,
    capacity_n=1_000,
    cpu_heavy_n=100,
    cpu_light_n=5_000,
    memory_sizes=(10_000, 100_000),
    semaphore_memory_max=10_000,
    blocking_s=(0.01, 0.1, 0.3),
    timeout=180.0,
    llm_n=1_000,
)


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def mem_available_mb() -> float | None:
    """MemAvailable from /proc/meminfo (Linux), in MB; ``None`` elsewhere."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


# --------------------------------------------------------------------------------------
# Running specs with progress
# --------------------------------------------------------------------------------------


class Bench:
    """One run's state: the profile, the progress board, the records so far."""

    def __init__(self, profile: Profile, board: Board, display: Display) -> None:
        self.profile = profile
        self.board = board
        self.display = display
        self.records: list[dict[str, Any]] = []

    async def run(
        self,
        part: str,
        case: str,
        specs: list[Spec],
        *,
        fresh: bool = False,
        after: Callable[[Spec, Result], dict[str, Any]] | None = None,
        before: Callable[[Spec], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Run ``specs`` (one child, or one child each when ``fresh``), record and return them.

        ``before(spec)`` runs in this process before each spec starts (fresh
        only), ``after(spec, result)`` returns extra fields to record with it.
        """
        task = self.board.add(f"{part}: {case}", len(specs))
        done = 0

        def show(index: int, progress: dict[str, Any]) -> None:
            spec = specs[min(done + index, len(specs) - 1)]
            detail = ""
            if "done" in progress:
                detail = f" {progress['done']:,}/{progress.get('total', 0):,}"
            elif "limit" in progress:
                detail = f" limit {progress['limit']}"
            self.board.update(task, done + index, f"{spec['label']}{detail}")

        results: list[Result] = []
        if fresh:
            for spec in specs:
                if before is not None:
                    before(spec)
                results += await run_specs([spec], timeout=self.profile.timeout, on_progress=show)
                done += 1
                extra = after(spec, results[-1]) if after is not None else {}
                results[-1] = {**results[-1], **extra}
                self.board.update(task, done, spec["label"])
        else:
            results = await run_specs(specs, timeout=self.profile.timeout * 2, on_progress=show)
        records = [
            {"part": part, "case": case, **spec, **result}
            for spec, result in zip(specs, results, strict=True)
        ]
        self.records += records
        failed = [r for r in records if r["status"] != "ok"]
        note = f"{len(specs) - len(failed)}/{len(specs)} ok"
        if failed:
            note += f"; {failed[0]['label']}: {failed[0]['status'][:60]}"
        self.board.finish(task, note)
        return records


def _spec(label: str, measure: str, **fields: Any) -> Spec:
    return {"label": label, "measure": measure, **fields}


# --------------------------------------------------------------------------------------
# The parts
# --------------------------------------------------------------------------------------

#: Strategies on seed 002's tiny tasks: (label, strategy, limit).
TINY_STRATEGIES: list[tuple[str, str, int | str | None]] = [
    ("gather, all at once", "gather_all", None),
    ("gather, batches of 1,000", "gather_batched", 1000),
    ("queue + 10 workers", "queue_workers", 10),
    ("Task per item + Semaphore(1,000)", "semaphore_tasks", 1000),
    ("1,000 workers, shared iterator", "iterator_workers", 1000),
    ("corral limit=1,000", "corral", 1000),
    ("corral auto", "corral", "auto"),
]


async def part_overhead(bench: Bench) -> None:
    p = bench.profile
    n = p.tiny_n
    loops = ["asyncio", "uvloop"]
    specs = [
        _spec(
            f"{label} [{loop}]",
            "fanout",
            strategy=strategy,
            limit=limit,
            workload="sleep0",
            n=n,
            loop=loop,
            repeat=p.repeat,
        )
        for loop in loops
        for label, strategy, limit in TINY_STRATEGIES
    ]
    await bench.run("overhead", "strategies", specs)
    limits = sorted({limit for limit in (1, 10, 100, 1_000, 10_000, n) if limit <= n})
    specs = [
        _spec(
            f"corral limit={limit:,}",
            "fanout",
            strategy="corral",
            limit=limit,
            workload="sleep0",
            n=n,
            loop="asyncio",
            repeat=p.repeat,
        )
        for limit in limits
    ]
    specs.append(
        _spec(
            f"gather, {n:,} tasks",
            "fanout",
            strategy="gather_all",
            limit=None,
            workload="sleep0",
            n=n,
            loop="asyncio",
            repeat=p.repeat,
            concurrency=n,
        )
    )
    for spec in specs:
        spec.setdefault("concurrency", spec["limit"])
    await bench.run("overhead", "concurrency", specs)
    if cpu_count() > 1 and hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        specs = [
            _spec(
                label,
                "fanout",
                strategy="corral",
                limit=1000,
                workload="sleep0",
                n=n,
                loop="asyncio",
                repeat=max(3, p.repeat),
                cpus=chosen,
            )
            for label, chosen in (("1 CPU", cpus[:1]), (f"all {len(cpus)} CPUs", cpus))
        ]
        await bench.run("overhead", "cores", specs)


async def part_seed001(bench: Bench) -> None:
    p = bench.profile
    specs = []
    for n in p.seed001_sizes:
        specs.append(
            _spec(
                f"gather, {n:,} at once",
                "fanout",
                way="gather, all at once",
                strategy="gather_all",
                limit=None,
                workload="sleep3x100ms",
                n=n,
                repeat=p.repeat,
            )
        )
        specs.append(
            _spec(
                f"five batches of {n // 5:,}",
                "fanout",
                way="gather, five batches",
                strategy="gather_five_batches",
                limit=None,
                workload="sleep3x100ms",
                n=n,
                repeat=p.repeat,
            )
        )
    for spec in specs:
        spec["loop"] = "asyncio"
    await bench.run("seed001", "sleeps", specs)


@contextlib.asynccontextmanager
async def _server(settings: dict[str, Any]) -> Any:
    from corral.lab.server import TargetServer

    async with TargetServer(**settings) as server:
        yield server


def _server_fields(server: Any) -> Callable[[Spec, Result], dict[str, Any]]:
    def after(spec: Spec, result: Result) -> dict[str, Any]:
        stats = server.stats()
        return {
            "server_peak_concurrency": stats.peak_concurrency,
            "server_rejected": stats.rejected,
        }

    return after


def _resetting(server: Any) -> Callable[[Spec], None]:
    def before(spec: Spec) -> None:
        server.reset()

    return before


#: Strategies on the HTTP job: (label, strategy, limit, retries).
HTTP_STRATEGIES: list[tuple[str, str, int | str | None, int]] = [
    ("gather, all at once", "gather_all", None, 0),
    ("gather, batches of 1,000", "gather_batched", 1000, 0),
    ("gather, five batches", "gather_five_batches", None, 0),
    ("queue + 10 workers", "queue_workers", 10, 0),
    ("Task per item + Semaphore(64)", "semaphore_tasks", 64, 0),
    ("64 workers, shared iterator", "iterator_workers", 64, 0),
    ("corral limit=64", "corral", 64, 0),
    ("corral auto, retries=3", "corral", "auto", 3),
]


async def part_http(bench: Bench) -> None:
    p = bench.profile
    cores = cpu_count()
    async with _server(HTTP_SERVER) as server:
        url = server.url
        limits = sorted(set(_geometric(p.sweep_max)) | {cores})
        await bench.run(
            "http",
            "sweep",
            [_spec("corral limit sweep", "sweep", url=url, limits=limits, seconds=p.trial_s)],
        )
        specs = [
            _spec(
                label,
                "http",
                strategy=strategy,
                limit=limit,
                retries=retries,
                n=p.http_n,
                url=url,
                client="aiohttp",
            )
            for label, strategy, limit, retries in HTTP_STRATEGIES
        ]
        specs.append(
            _spec(
                "64 threads, blocking http.client", "http_threads", threads=64, n=p.http_n, url=url
            )
        )
        await bench.run(
            "http",
            "strategies",
            specs,
            fresh=True,
            before=_resetting(server),
            after=_server_fields(server),
        )
        specs = [
            _spec(
                f"httpx: {label}",
                "http",
                strategy=strategy,
                limit=limit,
                retries=0,
                n=p.httpx_n,
                url=url,
                client="httpx",
            )
            for label, strategy, limit in (
                ("gather, all at once", "gather_all", None),
                ("gather, five batches", "gather_five_batches", None),
                ("corral limit=64", "corral", 64),
            )
        ]
        await bench.run(
            "http",
            "httpx",
            specs,
            fresh=True,
            before=_resetting(server),
            after=_server_fields(server),
        )


def _geometric(top: int) -> list[int]:
    from corral.lab.tune import geometric_limits

    return geometric_limits(top)


async def part_capacity(bench: Bench) -> None:
    p = bench.profile
    n = p.capacity_n
    cap = CAPACITY_SERVER["capacity"]
    ways: list[tuple[str, str, int | str | None, int]] = [
        (f"gather, {n:,} at once", "gather_all", None, 0),
        (f"five batches of {n // 5:,}", "gather_five_batches", None, 0),
        (f"batches of {cap}", "gather_batched", cap, 0),
        (f"corral limit={cap - 10}", "corral", cap - 10, 0),
        ("corral auto, retries=3", "corral", "auto", 3),
        (f"corral limit={n:,}, retries=3", "corral", n, 3),
    ]
    async with _server(CAPACITY_SERVER) as server:
        specs = [
            _spec(
                label,
                "http",
                strategy=strategy,
                limit=limit,
                retries=retries,
                n=n,
                url=server.url,
                client="aiohttp",
            )
            for label, strategy, limit, retries in ways
        ]
        await bench.run(
            "capacity",
            "hard cap",
            specs,
            fresh=True,
            before=_resetting(server),
            after=_server_fields(server),
        )


async def part_cpu(bench: Bench) -> None:
    p = bench.profile
    specs = [
        _spec(f"{work_ms:g} ms items: {where}", "cpu", mode=mode, n=n, work_ms=work_ms, limit=64)
        for work_ms, n in ((5.0, p.cpu_heavy_n), (0.05, p.cpu_light_n))
        for where, mode in (
            ("on the loop", "loop"),
            ("threads", "thread"),
            ("process pool", "process"),
        )
    ]
    await bench.run("cpu", "modes", specs)


async def part_memory(bench: Bench) -> None:
    p = bench.profile
    available = mem_available_mb()
    for n in sorted(p.memory_sizes):
        ways: list[tuple[str, str, int | None]] = [
            ("gather, all pending at once", "gather_all", None),
            ("corral limit=1,000", "corral", 1000),
        ]
        if n <= p.semaphore_memory_max:
            ways.append(("Task per item + Semaphore(1,000)", "semaphore_tasks", 1000))
        previous = [
            r
            for r in bench.records
            if r["part"] == "memory" and r["status"] == "ok" and r["strategy"] == "gather_all"
        ]
        if previous and available is not None:
            last = max(previous, key=lambda r: r["n"])
            needed = last["peak_mb"] / last["n"] * n * 1.5
            if needed > available * 0.5:
                bench.display.print(
                    f"memory: skipping {n:,} tasks: they would need about {needed:,.0f} MB, "
                    f"over half of the {available:,.0f} MB available"
                )
                continue
        specs = [
            _spec(
                f"{label}, {n:,}",
                "fanout",
                way=label,
                strategy=strategy,
                limit=limit,
                workload="pending",
                sleep_s=0.01,
                n=n,
                loop="asyncio",
                repeat=1,
            )
            for label, strategy, limit in ways
        ]
        await bench.run("memory", f"{n:,} tasks", specs, fresh=True)


async def part_blocking(bench: Bench) -> None:
    durations = list(bench.profile.blocking_s)
    await bench.run(
        "blocking", "stalls", [_spec("time.sleep on the loop", "blocking", durations=durations)]
    )


async def part_llm(bench: Bench) -> None:
    from corral.lab.llm_bench import part_llm as run_part

    await run_part(bench)


PART_RUNNERS: dict[str, Callable[[Bench], Any]] = {
    "overhead": part_overhead,
    "seed001": part_seed001,
    "http": part_http,
    "capacity": part_capacity,
    "cpu": part_cpu,
    "memory": part_memory,
    "blocking": part_blocking,
    "llm": part_llm,
}


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def _meta(profile: Profile, parts: list[str]) -> dict[str, Any]:
    import corral

    loop_knobs = sorted(
        {
            name
            for name in dir(asyncio.get_running_loop()) + dir(asyncio.SelectorEventLoop)
            if "max" in name.lower() or "limit" in name.lower()
        }
    )
    try:
        uvloop_version: str | None = importlib.metadata.version("uvloop")
    except importlib.metadata.PackageNotFoundError:
        uvloop_version = None
    return {
        "corral": corral.__version__,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": cpu_count(),
        "mem_available_mb": mem_available_mb(),
        "uvloop": uvloop_version,
        "profile": dataclasses.asdict(profile),
        "parts": parts,
        "loop_limit_attributes": loop_knobs,
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "http_server": HTTP_SERVER,
        "capacity_server": CAPACITY_SERVER,
    }


async def run_bench(parts: list[str], profile: Profile, display: Display) -> dict[str, Any]:
    """Run ``parts`` with ``profile``'s sizes; every record, and facts about the machine."""
    from corral.lab.workloads import auto_unavailable

    raise_open_files_limit()
    meta = _meta(profile, parts)
    meta["auto_unavailable"] = await auto_unavailable()
    watch = None
    try:
        from corral.lab.workloads import _watch_loop

        watch = _watch_loop()
    except ImportError:  # pragma: no cover - same package
        pass
    meta["watch_loop"] = watch is not None
    started = time.perf_counter()
    with display.board() as board:
        bench = Bench(profile, board, display)
        part_seconds: dict[str, float] = {}
        for name in parts:
            began = time.perf_counter()
            await PART_RUNNERS[name](bench)
            part_seconds[name] = round(time.perf_counter() - began, 1)
    meta["part_seconds"] = part_seconds
    meta["seconds"] = time.perf_counter() - started
    meta["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {"meta": meta, "records": bench.records}


def bench_command(
    out: Path, *, quick: bool = False, only: list[str] | None = None, scale: float = 1.0
) -> int:
    """Run ``corral bench``; write results.json, the plots and report.md into ``out``."""
    from corral.lab import report

    problem = prepare_out(out)
    if problem is not None:
        print(f"corral bench: error: {problem}", file=sys.stderr)
        return 2
    display = Display()
    profile = (QUICK if quick else FULL).scaled(scale)
    parts = [name for name in PARTS if only is None or name in only]
    display.print(
        f"corral bench ({profile.name}): {', '.join(parts)} on {cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}; each measurement in a fresh process."
    )
    try:
        results = run_main(run_bench(parts, profile, display))
    except KeyboardInterrupt:
        # run_main cancelled the run: the children were killed, the servers stopped.
        print("corral bench: interrupted; nothing written", file=sys.stderr)
        return 130
    verdicts = report.judge_all(results)
    unwritten: OSError | None = None
    plots: list[str] = []
    try:
        # --out was checked before the run, but it can vanish or fill up since.
        out.mkdir(parents=True, exist_ok=True)
        write_text_whole(out / "results.json", json.dumps(results, indent=2) + "\n")
        plots = report.draw_plots(results, out)
        write_text_whole(out / "report.md", report.markdown(results, verdicts, plots))
    except OSError as exc:
        unwritten = exc
    display.print()
    report.print_summary(display, results, verdicts)
    display.print()
    if unwritten is not None:
        # The summary above is all that is left of the run: say so, and fail.
        print(
            f"corral bench: error: cannot write the results into --out {str(out)!r}: {unwritten}",
            file=sys.stderr,
        )
        return 1
    display.print(
        f"Wrote {out / 'report.md'}, {out / 'results.json'} and {len(plots)} plots to {out}/ "
        f"in {results['meta']['seconds']:.0f} s."
    )
    broken = [r for r in results["records"] if r["status"].startswith("error")]
    for record in broken:
        display.print(f"error in {record['part']} / {record['label']}: {record['status']}")
    return 1 if broken else 0
