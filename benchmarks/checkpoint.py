"""Checkpoint benchmark: what recording every result costs, and how fast a resume skips.

    python benchmarks/checkpoint.py                  # full: 200k-item overhead, 1M-item resume
    python benchmarks/checkpoint.py --quick          # 50k and 200k items, 3 runs: about a minute
    python benchmarks/checkpoint.py --json out.json  # also write every raw measurement
    python benchmarks/checkpoint.py --cases overhead --baseline /tmp/old/src
                                    # the same overhead runs on another corral too

The cases
---------
``overhead``: ``async def fn(x): await asyncio.sleep(0); return x`` over 200k
    items (quick: 50k), limit 1000, with and without ``checkpoint=`` (a new
    file each run), both as ``corral.gather`` and as a consumed ``corral.map``.
    ``sleep(0)`` is the cheapest call that suspends: the per-item cost of the
    checkpoint (an id, a pickle, a row, the consumer's wait for the commit) is
    compared with corral's own, about as small as it gets. A real call (an
    HTTP request, an LLM) takes milliseconds and hides it completely. The
    ratio ``checkpoint / plain`` is the cost; the target is <= 1.10.
    ``--input`` sets its items: ``range`` (the default; a range's chunks
    are screened without a pass over their ids), ``list`` (the same ints in
    a list: a type check and an ascending check per chunk), ``strs`` (URLs
    in a shuffled order: every id goes in a set) or ``rows`` (dicts named by
    ``item_id=lambda row: row["id"]``, ascending ints, like rows read from a
    database; ``fn`` returns the dict, so every result is pickled).
``resume``: a file holding 1M recorded results (quick: 200k) is resumed by
    ``corral.gather`` / ``corral.map`` with an ``fn`` that must not be called:
    wall time covers opening the file, loading the ids, looking every item up
    and handing the results out. Target: under 5 s for 1M.
``partial``: the 200k-item overhead case (quick: 50k) resumed from a file
    holding every other item: half the items are looked up, half are called
    and recorded, side by side on one loop.
``floor``: the overhead case with the rows dropped instead of written: the
    checkpoint records every result, screens every chunk and hands each
    write to its thread as usual, and the thread returns at once (no
    ``marshal``, no SQLite). What the checkpoint costs apart from the disk:
    the target of 1.10 cannot be met by any writer if this is above it.
    Needs the overhead case's ``plain`` runs, so ask for both
    (``--cases overhead,floor``).
``processes``: the overhead case's map on ``processes=2`` (limit 1000 split
    between them), 100k items (quick: 25k): as it runs without checkpoint (the
    parent merges the workers' results), with ``checkpoint=`` (an engine in the
    parent pulls, records and orders, the workers run the calls), and with
    ``progress=`` only (that engine without a file). Each ``sleep(0)`` call
    crosses two process boundaries, so this is the most the parent's engine
    can cost.

``instructions``: the overhead case (50k and 2k items, quick: 20k and 1k,
    so that start-up cancels out) run once per variant under ``valgrind --tool=callgrind``,
    which counts the instructions both threads execute: the same count
    whatever else the machine does. What the checkpoint adds in *work* per
    item, apart from what it costs in waiting (the threads handing each
    other the GIL, the machine's scheduler), which only wall time shows.
    Needs valgrind; about two minutes.

How it measures
---------------
Each measurement runs in a fresh process (``--worker``) on a fresh or a
copied file in a temporary directory on the same disk as the system's temp
dir; the clock covers only the map (process start, imports and a warm-up on
3 items come before it). Runs repeat (quick: 3, full: 5) round-robin across
variants, and the median is reported with the spread ((max - min) / median).
The header gives Python, SQLite, the CPU count and the load average at start:
on a shared 2-core machine expect 10% noise, and trust only the ratios of
variants measured side by side in the same run. Each run also reports the
process's CPU time (both threads: the loop's and the writer's), which other
processes disturb less than wall time.

``--baseline DIR`` runs the overhead variants a second time with ``DIR`` (the
``src`` directory of another corral, e.g. from ``git archive HEAD src | tar -x
-C /tmp/old``) first on ``PYTHONPATH``, interleaved with the others: a
before/after comparison in one run, under the same load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[1] / "src"
try:
    import corral
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(SRC))
    import corral

LIMIT = 1000


def row_id(row: dict[str, Any]) -> int:
    """``item_id`` for the ``rows`` input."""
    return int(row["id"])


async def sleep0(x: int) -> int:
    """One trip through the event loop per call."""
    await asyncio.sleep(0)
    return x


async def noop(x: int) -> int:
    """Used to fill the files that the resume cases replay."""
    return x


async def must_not_run(x: int) -> int:
    """The resume cases' fn: every item is recorded, so it is never called."""
    raise AssertionError(f"fn called for recorded item {x}")


async def partial_fn(x: int) -> int:
    """The partial case's fn: odd items are called (even ones are recorded)."""
    assert x % 2, f"fn called for recorded item {x}"
    await asyncio.sleep(0)
    return x


# --------------------------------------------------------------------------------------
# The measuring process
# --------------------------------------------------------------------------------------


def make_items(kind: str, n: int) -> Sequence[Any]:
    """The input: ``range(n)``, the same ints in a list, n dicts, or n URLs in a shuffled order."""
    if kind == "range":
        return range(n)
    if kind == "list":
        return list(range(n))
    if kind == "rows":
        return [{"id": i, "prompt": f"item {i}"} for i in range(n)]
    order = list(range(n))
    random.Random(0).shuffle(order)
    return [f"https://example.com/items/{i}" for i in order]


async def _run(
    form: str,
    fn: Any,
    items: Sequence[Any],
    checkpoint: str | None,
    extra: dict[str, Any] | None = None,
) -> list[Any]:
    # fingerprint= is fixed so the files the parent filled (with noop) resume
    # under any fn.
    options: dict[str, Any] = {"limit": LIMIT, **(extra or {})}
    if checkpoint is not None:
        options.update(checkpoint=checkpoint, fingerprint="benchmark")
    if form == "gather":
        return await corral.gather(fn, items, **options)
    results = []
    async with corral.map(fn, items, **options) as stream:
        async for value in stream:
            results.append(value)
    return results


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one variant once, in this (fresh) process; return the numbers."""
    fn = {"sleep0": sleep0, "must_not_run": must_not_run, "partial": partial_fn}[spec["fn"]]
    n: int = spec["n"]
    items = make_items(spec.get("input", "range"), n)
    checkpoint: str | None = spec["checkpoint"]

    extra: dict[str, Any] = {}
    if spec.get("processes"):
        extra["processes"] = spec["processes"]
    if spec.get("progress"):
        extra["progress"] = _ignore
    if spec.get("input") == "rows" and checkpoint is not None:
        extra["item_id"] = row_id
    if spec.get("writes") == "dropped":
        from corral import _checkpoint_file

        def dropped(self: Any, plain: list[Any], others: list[Any]) -> None:
            """Take the rows on the thread and store nothing (the ``floor`` case)."""

        _checkpoint_file.Database.insert = dropped  # type: ignore[method-assign]

    async def timed() -> tuple[list[int], float]:
        await _run(spec["form"], noop, range(3), None)  # warm-up: code paths, first calls
        start = time.perf_counter()
        results = await _run(spec["form"], fn, items, checkpoint, extra)
        return results, time.perf_counter() - start

    cpu = time.process_time()
    results, wall = asyncio.run(timed())
    cpu = time.process_time() - cpu  # includes imports-free warm-up: a few ms
    return {
        "status": "ok" if results == list(items) else "wrong results",
        "wall_s": wall,
        "cpu_s": cpu,
        "us_per_item": wall / n * 1e6,
    }


def _ignore(stats: Any) -> None:
    """progress= that shows nothing: the cost of the engine in front of the processes alone."""


def _worker_env(spec: dict[str, Any]) -> dict[str, str]:
    env = dict(os.environ)
    src = spec.get("src") or str(SRC)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    env.pop("CORRAL_MONITOR", None)
    return env


def _worker_command(spec: dict[str, Any]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]


def run_in_fresh_process(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = _worker_env(spec)
    command = _worker_command(spec)
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


def count_instructions(spec: dict[str, Any]) -> int:
    """Instructions the worker process executes for ``spec`` (every thread), by callgrind."""
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    done = subprocess.run(
        command + _worker_command(spec),
        capture_output=True,
        text=True,
        timeout=900,
        env=_worker_env(spec),
    )
    found = re.search(r"Collected\s*:\s*(\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"callgrind run failed: {done.stderr.strip()[-300:]}")
    return int(found.group(1))


def instructions_case(work: Path, quick: bool, items: str) -> list[dict[str, Any]]:
    """Instructions per item, plain and checkpointed: the difference of two sizes."""
    small, large = (1_000, 20_000) if quick else (2_000, 50_000)
    rows = []
    for form in ("gather", "map"):
        per_item: dict[str, float] = {}
        for variant in ("plain", "checkpoint"):
            counts = []
            for n in (small, large):
                path = work / f"instructions-{form}-{n}.sqlite"
                checkpoint = str(path) if variant == "checkpoint" else None
                spec = {
                    "form": form,
                    "fn": "sleep0",
                    "n": n,
                    "checkpoint": checkpoint,
                    "input": items,
                }
                counts.append(count_instructions(spec))
            per_item[variant] = (counts[1] - counts[0]) / (large - small)
            print(f"  instructions {form} {variant:10} {per_item[variant]:9,.0f} per item")
        rows.append({"form": form, **per_item, "ratio": per_item["checkpoint"] / per_item["plain"]})
    return rows


# --------------------------------------------------------------------------------------
# Files to resume from
# --------------------------------------------------------------------------------------


def fill(path: Path, items: range) -> float:
    """Record ``items`` (as a checkpointed map of noop would) in a new file; seconds taken."""
    start = time.perf_counter()
    asyncio.run(
        corral.gather(noop, items, limit=LIMIT, checkpoint=str(path), fingerprint="benchmark")
    )
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------


def summarise(name: str, samples: list[dict[str, Any]]) -> dict[str, Any]:
    walls = [s["wall_s"] for s in samples if s.get("status") == "ok"]
    bad = [s["status"] for s in samples if s.get("status") != "ok"]
    if not walls:
        return {"variant": name, "status": bad[0] if bad else "no runs"}
    median = statistics.median(walls)
    return {
        "variant": name,
        "status": "ok" if not bad else f"{len(bad)} failed: {bad[0]}",
        "median_s": median,
        "cpu_s": statistics.median(s["cpu_s"] for s in samples if s.get("status") == "ok"),
        "spread": (max(walls) - min(walls)) / median,
        "runs": len(walls),
    }


def print_table(table: list[dict[str, Any]], overhead_n: int, resume_n: int) -> None:
    print()
    medians = {row["variant"]: row.get("median_s") for row in table}
    print(
        f"{'variant':36} {'median s':>9} {'µs/item':>8} {'spread':>7} {'x plain':>8} "
        f"{'cpu s':>7} {'cpu x':>6}"
    )
    cpus = {row["variant"]: row.get("cpu_s") for row in table}
    for row in table:
        name = row["variant"]
        if row["status"] != "ok" and "median_s" not in row:
            print(f"{name:36} {row['status']}")
            continue
        n = resume_n if name.startswith("resume") else overhead_n
        form = name.split()[1]
        # Each variant is compared with its own plain runs; `floor` with overhead's.
        base = "baseline" if name.startswith("baseline") else "overhead"
        if name.startswith("processes"):
            n, base = overhead_n // 2, "processes"
        plain = medians.get(f"{base} {form} plain")
        plain_cpu = cpus.get(f"{base} {form} plain")
        compared = plain and not name.startswith("resume")
        ratio = f"{row['median_s'] / plain:8.2f}" if compared else ""
        cpu_ratio = f"{row['cpu_s'] / plain_cpu:6.2f}" if compared and plain_cpu else ""
        print(
            f"{name:36} {row['median_s']:9.3f} {row['median_s'] / n * 1e6:8.2f} "
            f"{row['spread']:7.0%} {ratio:>8} {row['cpu_s']:7.3f} {cpu_ratio:>6}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, 3 runs")
    parser.add_argument("--runs", type=int, help="repeats per variant (quick: 3, full: 5)")
    parser.add_argument("--json", metavar="FILE", help="also write every raw measurement here")
    parser.add_argument(
        "--cases",
        default="overhead,resume,partial,processes",
        help="comma-separated; also: floor (with overhead), instructions (needs valgrind)",
    )
    parser.add_argument(
        "--baseline", metavar="DIR", help="also run the overhead cases on the corral in DIR"
    )
    parser.add_argument(
        "--input",
        choices=("range", "list", "strs", "rows"),
        default="range",
        help="the overhead and instructions cases' items (default: range)",
    )
    parser.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return 0

    runs = args.runs or (3 if args.quick else 5)
    overhead_n = 50_000 if args.quick else 200_000
    resume_n = 200_000 if args.quick else 1_000_000
    cases = args.cases.split(",")
    print(
        f"Python {sys.version.split()[0]} ({platform.python_implementation()}), "
        f"SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f} at start, limit {LIMIT}, asyncio loop, "
        f"--input {args.input}"
    )
    raw: dict[str, list[dict[str, Any]]] = {}
    table: list[dict[str, Any]] = []
    instructions: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="corral-checkpoint-bench-") as tmp:
        work = Path(tmp)
        if "instructions" in cases:
            if shutil.which("valgrind") is None:
                print("instructions: SKIPPED, valgrind is not installed")
            else:
                instructions = instructions_case(work, args.quick, args.input)
        variants: dict[str, list[dict[str, Any]]] = {}
        if "overhead" in cases:
            for form in ("gather", "map"):
                base = {"form": form, "fn": "sleep0", "n": overhead_n, "input": args.input}
                variants[f"overhead {form} plain"] = [{**base, "checkpoint": None}]
                variants[f"overhead {form} checkpoint"] = [
                    {**base, "checkpoint": str(work / f"new-{form}-{i}.sqlite")}
                    for i in range(runs)
                ]
                if args.baseline:
                    old = {**base, "src": str(Path(args.baseline).resolve())}
                    variants[f"baseline {form} plain"] = [{**old, "checkpoint": None}]
                    variants[f"baseline {form} checkpoint"] = [
                        {**old, "checkpoint": str(work / f"old-{form}-{i}.sqlite")}
                        for i in range(runs)
                    ]
        if "floor" in cases:
            for form in ("gather", "map"):
                variants[f"floor {form} rows dropped"] = [
                    {
                        "form": form,
                        "fn": "sleep0",
                        "n": overhead_n,
                        "input": args.input,
                        "writes": "dropped",
                        "checkpoint": str(work / f"floor-{form}-{i}.sqlite"),
                    }
                    for i in range(runs)
                ]
        if "resume" in cases:
            full = work / "full.sqlite"
            print(
                f"filling {full.name} with {resume_n:,} results: {fill(full, range(resume_n)):.1f} s"
            )
            for form in ("gather", "map"):
                variants[f"resume {form} {resume_n // 1000}k recorded"] = [
                    {"form": form, "fn": "must_not_run", "n": resume_n, "checkpoint": str(full)}
                ]
        if "partial" in cases:
            half = work / "half.sqlite"
            took = fill(half, range(0, overhead_n, 2))
            print(
                f"filling {half.name} with {overhead_n // 2:,} results (even items): {took:.1f} s"
            )
            for form in ("gather", "map"):
                variants[f"partial {form} half recorded"] = [
                    {"form": form, "fn": "partial", "n": overhead_n, "checkpoint": str(half)}
                ]
        if "processes" in cases:
            base = {"form": "map", "fn": "sleep0", "n": overhead_n // 2, "processes": 2}
            variants["processes map plain"] = [{**base, "checkpoint": None}]
            variants["processes map checkpoint"] = [
                {**base, "checkpoint": str(work / f"processes-{i}.sqlite")} for i in range(runs)
            ]
            variants["processes map progress"] = [{**base, "checkpoint": None, "progress": True}]
        names = list(variants)  # empty when only `instructions` was asked for
        for repeat in range(runs if names else 0):
            # Round-robin, starting one later each repeat: a noisy moment of
            # the machine hits every variant alike.
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                specs = variants[name]
                spec = specs[repeat % len(specs)]
                if "partial" in name:
                    # Each run records the odd items: resume from a fresh copy.
                    copy = work / f"half-copy-{repeat}.sqlite"
                    shutil.copy(work / "half.sqlite", copy)
                    spec = {**spec, "checkpoint": str(copy)}
                result = run_in_fresh_process(spec, timeout=300)
                raw.setdefault(name, []).append(result)
                print(
                    f"  {name:34} run {repeat + 1}: {result.get('wall_s', 0):.3f} s  {result['status']}"
                )
        for name in names:
            table.append(summarise(name, raw[name]))

    if table:
        print_table(table, overhead_n, resume_n)
    for row in instructions:
        print(
            f"instructions per item, {row['form']}: plain {row['plain']:,.0f}, "
            f"checkpoint {row['checkpoint']:,.0f} ({row['ratio']:.3f}x)"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"raw": raw, "table": table, "instructions": instructions}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
