"""backend="ray" on one machine: its overhead, and the driver's memory on a long stream.

    python benchmarks/ray_backend.py                  # 1M items, 3 repeats
    python benchmarks/ray_backend.py --items 200000 --repeats 1

Needs the ``ray`` extra (``make ray``). One local Ray cluster is started for
the whole run (as ``backend="ray"`` does on first use) and shared by every
Ray measurement; its start-up time is reported apart.

1. **Stream**: ``range(N)`` through ``corral.map(fn, ..., backend="ray")``,
   every result dropped as it arrives. The driver's RSS is sampled every
   N/20 results: after the first tenth (the cluster connected, the actors
   started) it must stay flat to the end, since the driver holds a bounded
   window of chunks whatever N is.
2. **Throughput**, side by side in one run, repeated, medians: the same
   ``N`` items through single-process corral (``backend="local"``),
   ``processes=2`` and ``backend="ray"`` (two actors, this machine's CPUs),
   for a no-op call (pure overhead) and a call that awaits 1 ms (I/O-like,
   limit 1000). On one machine Ray cannot win: the point is what its
   per-chunk round trips and serialisation cost against the local engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import corral
from corral import _ray


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


async def noop(x: int) -> int:
    return x


async def io_1ms(x: int) -> int:
    await asyncio.sleep(0.001)
    return x


async def _stream(
    fn: Callable[[int], Any], n: int, **options: Any
) -> tuple[float, float, list[float]]:
    """Seconds to stream ``n`` results, seconds to the first one, and RSS every n/20 results."""
    samples: list[float] = []
    step = max(1, n // 20)
    count = 0
    first = 0.0
    began = time.perf_counter()
    async with corral.map(fn, range(n), **options) as results:
        async for _ in results:
            if not count:
                first = time.perf_counter() - began
            count += 1
            if count % step == 0:
                samples.append(_rss_mb())
    elapsed = time.perf_counter() - began
    assert count == n, (count, n)
    return elapsed, first, samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--io-items", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", metavar="OUT", help="write the raw measurements to OUT")
    args = parser.parse_args(argv)
    n, io_n = args.items, args.io_items

    began = time.perf_counter()
    _ray.connect_sync(None)
    startup = time.perf_counter() - began
    print(f"local Ray cluster started in {startup:.1f} s (once per process)")

    # 1. The long stream: driver memory must stay flat.
    rss_start = _rss_mb()
    elapsed, _, samples = asyncio.run(_stream(noop, n, backend="ray", limit=1000))
    first, last, peak = samples[1], samples[-1], max(samples[1:])
    print(
        f"stream: {n:,} no-op items through backend='ray' in {elapsed:.1f} s "
        f"({n / elapsed:,.0f} items/s); driver RSS {rss_start:.0f} MB before, "
        f"{first:.0f} MB at 10 %, {last:.0f} MB at the end (peak {peak:.0f} MB, "
        f"growth after 10 %: {last - first:+.1f} MB)"
    )

    # 2. Throughput, side by side.
    cases: dict[str, tuple[Callable[[int], Any], int, dict[str, Any]]] = {
        "noop local": (noop, n, {"limit": 1000}),
        "noop processes=2": (noop, n, {"limit": 1000, "processes": 2}),
        "noop ray (2 actors)": (noop, n, {"limit": 1000, "backend": "ray"}),
        "io-1ms local": (io_1ms, io_n, {"limit": 1000}),
        "io-1ms processes=2": (io_1ms, io_n, {"limit": 1000, "processes": 2}),
        "io-1ms ray (2 actors)": (io_1ms, io_n, {"limit": 1000, "backend": "ray"}),
    }
    rates: dict[str, list[float]] = {name: [] for name in cases}
    steady: dict[str, list[float]] = {name: [] for name in cases}
    firsts: dict[str, list[float]] = {name: [] for name in cases}
    for repeat in range(args.repeats):
        for name, (fn, count, options) in cases.items():
            seconds, first, _ = asyncio.run(_stream(fn, count, **options))
            rates[name].append(count / seconds)
            # After the first result: without starting processes or actors.
            steady[name].append((count - 1) / (seconds - first))
            firsts[name].append(first)
            print(
                f"  repeat {repeat + 1}: {name:24} {count / seconds:>10,.0f} items/s "
                f"(first result after {first:.2f} s, then {steady[name][-1]:,.0f}/s)",
                flush=True,
            )
    print(f"\nmedians of {args.repeats} (items/s, and relative to local corral):")
    print(f"  {'':24} {'overall':>10} {'':>7} {'steady':>10} {'':>7} first result")
    medians = {name: statistics.median(values) for name, values in rates.items()}
    steadies = {name: statistics.median(values) for name, values in steady.items()}
    for name, value in medians.items():
        base = name.split()[0] + " local"
        print(
            f"  {name:24} {value:>10,.0f}  x{value / medians[base]:.2f} "
            f"{steadies[name]:>10,.0f}  x{steadies[name] / steadies[base]:.2f} "
            f"{statistics.median(firsts[name]):>8.2f} s"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "items": n,
                    "io_items": io_n,
                    "startup_s": startup,
                    "stream_s": elapsed,
                    "stream_rss_mb": samples,
                    "rates": rates,
                    "steady_rates": steady,
                    "first_result_s": firsts,
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
