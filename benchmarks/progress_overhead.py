"""What ``progress=`` costs a map: A/B wall times, and the cost of one update.

    python benchmarks/progress_overhead.py                 # 200k sleep(0) items, 5 rounds, 20 pairs
    python benchmarks/progress_overhead.py --runs 7 --n 400000 --loop uvloop

The A/B part
------------
The engine benchmark's ``sleep0`` case (``await asyncio.sleep(0)``, 200k
items, limit 1000: about 2 µs of corral per item, the cheapest real workload,
so any display cost shows most here) run with ``corral.gather`` and:

``off``       ``progress=False``, the baseline;
``callable``  ``progress=snaps.append`` (a snapshot every 0.25 s);
``plain``     ``progress=True`` with stderr not a terminal (``/dev/null``): a
              plain line every 5 s (so at most the final one in a short run);
``live``      ``progress=True`` with stderr taken for a terminal
              (``FORCE_COLOR=1``, written to ``/dev/null``): rich redraws every
              0.2 s. The terminal emulator's own work is not counted (it is
              another process); rendering the row in Python is.

Each measurement runs in a fresh process and reports wall time and the
process's CPU time (``time.process_time``, less disturbed than wall time by
other processes on a shared machine). The clocks cover only the ``gather``
call; imports (rich, for the two ``progress=True`` modes) and a 3-item warm-up
with the same mode come first. Rounds are interleaved (every
mode once per round, the order rotating), and the median per mode is reported
with its spread ((max - min) / median) and its ratio to ``off``; ``best`` is
the fastest run of each mode, the one least disturbed by the rest of the
machine.

The paired part
---------------
On a shared machine the fresh-process medians swing by more than the effect
sought, so one more fresh process runs ``--pairs`` back-to-back pairs (``off``
then the mode, or the mode then ``off``, alternating) per mode, each pair a
second or so apart, and reports the median and quartiles of the ratios
mode / off. Adjacent runs see nearly the same load, which the ratio cancels.

The per-update part
-------------------
An A/B difference of 1% is below the noise of a shared 2-core machine, so the
script also times the work of one update directly, in one process, while a map
holds 1000 calls in flight: the snapshot (``Engine.stats()``: counters and three
latency percentiles) and the delivery (the callable, a plain line, or a rich
redraw). Divided by the update interval this is the display's steady-state
cost as a share of one core, independent of the workload: what it takes away
from the engine at most, whatever the items do.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

SRC = Path(__file__).resolve().parents[1] / "src"
try:
    import corral
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(SRC))
    import corral
_progress = importlib.import_module("corral._progress")
Progress = _progress.Progress

MODES = ["off", "callable", "plain", "live"]


async def sleep0(x: int) -> int:
    """One trip through the event loop per call."""
    await asyncio.sleep(0)
    return x


def _environment(mode: str) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "NO_COLOR"):
        env.pop(name, None)
    if mode == "live":
        env["FORCE_COLOR"] = "1"
        env["COLUMNS"] = "160"
    return env


def _progress_value(mode: str, snaps: list[Any]) -> Any:
    if mode == "off":
        return False
    if mode == "callable":
        return snaps.append
    return True


def worker(mode: str, n: int, limit: int, loop: str) -> dict[str, Any]:
    """Runs in a fresh process: one timed gather with ``mode``; stderr goes to /dev/null."""
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    snaps: list[Any] = []
    progress = _progress_value(mode, snaps)

    async def main() -> tuple[float, float]:
        await corral.gather(sleep0, range(3), limit=limit, progress=progress)  # warm-up
        snaps.clear()
        gc.collect()
        began, cpu = time.perf_counter(), time.process_time()
        await corral.gather(sleep0, range(n), limit=limit, progress=progress)
        return time.perf_counter() - began, time.process_time() - cpu

    if loop == "uvloop":
        import uvloop

        wall, cpu = uvloop.run(main())
    else:
        wall, cpu = asyncio.run(main())
    return {"mode": mode, "wall": wall, "cpu": cpu, "snapshots": len(snaps)}


def paired(n: int, limit: int, pairs: int, loop: str) -> dict[str, list[float]]:
    """Runs in one fresh process: ``pairs`` back-to-back (off, mode) runs per mode; their ratios.

    Two runs a fraction of a second apart see nearly the same machine, so the
    ratio of each pair cancels most of the load that other processes put on
    it; which of the two goes first alternates.
    """
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    snaps: list[Any] = []

    async def once(mode: str) -> float:
        # Rich reads the environment when the display is created: set per run.
        os.environ.pop("FORCE_COLOR", None)
        if mode == "live":
            os.environ["FORCE_COLOR"] = "1"
        progress = _progress_value(mode, snaps)
        gc.collect()
        began = time.perf_counter()
        await corral.gather(sleep0, range(n), limit=limit, progress=progress)
        return time.perf_counter() - began

    async def main() -> dict[str, list[float]]:
        for mode in MODES:
            await once(mode)  # warm-up: imports, first display
        ratios: dict[str, list[float]] = {mode: [] for mode in MODES[1:]}
        for index in range(pairs):
            for mode in MODES[1:]:
                if index % 2:
                    with_progress = await once(mode)
                    without = await once("off")
                else:
                    without = await once("off")
                    with_progress = await once(mode)
                ratios[mode].append(with_progress / without)
        return ratios

    if loop == "uvloop":
        import uvloop

        return uvloop.run(main())
    return asyncio.run(main())


def run_worker(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        mode,
        "--n",
        str(args.n),
        "--limit",
        str(args.limit),
        "--loop",
        args.loop,
        "--pairs",
        str(args.pairs),
    ]
    out = subprocess.run(
        command, capture_output=True, text=True, check=True, env=_environment(mode), timeout=600
    )
    last = out.stdout.strip().splitlines()[-1]
    if mode == "paired":
        return {"ratios": last}
    result: dict[str, Any] = json.loads(last)
    return result


# ---------------------------------------------------------------------------
# One update, timed in process
# ---------------------------------------------------------------------------


async def _update_costs(repeats: int, devnull: TextIO) -> dict[str, float]:
    """Seconds per update (snapshot + delivery) for each mode, with 1000 calls in flight."""
    costs: dict[str, float] = {}

    async def hang(x: int) -> int:
        await asyncio.sleep(3600)
        return x

    async with corral.map(hang, range(100_000), limit=1000) as results:
        engine = results._engine  # the snapshot the display pulls
        while results.stats.in_flight < 1000:
            await asyncio.sleep(0)  # let the pool grow to the limit
        sinks: dict[str, Any] = {
            "snapshot only": Progress.create(lambda stats: None, engine.stats, 100_000),
            "callable": Progress.create([].append, engine.stats, 100_000),
            "plain": Progress.create(True, engine.stats, 100_000, stream=devnull, terminal=False),
            "live": Progress.create(True, engine.stats, 100_000, stream=devnull, terminal=True),
        }
        for name, progress in sinks.items():
            assert progress is not None
            progress.start()
            tick = progress._tick
            tick()  # first draw outside the clock
            began = time.perf_counter()
            for _ in range(repeats):
                tick()
            costs[name] = (time.perf_counter() - began) / repeats
            progress.stop()
    return costs


def _intervals() -> dict[str, float]:
    return {
        "snapshot only": _progress.CALLBACK_INTERVAL,
        "callable": _progress.CALLBACK_INTERVAL,
        "plain": _progress.LINE_INTERVAL,
        "live": _progress.LIVE_INTERVAL,
    }


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", type=int, default=200_000, help="items (default 200000)")
    parser.add_argument("--limit", type=int, default=1000, help="limit (default 1000)")
    parser.add_argument("--runs", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument(
        "--pairs", type=int, default=20, help="paired runs per mode in one process (default 20)"
    )
    parser.add_argument("--worker", choices=[*MODES, "paired"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker == "paired":
        print(json.dumps(paired(args.n, args.limit, args.pairs, args.loop)))
        return 0
    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.limit, args.loop)))
        return 0

    print(
        f"progress overhead: sleep0 x {args.n:,}, limit {args.limit}, gather, {args.loop} loop; "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs; median of {args.runs} "
        "fresh-process runs, modes interleaved"
    )
    walls: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpus: dict[str, list[float]] = {mode: [] for mode in MODES}
    snapshots: dict[str, list[int]] = {mode: [] for mode in MODES}
    for round_ in range(args.runs):
        order = MODES[round_ % len(MODES) :] + MODES[: round_ % len(MODES)]
        for mode in order:
            result = run_worker(mode, args)
            walls[mode].append(result["wall"])
            cpus[mode].append(result["cpu"])
            snapshots[mode].append(result["snapshots"])
    base = statistics.median(walls["off"])
    cpu_base = statistics.median(cpus["off"])
    best_base = min(walls["off"])
    print()
    print(
        f"{'mode':<10} {'wall s':>8} {'µs/item':>8} {'spread':>7} {'x off':>7}   "
        f"{'cpu s':>7} {'spread':>7} {'x off':>7}   {'best s':>7} {'x off':>7}"
    )
    for mode in MODES:
        median = statistics.median(walls[mode])
        spread = (max(walls[mode]) - min(walls[mode])) / median
        cpu = statistics.median(cpus[mode])
        cpu_spread = (max(cpus[mode]) - min(cpus[mode])) / cpu
        best = min(walls[mode])
        print(
            f"{mode:<10} {median:>8.3f} {median / args.n * 1e6:>8.2f} "
            f"{spread:>6.1%} {median / base:>7.3f}   "
            f"{cpu:>7.3f} {cpu_spread:>6.1%} {cpu / cpu_base:>7.3f}   "
            f"{best:>7.3f} {best / best_base:>7.3f}"
        )
    print(f"(callable received {statistics.median(snapshots['callable']):.0f} snapshots per run)")

    sys.stdout.flush()
    ratios = json.loads(run_worker("paired", args)["ratios"])
    print()
    print(f"paired in one process: {args.pairs} (off, mode) pairs per mode, ratio mode / off")
    print(f"{'mode':<10} {'median':>7} {'q1':>7} {'q3':>7}")
    for mode, values in ratios.items():
        q1, median, q3 = statistics.quantiles(values, n=4)
        print(f"{mode:<10} {median:>7.3f} {q1:>7.3f} {q3:>7.3f}")
    with open(os.devnull, "w") as devnull:
        costs = asyncio.run(_update_costs(200, devnull))
    intervals = _intervals()
    print()
    print("one update with 1000 calls in flight (in process, mean of 200):")
    print(f"{'mode':<14} {'µs/update':>10} {'every s':>8} {'% of a core':>12}")
    for name, seconds in costs.items():
        interval = intervals[name]
        print(f"{name:<14} {seconds * 1e6:>10.1f} {interval:>8.2f} {seconds / interval:>12.3%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
