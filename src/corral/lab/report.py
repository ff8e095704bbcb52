"""The bench's verdicts: each seed claim against this run's numbers, as plots and report.md.

A verdict is computed, never written in advance: each claim has a *judge*, a
function of the run's records that returns **confirmed**, **refuted** or
**depends** (true in some conditions, false in others, and the numbers say
which), the sentence saying why with the numbers in it, the measurements
that decide it, and the rule it applied. A claim whose part was not run
(``--only``) or failed is **not measured**, and says which part to run.

The rules are deliberately coarse (a factor of 1.25 or 2, not 5%): the bench
runs on shared laptops and CI machines, and a verdict should not flip with
noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.lab.console import Display

__all__ = ["CLAIMS", "Claim", "Verdict", "draw_plots", "judge_all", "markdown", "print_summary"]

Records = list[dict[str, Any]]
Results = dict[str, Any]

CONFIRMED, REFUTED, DEPENDS, NOT_MEASURED = "confirmed", "refuted", "depends", "not measured"


@dataclass
class Verdict:
    """One claim's verdict and what decided it."""

    verdict: str
    why: str
    headline: str = ""
    evidence: list[tuple[str, str]] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)


class Missing(Exception):
    """The records a judge needs are not in this run."""


# --------------------------------------------------------------------------------------
# Reading records
# --------------------------------------------------------------------------------------


def _select(results: Results, part: str, case: str | None = None, **match: Any) -> Records:
    return [
        r
        for r in results["records"]
        if r["part"] == part
        and r["status"] == "ok"
        and (case is None or r["case"] == case)
        and all(r.get(k) == v for k, v in match.items())
    ]


def _one(records: Records, what: str, **match: Any) -> dict[str, Any]:
    for record in records:
        if all(record.get(k) == v for k, v in match.items()):
            return record
    raise Missing(what)


def _need(records: Records, part: str) -> Records:
    if not records:
        raise Missing(f"part {part}")
    return records


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f} ms" if seconds >= 0.01 else f"{seconds * 1e3:.1f} ms"


def _rate(value: float) -> str:
    return f"{value:,.0f}/s"


def _sweep(results: Results) -> list[dict[str, Any]]:
    [record] = _need(_select(results, "http", "sweep"), "http") or [{}]
    trials: list[dict[str, Any]] = record["trials"]
    return trials


def _best_clean(trials: list[dict[str, Any]]) -> dict[str, Any]:
    clean = [t for t in trials if t["errors"] == 0 and t["ok"] > 0]
    if not clean:
        raise Missing("an error-free trial in the HTTP sweep")
    return max(clean, key=lambda t: t["throughput"])


# --------------------------------------------------------------------------------------
# The judges
# --------------------------------------------------------------------------------------


def judge_cores(results: Results) -> Verdict:
    cores = _need(_select(results, "overhead", "cores"), "overhead (on 2+ CPUs)")
    one = min(cores, key=lambda r: len(r["cpus"]))
    every = max(cores, key=lambda r: len(r["cpus"]))
    if len(every["cpus"]) < 2:
        raise Missing("a machine with 2+ CPUs")
    speedup = one["wall_s"] / every["wall_s"]
    busy = every["cores_busy"]
    threads = max(r["threads"] for r in cores)
    pending = max((r["peak_pending"] or 0 for r in _select(results, "memory")), default=0)
    k = len(every["cpus"])
    evidence = [
        ("1 CPU", f"{one['us_per_item']:.2f} µs/item ({one['wall_s']:.2f} s)"),
        (f"{k} CPUs", f"{every['us_per_item']:.2f} µs/item ({every['wall_s']:.2f} s)"),
        ("speed-up from the extra CPUs", f"{speedup:.2f}x"),
        (f"CPU-seconds per second on {k} CPUs", f"{busy:.2f}"),
        ("threads in the process", str(threads)),
    ]
    if pending:
        evidence.append(("most tasks pending at once (memory part)", f"{pending:,}"))
    head = f"{busy:.2f} cores busy of {k}, {speedup:.2f}x"
    ran = (
        f"The same {one['n']:,} tasks took {one['wall_s']:.2f} s pinned to 1 CPU and "
        f"{every['wall_s']:.2f} s free to use all {k} ({speedup:.2f}x), and there they kept "
        f"{busy:.2f} CPUs busy."
    )
    if busy <= 1.1:
        more = f", {pending:,} of them at once in the memory part" if pending else ""
        why = (
            f"{ran} The event loop is one thread (the process had {threads} "
            f"thread{'s' if threads > 1 else ''}): it interleaves tasks on one core whatever "
            "the machine has, and as many as memory holds"
            f"{more}. A speed-up without a second core's worth of CPU time is a busy machine "
            "leaving more room, not more interleaving."
        )
        return Verdict(REFUTED, why, head, evidence)
    if speedup >= 1.25:
        return Verdict(CONFIRMED, ran, head, evidence)
    return Verdict(DEPENDS, ran, head, evidence)


def judge_start_with_cores(results: Results) -> Verdict:
    trials = _sweep(results)
    cores = results["meta"]["cpus"]
    at_cores = _one(trials, f"a trial at limit {cores}", limit=cores)
    best = _best_clean(trials)
    ratio = at_cores["throughput"] / best["throughput"]
    capacity = results["meta"]["http_server"]["capacity"]
    evidence = [
        (f"limit {cores} (CPU count)", _rate(at_cores["throughput"])),
        (f"limit {best['limit']} (best without errors)", _rate(best["throughput"])),
        ("ratio", f"{ratio:.0%}"),
        ("the API's capacity", str(capacity)),
    ]
    head = f"limit {cores}: {ratio:.0%} of the best (limit {best['limit']})"
    why = (
        f"Against an API serving {capacity} requests at once, limit {cores} (this machine's "
        f"CPUs) gave {_rate(at_cores['throughput'])}; the best limit without errors, "
        f"{best['limit']}, gave {_rate(best['throughput'])}: {ratio:.0%}."
    )
    if ratio >= 0.8:
        return Verdict(CONFIRMED, why + " Here the core count is close enough.", head, evidence)
    tail = (
        " Waiting on I/O uses no core: the limit to start from is what the target can take "
        "(its capacity, or corral tune's answer), not the client's CPU count."
    )
    return Verdict(REFUTED if ratio < 0.5 else DEPENDS, why + tail, head, evidence)


def judge_loop_limits(results: Results) -> Verdict:
    gathers = _need(_select(results, "memory", strategy="gather_all"), "memory")
    largest = max(gathers, key=lambda r: r["n"])
    knobs: list[str] = results["meta"]["loop_limit_attributes"]
    per_task_kb = largest["peak_mb"] * 1024 / largest["n"]
    all_pending = largest["peak_pending"] == largest["n"]
    evidence = [
        (
            "tasks pending at once, one default loop",
            f"{largest['peak_pending']:,} of {largest['n']:,}",
        ),
        ("loop attributes named *max* or *limit*", ", ".join(knobs) or "none"),
        ("memory per pending task", f"{per_task_kb:.2f} KB"),
    ]
    head = f"{largest['peak_pending']:,} tasks at once, no setting"
    if knobs:
        why = (
            f"The loop has attributes {', '.join(knobs)}; check what they bound. "
            f"{largest['peak_pending']:,} tasks were pending at once without setting them."
        )
        return Verdict(DEPENDS, why, head, evidence)
    why = (
        f"{largest['peak_pending']:,} tasks were pending at once on one default event loop with "
        "nothing configured, and the loop has no attribute with 'max' or 'limit' in its name. "
        "The set_task_factory the seed shows changes how a Task is made, not how many may "
        f"exist. The one limit is memory: {per_task_kb:.2f} KB per pending task (claim 8)."
    )
    return Verdict(REFUTED if all_pending else DEPENDS, why, head, evidence)


def judge_more_tasks_slower(results: Results) -> Verdict:
    evidence: list[tuple[str, str]] = []
    sentences: list[str] = []
    slow: list[bool] = []
    head_parts: list[str] = []
    conc = _select(results, "overhead", "concurrency")
    if conc:
        best = min(conc, key=lambda r: r["us_per_item"])
        top_n = max(r["concurrency"] for r in conc)
        at_top = max((r for r in conc if r["concurrency"] == top_n), key=lambda r: r["us_per_item"])
        ratio = at_top["us_per_item"] / best["us_per_item"]
        slow.append(ratio >= 1.5)
        evidence += [
            (
                f"tiny tasks, {best['concurrency']:,} in flight (cheapest)",
                f"{best['us_per_item']:.2f} µs/item",
            ),
            (
                f"tiny tasks, {top_n:,} in flight ({at_top['label']})",
                f"{at_top['us_per_item']:.2f} µs/item",
            ),
        ]
        head_parts.append(f"tiny tasks {ratio:.1f}x")
        sentences.append(
            f"Tiny tasks cost {best['us_per_item']:.2f} µs each with {best['concurrency']:,} in "
            f"flight and {at_top['us_per_item']:.2f} µs with {top_n:,} at once ({ratio:.1f}x): "
            "more tasks at once cost more per task (allocation, a bigger ready queue, caches), "
            "on one thread, with no OS context switch involved."
        )
    try:
        trials = _sweep(results)
    except Missing:
        trials = []
    if trials:
        best_t = _best_clean(trials)
        last = max(trials, key=lambda t: t["limit"])
        failing = [t for t in trials if t["errors"]]
        capacity = results["meta"]["http_server"]["capacity"]
        slow.append(last["throughput"] < 0.8 * best_t["throughput"] or bool(failing))
        evidence += [
            (
                f"HTTP, limit {best_t['limit']} (best)",
                f"{_rate(best_t['throughput'])}, p99 {best_t['p99_ms']:,.0f} ms",
            ),
            (
                f"HTTP, limit {last['limit']} (highest)",
                f"{_rate(last['throughput'])}, p99 {last['p99_ms'] or 0:,.0f} ms, "
                f"{last['error_rate']:.0%} errors",
            ),
        ]
        head_parts.append(
            f"HTTP {last['throughput'] / best_t['throughput']:.0%} at {last['limit']}"
        )
        sentence = (
            f"Over HTTP throughput peaked at {_rate(best_t['throughput'])} (limit "
            f"{best_t['limit']}); past the API's capacity ({capacity}) extra calls only wait in "
            f"its queue (p99 {best_t['p99_ms']:,.0f} ms at {best_t['limit']}, "
            f"{last['p99_ms'] or 0:,.0f} ms at {last['limit']})"
        )
        if failing:
            first = min(failing, key=lambda t: t["limit"])
            sentence += (
                f", and from limit {first['limit']} they are refused "
                f"({first['error_rate']:.0%} errors)"
            )
        sentences.append(sentence + ".")
    if not slow:
        raise Missing("parts overhead or http")
    verdict = CONFIRMED if all(slow) else REFUTED if not any(slow) else DEPENDS
    return Verdict(verdict, " ".join(sentences), ", ".join(head_parts), evidence)


def judge_batching_seed001(results: Results) -> Verdict:
    records = _need(_select(results, "seed001"), "seed001")
    sizes = sorted({r["n"] for r in records})
    small, large = sizes[0], sizes[-1]
    g_s = _one(records, "gather", n=small, strategy="gather_all")
    b_s = _one(records, "five batches", n=small, strategy="gather_five_batches")
    g_l = _one(records, "gather", n=large, strategy="gather_all")
    b_l = _one(records, "five batches", n=large, strategy="gather_five_batches")
    r_small, r_large = b_s["wall_s"] / g_s["wall_s"], b_l["wall_s"] / g_l["wall_s"]
    evidence = [
        (
            f"{small:,}: all at once / five batches",
            f"{g_s['wall_s']:.2f} s / {b_s['wall_s']:.2f} s ({r_small:.2f}x)",
        ),
        (
            f"{large:,}: all at once / five batches",
            f"{g_l['wall_s']:.2f} s / {b_l['wall_s']:.2f} s ({r_large:.2f}x)",
        ),
        ("time spent waiting (the bound)", "0.3 s all at once, 1.5 s in five batches"),
    ]
    why = (
        f"3 x sleep(0.1) per coroutine: {small:,} took {g_s['wall_s']:.2f} s all at once and "
        f"{b_s['wall_s']:.2f} s in five batches ({r_small:.1f}x); {large:,} took "
        f"{g_l['wall_s']:.2f} s and {b_l['wall_s']:.2f} s ({r_large:.2f}x). Waiting is 0.3 s all "
        "at once and 1.5 s in five batches; the rest is per-coroutine overhead "
        f"({(g_l['wall_s'] - 0.3) / large * 1e6:.0f} µs each at {large:,} all at once), which "
        "batching spreads out but does not remove."
    )
    head = f"batched/unbatched: {r_small:.2f}x at {small:,}, {r_large:.2f}x at {large:,}"
    if large < 100_000:
        why += f" (The largest size in this run is {large:,}, below the seed's 100,000.)"
    if r_small > 1.1 and r_large < 0.9:
        return Verdict(CONFIRMED, why, head, evidence)
    if r_small > 1.1 and r_large > 1.1:
        return Verdict(REFUTED, why + " Batching was the slower at both sizes.", head, evidence)
    if r_small > 1.1:
        why += f" At {large:,} the two are within 10%: a tie, not a win for batching."
    return Verdict(DEPENDS, why, head, evidence)


def judge_timeouts_batching(results: Results) -> Verdict:
    records = _need(_select(results, "capacity"), "capacity")
    server = results["meta"]["capacity_server"]
    cap = server["capacity"]
    g = _one(records, "gather all at once", strategy="gather_all")
    five = _one(records, "five batches", strategy="gather_five_batches")
    batches = _one(records, "batches of the capacity", strategy="gather_batched")
    limited = _one(records, "corral below the capacity", strategy="corral", limit=cap - 10)
    n = g["n"]
    evidence = [
        (
            f"{n:,} at once",
            f"{g['failed']:,} failed, peak {g.get('server_peak_concurrency', '?')} at the server",
        ),
        (f"five batches of {n // 5:,}", f"{five['failed']:,} failed, {_rate(five['ok_per_s'])}"),
        (f"batches of {cap}", f"{batches['failed']:,} failed, {_rate(batches['ok_per_s'])}"),
        (f"corral limit={cap - 10}", f"{limited['failed']:,} failed, {_rate(limited['ok_per_s'])}"),
    ]
    head = f"all at once: {g['failed']:,}/{n:,} failed; limit {cap - 10}: {limited['failed']:,}"
    holds = cap + server.get("queue", 0)
    if n <= holds:
        # No failure is then what the target's size guarantees, not evidence against the claim.
        why = (
            f"Not measured in this run: {n:,} calls at once cannot overload a target taking "
            f"{holds:,} at once ({cap} in service, {holds - cap} waiting); run a larger --scale."
        )
        return Verdict(NOT_MEASURED, why, "-", evidence)
    if g["failed"] == 0:
        why = f"{n:,} calls at once against a target taking {cap} at a time ran without errors."
        return Verdict(REFUTED, why, head, evidence)
    why = (
        f"Against a target that takes {cap} calls at once and refuses the rest with "
        f"{server['status']} (like a database at max_connections), {n:,} calls at once lost "
        f"{g['failed']:,} ({g['failed'] / n:.0%}). Seed 001's five batches ({n // 5:,} at once) "
        f"lost {five['failed']:,}; batches of {cap} lost {batches['failed']:,} at "
        f"{_rate(batches['ok_per_s'])}, each waiting for its slowest call; a limit of {cap - 10} "
        f"lost {limited['failed']:,} at {_rate(limited['ok_per_s'])}."
    )
    good_batches = [
        b
        for b in (five, batches)
        if b["failed"] == 0 and b["ok_per_s"] >= 0.9 * limited["ok_per_s"]
    ]
    if good_batches:
        return Verdict(CONFIRMED, why + " Batching fixed it at no cost.", head, evidence)
    tail = (
        " The errors are real; what fixes them is a limit below the capacity, not batches."
        if limited["failed"] == 0
        else " The errors are real; neither batching nor this limit removed them all."
    )
    return Verdict(DEPENDS, why + tail, head, evidence)


def judge_batching_queue(results: Results) -> Verdict:
    tiny = _select(results, "overhead", "strategies", loop="asyncio")
    http = _select(results, "http", "strategies")
    evidence: list[tuple[str, str]] = []
    sentences: list[str] = []
    reduces = efficient = None
    if tiny:
        g = _one(tiny, "gather", strategy="gather_all")
        b = _one(tiny, "batches", strategy="gather_batched")
        q = _one(tiny, "queue", strategy="queue_workers")
        cheapest = min(tiny, key=lambda r: r["us_per_item"])
        reduces = b["us_per_item"] < g["us_per_item"] and q["us_per_item"] < g["us_per_item"]
        evidence += [
            ("tiny tasks: gather over all", f"{g['us_per_item']:.2f} µs/item"),
            ("tiny tasks: batches of 1,000", f"{b['us_per_item']:.2f} µs/item"),
            ("tiny tasks: queue + 10 workers", f"{q['us_per_item']:.2f} µs/item"),
            (
                f"tiny tasks: cheapest ({cheapest['label']})",
                f"{cheapest['us_per_item']:.2f} µs/item",
            ),
        ]
        sentences.append(
            f"On {g['n']:,} tiny tasks, batches of 1,000 cost {b['us_per_item']:.2f} µs per item "
            f"and a queue with 10 workers {q['us_per_item']:.2f} µs, against "
            f"{g['us_per_item']:.2f} µs for one gather over everything"
            + (": less overhead, yes." if reduces else ".")
        )
    if http:
        b = _one(http, "batches", strategy="gather_batched")
        q = _one(http, "queue", strategy="queue_workers")
        clean = [r for r in http if r["failed"] == 0]
        if not clean:
            raise Missing("an HTTP strategy without failures")
        best = max(clean, key=lambda r: r["ok_per_s"])
        held = results["meta"]["http_server"]["capacity"] + results["meta"]["http_server"]["queue"]
        efficient = (
            b["failed"] == 0
            and q["failed"] == 0
            and min(b["ok_per_s"], q["ok_per_s"]) >= 0.8 * best["ok_per_s"]
        )
        evidence += [
            ("HTTP: batches of 1,000", f"{b['failed']:,} failed, {_rate(b['ok_per_s'])}"),
            ("HTTP: queue + 10 workers", f"{q['failed']:,} failed, {_rate(q['ok_per_s'])}"),
            (f"HTTP: best without failures ({best['label']})", _rate(best["ok_per_s"])),
        ]
        sentences.append(
            f"Under real load they manage it poorly: over HTTP, batches of 1,000 lost "
            f"{b['failed']:,} requests (the API holds {held}), and 10 workers made "
            f"{_rate(q['ok_per_s'])} where {best['label']} made {_rate(best['ok_per_s'])} "
            "with nothing lost."
            if not efficient
            else f"Over HTTP both lost nothing and ran within 80% of the best ({best['label']})."
        )
    if reduces is None and efficient is None:
        raise Missing("parts overhead or http")
    known = [x for x in (reduces, efficient) if x is not None]
    verdict = CONFIRMED if all(known) else REFUTED if not any(known) else DEPENDS
    head = ", ".join(
        ([f"overhead {'lower' if reduces else 'not lower'}"] if reduces is not None else [])
        + ([f"load {'well' if efficient else 'poorly'} managed"] if efficient is not None else [])
    )
    return Verdict(verdict, " ".join(sentences), head, evidence)


def judge_memory_error(results: Results) -> Verdict:
    records = _need(_select(results, "memory"), "memory")
    crashed = [
        r for r in results["records"] if r["part"] == "memory" and "MemoryError" in r["status"]
    ]
    gathers = sorted((r for r in records if r["strategy"] == "gather_all"), key=lambda r: r["n"])
    if not gathers:
        raise Missing("part memory (gather)")
    largest = gathers[-1]
    per_task_kb = largest["peak_mb"] * 1024 / largest["n"]
    bounded = [r for r in records if r["strategy"] == "corral" and r["n"] == largest["n"]]
    available = results["meta"].get("mem_available_mb")
    evidence = [
        (f"gather, {r['n']:,} pending at once", f"+{r['peak_mb']:,.0f} MB") for r in gathers
    ]
    evidence.append(("per pending task", f"{per_task_kb:.2f} KB"))
    if bounded:
        evidence.append(
            (f"corral limit=1,000, {largest['n']:,} items", f"+{bounded[0]['peak_mb']:,.0f} MB")
        )
    if available:
        evidence.append(("memory available at the start", f"{available:,.0f} MB"))
    head = f"{per_task_kb:.2f} KB per pending task"
    if crashed:
        why = f"A run of {crashed[0]['n']:,} tasks failed with {crashed[0]['status']}."
        return Verdict(CONFIRMED, why, head, evidence)
    if per_task_kb < 0.05:
        why = f"{largest['n']:,} pending tasks added only {largest['peak_mb']:.1f} MB."
        return Verdict(REFUTED, why, head, evidence)
    fill = (
        f" about {available * 1024 / per_task_kb / 1e6:,.0f} million at once on this machine"
        if available
        else ""
    )
    why = (
        f"Memory grows with the tasks that exist at once: {largest['n']:,} pending added "
        f"{largest['peak_mb']:,.0f} MB, {per_task_kb:.2f} KB each, so running out takes{fill} "
        "(and Linux's OOM killer usually ends the process before Python raises MemoryError)."
    )
    if bounded:
        why += (
            f" It is the tasks alive at once that count, not the total: corral with limit 1,000 "
            f"ran the same {largest['n']:,} items in +{bounded[0]['peak_mb']:,.0f} MB, the "
            "list of results it returns included."
        )
    return Verdict(DEPENDS, why, head, evidence)


def judge_process_pool(results: Results) -> Verdict:
    records = _need(_select(results, "cpu"), "cpu")
    sizes = sorted({r["work_ms"] for r in records}, reverse=True)
    heavy_ms, light_ms = sizes[0], sizes[-1]
    h = {r["mode"]: r for r in records if r["work_ms"] == heavy_ms}
    light = {r["mode"]: r for r in records if r["work_ms"] == light_ms}
    if not {"loop", "thread", "process"} <= h.keys() <= light.keys() | h.keys():
        raise Missing("part cpu (all three modes)")
    speed = h["process"]["items_per_s"] / max(h["loop"]["items_per_s"], h["thread"]["items_per_s"])
    responsive = h["process"]["max_lag_ms"] < 0.2 * h["loop"]["max_lag_ms"]
    evidence = [
        (
            f"{heavy_ms:g} ms calls: {where}",
            f"{_rate(h[mode]['items_per_s'])}, loop lag up to {h[mode]['max_lag_ms']:,.0f} ms",
        )
        for where, mode in (
            ("on the loop", "loop"),
            ("threads", "thread"),
            ("process pool", "process"),
        )
    ]
    light_speed = None
    if light_ms != heavy_ms and {"loop", "process"} <= light.keys():
        light_speed = light["process"]["items_per_s"] / light["loop"]["items_per_s"]
        evidence += [
            (f"{light_ms:g} ms calls: on the loop", _rate(light["loop"]["items_per_s"])),
            (f"{light_ms:g} ms calls: process pool", _rate(light["process"]["items_per_s"])),
        ]
    cpus = h["process"].get("cpus") or results["meta"]["cpus"]
    why = (
        f"{h['loop']['n']:,} calls of {h['loop']['item_ms']:.1f} ms: on the loop "
        f"{_rate(h['loop']['items_per_s'])} with the loop stalled up to "
        f"{h['loop']['max_lag_ms']:,.0f} ms at a time; threads {_rate(h['thread']['items_per_s'])} "
        f"(one GIL); a process pool {_rate(h['process']['items_per_s'])} ({speed:.1f}x on {cpus} "
        f"CPUs) with the loop free (lag up to {h['process']['max_lag_ms']:,.0f} ms)."
    )
    if light_speed is not None:
        why += (
            f" For {light_ms:g} ms calls the pool made {_rate(light['process']['items_per_s'])} "
            f"against {_rate(light['loop']['items_per_s'])} on the loop."
        )
    head = f"process pool {speed:.1f}x for {heavy_ms:g} ms calls" + (
        f", {light_speed:.1f}x for {light_ms:g} ms" if light_speed is not None else ""
    )
    heavy_wins = speed >= 1.2
    light_wins = light_speed is None or light_speed >= 1.2
    if heavy_wins and light_wins:
        return Verdict(CONFIRMED, why, head, evidence)
    if heavy_wins:
        why += (
            " Worth it for heavy calls; for light ones the trip to another process costs "
            "more than the call itself."
        )
        return Verdict(DEPENDS, why, head, evidence)
    if responsive:
        load = results["meta"].get("load_average_start")
        busy = f", load average {load[0]:.1f} at the start" if load else ""
        why += (
            f" Here the pool barely sped the work up ({speed:.1f}x on {cpus} CPUs{busy}), but "
            "it kept the loop responsive: that, and the cores it can use when they are free, "
            "is the reason to put it beside a loop."
        )
        return Verdict(DEPENDS, why, head, evidence)
    return Verdict(REFUTED, why, head, evidence)


def _http_cell(r: dict[str, Any]) -> str:
    p99 = r["p99_ms"] or 0.0
    return (
        f"{_rate(r['ok_per_s'])}, p99 {p99:,.0f} ms, +{r['peak_mb']:.0f} MB, {r['failed']:,} failed"
    )


def judge_rival_threads(results: Results) -> Verdict:
    http = _need(_select(results, "http", "strategies"), "http")
    a = _one(http, "corral limit=64", strategy="corral", limit=64)
    t = _one(http, "threads", measure="http_threads")
    ratio = a["ok_per_s"] / t["ok_per_s"] if t["ok_per_s"] else float("inf")
    evidence = [
        (
            "asyncio: aiohttp + corral limit=64",
            _http_cell(a),
        ),
        (
            f"{t['threads']} threads: blocking http.client",
            _http_cell(t),
        ),
        ("asyncio / threads", f"{ratio:.2f}x"),
    ]
    why = (
        f"The same {a['n']:,} GET requests with 64 in flight: asyncio (one thread, aiohttp, "
        f"corral) made {_rate(a['ok_per_s'])}, {t['threads']} threads with blocking "
        f"http.client {_rate(t['ok_per_s'])}: {ratio:.2f}x."
    )
    head = f"asyncio/threads {ratio:.2f}x"
    if ratio >= 0.9:
        return Verdict(CONFIRMED, why, head, evidence)
    return Verdict(REFUTED if ratio < 0.5 else DEPENDS, why, head, evidence)


def judge_blocking(results: Results) -> Verdict:
    [record] = _need(_select(results, "blocking"), "blocking")
    rows = record["rows"]
    blocking = {r["seconds"]: r for r in rows if r["how"] == "blocking"}
    offloaded = {r["seconds"]: r for r in rows if r["how"] == "to_thread"}
    judged = [d for d in sorted(blocking) if d >= 0.005] or sorted(blocking)
    ratios = [blocking[d]["max_lag_s"] / d for d in judged]
    evidence = [
        (
            f"time.sleep({d:g}) in a coroutine / in a thread",
            f"loop late by {_ms(blocking[d]['max_lag_s'])} / {_ms(offloaded[d]['max_lag_s'])}",
        )
        for d in sorted(blocking)
        if d in offloaded
    ]
    lags = ", ".join(f"{_ms(blocking[d]['max_lag_s'])} for {_ms(d)}" for d in judged)
    worst_offloaded = max(
        (offloaded[d]["max_lag_s"] for d in judged if d in offloaded), default=0.0
    )
    why = (
        f"While a coroutine called time.sleep, the loop ran nothing else: it was late by {lags}. "
        f"The same sleep awaited in a thread (asyncio.to_thread) left it late by at most "
        f"{_ms(worst_offloaded)}."
    )
    reports = record.get("reports") or []
    if record.get("watchdog") and reports:
        blamed = reports[-1]
        why += (
            f" corral.watch_loop reported {len(reports)} stall(s) and named "
            f"{blamed['function']}() at line {blamed['lineno']}."
        )
        evidence.append(
            ("corral.watch_loop reports", f"{len(reports)}, blaming {blamed['function']}()")
        )
    elif not record.get("watchdog"):
        why += " (corral.watch_loop is not in this build: a heartbeat callback measured the lag.)"
    head = f"lag/blocking time {min(ratios):.2f}-{max(ratios):.2f}"
    if min(ratios) >= 0.8:
        return Verdict(CONFIRMED, why, head, evidence)
    if max(ratios) < 0.5:
        return Verdict(REFUTED, why, head, evidence)
    return Verdict(DEPENDS, why, head, evidence)


@dataclass(frozen=True)
class Claim:
    """A seed's claim, the parts that test it, the rule and the plots that decide it."""

    number: int
    text: str
    source: str
    parts: tuple[str, ...]
    judge: Callable[[Results], Verdict]
    rule: str
    plots: tuple[str, ...]


CLAIMS: list[Claim] = [
    Claim(
        1,
        "More CPU cores = more threads = more tasks asyncio can interleave",
        "seed 000",
        ("overhead",),
        judge_cores,
        "the same tiny-task run pinned to 1 CPU and free to use all: refuted if on all CPUs "
        "it kept at most 1.1 CPUs busy (CPU time / wall time: one thread's worth), whatever "
        "its speed-up; confirmed if it kept more busy and ran >= 1.25x faster; depends "
        "otherwise.",
        ("cores.png",),
    ),
    Claim(
        2,
        "Start with the number of CPU cores as the number of concurrent tasks",
        "seed 000",
        ("http",),
        judge_start_with_cores,
        "HTTP throughput at limit = CPU count vs the best error-free limit of the sweep: "
        "confirmed at >= 80%, refuted below 50%, depends between.",
        ("throughput_vs_concurrency.png",),
    ),
    Claim(
        3,
        "The event loop has configurable limits on the number of tasks",
        "seed 000",
        ("memory",),
        judge_loop_limits,
        "refuted if every task of the largest gather was pending at once with nothing "
        "configured and the loop has no attribute named like a limit; depends otherwise.",
        ("memory.png",),
    ),
    Claim(
        4,
        "At some point more tasks slows things down: context switching has a cost",
        "seeds 000, 002",
        ("overhead", "http"),
        judge_more_tasks_slower,
        "tiny tasks: slower if the cost per item at the highest concurrency is >= 1.5x the "
        "cheapest; HTTP: slower if the highest limit gives < 80% of the best throughput or "
        "errors. Confirmed if both, refuted if neither, depends if one.",
        ("concurrency.png", "throughput_vs_concurrency.png"),
    ),
    Claim(
        5,
        "Batching is slower, except at very high numbers of coroutines (100,000)",
        "seed 001",
        ("seed001",),
        judge_batching_seed001,
        "five batches vs all at once: confirmed if batching is > 10% slower at the smaller "
        "size and > 10% faster at the larger; refuted if > 10% slower at both; depends "
        "otherwise (a tie within 10%).",
        ("seed001.png",),
    ),
    Claim(
        6,
        "At 1,000 concurrent network calls you get timeouts; batching makes sense then",
        "seed 001",
        ("capacity",),
        judge_timeouts_batching,
        "refuted if 1,000 at once has no failures; confirmed if it has and a batched way "
        "has none at >= 90% of the throughput of a limit below the capacity; depends otherwise.",
        ("capacity.png",),
    ),
    Claim(
        7,
        "Batching or a queue with a fixed number of workers reduces overhead and manages "
        "load efficiently",
        "seed 002",
        ("overhead", "http"),
        judge_batching_queue,
        "overhead: both cost less per tiny task than one gather; load: over HTTP both lose "
        "nothing and reach >= 80% of the best throughput. Confirmed if both hold, refuted "
        "if neither, depends if one.",
        ("overhead.png", "http_strategies.png"),
    ),
    Claim(
        8,
        "Too many tasks lead to MemoryError",
        "seed 002",
        ("memory",),
        judge_memory_error,
        "confirmed if a run raised MemoryError; refuted if pending tasks cost < 0.05 KB "
        "each; otherwise depends, on how many tasks exist at once.",
        ("memory.png",),
    ),
    Claim(
        9,
        "For CPU-heavy work use a process pool beside the loop",
        "seed 003",
        ("cpu",),
        judge_process_pool,
        "process pool vs the better of loop and threads: confirmed if >= 1.2x for heavy and "
        "light calls; depends if only for heavy ones, or if it only keeps the loop responsive "
        "(lag < 20% of the loop's); refuted otherwise.",
        ("cpu.png",),
    ),
    Claim(
        10,
        "Properly written asyncio can rival parallel solutions for I/O-bound work",
        "seed 003",
        ("http",),
        judge_rival_threads,
        "HTTP throughput of asyncio (corral, 64 in flight) vs 64 threads: confirmed at >= "
        "0.9x, refuted below 0.5x, depends between.",
        ("http_strategies.png",),
    ),
    Claim(
        11,
        "Any blocking call halts the event loop",
        "seed 003",
        ("blocking",),
        judge_blocking,
        "loop lag while a coroutine blocks for d seconds (d >= 5 ms): confirmed if the lag is "
        ">= 0.8 d for every d, refuted if < 0.5 d for every d, depends otherwise.",
        ("blocking.png",),
    ),
]


def judge_all(results: Results) -> list[Verdict]:
    """One verdict per claim, in order."""
    verdicts = []
    for claim in CLAIMS:
        try:
            verdict = claim.judge(results)
        except Missing as exc:
            ran = results["meta"]["parts"]
            needed = [p for p in claim.parts if p not in ran]
            hint = (
                f"run part {', '.join(needed)} (--only {','.join(needed)})"
                if needed
                else f"missing {exc}; see the errors in results.json"
            )
            verdict = Verdict(NOT_MEASURED, f"Not measured in this run: {hint}.", "-")
        verdict.plots = list(claim.plots)
        verdicts.append(verdict)
    return verdicts


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------


def draw_plots(results: Results, out: Path) -> list[str]:
    """Every plot the run's records allow, as PNG files in ``out``; their names."""
    try:
        from corral.lab import plots
    except ImportError:  # pragma: no cover - matplotlib is part of the lab extra
        return []
    drawn: list[str] = []
    note = (
        f"{results['meta']['cpus']} CPUs, Python {results['meta']['python']}, "
        f"{results['meta']['profile']['name']} run"
    )

    def draw(name: str, fn: Callable[[Path], Any]) -> None:
        try:
            fn(out / name)
        except (Missing, KeyError, ValueError, StopIteration):
            return
        drawn.append(name)

    def overhead(path: Path) -> None:
        rows = _need(_select(results, "overhead", "strategies"), "overhead")
        loops = list(dict.fromkeys(r["loop"] for r in rows))
        panels = [
            plots.Panel(
                f"µs per item, {loop}",
                {
                    r["label"].rsplit(" [", 1)[0]: r["us_per_item"]
                    for r in rows
                    if r["loop"] == loop
                },
            )
            for loop in loops
        ]
        plots.bar_panels(
            path,
            f"Seed 002's tiny tasks ({rows[0]['n']:,} x sleep(0)): cost per item",
            panels,
            note=note,
        )

    def concurrency(path: Path) -> None:
        rows = _need(_select(results, "overhead", "concurrency"), "overhead")
        corral_rows = sorted(
            (r for r in rows if r["strategy"] == "corral"), key=lambda r: r["concurrency"]
        )
        series = [
            plots.Series(
                "corral, limit = tasks in flight",
                [(r["concurrency"], r["us_per_item"]) for r in corral_rows],
            )
        ]
        gathers = [r for r in rows if r["strategy"] == "gather_all"]
        if gathers:
            series.append(
                plots.Series(
                    "gather: one Task per item, all at once",
                    [(r["concurrency"], r["us_per_item"]) for r in gathers],
                    "s",
                )
            )
        plots.line_panels(
            path,
            "Tiny tasks: cost per item vs tasks in flight",
            [("", "µs per item", series)],
            xlabel="tasks in flight",
            note=note,
        )

    def cores(path: Path) -> None:
        rows = _need(_select(results, "overhead", "cores"), "overhead")
        plots.bar_panels(
            path,
            "Same tiny-task run, pinned to 1 CPU vs all CPUs",
            [
                plots.Panel("µs per item", {r["label"]: r["us_per_item"] for r in rows}),
                plots.Panel(
                    "CPUs kept busy (CPU time / wall time)",
                    {r["label"]: r["cores_busy"] for r in rows},
                    color="#9e9e9e",
                ),
                plots.Panel(
                    "threads in the process",
                    {r["label"]: float(r["threads"]) for r in rows},
                    color="#9e9e9e",
                ),
            ],
            note=note,
        )

    def seed001(path: Path) -> None:
        rows = _need(_select(results, "seed001"), "seed001")
        sizes = sorted({r["n"] for r in rows})
        panels = [
            plots.Panel(
                f"{n:,} coroutines: seconds", {r["way"]: r["wall_s"] for r in rows if r["n"] == n}
            )
            for n in sizes
        ]
        plots.bar_panels(
            path,
            "Seed 001: 3 x sleep(0.1) per coroutine "
            "(waiting alone: 0.3 s at once, 1.5 s in 5 batches)",
            panels,
            note=note,
        )

    def sweep(path: Path) -> None:
        trials = _sweep(results)
        server = results["meta"]["http_server"]
        marks = {
            f"{results['meta']['cpus']} CPUs": float(results["meta"]["cpus"]),
            f"capacity {server['capacity']}": float(server["capacity"]),
            f"capacity + queue {server['capacity'] + server['queue']}": float(
                server["capacity"] + server["queue"]
            ),
        }
        plots.line_panels(
            path,
            f"HTTP: corral.map against an API serving {server['capacity']} at once "
            f"({server['service_ms']:g} ms +/- {server['jitter']:.0%}), "
            f"{server['queue']} queued, then 429",
            [
                (
                    "successful requests per second",
                    "requests/s",
                    [plots.Series("ok/s", [(t["limit"], t["throughput"]) for t in trials])],
                ),
                (
                    "latency of successful requests",
                    "ms",
                    [
                        plots.Series("p50", [(t["limit"], t["p50_ms"]) for t in trials]),
                        plots.Series("p99", [(t["limit"], t["p99_ms"]) for t in trials]),
                    ],
                ),
                (
                    "errors (429)",
                    "share of calls",
                    [plots.Series("error rate", [(t["limit"], t["error_rate"]) for t in trials])],
                ),
            ],
            xlabel="limit (requests in flight)",
            logy=[False, True, False],
            marks=marks,
            note=note,
        )

    def http_strategies(path: Path) -> None:
        rows = _need(
            _select(results, "http", "strategies") + _select(results, "http", "httpx"), "http"
        )
        plots.bar_panels(
            path,
            f"HTTP: the same {rows[0]['n']:,} GETs "
            f"(httpx rows: {results['meta']['profile']['httpx_n']:,})",
            [
                plots.Panel("successful requests/s", {r["label"]: r["ok_per_s"] for r in rows}),
                plots.Panel(
                    "failed requests",
                    {r["label"]: float(r["failed"]) for r in rows},
                    color=plots.BAD,
                ),
                plots.Panel(
                    "p99 latency",
                    {r["label"]: r["p99_ms"] for r in rows},
                    unit="ms, log scale",
                    color="#f28e2b",
                    log=True,
                ),
                plots.Panel(
                    "peak memory growth",
                    {r["label"]: r["peak_mb"] for r in rows},
                    unit="MB",
                    color="#9e9e9e",
                ),
            ],
            note=note,
        )

    def capacity(path: Path) -> None:
        rows = _need(_select(results, "capacity"), "capacity")
        server = results["meta"]["capacity_server"]
        plots.bar_panels(
            path,
            f"{rows[0]['n']:,} calls to a target with a hard cap of {server['capacity']} "
            f"(no queue, {server['status']} beyond)",
            [
                plots.Panel("successful calls/s", {r["label"]: r["ok_per_s"] for r in rows}),
                plots.Panel(
                    "failed calls", {r["label"]: float(r["failed"]) for r in rows}, color=plots.BAD
                ),
                plots.Panel(
                    "peak in flight at the server",
                    {r["label"]: float(r.get("server_peak_concurrency", 0)) for r in rows},
                    color="#9e9e9e",
                ),
            ],
            note=note,
        )

    def cpu(path: Path) -> None:
        rows = _need(_select(results, "cpu"), "cpu")
        plots.bar_panels(
            path,
            "CPU-bound calls: on the loop, in threads, in a process pool",
            [
                plots.Panel(
                    "calls per second", {r["label"]: r["items_per_s"] for r in rows}, log=True
                ),
                plots.Panel(
                    "longest loop stall",
                    {r["label"]: r["max_lag_ms"] for r in rows},
                    unit="ms",
                    color=plots.BAD,
                ),
            ],
            note=note,
        )

    def memory(path: Path) -> None:
        rows = _need(_select(results, "memory"), "memory")
        names = list(dict.fromkeys(r["way"] for r in rows))
        series = [
            plots.Series(
                name,
                sorted((r["n"], max(r["peak_mb"], 0.1)) for r in rows if r["way"] == name),
            )
            for name in names
        ]
        plots.line_panels(
            path,
            "Peak memory growth vs number of items (each run in a fresh process)",
            [("", "MB", series)],
            xlabel="items",
            logy=[True],
            note=note,
        )

    def blocking(path: Path) -> None:
        [record] = _need(_select(results, "blocking"), "blocking")
        rows = record["rows"]
        series = [
            plots.Series(
                label, [(r["seconds"] * 1e3, r["max_lag_s"] * 1e3) for r in rows if r["how"] == how]
            )
            for label, how in (
                ("time.sleep(d) in a coroutine", "blocking"),
                ("await asyncio.to_thread(time.sleep, d)", "to_thread"),
            )
        ]
        series.append(
            plots.Series(
                "lag = d",
                [(r["seconds"] * 1e3, r["seconds"] * 1e3) for r in rows if r["how"] == "blocking"],
                ":",
            )
        )
        plots.line_panels(
            path,
            "How late the event loop runs while a call blocks it",
            [("", "loop lag (ms)", series)],
            xlabel="blocking call d (ms)",
            logy=[True],
            note=note,
        )

    def llm(path: Path) -> None:
        from corral.lab import llm_bench

        llm_bench.draw(results, path)

    for name, fn in (
        ("overhead.png", overhead),
        ("concurrency.png", concurrency),
        ("cores.png", cores),
        ("seed001.png", seed001),
        ("throughput_vs_concurrency.png", sweep),
        ("http_strategies.png", http_strategies),
        ("capacity.png", capacity),
        ("cpu.png", cpu),
        ("memory.png", memory),
        ("blocking.png", blocking),
        ("llm.png", llm),
    ):
        draw(name, fn)
    return drawn


# --------------------------------------------------------------------------------------
# report.md and the terminal summary
# --------------------------------------------------------------------------------------


def _load(meta: dict[str, Any]) -> str:
    start, end = meta.get("load_average_start"), meta.get("load_average_end")
    if not start:
        return ""
    text = f"load average {start[0]:.2f} at the start"
    if end:
        text += f", {end[0]:.2f} at the end"
    return text


def _part_tables(results: Results) -> list[str]:
    lines: list[str] = []
    by_part: dict[str, Records] = {}
    for record in results["records"]:
        by_part.setdefault(record["part"], []).append(record)
    for part, records in by_part.items():
        lines += [
            f"### {part}",
            "",
            "| case | measurement | status | numbers |",
            "|---|---|---|---|",
        ]
        for r in records:
            lines.append(f"| {r['case']} | {r['label']} | {r['status'][:80]} | {_numbers(r)} |")
        lines.append("")
    return lines


def _numbers(r: dict[str, Any]) -> str:
    if r["status"] != "ok":
        return ""
    measure = r["measure"]
    if measure == "fanout":
        text = f"{r['wall_s']:.3f} s, {r['us_per_item']:.2f} µs/item"
        if r.get("peak_mb") is not None and r["part"] == "memory":
            text += f", +{r['peak_mb']:.1f} MB, {r['peak_pending']:,} pending at once"
        return text
    if measure in ("http", "http_threads"):
        p99 = f"{r['p99_ms']:,.0f}" if r.get("p99_ms") is not None else "-"
        kinds = ", ".join(f"{v:,} x {k}" for k, v in r["failures"].items())
        return (
            f"{r['wall_s']:.2f} s, {r['ok_per_s']:,.0f} ok/s, {r['failed']:,} failed"
            + (f" ({kinds})" if kinds else "")
            + f", {r.get('retried', 0):,} retries, p99 {p99} ms, +{r['peak_mb']:.0f} MB"
        )
    if measure == "sweep":
        return "; ".join(
            f"{t['limit']}: {t['throughput']:,.0f}/s"
            + (f" ({t['error_rate']:.0%} err)" if t["errors"] else "")
            for t in r["trials"]
        )
    if measure == "cpu":
        return (
            f"{r['items_per_s']:,.0f} calls/s ({r['item_ms']:.2f} ms each), "
            f"loop lag up to {r['max_lag_ms']:,.0f} ms"
        )
    if measure == "llm":
        return (
            f"{r['wall_s']:.1f} s, {r['items_per_s']:,.1f} items/s, {r['failed']:,} failed, "
            f"{r['rejected_429']:,} x 429 in {r['attempts']:,} attempts, "
            f"{r['wasted_input_tokens']:,} input tokens on 429s"
        )
    if measure == "blocking":
        return "; ".join(
            f"{x['how']} {x['seconds']:g} s: lag {x['max_lag_s'] * 1e3:,.1f} ms" for x in r["rows"]
        )
    return ""


def markdown(results: Results, verdicts: list[Verdict], plots: list[str]) -> str:
    """report.md: the verdicts, what decided them, and every measurement."""
    meta = results["meta"]
    counts = {
        v: sum(1 for x in verdicts if x.verdict == v)
        for v in (CONFIRMED, REFUTED, DEPENDS, NOT_MEASURED)
    }
    load = _load(meta)
    lines = [
        "# corral bench: the seeds' claims, measured",
        "",
        f"Run {meta['started']}, {meta['profile']['name']} profile, {meta['seconds']:.0f} s; "
        f"corral {meta['corral']}, Python {meta['python']} on {meta['platform']}, "
        f"{meta['cpus']} CPUs, uvloop {meta['uvloop'] or 'not installed'}"
        + (f"; {load}" if load else "")
        + ". Each measurement ran in a fresh process; times are medians of "
        f"{meta['profile']['repeat']} run(s). On a shared or loaded machine, trust ratios "
        "measured side by side more than absolute numbers.",
        "",
        f"**{counts[CONFIRMED]} confirmed, {counts[REFUTED]} refuted, {counts[DEPENDS]} depends"
        + (f", {counts[NOT_MEASURED]} not measured" if counts[NOT_MEASURED] else "")
        + ".**",
        "",
        "| # | claim | source | verdict | deciding numbers |",
        "|---|---|---|---|---|",
    ]
    for claim, verdict in zip(CLAIMS, verdicts, strict=True):
        lines.append(
            f"| {claim.number} | {claim.text} | {claim.source} | "
            f"**{verdict.verdict}** | {verdict.headline} |"
        )
    lines.append("")
    for claim, verdict in zip(CLAIMS, verdicts, strict=True):
        lines += [
            f'## {claim.number}. "{claim.text}" ({claim.source})',
            "",
            f"**Verdict: {verdict.verdict}.** {verdict.why}",
            "",
        ]
        if verdict.evidence:
            lines += ["| measurement | value |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in verdict.evidence]
            lines.append("")
        lines += [f"Rule: {claim.rule}", ""]
        for plot in verdict.plots:
            if plot in plots:
                lines += [f"![{plot}]({plot})", ""]
    from corral.lab.llm_bench import markdown_lines

    lines += markdown_lines(results)
    lines += ["## Every measurement", "", *_part_tables(results)]
    if meta.get("auto_unavailable"):
        lines += [f"Note: corral auto was not measured: {meta['auto_unavailable']}", ""]
    return "\n".join(lines)


def print_summary(display: Display, results: Results, verdicts: list[Verdict]) -> None:
    """The verdicts as a terminal table."""
    styles = {CONFIRMED: "green", REFUTED: "red", DEPENDS: "yellow", NOT_MEASURED: "dim"}
    rows = [
        [str(c.number), c.text if len(c.text) < 60 else c.text[:57] + "...", v.verdict, v.headline]
        for c, v in zip(CLAIMS, verdicts, strict=True)
    ]
    display.table(
        "The seeds' claims, measured here",
        ["#", "claim", "verdict", "deciding numbers"],
        rows,
        right={0},
        styles=[styles[v.verdict] for v in verdicts],
    )
    from corral.lab.llm_bench import COLUMNS, summary_rows

    llm_rows = summary_rows(results)
    if llm_rows:
        display.print()
        display.table(
            "A rate-limited LLM API: the same prompts",
            COLUMNS,
            llm_rows,
            right={1, 2, 3, 4, 5, 6, 7},
        )
