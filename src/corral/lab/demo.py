"""``corral demo``: the same job done the ways people do it, side by side.

The job: GET 10,000 URLs from an API that, like real ones, serves a limited
number of requests at once (64, for 10 ms each), lets a few hundred more wait
(256), and answers ``429 Too Many Requests`` with ``Retry-After: 1`` beyond
that. The API is :func:`corral.lab.serve`, on loopback; nothing leaves the
machine. The ways:

==================== =============================================================
plain gather         ``asyncio.gather`` over every request (seed 001, "unbatched")
batched gather       ``asyncio.gather`` over batches of 1,000 (seed 002)
queue + 10 workers   an ``asyncio.Queue`` feeding 10 worker tasks (seed 002)
corral limit=64      ``corral.map(get, urls, limit=64, retries=3)``
corral limit=1000    the same with a limit far above what the API holds
corral auto          ``corral.map(get, urls, limit="auto", retries=3)``
==================== =============================================================

The baselines do not retry, as written in the seeds; corral retries three
times, waiting as long as the 429's Retry-After asks. Each runs in its own
process with one shared aiohttp session and no connection cap (aiohttp's
default of 100 would otherwise limit them all), so memory and CPU are its own.
The table gives the time, the successful requests per second, the failed
ones and why, the p99 latency of the successful ones (from the first
attempt), and the growth of peak memory; the plot goes to ``./corral-demo/``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.lab.console import Display
from corral.lab.runner import (
    Result,
    raise_open_files_limit,
    run_main,
    run_specs,
    unwritable,
    write_text_whole,
)

__all__ = ["DEMO_ITEMS", "DEMO_SERVER", "WAYS", "Way", "demo_command", "run_demo"]

#: Requests in the job.
DEMO_ITEMS = 10_000
#: The API: capacity (in service at once), service time, waiting room, refusal.
DEMO_SERVER: dict[str, Any] = {"capacity": 64, "service_ms": 10.0, "queue": 256, "retry_after": 1.0}
#: Seconds one way may take before it is stopped and shown as timed out.
WAY_TIMEOUT = 300.0


@dataclass(frozen=True)
class Way:
    """One way of doing the job: a strategy of the lab, its limit and retries."""

    label: str
    how: str
    strategy: str
    limit: int | str | None
    retries: int = 0

    def spec(self, url: str, items: int) -> dict[str, Any]:
        return {
            "measure": "http",
            "strategy": self.strategy,
            "limit": self.limit,
            "retries": self.retries,
            "n": items,
            "url": url,
            "client": "aiohttp",
        }


WAYS = [
    Way("plain gather", "asyncio.gather(*every request)", "gather_all", None),
    Way("batched gather", "gather, batches of 1,000", "gather_batched", 1000),
    Way("queue + 10 workers", "asyncio.Queue, 10 worker tasks", "queue_workers", 10),
    Way("corral limit=64", "corral.map(limit=64, retries=3)", "corral", 64, 3),
    Way("corral limit=1000", "corral.map(limit=1000, retries=3)", "corral", 1000, 3),
    Way("corral auto", 'corral.map(limit="auto", retries=3)', "corral", "auto", 3),
]


async def run_demo(
    display: Display, items: int = DEMO_ITEMS
) -> tuple[dict[str, Any], list[Result]]:
    """Serve the API, run every way against it with live progress; the results in order."""
    import corral.lab
    from corral.lab.workloads import auto_unavailable

    raise_open_files_limit()
    server = dict(DEMO_SERVER)
    display.print(
        f"corral demo: {items:,} GET requests to a local API that serves {server['capacity']} "
        f"at a time ({server['service_ms']:g} ms each), lets {server['queue']} more wait, and "
        f"answers 429 with Retry-After: {server['retry_after']:g} beyond that."
    )
    display.print("Each way runs in its own process; the API runs in this one.")
    display.print()
    auto_reason = await auto_unavailable()
    results: list[Result] = []
    async with corral.lab.serve(**server) as url:
        with display.board() as board:
            for way in WAYS:
                if way.limit == "auto" and auto_reason is not None:
                    results.append({"status": f"unavailable: {auto_reason}"})
                    continue
                task = board.add(way.label, items)

                def show(_: int, progress: dict[str, Any], task: int = task) -> None:
                    failed = progress.get("failed", 0)
                    board.update(
                        task, progress.get("done", 0), f"{failed:,} failed" if failed else ""
                    )

                [result] = await run_specs(
                    [way.spec(url, items)], timeout=WAY_TIMEOUT, on_progress=show
                )
                results.append(result)
                board.finish(task, _finish_note(result))
    if auto_reason is not None:
        display.print("(auto: not available in this version)")
    return {"items": items, **server}, results


def _finish_note(result: Result) -> str:
    if result["status"] != "ok":
        return str(result["status"])
    failed = f", {result['failed']:,} failed" if result["failed"] else ""
    return f"{result['wall_s']:.1f} s{failed}"


def _failed_cell(result: Result) -> str:
    if not result["failed"]:
        return "0"
    kinds = ", ".join(f"{count:,} x {kind}" for kind, count in result["failures"].items())
    return f"{result['failed']:,} ({kinds})"


def table_rows(results: list[Result]) -> list[list[str]]:
    """One row per way: the cells of the side-by-side table."""
    rows = []
    for way, r in zip(WAYS, results, strict=True):
        if r["status"] != "ok":
            status = (
                "not available in this version"
                if r["status"].startswith("unavailable")
                else r["status"]
            )
            rows.append([way.label, way.how, "-", "-", status, "-", "-", "-"])
            continue
        p99 = "-" if r["p99_ms"] is None else f"{r['p99_ms']:,.0f} ms"
        rows.append(
            [
                way.label,
                way.how,
                f"{r['wall_s']:.1f} s",
                f"{r['ok_per_s']:,.0f}",
                _failed_cell(r),
                f"{r['retried']:,}",
                p99,
                f"+{r['peak_mb']:.0f} MB",
            ]
        )
    return rows


COLUMNS = ["way", "how", "time", "ok/s", "failed (why)", "retries", "p99", "peak mem"]


def findings(results: list[Result], items: int, server: dict[str, Any]) -> list[str]:
    """What the table says, in sentences computed from this run's numbers."""
    by_label = {w.label: r for w, r in zip(WAYS, results, strict=True) if r["status"] == "ok"}
    held = server["capacity"] + server["queue"]
    lines: list[str] = []
    clean = {k: r for k, r in by_label.items() if r["failed"] == 0}
    best = max(clean, key=lambda k: clean[k]["ok_per_s"], default=None)
    plain = by_label.get("plain gather")
    if plain is not None:
        if plain["failed"]:
            lines.append(
                f"plain gather lost {plain['failed']:,} of {items:,} requests "
                f"({plain['failed'] / items:.0%}): it sends all of them at once, and the API "
                f"holds {held} ({server['capacity']} in service + {server['queue']} waiting); "
                "the rest are refused, and nothing retries them."
            )
        else:
            lines.append(f"plain gather sent all {items:,} at once and none failed on this run.")
    batched = by_label.get("batched gather")
    if batched is not None:
        if batched["failed"]:
            lines.append(
                f"batched gather still lost {batched['failed']:,}: a batch of 1,000 is more than "
                f"the {held} the API holds. Batching caps the crowd, but not at the right size."
            )
        elif best is not None:
            lines.append(
                f"batched gather lost nothing, at {batched['ok_per_s']:,.0f}/s against "
                f"{clean[best]['ok_per_s']:,.0f}/s for {best}: each batch waits for its slowest."
            )
    queue = by_label.get("queue + 10 workers")
    if queue is not None and best is not None and best != "queue + 10 workers":
        lines.append(
            f"queue + 10 workers lost {queue['failed']:,}, but 10 in flight use 10 of the "
            f"API's {server['capacity']} slots: {queue['ok_per_s']:,.0f}/s, "
            f"{clean[best]['ok_per_s'] / max(queue['ok_per_s'], 1e-9):.1f}x slower than {best}."
        )
    fixed = by_label.get("corral limit=64")
    if fixed is not None:
        lines.append(
            f"corral limit=64 (the API's capacity): {fixed['ok']:,} of {items:,} succeeded at "
            f"{fixed['ok_per_s']:,.0f}/s, p99 {fixed['p99_ms'] or 0:,.0f} ms."
        )
    high = by_label.get("corral limit=1000")
    if high is not None and fixed is not None:
        if high["retried"]:
            lines.append(
                f"corral limit=1000 is a limit set far above what the API holds: "
                f"{high['retried']:,} refused requests were retried after the Retry-After wait "
                f"({high['failed']:,} still failed), so it took {high['wall_s']:.1f} s against "
                f"{fixed['wall_s']:.1f} s at limit=64, with p99 {high['p99_ms'] or 0:,.0f} ms. "
                "Retries rescue a wrong limit; they do not make it fast."
            )
        else:
            lines.append(
                f"corral limit=1000 was never refused this time, but with up to 1,000 requests "
                f"in flight the slowest waited {high['p99_ms'] or 0:,.0f} ms (p99) against "
                f"{fixed['p99_ms'] or 0:,.0f} ms at limit=64."
            )
    auto = by_label.get("corral auto")
    if auto is not None:
        lines.append(
            f"corral auto, given no limit, made {auto['ok_per_s']:,.0f}/s with "
            f"{auto['failed']:,} failed and {auto['retried']:,} retries."
        )
    if best is not None:
        lines.append(f"Fastest with nothing lost: {best} ({clean[best]['ok_per_s']:,.0f}/s).")
    return lines


def plot(results: list[Result], items: int, server: dict[str, Any], path: Path) -> Path | None:
    """Successful requests/s, failed requests and p99 latency per way, as a PNG."""
    try:
        from corral.lab.plots import BAD, Panel, bar_panels
    except ImportError:  # pragma: no cover - matplotlib is part of the lab extra
        return None
    ok = {w.label: r for w, r in zip(WAYS, results, strict=True) if r["status"] == "ok"}
    return bar_panels(
        path,
        f"corral demo: {items:,} GETs, API capacity {server['capacity']} "
        f"(+{server['queue']} queued, then 429)",
        [
            Panel("successful requests per second", {k: r["ok_per_s"] for k, r in ok.items()}),
            Panel("failed requests", {k: float(r["failed"]) for k, r in ok.items()}, color=BAD),
            Panel(
                "p99 latency",
                {k: r["p99_ms"] for k, r in ok.items()},
                unit="ms, log scale",
                color="#f28e2b",
                log=True,
            ),
        ],
        note=f"{sys.platform}, {os.cpu_count()} CPUs; each way in its own process; "
        "baselines do not retry, corral retries 3 times honouring Retry-After",
    )


def demo_command(out: Path = Path("corral-demo"), items: int | None = None) -> int:
    """Run the demo, print the table and save the plot under ``out``; the exit status."""
    problem = unwritable(out)
    if problem is not None:
        # Found now, not after a minute of requests. The demo has no --out:
        # it saves into ./corral-demo/, so say where to run it from instead.
        print(
            f"corral demo: error: cannot save into {str(out)!r} ({problem}); "
            "run it from a directory you can write to",
            file=sys.stderr,
        )
        return 1
    display = Display()
    count = DEMO_ITEMS if items is None else items
    started = time.perf_counter()
    try:
        server, results = run_main(run_demo(display, count))
    except KeyboardInterrupt:
        # run_main cancelled the run: the children were killed, the API stopped.
        print("corral demo: interrupted", file=sys.stderr)
        return 130
    display.print()
    display.table(
        f"The same {count:,} requests, six ways",
        COLUMNS,
        table_rows(results),
        right={2, 3, 5, 6, 7},
    )
    for line in findings(results, count, server):
        display.print("- " + line)
    record = {
        "server": server,
        "ways": [{**way.__dict__, **r} for way, r in zip(WAYS, results, strict=True)],
        "seconds": time.perf_counter() - started,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    display.print()
    try:
        # ./corral-demo/ was checked before the run, but it can vanish or fill up since.
        out.mkdir(parents=True, exist_ok=True)
        write_text_whole(out / "results.json", json.dumps(record, indent=2) + "\n")
        png = plot(results, count, server, out / "demo.png")
    except OSError as exc:
        # The table above is the result; only the files are lost: say so, and fail.
        print(f"corral demo: error: cannot save into {str(out)!r}: {exc}", file=sys.stderr)
        return 1
    display.print(f"Saved {png or 'no plot (matplotlib missing)'} and {out / 'results.json'}.")
    display.print(f"The demo took {record['seconds']:.0f} s.")
    return (
        0
        if all(r["status"] == "ok" or r["status"].startswith("unavailable") for r in results)
        else 1
    )
