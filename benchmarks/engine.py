"""Engine benchmark: what each way of fanning out async calls costs per item.

    python benchmarks/engine.py                      # full run (long: the 100k-item cases)
    python benchmarks/engine.py --quick              # smaller sizes, 3 runs: 2-3 minutes on 2 cores
    python benchmarks/engine.py --json out.json      # also write every raw measurement
    python benchmarks/engine.py --cases noop,sleep0 --loops asyncio --strategies gather_all,iterator_workers

What it compares
----------------
The strategies of :mod:`corral.lab.strategies`: the seeds' ``asyncio.gather``
(unbatched, in batches of ``limit``, in 5 batches), the Task-per-item +
Semaphore recipe, a queue of workers, the peer libraries aiometer and
aiostream, corral itself, and the hand-written baseline ``iterator_workers``
(``limit`` workers pulling from one shared iterator). Every ratio in the
tables is relative to that baseline, measured in the same run on the same
loop.

The cases
---------
``noop``: ``async def fn(x): return x``, 1M items (quick: 20k), limit 1000.
    The call never suspends, so the time is pure per-item overhead: creating a
    Task or coroutine, a queue hand-off, a semaphore, the bookkeeping of
    ordering. This is the ceiling on how fast a strategy can go.
``sleep0``: one ``await asyncio.sleep(0)``, 200k items (quick: 10k), limit 1000.
    Every call suspends once, so it adds what a real I/O call costs the
    strategy: a trip through the event loop, waking the waiter, resuming.
``sleep3x100ms-N-unbounded`` / ``sleep3x100ms-N-limit1000``: seed 001's
    ``3 x await asyncio.sleep(0.1)``, for N = 10k and 100k items (quick: 5k
    unbounded and 2k with limit 1000), with no limit and with limit 1000.
    Here the strategy is mostly waiting, and the question is how close its
    wall time gets to the *physical bound*: 0.3 s when every call may run at
    once, ``0.3 s x ceil(N / limit)`` when only ``limit`` may. The ``x bound``
    column is wall / bound: 1.00 is perfect, 1.30 means 30% lost to overhead
    (or, for gather_batched, to waiting for the slowest call of each batch).
    Strategies marked "no limit" ignore the limit and may beat the bound: they
    run more calls at once than allowed, which is the point seed 001 missed.

How it measures
---------------
- Each (case, strategy, loop) measurement runs in a fresh process (``--worker``),
  so no strategy inherits another's heap, caches or garbage. The clock covers
  only the strategy call: process start, imports and a warm-up call on 3 items
  (which also triggers the lazy imports of aiometer/aiostream) come before it.
- Runs are repeated (quick: 3, full: 5) and the median is reported; ``spread``
  is (max - min) / median over the runs. The strategies of one case run
  round-robin, starting one later each repeat, so a noisy moment of the
  machine hits them all alike.
- ``µs/item`` is the wall time of the call divided by the number of items.
- ``peak MB`` is the growth of the process's RSS high-water mark during the
  call (``ru_maxrss`` after, minus the RSS just before). It includes the result
  list and the result objects (about 36 MB per million int results for
  everyone), so compare strategies with one another, not with zero.
- Items are ``range(N)``, generated lazily. Strategies marked "materialises
  input" build a list, a Task, a coroutine or a callable for every item before
  the first call ends; their memory grows with N. The others pull items only
  as capacity frees and need O(limit) memory beyond the results.
- A measurement taking longer than ``--timeout`` seconds (quick: 30, full: 120)
  is killed and shown as ``timeout``; later repeats of it are skipped, so a run
  always ends.
- The header gives Python, the loops, the CPU count and the import time of
  ``corral`` (``python -X importtime -c "import corral"``, median of 5), also
  measured with asyncio already imported: what corral adds to an asyncio program.

How to read it
--------------
Look at ``x base`` first: below 1.5 is within noise and ordering costs of the
best hand-written pattern; 5-50 is the Task-per-item family. ``peak MB``
separates the strategies that scale to unbounded inputs from those that do
not. uvloop speeds up the loop itself, so it helps strategies that make many
loop trips (a Task per item) more than those that do not. On a 2-core machine
expect 5-10% noise; trust differences larger than the spread column.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass
from importlib import util
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[1] / "src"
try:
    from corral.lab import strategies
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(SRC))
    from corral.lab import strategies


# --------------------------------------------------------------------------------------
# Workloads and cases
# --------------------------------------------------------------------------------------


async def noop(x: int) -> int:
    """The call that never suspends: pure per-item overhead."""
    return x


async def sleep0(x: int) -> int:
    """One trip through the event loop per call."""
    await asyncio.sleep(0)
    return x


async def sleep3x100ms(x: int) -> int:
    """Seed 001's test_coroutine: three 0.1 s waits "representing the network"."""
    await asyncio.sleep(0.1)
    await asyncio.sleep(0.1)
    await asyncio.sleep(0.1)
    return x


WORKLOADS: dict[str, Callable[[int], Awaitable[int]]] = {
    "noop": noop,
    "sleep0": sleep0,
    "sleep3x100ms": sleep3x100ms,
}
SECONDS_PER_CALL = {"sleep3x100ms": 0.3}


@dataclass(frozen=True)
class Case:
    """One workload at one size and limit."""

    workload: str
    n: int
    limit: int | None

    @property
    def key(self) -> str:
        if self.workload in SECONDS_PER_CALL:
            size = f"{self.n // 1000}k" if self.n % 1000 == 0 else str(self.n)
            bound = "unbounded" if self.limit is None else f"limit{self.limit}"
            return f"{self.workload}-{size}-{bound}"
        return self.workload

    @property
    def bound(self) -> float | None:
        """The least wall time physics allows: waves of ``limit`` calls of fixed length."""
        per_call = SECONDS_PER_CALL.get(self.workload)
        if per_call is None:
            return None
        waves = 1 if self.limit is None else math.ceil(self.n / self.limit)
        return per_call * waves


FULL_CASES = [
    Case("noop", 1_000_000, 1000),
    Case("sleep0", 200_000, 1000),
    Case("sleep3x100ms", 10_000, None),
    Case("sleep3x100ms", 10_000, 1000),
    Case("sleep3x100ms", 100_000, None),
    Case("sleep3x100ms", 100_000, 1000),
]
# Quick mode keeps every case but shrinks it: per-item costs do not depend on
# the size (the slow peers cost 60-130 µs per item, so 200k no-op items would
# take minutes), and two waves of 1000 show the limited case's wave penalty.
QUICK_CASES = [
    Case("noop", 20_000, 1000),
    Case("sleep0", 10_000, 1000),
    Case("sleep3x100ms", 5_000, None),
    Case("sleep3x100ms", 2_000, 1000),
]

LOOPS = ["asyncio", "uvloop", "eager"]


def loop_unavailable(loop: str) -> str | None:
    """``None`` if loop kind ``loop`` can run here, else why not."""
    if loop == "uvloop" and util.find_spec("uvloop") is None:
        return "uvloop is not installed: pip install 'corral[uvloop]'"
    if loop == "eager" and sys.version_info < (3, 12):
        return "the eager task factory needs Python 3.12+"
    if loop not in LOOPS:
        return f"unknown loop {loop!r}; choose from {', '.join(LOOPS)}"
    return None


# --------------------------------------------------------------------------------------
# The measuring process
# --------------------------------------------------------------------------------------


def _maxrss_kb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform == "darwin" else float(peak)  # macOS says bytes


def _rss_kb() -> float:
    """The current RSS; the high-water mark where /proc is missing (an upper bound)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 1024
    except (OSError, ValueError, IndexError):
        return _maxrss_kb()


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one strategy once on one case, in this (fresh) process; return the numbers."""
    strategy = strategies.STRATEGIES[spec["strategy"]].run
    fn = WORKLOADS[spec["workload"]]
    n: int = spec["n"]
    limit: int | None = spec["limit"]
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if spec["loop"] == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop

    async def timed() -> tuple[list[Any], float, float, float]:
        # Warm-up on 3 items: lazy imports, first-call costs, code paths.
        await strategy(noop, range(3), limit)
        gc.collect()
        rss_before = _rss_kb()
        start = time.perf_counter()
        results = await strategy(fn, range(n), limit)
        wall = time.perf_counter() - start
        return results, wall, rss_before, _maxrss_kb()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        if spec["loop"] == "eager":
            runner.get_loop().set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined,unused-ignore]
        results, wall, rss_before, peak = runner.run(timed())
    correct = results == list(range(n))
    return {
        "status": "ok" if correct else "wrong results",
        "wall_s": wall,
        "us_per_item": wall / n * 1e6,
        "peak_mb": max(0.0, peak - rss_before) / 1024,
    }


def run_in_fresh_process(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Measure ``spec`` in a new interpreter; a run past ``timeout`` seconds is killed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    env.pop("CORRAL_MONITOR", None)  # the loop watch would tax corral's strategies only
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return {"status": f"error: {tail[:200]}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# --------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------


def corral_import_ms(runs: int = 5, *, after: str = "") -> float | None:
    """Median cumulative import time of ``corral``, from ``python -X importtime``.

    ``after="asyncio"`` imports that first, so its cost is left out: what
    corral adds to a program that already uses asyncio.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    code = f"import {after}; import corral" if after else "import corral"
    samples = []
    for _ in range(runs):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", code],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        for line in done.stderr.splitlines():
            parts = [p.strip() for p in line.removeprefix("import time:").split("|")]
            if len(parts) == 3 and parts[2] == "corral":
                samples.append(int(parts[1]) / 1000)
    return statistics.median(samples) if samples else None


def _version(distribution: str) -> str | None:
    from importlib import metadata  # 30 ms: only the parent needs it, not each measurement

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def environment(loops: list[str]) -> dict[str, Any]:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "loops": loops,
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "corral_import_ms": corral_import_ms(),
        "corral_import_after_asyncio_ms": corral_import_ms(after="asyncio"),
        "versions": {
            name: _version(name) for name in ("corral", "uvloop", "aiometer", "aiostream")
        },
    }


# --------------------------------------------------------------------------------------
# Summary and tables
# --------------------------------------------------------------------------------------


def summarise(
    case: Case, loop: str, names: list[str], rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Median per strategy for one case and loop, with ratios to the baseline."""
    out = []
    for name in names:
        mine = [r for r in rows if r["strategy"] == name and r["loop"] == loop]
        ok = [r for r in mine if r["status"] == "ok"]
        failed = [r["status"] for r in mine if r["status"] != "ok"]
        entry: dict[str, Any] = {"case": case.key, "loop": loop, "strategy": name}
        entry["status"] = failed[0] if failed else "ok"
        if ok and not failed:
            walls = [r["wall_s"] for r in ok]
            entry["runs"] = len(ok)
            entry["wall_s"] = statistics.median(walls)
            entry["us_per_item"] = statistics.median(r["us_per_item"] for r in ok)
            entry["spread"] = (max(walls) - min(walls)) / entry["wall_s"]
            entry["peak_mb"] = statistics.median(r["peak_mb"] for r in ok)
            if case.bound is not None:
                entry["bound_s"] = case.bound
                entry["x_bound"] = entry["wall_s"] / case.bound
        out.append(entry)
    base = next((e for e in out if e["strategy"] == strategies.BASELINE and "wall_s" in e), None)
    for entry in out:
        if base is not None and "wall_s" in entry:
            entry["x_base"] = entry["wall_s"] / base["wall_s"]
    return out


def _notes(case: Case, name: str) -> str:
    info = strategies.STRATEGIES[name]
    notes = []
    if case.limit is not None and not info.bounded:
        notes.append("no limit")
    if not info.lazy:
        notes.append("materialises input")
    if name == strategies.BASELINE:
        notes.append("baseline")
    return ", ".join(notes)


def table_rows(case: Case, summary: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["loop", "strategy", "µs/item", "x base", "spread", "peak MB"]
    if case.bound is not None:
        header += ["wall s", "bound s", "x bound"]
    header.append("notes")
    rows = []
    for e in summary:
        row = [e["loop"], e["strategy"]]
        if "wall_s" in e:
            row += [
                f"{e['us_per_item']:.2f}",
                f"{e['x_base']:.2f}" if "x_base" in e else "-",
                f"{e['spread']:.0%}",
                f"{e['peak_mb']:.1f}",
            ]
            if case.bound is not None:
                row += [f"{e['wall_s']:.2f}", f"{e['bound_s']:.1f}", f"{e['x_bound']:.2f}"]
        else:
            row += [e["status"]] + [""] * (len(header) - 4)
        row.append(_notes(case, e["strategy"]))
        rows.append(row)
    return header, rows


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """A rich table when rich is installed and stdout is a terminal, else plain aligned text."""
    numeric = {"µs/item", "x base", "spread", "peak MB", "wall s", "bound s", "x bound"}
    if sys.stdout.isatty() and util.find_spec("rich") is not None:
        from rich import box
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
        for column in header:
            table.add_column(column, justify="right" if column in numeric else "left")
        previous = None
        for row in rows:
            if previous is not None and row[0] != previous:
                table.add_section()
            previous = row[0]
            table.add_row(*row)
        Console().print(table)
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if h in numeric else c.ljust(w)
            for c, w, h in zip(cells, widths, header, strict=True)
        ).rstrip()

    print(f"\n{title}")
    print(line(header))
    print(line(["-" * w for w in widths]))
    previous = None
    for row in rows:
        if previous is not None and row[0] != previous:
            print()
        previous = row[0]
        print(line(row))
    sys.stdout.flush()


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------


def _pick(requested: str | None, known: Iterable[str], what: str) -> list[str]:
    known = list(known)
    if requested is None:
        return known
    picked = [p.strip() for p in requested.split(",") if p.strip()]
    unknown = [p for p in picked if p not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)}; choose from {', '.join(known)}")
    return picked


def _select_cases(requested: str | None, cases: list[Case]) -> list[Case]:
    """Cases by key, or by workload name (all sizes of it)."""
    if requested is None:
        return cases
    wanted = [p.strip() for p in requested.split(",") if p.strip()]
    chosen = [c for c in cases if c.key in wanted or c.workload in wanted]
    known = {c.key for c in cases} | {c.workload for c in cases}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise SystemExit(
            f"unknown case: {', '.join(unknown)}; choose from {', '.join(sorted(known))}"
        )
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Per-item cost of the ways to fan out async calls (see the module docstring)."
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes and 3 repeats")
    parser.add_argument("--json", metavar="OUT", help="write all raw measurements to OUT")
    parser.add_argument("--cases", help="comma-separated case keys or workloads (noop,sleep0,...)")
    parser.add_argument("--loops", default="asyncio,uvloop", help="asyncio,uvloop,eager")
    parser.add_argument("--strategies", help="comma-separated strategy names (default: all)")
    parser.add_argument("--repeats", type=int, help="runs per measurement (quick 3, full 5)")
    parser.add_argument("--timeout", type=float, help="seconds per run (quick 30, full 120)")
    parser.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return 0

    cases = _select_cases(args.cases, QUICK_CASES if args.quick else FULL_CASES)
    repeats = args.repeats or (3 if args.quick else 5)
    timeout = args.timeout or (30.0 if args.quick else 120.0)
    if repeats < 1 or timeout <= 0:
        raise SystemExit(f"--repeats must be >= 1 and --timeout > 0; got {repeats} and {timeout}")

    loops = []
    for loop in _pick(args.loops, LOOPS, "loop"):
        reason = loop_unavailable(loop)
        if reason:
            print(f"note: skipping loop {loop}: {reason}")
        else:
            loops.append(loop)
    names = []
    for name in _pick(args.strategies, strategies.STRATEGIES, "strategy"):
        reason = strategies.unavailable(name)
        if reason:
            print(f"note: skipping strategy {name}: {reason}")
        else:
            names.append(name)
    if not loops or not names:
        raise SystemExit("nothing to run: no loop or no strategy is available")

    env = environment(loops)
    cpus = (
        env["cpu_count"]
        if env["cpus_usable"] in (None, env["cpu_count"])
        else (f"{env['cpus_usable']} of {env['cpu_count']}")
    )
    cold, warm = env["corral_import_ms"], env["corral_import_after_asyncio_ms"]
    imported = (
        "?" if cold is None or warm is None else f"{cold:.0f} ms ({warm:.0f} ms after asyncio)"
    )
    print(
        f"Python {env['python']} ({env['implementation']}) on {env['platform']}\n"
        f"loops: {', '.join(loops)}   CPUs: {cpus}   "
        f"import corral: {imported}\n"
        f"{'quick' if args.quick else 'full'} mode: {repeats} runs per measurement, "
        f"median shown; timeout {timeout:g} s per run; baseline {strategies.BASELINE}\n"
        + "   ".join(f"{k} {v}" for k, v in env["versions"].items() if v),
        flush=True,
    )

    measurements: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    for case in cases:
        runnable = [n for n in names if not (n == "gather_batched" and case.limit is None)]
        skipped = "gather_batched: n/a without a limit (one batch is gather_all)"
        rows: list[dict[str, Any]] = []
        given_up: set[tuple[str, str]] = set()
        for repeat in range(repeats):
            # Round-robin, starting one later each repeat.
            order = runnable[repeat % len(runnable) :] + runnable[: repeat % len(runnable)]
            for loop in loops:
                for name in order:
                    if (loop, name) in given_up:
                        continue
                    spec = {
                        "workload": case.workload,
                        "n": case.n,
                        "limit": case.limit,
                        "strategy": name,
                        "loop": loop,
                    }
                    result = run_in_fresh_process(spec, timeout)
                    if result["status"] == "timeout":
                        result["status"] = f"timeout >{timeout:g}s"
                    if result["status"] != "ok":
                        given_up.add((loop, name))
                    row = {"case": case.key, "repeat": repeat, **spec, **result}
                    rows.append(row)
                    shown = (
                        f"{result['us_per_item']:8.2f} µs/item"
                        if result["status"] == "ok"
                        else result["status"]
                    )
                    print(
                        f"  {case.key} run {repeat + 1}/{repeats} {loop:8} {name:20} {shown}",
                        file=sys.stderr,
                        flush=True,
                    )
        measurements += rows
        case_summary = [e for loop in loops for e in summarise(case, loop, runnable, rows)]
        summaries += case_summary
        limit = "none" if case.limit is None else f"{case.limit:,}"
        title = f"{case.key}: {case.n:,} items, limit {limit}, median of {repeats}"
        if case.bound is not None:
            title += f", physical bound {case.bound:.1f} s"
        header, table = table_rows(case, case_summary)
        print_table(title, header, table)
        if case.limit is None and "gather_batched" in names:
            print(f"  ({skipped})")

    if args.json:
        document = {
            "environment": env,
            "mode": "quick" if args.quick else "full",
            "repeats": repeats,
            "timeout_s": timeout,
            "baseline": strategies.BASELINE,
            "cases": [{"key": c.key, **asdict(c), "bound_s": c.bound} for c in cases],
            "strategies": {
                n: {k: v for k, v in asdict(strategies.STRATEGIES[n]).items() if k != "run"}
                for n in names
            },
            "measurements": measurements,
            "summary": summaries,
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
        print(f"\nraw measurements written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
