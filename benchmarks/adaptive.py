"""Adaptive concurrency benchmark: ``limit="auto"`` against every fixed limit, over real HTTP.

    python benchmarks/adaptive.py                   # full: 20k requests per run, 3 rounds
    python benchmarks/adaptive.py --quick           # 5k requests, 1 round: about 2 minutes
    python benchmarks/adaptive.py --json out.json --plot docs/adaptive.png
    python benchmarks/adaptive.py --service-ms 40   # a slower service: the server the bottleneck
    python benchmarks/adaptive.py --curve           # latency at fixed limits 56..96, and auto's rest

The question
------------
"How many concurrent calls should I run?" The seeds answer "profile and tune by
hand". This benchmark does the tuning by brute force, to see whether
``limit="auto"`` finds the answer by itself: against one target server it runs
the same job with every fixed limit 1, 2, 4, ... 2048, with a plain unbounded
``asyncio.gather`` (the seeds' approach), and with ``limit="auto"``.

The target
----------
``corral serve`` (:mod:`corral.lab.server`) in its own process: capacity 64
requests served in parallel, 10 ms each, up to 256 more waiting in its queue,
429 with ``Retry-After: 1`` beyond that. Latency therefore grows with
concurrency past 64, and past 320 requests are refused.

The client
----------
An aiohttp ``ClientSession`` whose connector has no connection limit (the
default of 100 would cap every run at 100 and hide the server's behaviour), on
uvloop, in this process. Each corral run uses ``ordered=False`` and the same
retry policy, ``Retry(attempts=10, backoff=0.05)``, so a 429 is retried after
its Retry-After: "failed" counts items that failed even so. Plain gather has
no retries, as in the seeds. Request latency is measured inside the request
function (``time.perf_counter()`` around one HTTP exchange, successful ones
only), so it is what the service made the call wait, not time spent waiting
for a slot in the client.

Small fixed limits run fewer requests (``400 x limit``, at most the full
count): a limit of 1 needs 12 ms per request, and 20k of them would take four
minutes to say what 400 say. Every other run uses the full count.

Warm-up and steady state
------------------------
Every number in the tables counts the whole run: for ``limit="auto"`` that
includes its slow start from 4 calls in flight (a few hundred ms), while a
fixed limit starts at its value. The verdict also gives the *steady state*:
the calls that ended from ``WARMUP`` (1 s) into each run on, the same cut
for every strategy, with the best fixed limit picked again on those numbers.

Two scenarios
-------------
1. *Sweep*: every fixed limit and auto, ``--rounds`` times, in an order
   rotated each round (every run starts with a ``gc.collect()``, so none pays
   for the garbage of the one before); then plain gather once (its 20k connections leave
   sockets in TIME_WAIT, and its failures need no median). The table gives
   medians over the rounds; "best fixed" is the fixed limit with the highest
   median throughput.
2. *Halving*: a fresh server whose capacity drops from 64 to 32 two seconds
   into the run (its ``--schedule``), with 1.5x the requests; auto and the best
   fixed limit of the sweep, each ``--rounds`` times. Auto's limit is sampled
   every 50 ms; "settles in" is the time from the halving until the limit is
   three quarters of the way from its level before (median over the second
   before) to its level after (median from 3 s after to the end).

The machine
-----------
Client and server share the machine's cores (the header says how many) and
the client process's CPU use is reported per run: at 100% the client, not the
server, is the bottleneck, and the numbers say more about Python's HTTP stack
than about the limits. Run it on a quiet machine; the spread between rounds is
printed so noise is visible. On two cores a 10 ms service (6,400 requests/s
at most) keeps this client at 86-95% CPU (4,300-5,600 requests/s, depending
on what else runs), so its CPU is nearly a bottleneck too; ``--service-ms
20`` or ``40`` caps the service at 3,200 or 1,600 requests/s, well below
that, so the limits are judged against the service alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

SRC = Path(__file__).resolve().parents[1] / "src"
try:
    import corral
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(SRC))
    import corral

CAPACITY = 64
SERVICE_MS = 10.0
QUEUE = 256
FIXED_LIMITS = [2**k for k in range(12)]  # 1 .. 2048
RETRY = corral.Retry(attempts=10, backoff=0.05)
HALVE_AT = 2.0  # seconds after the server starts
SAMPLE_EVERY = 0.05  # seconds between samples of auto's limit
RUN_TIMEOUT = 180.0  # a run taking longer is cancelled and shown as "timeout"
WARMUP = 1.0  # seconds of every run left out of its "steady" numbers
CURVE_LIMITS = [56, 64, 68, 72, 76, 80, 88, 96]  # --curve: fixed limits around the knee
CURVE_QUANTILES = [25, 50, 75, 90, 99]


# --------------------------------------------------------------------------------------
# The server, in its own process
# --------------------------------------------------------------------------------------


@dataclass
class Server:
    """``corral serve`` running in a child process."""

    process: subprocess.Popen[str]
    url: str
    started: float  # time.perf_counter() when it said it was listening

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the server process has used so far."""
        with open(f"/proc/{self.process.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def serve(schedule: str | None = None) -> Iterator[Server]:
    command = [
        sys.executable,
        "-m",
        "corral.cli",
        "serve",
        "--port",
        "0",
        "--capacity",
        str(CAPACITY),
        "--service-ms",
        str(SERVICE_MS),
        "--queue",
        str(QUEUE),
    ]
    if schedule:
        command += ["--schedule", schedule]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        started = time.perf_counter()
        if "listening on" not in line:
            raise RuntimeError(f"corral serve did not start: {line!r}")
        yield Server(process, line.split()[-1], started)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


async def _server_stats(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(f"{url}/_corral/stats") as response:
        stats: dict[str, Any] = await response.json()
        return stats


async def _settle_and_reset(url: str) -> None:
    """Wait until the server is idle (a cancelled run's requests drain), then zero its counters."""
    async with aiohttp.ClientSession() as session:
        for _ in range(600):
            stats = await _server_stats(session, url)
            if stats["in_service"] == 0 and stats["queued"] == 0:
                break
            await asyncio.sleep(0.05)
        async with session.post(f"{url}/_corral/reset") as response:
            await response.read()


# --------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------


@dataclass
class Probe:
    """What the request function saw: latencies of successes, refusals, errors, a timeline."""

    started: float
    latencies: list[float] = field(default_factory=list)
    done_at: list[float] = field(default_factory=list)  # seconds since start, per success
    refused_at: list[float] = field(default_factory=list)  # per 429/503 answer
    errors: int = 0  # connection errors and other failures of one attempt


def _percentile(ordered: list[float], p: float) -> float | None:
    if not ordered:
        return None
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


async def measure(
    server: Server, strategy: str, n: int, *, sample_limit: bool = False
) -> dict[str, Any]:
    """Run ``strategy`` ("fixed:N", "auto" or "gather") on ``n`` requests; return its numbers."""
    url = server.url
    await _settle_and_reset(url)
    connector = aiohttp.TCPConnector(limit=0)  # no client-side cap: see the module docstring
    clock = time.perf_counter
    probe = Probe(started=clock())
    limits: list[tuple[float, int | None]] = []
    failed = retried = 0

    async with aiohttp.ClientSession(connector=connector) as session:

        async def fetch(i: int) -> None:
            began = clock()
            try:
                async with session.get(f"{url}/item/{i}") as response:
                    if response.status != 200:
                        probe.refused_at.append(clock() - probe.started)
                        response.raise_for_status()
                    await response.read()
            except aiohttp.ClientResponseError:
                raise
            except Exception:
                probe.errors += 1
                raise
            now = clock()
            probe.latencies.append(now - began)
            probe.done_at.append(now - probe.started)

        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        server_cpu_before = server.cpu_seconds()
        probe.started = start = clock()
        try:
            async with asyncio.timeout(RUN_TIMEOUT):
                if strategy == "gather":
                    outcomes = await asyncio.gather(
                        *(fetch(i) for i in range(n)), return_exceptions=True
                    )
                    failed = sum(isinstance(o, BaseException) for o in outcomes)
                else:
                    limit: Any = "auto" if strategy == "auto" else int(strategy.split(":")[1])
                    async with corral.map(
                        fetch,
                        range(n),
                        limit=limit,
                        retries=RETRY,
                        ordered=False,
                        return_exceptions=True,
                    ) as results:
                        sampler = None
                        if sample_limit:
                            sampler = asyncio.create_task(_sample(results, start, limits))
                        async for outcome in results:
                            failed += isinstance(outcome, BaseException)
                        if sampler is not None:
                            sampler.cancel()
                            with contextlib.suppress(asyncio.CancelledError):
                                await sampler
                        retried = results.stats.retried
                        limits.append((clock() - start, results.stats.limit))
            status = "ok"
        except TimeoutError:
            status = "timeout"
        wall = clock() - start
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        server_cpu = server.cpu_seconds() - server_cpu_before
        stats = await _server_stats(session, url)

    client_cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (
        cpu_before.ru_utime + cpu_before.ru_stime
    )
    ordered = sorted(probe.latencies)
    p50, p99 = _percentile(ordered, 50), _percentile(ordered, 99)
    # Steady state: calls that ended after the first WARMUP seconds, the same
    # cut for every strategy (a fixed limit opens its connections then too).
    steady = sorted(
        lat for lat, t in zip(probe.latencies, probe.done_at, strict=True) if t >= WARMUP
    )
    steady_p99 = _percentile(steady, 99)
    steady_quantiles = [_percentile(steady, q) for q in CURVE_QUANTILES]
    return {
        "strategy": strategy,
        "status": status,
        "n": n,
        "wall_s": wall,
        "throughput": len(probe.latencies) / wall,
        "steady_throughput": len(steady) / (wall - WARMUP) if wall > 2 * WARMUP else None,
        "steady_p99_ms": steady_p99 * 1e3 if steady_p99 is not None and wall > 2 * WARMUP else None,
        "p50_ms": p50 * 1e3 if p50 is not None else None,
        "p99_ms": p99 * 1e3 if p99 is not None else None,
        "steady_quantiles_ms": [None if q is None else q * 1e3 for q in steady_quantiles],
        "failed": failed,
        "refused": len(probe.refused_at),
        "errors": probe.errors,
        "retried": retried,
        "peak_concurrency": stats["peak_concurrency"],
        "client_cpu": client_cpu / wall,
        "server_cpu": server_cpu / wall,
        "limits": limits,
        "done_at": probe.done_at,
        "refused_at": probe.refused_at,
        # The server's schedule counts from its start; this run's clock from `start`.
        "offset": start - server.started,
    }


async def _sample(results: Any, start: float, into: list[tuple[float, int | None]]) -> None:
    while True:
        into.append((time.perf_counter() - start, results.stats.limit))
        await asyncio.sleep(SAMPLE_EVERY)


def run_measure(server: Server, strategy: str, n: int, **kwargs: Any) -> dict[str, Any]:
    import uvloop

    # The garbage of the run before (an overloaded limit's thousands of 429s
    # and retries) is collected now, not during this run: in the sweep auto
    # follows limit=2048, and the collection cost it 7% of its throughput.
    gc.collect()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(measure(server, strategy, n, **kwargs))


# --------------------------------------------------------------------------------------
# The scenarios
# --------------------------------------------------------------------------------------


def requests_for(strategy: str, n: int) -> int:
    if strategy.startswith("fixed:"):
        return min(n, 400 * int(strategy.split(":")[1]))
    return n


def median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each number over the runs of one strategy (and its spread)."""
    row: dict[str, Any] = {"strategy": runs[0]["strategy"], "n": runs[0]["n"]}
    row["status"] = "ok" if all(r["status"] == "ok" for r in runs) else "timeout"
    for key in (
        "throughput",
        "steady_throughput",
        "steady_p99_ms",
        "p50_ms",
        "p99_ms",
        "failed",
        "refused",
        "errors",
        "retried",
        "peak_concurrency",
        "client_cpu",
        "server_cpu",
    ):
        values = [r[key] for r in runs if r[key] is not None]
        row[key] = statistics.median(values) if values else None
    tps = [r["throughput"] for r in runs]
    row["spread"] = (max(tps) - min(tps)) / statistics.median(tps) if len(tps) > 1 else 0.0
    return row


def sweep(
    n: int, rounds: int, only: list[str] | None
) -> tuple[dict[str, list[dict[str, Any]]], list[str], bool]:
    strategies = [f"fixed:{limit}" for limit in FIXED_LIMITS] + ["auto"]
    with_gather = only is None or "gather" in only
    if only is not None:
        strategies = [s for s in strategies if s in only]
    tail = ["gather"] if with_gather else []
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in [*strategies, *tail]}
    with serve() as server:
        for r in range(rounds):
            order = strategies[r % len(strategies) :] + strategies[: r % len(strategies)]
            for strategy in order:
                result = run_measure(
                    server, strategy, requests_for(strategy, n), sample_limit=strategy == "auto"
                )
                runs[strategy].append(result)
                print(f"  round {r + 1}: {_one_line(result)}", file=sys.stderr, flush=True)
        for strategy in tail:  # once, last: it leaves thousands of sockets in TIME_WAIT
            result = run_measure(server, strategy, n)
            runs[strategy].append(result)
            print(f"  once: {_one_line(result)}", file=sys.stderr, flush=True)
    return runs, strategies, with_gather


def halving(n: int, rounds: int, best: str) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {"auto": [], best: []}
    for r in range(rounds):
        for strategy in ("auto", best) if r % 2 == 0 else (best, "auto"):
            with serve(schedule=f"{HALVE_AT}:{CAPACITY // 2}") as server:
                # The schedule counts from the server's start; so does the run.
                result = run_measure(server, strategy, n, sample_limit=strategy == "auto")
                runs[strategy].append(result)
                print(f"  halving {r + 1}: {_one_line(result)}", file=sys.stderr, flush=True)
    return runs


def _median_of(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def curve(n: int, rounds: int, limits: list[int]) -> str:
    """Steady latency quantiles at fixed limits around the knee, and where auto rests on them.

    The sweep's powers of two jump from 64 to 128 across the knee; this
    says how latency grows between them, which is what an adaptive limit
    reads: a limit that keeps p99 within 1.5x of ``limit=64``'s has to rest
    where latency has grown by only a few percent.
    """
    strategies = [f"fixed:{limit}" for limit in limits] + ["auto"]
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in strategies}
    with serve() as server:
        for r in range(rounds):
            order = strategies[r % len(strategies) :] + strategies[: r % len(strategies)]
            for strategy in order:
                result = run_measure(server, strategy, n, sample_limit=strategy == "auto")
                runs[strategy].append(result)
                print(f"  curve {r + 1}: {_one_line(result)}", file=sys.stderr, flush=True)
    names = " | ".join(f"p{q}" for q in CURVE_QUANTILES)
    lines = [
        f"| limit | steady throughput (req/s) | {names} (ms) |",
        "|---|---:|" + "---:|" * len(CURVE_QUANTILES),
    ]
    for strategy in strategies:
        results = runs[strategy]
        if strategy == "auto":
            rest = [
                statistics.median(v for t, v in r["limits"] if t >= WARMUP and v is not None)
                for r in results
                if any(t >= WARMUP and v is not None for t, v in r["limits"])
            ]
            name = f"**auto** (rests at {statistics.median(rest):.0f})" if rest else "**auto**"
        else:
            name = strategy.split(":")[1]
        throughput = _median_of([r["steady_throughput"] for r in results])
        quantiles = [
            _fmt(_median_of([r["steady_quantiles_ms"][i] for r in results]), ".1f")
            for i in range(len(CURVE_QUANTILES))
        ]
        lines.append(f"| {name} | {_fmt(throughput, '.0f')} | " + " | ".join(quantiles) + " |")
    return "\n".join(lines)


def settle_time(limits: list[tuple[float, int | None]], at: float) -> float | None:
    """Seconds after ``at`` until the limit is 3/4 of the way from its old level to its new."""
    before = [v for t, v in limits if at - 1.0 <= t < at and v is not None]
    after = [v for t, v in limits if t >= at + 3.0 and v is not None]
    if not before or not after:
        return None
    old, new = statistics.median(before), statistics.median(after)
    if new >= old:
        return None
    target = new + 0.25 * (old - new)
    for t, v in limits:
        if t >= at and v is not None and v <= target:
            return t - at
    return None


def window_stats(result: dict[str, Any], t0: float, t1: float) -> tuple[float, int]:
    """Throughput and 429s between ``t0`` and ``t1`` seconds into the run."""
    done = sum(t0 <= t < t1 for t in result["done_at"])
    refused = sum(t0 <= t < t1 for t in result["refused_at"])
    return done / (t1 - t0), refused


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _one_line(r: dict[str, Any]) -> str:
    return (
        f"{r['strategy']:>11} {r['status']:>7} {r['throughput']:7.0f}/s "
        f"p50 {_fmt(r['p50_ms'], '6.1f')} ms p99 {_fmt(r['p99_ms'], '7.1f')} ms "
        f"failed {r['failed']} 429s {r['refused']} errors {r['errors']} "
        f"client cpu {r['client_cpu']:.0%} server cpu {r['server_cpu']:.0%}"
    )


def sweep_table(rows: list[dict[str, Any]], best: dict[str, Any]) -> str:
    lines = [
        "| strategy | requests | throughput (req/s) | vs best | p50 (ms) | p99 (ms) "
        "| failed items | 429s | retries | peak at server | client CPU | spread |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        name = row["strategy"].replace("fixed:", "limit=")
        if row["strategy"] == "auto":
            name = '**limit="auto"**'
        elif row["strategy"] == "gather":
            name = "plain asyncio.gather"
        if row is best:
            name += " (best fixed)"
        status = "" if row["status"] == "ok" else f" ({row['status']})"
        lines.append(
            f"| {name}{status} | {row['n']} | {row['throughput']:.0f} "
            f"| {row['throughput'] / best['throughput']:.0%} "
            f"| {_fmt(row['p50_ms'], '.1f')} | {_fmt(row['p99_ms'], '.1f')} "
            f"| {row['failed']:.0f} | {row['refused']:.0f} | {row['retried']:.0f} "
            f"| {row['peak_concurrency']:.0f} | {row['client_cpu']:.0%} | {row['spread']:.0%} |"
        )
    return "\n".join(lines)


def plot(
    path: Path,
    rows: list[dict[str, Any]],
    auto_run: dict[str, Any],
    half_auto: dict[str, Any],
    half_fixed: dict[str, Any],
    best_name: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))

    ax = axes[0]
    fixed = [r for r in rows if r["strategy"].startswith("fixed:")]
    xs = [int(r["strategy"].split(":")[1]) for r in fixed]
    ax.plot(xs, [r["throughput"] for r in fixed], "o-", color="tab:blue", label="fixed limit")
    auto = next(r for r in rows if r["strategy"] == "auto")
    ax.axhline(auto["throughput"], color="tab:red", ls="--", label='limit="auto"')
    ax.set_xscale("log", base=2)
    ax.set_xlabel("fixed limit (calls in flight)")
    ax.set_ylabel("throughput (requests/s)")
    ax.set_title("Sweep: throughput (median of rounds)")
    ax2 = ax.twinx()
    ax2.plot(xs, [r["p99_ms"] for r in fixed], "s:", color="tab:gray", label="p99 (fixed)")
    ax2.axhline(auto["p99_ms"], color="tab:orange", ls=":", label='p99 ("auto")')
    ax2.set_yscale("log")
    ax2.set_ylabel("p99 request latency (ms)")
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], loc="lower right", fontsize=8)

    ax = axes[1]
    points = [(t, v) for t, v in auto_run["limits"] if v is not None]
    ax.step(
        [t for t, _ in points],
        [v for _, v in points],
        where="post",
        color="tab:red",
        label='limit="auto": limit in force',
    )
    ax.axhline(CAPACITY, color="black", ls="--", label=f"server capacity ({CAPACITY})")
    ax.set_ylim(0, max([v for _, v in points] + [CAPACITY]) * 1.25)
    ax.set_xlabel("seconds")
    ax.set_ylabel("calls in flight")
    ax.set_title("Steady server: the limit auto finds")
    ax.legend(loc="upper right", fontsize=8)

    ax = axes[2]
    ts = [t for t, v in half_auto["limits"] if v is not None]
    ax.step(
        ts,
        [v for _, v in half_auto["limits"] if v is not None],
        where="post",
        color="tab:red",
        label='limit="auto"',
    )
    end = max(half_auto["wall_s"], half_fixed["wall_s"])
    offset = half_auto["offset"]
    ax.step(
        [0, HALVE_AT - offset, end],
        [CAPACITY, CAPACITY // 2, CAPACITY // 2],
        where="post",
        color="black",
        ls="--",
        label="server capacity",
    )
    fixed_limit = int(best_name.split(":")[1])
    top = max([v for _, v in half_auto["limits"] if v is not None] + [CAPACITY]) * 1.6
    if fixed_limit <= top:
        ax.axhline(
            fixed_limit, color="tab:blue", ls="-.", label=f"best fixed limit ({fixed_limit})"
        )
    ax.set_xlabel("seconds")
    ax.set_ylabel("calls in flight")
    ax.set_title(f"Capacity halves at t={HALVE_AT:g} s")
    ax3 = ax.twinx()
    for run, color, label in ((half_auto, "tab:red", "auto"), (half_fixed, "tab:blue", "fixed")):
        bins = [0.25 * i for i in range(int(run["wall_s"] / 0.25) + 1)]
        counts = [sum(b <= t < b + 0.25 for t in run["done_at"]) / 0.25 for b in bins]
        ax3.plot(bins, counts, color=color, alpha=0.35, lw=1, label=f"throughput ({label})")
    ax3.set_ylabel("throughput (requests/s)")
    ax3.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()
    handles3 = ax3.get_legend_handles_labels()
    ax.legend(handles[0] + handles3[0], handles[1] + handles3[1], loc="upper right", fontsize=8)
    ax.set_ylim(0, top)

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def header() -> str:
    import uvloop

    load = os.getloadavg()
    return (
        f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}, "
        f"uvloop {getattr(uvloop, '__version__', '?')} (client and server), "
        f"{os.cpu_count()} CPUs, load average before the run {load[0]:.2f}; "
        f"server: capacity {CAPACITY}, {SERVICE_MS:g} ms per request, queue {QUEUE}, "
        f"429 + Retry-After: 1 beyond"
    )


def main(argv: list[str] | None = None) -> int:
    global SERVICE_MS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="5k requests, 1 round")
    parser.add_argument("--requests", type=int, help="requests per run (default 20000)")
    parser.add_argument("--rounds", type=int, help="rounds of the sweep (default 3)")
    parser.add_argument("--only", help="a subset, e.g. auto,fixed:64,gather (auto is needed)")
    parser.add_argument("--json", type=Path, help="write every measurement to this file")
    parser.add_argument(
        "--plot",
        type=Path,
        default=Path("docs/adaptive.png"),
        help="where to write the plot (default docs/adaptive.png)",
    )
    parser.add_argument(
        "--service-ms",
        type=float,
        default=SERVICE_MS,
        help=f"the server's time per request (default {SERVICE_MS:g}); a longer one makes"
        " the service, not this client's CPU, the bottleneck",
    )
    parser.add_argument(
        "--curve",
        nargs="?",
        const=",".join(map(str, CURVE_LIMITS)),
        metavar="LIMITS",
        help="instead of the sweep: steady latency quantiles at these fixed limits and auto"
        f" (default {','.join(map(str, CURVE_LIMITS))})",
    )
    args = parser.parse_args(argv)
    if args.service_ms <= 0:
        parser.error(f"--service-ms must be > 0, got {args.service_ms}")
    SERVICE_MS = args.service_ms
    n = args.requests or (5_000 if args.quick else 20_000)
    rounds = args.rounds or (1 if args.quick else 3)

    limits = None
    if args.curve:
        try:
            limits = [int(x) for x in args.curve.split(",")]
        except ValueError:
            parser.error(f"--curve takes limits like 64,72,80; got {args.curve!r}")
        if not limits or min(limits) < 1:
            parser.error(f"--curve limits must be >= 1; got {args.curve!r}")

    print(header(), flush=True)
    if limits:
        print(
            f"\nCurve: {n} requests per run, {rounds} round(s), medians of the steady state"
            f" (from {WARMUP:g} s)\n",
            file=sys.stderr,
            flush=True,
        )
        print("\n" + curve(n, rounds, limits), flush=True)
        return 0
    print(
        f"\nSweep: {n} requests per run (small fixed limits: 400 x limit), "
        f"{rounds} round(s), medians\n",
        file=sys.stderr,
        flush=True,
    )
    only = args.only.split(",") if args.only else None
    runs, strategies, with_gather = sweep(n, rounds, only)
    rows = [median_row(runs[s]) for s in [*strategies, *(["gather"] if with_gather else [])]]
    fixed_rows = [r for r in rows if r["strategy"].startswith("fixed:")]
    best = max(fixed_rows, key=lambda r: r["throughput"])
    auto = next(r for r in rows if r["strategy"] == "auto")
    print("\n" + sweep_table(rows, best), flush=True)

    n_half = int(n * 1.5)
    print(
        f"\nHalving: {n_half} requests, capacity {CAPACITY} -> {CAPACITY // 2} at "
        f"t={HALVE_AT:g} s\n",
        file=sys.stderr,
        flush=True,
    )
    half = halving(n_half, rounds, best["strategy"])
    half_rows = []
    for results in half.values():
        settles = [settle_time(r["limits"], HALVE_AT - r["offset"]) for r in results]
        after = [window_stats(r, HALVE_AT - r["offset"], r["wall_s"]) for r in results]
        row = median_row(results)
        row["settle_s"] = (
            statistics.median([s for s in settles if s is not None])
            if any(s is not None for s in settles)
            else None
        )
        row["tp_after"] = statistics.median(a[0] for a in after)
        row["refused_after"] = statistics.median(a[1] for a in after)
        half_rows.append(row)
    lines = [
        "| strategy | throughput (req/s) | throughput after halving | p50 (ms) | p99 (ms) "
        "| failed items | 429s | limit settles in |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in half_rows:
        name = (
            '**limit="auto"**'
            if row["strategy"] == "auto"
            else (row["strategy"].replace("fixed:", "limit=") + " (best fixed)")
        )
        settle = "-" if row.get("settle_s") is None else f"{row['settle_s']:.2f} s"
        lines.append(
            f"| {name} | {row['throughput']:.0f} | {row['tp_after']:.0f} "
            f"| {_fmt(row['p50_ms'], '.1f')} | {_fmt(row['p99_ms'], '.1f')} "
            f"| {row['failed']:.0f} | {row['refused']:.0f} | {settle} |"
        )
    print("\n" + "\n".join(lines), flush=True)

    # Side by side: auto against the three best fixed limits, round by round
    # (the machine's load drifts between rounds; within one, less so).
    paired: dict[str, list[float]] = {}
    for row in sorted(fixed_rows, key=lambda r: -r["throughput"])[:3]:
        name = row["strategy"]
        ratios = [
            a["throughput"] / b["throughput"] for a, b in zip(runs["auto"], runs[name], strict=True)
        ]
        p99s = [
            a["p99_ms"] / b["p99_ms"]
            for a, b in zip(runs["auto"], runs[name], strict=True)
            if a["p99_ms"] and b["p99_ms"]
        ]
        paired[name] = ratios
        print(
            f"Same round, auto / {name.replace('fixed:', 'limit=')}: throughput "
            + ", ".join(f"{x:.0%}" for x in ratios)
            + f" (median {statistics.median(ratios):.0%}); p99 "
            + ", ".join(f"{x:.2f}x" for x in p99s),
            flush=True,
        )
    # Steady state (every run from WARMUP s on), and the best fixed limit by
    # steady throughput, picked again on those numbers.
    steady_rows = [r for r in fixed_rows if r["steady_throughput"]]
    steady_best = max(steady_rows, key=lambda r: r["steady_throughput"]) if steady_rows else None
    verdict = {
        "auto_vs_best_throughput": auto["throughput"] / best["throughput"],
        "steady_best_fixed": steady_best["strategy"] if steady_best else None,
        "steady_auto_vs_best_throughput": (
            auto["steady_throughput"] / steady_best["steady_throughput"]
            if steady_best and auto["steady_throughput"]
            else None
        ),
        "steady_auto_p99_vs_best": (
            auto["steady_p99_ms"] / steady_best["steady_p99_ms"]
            if steady_best and auto["steady_p99_ms"] and steady_best["steady_p99_ms"]
            else None
        ),
        "auto_vs_top_fixed_same_round": paired,
        "auto_failed": auto["failed"],
        "auto_p99_vs_best": (auto["p99_ms"] / best["p99_ms"]) if best["p99_ms"] else None,
        "best_fixed": best["strategy"],
        "halving_settle_s": half_rows[0].get("settle_s"),
        "halving_auto_failed": half_rows[0]["failed"],
        "halving_best_fixed_429s": half_rows[1]["refused"],
    }
    print(
        "\nTargets: auto >= 95% of the best fixed throughput: "
        f"{verdict['auto_vs_best_throughput']:.1%}; failed items {auto['failed']:.0f}; "
        f"p99 vs best fixed {_fmt(verdict['auto_p99_vs_best'], '.2f')}x (target <= 1.5x); "
        f"after halving: settles in {_fmt(verdict['halving_settle_s'], '.2f')} s, "
        f"{verdict['halving_auto_failed']:.0f} failed items; best fixed got "
        f"{verdict['halving_best_fixed_429s']:.0f} 429s",
        flush=True,
    )
    print(
        f"Steady state (from {WARMUP:g} s into each run; best fixed "
        f"{verdict['steady_best_fixed']}): auto throughput "
        f"{_fmt(verdict['steady_auto_vs_best_throughput'], '.1%')} of it, p99 "
        f"{_fmt(verdict['steady_auto_p99_vs_best'], '.2f')}x",
        flush=True,
    )

    auto_runs = runs["auto"]
    median_auto = sorted(auto_runs, key=lambda r: r["throughput"])[len(auto_runs) // 2]
    half_auto = sorted(half["auto"], key=lambda r: r["throughput"])[len(half["auto"]) // 2]
    half_fixed = sorted(half[best["strategy"]], key=lambda r: r["throughput"])[
        len(half[best["strategy"]]) // 2
    ]
    plot(args.plot, rows, median_auto, half_auto, half_fixed, best["strategy"])
    print(f"\nplot: {args.plot}", flush=True)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"header": header(), "sweep": runs, "halving": half, "verdict": verdict}, indent=1
            )
        )
        print(f"measurements: {args.json}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
