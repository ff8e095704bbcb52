"""What ``monitor=True`` costs a map: paired A/B runs, and the cost of each part.

    python benchmarks/monitor_overhead.py                  # 200k and 1M items, 9 pairs each
    python benchmarks/monitor_overhead.py --quick          # 200k items, 5 pairs: under a minute
    python benchmarks/monitor_overhead.py --sizes 400000 --pairs 15 --loop uvloop

The A/B part
------------
The engine benchmark's two cheapest workloads, where a per-run cost shows most:

``noop``    ``async def fn(x): return x``: never suspends, so the whole map
            is one long callback (the loop watch rightly reports it as a
            stall: the watchdog samples the stack every ``threshold / 4``);
``sleep0``  ``await asyncio.sleep(0)``: one trip through the loop per item,
            about 2-4 µs of corral per item, so the heartbeat's timer and the
            watchdog's wake-ups land between ordinary callbacks.

Each is run with ``corral.gather(fn, range(n), limit=1000)`` and with
``monitor=True`` added (threshold 0.1 s: a heartbeat every 25 ms, a watchdog
wake-up about every 100 ms), in one process, in rounds of three back-to-back
runs: off, on, and off again as a *control*, the order rotating from round to
round. Adjacent runs see nearly the same load from the rest of a shared
machine, which the ratio to the round's ``off`` cancels. Reported per workload
and size: the median wall time of each mode, the median and quartiles of the
ratios on/off and control/off, and the same for CPU time
(``time.process_time``, both threads: less disturbed by other processes). The
control/off spread is the noise floor: an on/off ratio inside it measures
nothing. Reports the watch logs about the no-op map go to a silenced logger.

The per-part costs
------------------
A difference of 1% is below the noise of a shared 2-core machine, so the
script also measures what each part of the watch takes from the loop thread,
amplified until it is measurable: a CPU-bound loop (a callback that counts,
yielding to the loop every 1 ms) runs for a fixed time with

- no watch (the baseline rate of work),
- heartbeats only, every 0.5 ms (a watch whose watchdog sleeps long),
- watchdog wake-ups only, every ~1 ms (threshold 4 ms with a slow heartbeat),

and the work lost, divided by the beats or wake-ups that happened, is the
cost of one. ``projected`` multiplies those by the rates at the default
threshold (40 beats and ~10 wake-ups a second) to give the watch's
steady-state share of the loop thread, independent of the workload.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[1] / "src"
try:
    import corral
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(SRC))
    import corral
LoopWatch = importlib.import_module("corral._monitor").LoopWatch

LIMIT = 1000


async def noop(x: int) -> int:
    """Never suspends."""
    return x


async def sleep0(x: int) -> int:
    """One trip through the event loop per call."""
    await asyncio.sleep(0)
    return x


WORKLOADS: dict[str, Callable[[int], Awaitable[int]]] = {"noop": noop, "sleep0": sleep0}


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


async def paired(workload: str, n: int, pairs: int) -> dict[str, Any]:
    """``pairs`` rounds of back-to-back runs: off, on, and off again (the control).

    The order rotates from round to round. The control's ratio to ``off``
    measures nothing but the machine: how far two identical runs side by side
    differ, the floor below which ``on / off`` says nothing.
    """
    fn = WORKLOADS[workload]
    await corral.gather(fn, range(1000), limit=LIMIT)  # warm-up
    await corral.gather(fn, range(1000), limit=LIMIT, monitor=True)
    modes = ["off", "on", "control"]
    wall: dict[str, list[float]] = {mode: [] for mode in modes}
    cpu: dict[str, list[float]] = {mode: [] for mode in modes}
    for i in range(pairs):
        for mode in modes[i % 3 :] + modes[: i % 3]:
            start, start_cpu = time.perf_counter(), time.process_time()
            results = await corral.gather(fn, range(n), limit=LIMIT, monitor=mode == "on")
            wall[mode].append(time.perf_counter() - start)
            cpu[mode].append(time.process_time() - start_cpu)
            assert len(results) == n
            del results

    def ratios(times: dict[str, list[float]], mode: str) -> tuple[float, float, float]:
        return _quartiles([b / a for a, b in zip(times["off"], times[mode], strict=True)])

    return {
        "workload": workload,
        "n": n,
        "pairs": pairs,
        "wall_off_s": statistics.median(wall["off"]),
        "wall_on_s": statistics.median(wall["on"]),
        "wall_ratio_q": ratios(wall, "on"),
        "cpu_ratio_q": ratios(cpu, "on"),
        "control_wall_ratio_q": ratios(wall, "control"),
        "control_cpu_ratio_q": ratios(cpu, "control"),
        "raw": {"wall": wall, "cpu": cpu},
    }


async def _count_for(seconds: float, watch: LoopWatch) -> tuple[int, int]:
    """Count on the loop in 0.1 ms slices for ``seconds``; (count, watchdog wake-ups)."""
    loop = asyncio.get_running_loop()
    watch.start()
    count = 0
    end = loop.time() + seconds
    try:
        while loop.time() < end:
            slice_end = time.perf_counter() + 0.0001
            while time.perf_counter() < slice_end:
                count += 1
            await asyncio.sleep(0)
    finally:
        watch.stop()
    return count, watch.wakeups


async def beat_cost(beats: int = 20_000) -> float:
    """Seconds of loop time one heartbeat takes (the callback itself, timed directly)."""
    watch = LoopWatch(10.0, interval=10.0)
    watch.start()
    await asyncio.sleep(0)  # the first beat: learns the loop's frames
    beat = watch._beat
    start = time.perf_counter()
    for _ in range(beats):
        beat()  # reschedules itself: cancelled at stop, the heap holds them meanwhile
    took = time.perf_counter() - start
    watch.stop()
    return took / beats


async def wakeup_cost(seconds: float, pairs: int) -> tuple[float, float]:
    """Loop time one watchdog wake-up takes from the loop thread, and wake-ups per second.

    A/B in adjacent pairs: the same heartbeat rate (every 0.5 ms), with the
    watchdog waking about every millisecond (threshold 1 ms) or almost never
    (threshold 10 s). The work the loop lost, over the extra wake-ups.
    """
    costs, rates = [], []
    for i in range(pairs):
        runs = {}
        for name in ("quiet", "awake") if i % 2 == 0 else ("awake", "quiet"):
            threshold = 10.0 if name == "quiet" else 0.001
            runs[name] = await _count_for(seconds, LoopWatch(threshold, interval=0.0005))
        (quiet, quiet_wakes), (awake, awake_wakes) = runs["quiet"], runs["awake"]
        extra = max(1, awake_wakes - quiet_wakes)
        costs.append((1 - awake / quiet) * seconds / extra)
        rates.append(awake_wakes / seconds)
    return statistics.median(costs), statistics.median(rates)


async def part_costs(seconds: float, pairs: int) -> dict[str, Any]:
    """The loop-thread time one heartbeat and one watchdog wake-up cost, and their share."""
    beat = await beat_cost()
    wakeup, rate = await wakeup_cost(seconds, pairs)
    watch = LoopWatch()  # the defaults of monitor=True
    beats_per_s = 1 / watch.interval
    wakeups_per_s = 1 / watch.threshold
    return {
        "cost_per_beat_us": beat * 1e6,
        "cost_per_wakeup_us": wakeup * 1e6,
        "wakeups_per_s_measured": rate,
        "default_beats_per_s": beats_per_s,
        "default_wakeups_per_s": wakeups_per_s,
        "projected_share": beats_per_s * beat + wakeups_per_s * wakeup,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200k items, 5 pairs")
    parser.add_argument("--sizes", help="comma-separated item counts (default 200000,1000000)")
    parser.add_argument("--pairs", type=int, help="off/on pairs per case (default 9)")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--json", metavar="FILE", help="also write every raw measurement here")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    if sizes is None:
        sizes = [200_000] if args.quick else [200_000, 1_000_000]
    pairs = args.pairs or (5 if args.quick else 9)
    logging.getLogger("corral").setLevel(logging.CRITICAL)  # the no-op map's stall reports
    os.environ.pop("CORRAL_MONITOR", None)

    loop_factory = None
    if args.loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    print(
        f"Python {sys.version.split()[0]} ({platform.python_implementation()}), {args.loop} loop, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start, limit {LIMIT}"
    )

    async def run_all() -> dict[str, Any]:
        rows = []
        for n in sizes:
            for workload in WORKLOADS:
                row = await paired(workload, n, pairs)
                rows.append(row)
                w, c = row["wall_ratio_q"], row["cpu_ratio_q"]
                cw, cc = row["control_wall_ratio_q"], row["control_cpu_ratio_q"]
                print(
                    f"{workload:7} {n:>9,}  off {row['wall_off_s']:7.3f} s  on {row['wall_on_s']:7.3f} s"
                    f"  wall on/off {w[1]:.3f} [{w[0]:.3f}-{w[2]:.3f}]"
                    f"  cpu on/off {c[1]:.3f} [{c[0]:.3f}-{c[2]:.3f}]"
                    f"  | control/off: wall {cw[1]:.3f} [{cw[0]:.3f}-{cw[2]:.3f}]"
                    f" cpu {cc[1]:.3f} [{cc[0]:.3f}-{cc[2]:.3f}]",
                    flush=True,
                )
        parts = await part_costs(seconds=0.5, pairs=6 if args.quick else 12)
        print(
            f"one heartbeat costs the loop {parts['cost_per_beat_us']:.1f} µs, one watchdog "
            f"wake-up {parts['cost_per_wakeup_us']:.1f} µs (measured at "
            f"{parts['wakeups_per_s_measured']:.0f} wake-ups/s); at the defaults "
            f"({parts['default_beats_per_s']:.0f} beats/s, about "
            f"{parts['default_wakeups_per_s']:.0f} wake-ups/s): "
            f"{parts['projected_share']:.3%} of the loop thread"
        )
        return {"pairs": rows, "parts": parts}

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        results = runner.run(run_all())
    print(
        "(ratios: median [quartiles] over rounds of back-to-back runs; control: a second "
        "run without the watch, the noise floor; target: monitor costs < 3%)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
