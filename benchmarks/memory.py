"""Memory benchmark: does a streaming map stay flat as the input grows?

    python benchmarks/memory.py                 # 2M items, ordered and unordered
    python benchmarks/memory.py --items 10000000

Each run streams ``range(N)`` through ``corral.map(fn, items, limit=1000)``
and throws every result away as it arrives, the way a pipeline writing to a
file or a database would. If the engine were O(items) anywhere (materialising
the input, buffering results, keeping a Task per item) the process's peak RSS
would grow with N. It reports the growth of the RSS high-water mark
(``ru_maxrss``) over the run, for N and for N/10 in fresh processes: the two
should be about equal. The target (issue: the engine) is under 60 MB for 2M
items with ``ordered=True`` and limit 1000.

Two workloads: a no-op call (fastest, the most results in flight per second)
and one ``await asyncio.sleep(0)`` (every call suspends, so 1000 are really in
flight), each in input order and as completed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import time


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


async def _noop(x: int) -> int:
    return x


async def _sleep0(x: int) -> int:
    await asyncio.sleep(0)
    return x


def _worker(n: int, workload: str, ordered: bool) -> None:
    import corral

    fn = _noop if workload == "noop" else _sleep0

    async def main() -> int:
        count = 0
        async with corral.map(fn, range(n), limit=1000, ordered=ordered) as results:
            async for _ in results:
                count += 1
        return count

    before = _rss_mb()
    start = time.perf_counter()
    assert asyncio.run(main()) == n
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"growth_mb": peak - before, "seconds": elapsed}))


def _measure(n: int, workload: str, ordered: bool) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", str(n), workload, str(int(ordered))],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(out.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2_000_000)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        n, workload, ordered = args.worker
        _worker(int(n), workload, ordered == "1")
        return
    n = args.items
    print(f"Python {sys.version.split()[0]}, limit 1000, results discarded as they arrive")
    print(f"{'workload':10} {'order':10} {'items':>10} {'RSS growth MB':>14} {'µs/item':>8}")
    for workload in ("noop", "sleep0"):
        for ordered in (True, False):
            for size in (n // 10, n):
                r = _measure(size, workload, ordered)
                order = "input" if ordered else "completed"
                print(
                    f"{workload:10} {order:10} {size:>10,} {r['growth_mb']:>14.1f} "
                    f"{r['seconds'] / size * 1e6:>8.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
