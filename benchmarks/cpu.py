"""CPU benchmark: the ways to get CPU work off one event loop, side by side.

    python benchmarks/cpu.py                  # both cases, 3 runs each, ~2-3 minutes on 2 cores
    python benchmarks/cpu.py --repeats 5      # steadier medians
    python benchmarks/cpu.py --cases b        # only the tiny-task case
    python benchmarks/cpu.py --json out.json  # also write every raw measurement

Needs the ``peers`` extra for aiomultiprocess (``pip install aiomultiprocess``);
without it that row is skipped.

The cases
---------
``a``: "fetch and parse", 2,000 items: each waits 10 ms (``asyncio.sleep``,
    standing for the network) and then runs 2 ms of pure-Python CPU (standing
    for parsing). One loop can overlap the waits but not the CPU: 2,000 x 2 ms
    is 4 s on one core whatever the limit, and ~2 s on two.
``b``: 20,000 tiny CPU tasks of ~50 µs each. The work is 1 s on one core;
    the question is what the way of sending it elsewhere costs per item.

The strategies
--------------
``loop``: corral in one process (``limit=100``), the CPU running on the loop:
    the single-process baseline of case a.
``run_in_executor``: the textbook recipe, ``await loop.run_in_executor(pool,
    cpu, x)`` for every item on a plain ``ProcessPoolExecutor(2)``, gathered
    with ``asyncio.gather``: one submission (pickling, a queue hand-off, a
    result) per item. The baseline of case b.
``aiomultiprocess``: ``aiomultiprocess.Pool(2, childconcurrency=50).map(fn,
    items)``: async ``fn`` run on an event loop in each of 2 processes, one
    queue round trip per item.
``executor=process``: corral with a plain ``def`` fn and ``executor="process"``
    (chunked, adaptive). Case a is a two-stage pipeline, the corral idiom for
    "await, then compute": ``corral.gather(parse, corral.map(fetch, items),
    executor="process")``.
``processes=2``: ``corral.gather(fn, items, processes=2)``: the async ``fn``
    runs on 2 worker processes, each with its own loop and engine (limit 100
    split 50/50).

How it measures
---------------
- Each (case, strategy) measurement runs in a fresh process (``--worker``);
  strategies run round-robin, starting one later each repeat, so a noisy
  moment of the machine hits them all alike. The median of the runs is shown;
  ``spread`` is (max - min) / median.
- The clock covers the whole call, including starting and stopping the
  worker processes the strategy uses: a program pays that too. Before it, a
  warm-up call of the same strategy on 3 items starts multiprocessing's fork
  server and loads the code, as in any program that has already done work.
- The CPU work is calibrated once in the driver (iterations of a pure-Python
  loop taking 2 ms and 50 µs on this machine, median of many) and passed to
  every measurement, so all strategies do identical work.
- Every run checks that the results are ``list(range(n))``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from importlib import util
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[1] / "src"
try:
    import corral
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(SRC))
    import corral

# Iterations of spin() for each case, set by the driver (see calibrate()) and
# inherited through the environment by every process a measurement starts.
SPIN_A = int(os.environ.get("CORRAL_CPU_BENCH_SPIN_A", "0"))
SPIN_B = int(os.environ.get("CORRAL_CPU_BENCH_SPIN_B", "0"))
WAIT_A = 0.010

CASES = {
    "a": {"n": 2_000, "what": "10 ms await + 2 ms pure-Python CPU per item"},
    "b": {"n": 20_000, "what": "~50 µs pure-Python CPU per item"},
}
STRATEGIES = ["loop", "run_in_executor", "aiomultiprocess", "executor=process", "processes=2"]
BASELINE = {"a": "loop", "b": "run_in_executor"}


# --------------------------------------------------------------------------------------
# Work (module level: worker processes import it by name)
# --------------------------------------------------------------------------------------


def spin(iterations: int) -> int:
    """Pure-Python CPU work: holds the GIL the whole time."""
    total = 0
    for i in range(iterations):
        total += i * i
    return total


def parse_a(x: int) -> int:
    spin(SPIN_A)
    return x


async def fetch_a(x: int) -> int:
    await asyncio.sleep(WAIT_A)
    return x


async def fetch_and_parse_a(x: int) -> int:
    await asyncio.sleep(WAIT_A)
    spin(SPIN_A)
    return x


def tiny_b(x: int) -> int:
    spin(SPIN_B)
    return x


async def tiny_async_b(x: int) -> int:
    spin(SPIN_B)
    return x


# --------------------------------------------------------------------------------------
# Strategies: each maps its case over range(n) and returns the results in order
# --------------------------------------------------------------------------------------


async def by_loop(case: str, n: int) -> list[int]:
    fn = fetch_and_parse_a if case == "a" else tiny_async_b
    return await corral.gather(fn, range(n), limit=100)


async def by_run_in_executor(case: str, n: int) -> list[int]:
    import concurrent.futures

    loop = asyncio.get_running_loop()
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        if case == "a":

            async def one(x: int) -> int:
                await asyncio.sleep(WAIT_A)
                return await loop.run_in_executor(pool, parse_a, x)

            return await asyncio.gather(*(one(x) for x in range(n)))
        return await asyncio.gather(*(loop.run_in_executor(pool, tiny_b, x) for x in range(n)))


async def by_aiomultiprocess(case: str, n: int) -> list[int]:
    from aiomultiprocess import Pool  # type: ignore[import-untyped]

    fn = fetch_and_parse_a if case == "a" else tiny_async_b
    async with Pool(processes=2, childconcurrency=50) as pool:
        results: list[int] = await pool.map(fn, range(n))
        return results


async def by_executor_process(case: str, n: int) -> list[int]:
    if case == "a":
        async with corral.map(fetch_a, range(n), limit=100) as fetched:
            return await corral.gather(parse_a, fetched, executor="process", limit=100)
    return await corral.gather(tiny_b, range(n), executor="process", limit=100)


async def by_processes(case: str, n: int) -> list[int]:
    fn = fetch_and_parse_a if case == "a" else tiny_async_b
    return await corral.gather(fn, range(n), processes=2, limit=100)


RUNNERS: dict[str, Callable[[str, int], Awaitable[list[int]]]] = {
    "loop": by_loop,
    "run_in_executor": by_run_in_executor,
    "aiomultiprocess": by_aiomultiprocess,
    "executor=process": by_executor_process,
    "processes=2": by_processes,
}


def unavailable(strategy: str) -> str | None:
    if strategy == "aiomultiprocess" and util.find_spec("aiomultiprocess") is None:
        return "aiomultiprocess is not installed: pip install 'aiomultiprocess>=0.9'"
    return None


# --------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one strategy once on one case, in this (fresh) process."""
    runner = RUNNERS[spec["strategy"]]
    case, n = spec["case"], spec["n"]

    async def timed() -> tuple[list[int], float]:
        await runner(case, 3)  # warm-up: fork server, imports, first calls
        start = time.perf_counter()
        results = await runner(case, n)
        return results, time.perf_counter() - start

    results, wall = asyncio.run(timed())
    ok = list(results) == list(range(n))
    return {"status": "ok" if ok else "wrong results", "wall_s": wall}


def run_in_fresh_process(spec: dict[str, Any], spins: dict[str, int], timeout: float) -> Any:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    env["CORRAL_CPU_BENCH_SPIN_A"] = str(spins["a"])
    env["CORRAL_CPU_BENCH_SPIN_B"] = str(spins["b"])
    env.pop("CORRAL_MONITOR", None)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout >{timeout:g}s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return {"status": f"error: {tail[:200]}"}
    return json.loads(lines[-1])


def calibrate(seconds: float) -> int:
    """Iterations of spin() that take ``seconds`` here (median of repeated timings)."""
    iterations = 1000
    while True:  # grow until one timing is long enough to trust
        start = time.perf_counter()
        spin(iterations)
        if time.perf_counter() - start > 0.02:
            break
        iterations *= 2
    samples = []
    for _ in range(15):
        start = time.perf_counter()
        spin(iterations)
        samples.append((time.perf_counter() - start) / iterations)
    return max(1, round(seconds / statistics.median(samples)))


def parallelism(iterations: int, repeats: int = 3) -> float:
    """How many cores two CPU-bound processes really get here, now: 2.0 on an idle 2-core box.

    The machine may be shared: this is the ceiling for any two-process speedup
    measured at about the same time.
    """
    import multiprocessing

    context = multiprocessing.get_context("forkserver")

    def wall(processes: int) -> float:
        workers = [context.Process(target=spin, args=(iterations,)) for _ in range(processes)]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return time.perf_counter() - start

    ratios = [2 * wall(1) / wall(2) for _ in range(repeats)]
    return statistics.median(ratios)


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def summarise(case: str, rows: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    n = CASES[case]["n"]
    out = []
    for name in names:
        mine = [r for r in rows if r["strategy"] == name]
        failed = [r["status"] for r in mine if r["status"] != "ok"]
        entry: dict[str, Any] = {"case": case, "strategy": name}
        if failed or not mine:
            entry["status"] = failed[0] if failed else "not run"
        else:
            walls = [r["wall_s"] for r in mine]
            entry |= {
                "status": "ok",
                "runs": len(walls),
                "wall_s": statistics.median(walls),
                "spread": (max(walls) - min(walls)) / statistics.median(walls),
            }
            entry["items_per_s"] = n / entry["wall_s"]
        out.append(entry)
    base = next((e for e in out if e["strategy"] == BASELINE[case] and "wall_s" in e), None)
    for entry in out:
        if base is not None and "wall_s" in entry:
            entry["speedup"] = base["wall_s"] / entry["wall_s"]
    return out


def markdown(case: str, summary: list[dict[str, Any]], repeats: int) -> str:
    n = CASES[case]["n"]
    lines = [
        f"**({case}) {n:,} items, {CASES[case]['what']}** (median of {repeats}; "
        f"speedup vs `{BASELINE[case]}`)",
        "",
        "| strategy | wall s | items/s | speedup | spread |",
        "|---|---:|---:|---:|---:|",
    ]
    for e in summary:
        if "wall_s" in e:
            speedup = f"{e['speedup']:.2f}x" if "speedup" in e else "-"
            lines.append(
                f"| `{e['strategy']}` | {e['wall_s']:.2f} | {e['items_per_s']:,.0f} | "
                f"{speedup} | {e['spread']:.0%} |"
            )
        else:
            lines.append(f"| `{e['strategy']}` | {e['status']} | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="CPU off the loop (see the module docstring).")
    parser.add_argument("--cases", default="a,b", help="a, b or a,b")
    parser.add_argument("--strategies", help="comma-separated (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per run")
    parser.add_argument("--json", metavar="OUT", help="write all raw measurements to OUT")
    parser.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return 0

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    names = STRATEGIES if args.strategies is None else args.strategies.split(",")
    for name in [*cases, *names]:
        if name not in CASES and name not in RUNNERS:
            raise SystemExit(f"unknown case or strategy {name!r}")
    runnable = []
    for name in names:
        reason = unavailable(name)
        if reason:
            print(f"note: skipping {name}: {reason}")
        else:
            runnable.append(name)

    spins = {"a": calibrate(0.002), "b": calibrate(0.00005)}
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    header = (
        f"Python {sys.version.split()[0]} on {platform.platform()}, {cpus} CPUs, "
        f"uvloop {'yes' if util.find_spec('uvloop') else 'no'}; "
        f"load average at start {load[0]:.2f}"
        if load
        else ""
    )
    print(header)
    print(f"calibrated: spin({spins['a']}) ~ 2 ms, spin({spins['b']}) ~ 50 µs", flush=True)
    cores_before = parallelism(spins["a"] * 100)
    print(f"cores two CPU-bound processes get now: {cores_before:.2f}", flush=True)

    measurements: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    for case in cases:
        rows = []
        for repeat in range(args.repeats):
            order = runnable[repeat % len(runnable) :] + runnable[: repeat % len(runnable)]
            for name in order:
                spec = {"case": case, "n": CASES[case]["n"], "strategy": name}
                result = run_in_fresh_process(spec, spins, args.timeout)
                rows.append({**spec, "repeat": repeat, **result})
                shown = f"{result['wall_s']:7.2f} s" if "wall_s" in result else result["status"]
                print(f"  ({case}) run {repeat + 1}/{args.repeats} {name:18} {shown}", flush=True)
        measurements += rows
        summary = summarise(case, rows, runnable)
        summaries += summary
        print()
        print(markdown(case, summary, args.repeats))
        print(flush=True)

    cores_after = parallelism(spins["a"] * 100)
    print(f"cores two CPU-bound processes get: {cores_before:.2f} before, {cores_after:.2f} after")
    if args.json:
        document = {
            "header": header,
            "cores_before": cores_before,
            "cores_after": cores_after,
            "spins": spins,
            "repeats": args.repeats,
            "measurements": measurements,
            "summary": summaries,
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
        print(f"raw measurements written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
