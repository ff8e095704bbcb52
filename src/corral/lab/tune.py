"""``corral tune``: find the concurrency limit a workload should run at.

Too few calls in flight and the target idles; too many and they queue inside
it (latency grows, throughput does not) until it starts refusing them. The
limit worth using is the *knee*: the smallest one that already gets (almost)
all the throughput there is, without errors. No rule of thumb finds it (the
number of CPU cores certainly does not); a short experiment does::

    corral tune http://127.0.0.1:8080/search         # GET that URL, nothing else
    corral tune myapp.jobs:fetch --items urls.txt    # your async function, your items
    corral tune myapp.jobs:fetch --items range:1000 --json

The sweep runs short trials at limits 1, 2, 4, 8, ... and measures, for each,
the successful calls per second, the p50/p99 latency and the error rate. It
stops early once errors appear, once throughput falls (below 85% of the best
so far), or once two doublings in a row gain less than 5% (a plateau).
It recommends the smallest limit whose throughput is at least 95% of the
best seen in an error-free trial, or the knee of the curve if that comes
first (the doubling past which throughput gains under 20% while latency grows
over 50%: the target is saturated and extra calls only queue), says why in
one sentence, and draws the curve to a PNG.

Reference:

``Trial``
    One limit's measurements.
``run_trial(fn, items, limit, seconds)``
    Run ``fn`` over ``items`` at ``limit`` for about ``seconds``.
``sweep(fn, items, limits=..., seconds=..., stop_early=True, on_trial=None)``
    Trials at each limit in turn; stops early unless told not to.
``recommend(trials)``
    ``(limit, reason)``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import itertools
import json
import math
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from corral.lab._options import (
    DAY_S,
    directory_option,
    int_option,
    number_option,
    show_number,
)

__all__ = [
    "PEAK_SHARE",
    "Trial",
    "geometric_limits",
    "recommend",
    "run_trial",
    "stop_reason",
    "sweep",
    "tune_command",
]

#: The recommended limit is the smallest reaching this share of the peak throughput.
PEAK_SHARE = 0.95
#: A trial below this share of the best throughput so far ends the sweep.
FALL_SHARE = 0.85
#: Two doublings in a row gaining less than this (5%) are a plateau.
PLATEAU_GAIN = 1.05
#: The knee: a doubling gaining less than this much throughput (20%) ...
KNEE_GAIN = 1.2
#: ... while the median latency grows more than this (50%) ...
KNEE_LATENCY = 1.5
#: ... from a limit already at this share of the peak (80%).
KNEE_FLOOR = 0.8
#: The shortest --trial-seconds, 10 ms: a trial is cut off at ten times its
#: length on the loop's clock, which uvloop ticks in whole milliseconds; far
#: shorter (1e-300) ends every trial before any call does.
MIN_TRIAL_S = 0.01
#: The longest --trial-seconds: a day per limit already makes a sweep of a week or more.
MAX_TRIAL_S = DAY_S

Fn = Callable[[Any], Awaitable[Any]]


@dataclass(frozen=True)
class Trial:
    """The measurements of one trial at one limit.

    Attributes:
        limit: calls allowed in flight.
        ok: calls that returned.
        errors: calls that raised (for a URL: a failed connection or a status >= 400).
        seconds: how long the trial ran.
        throughput: successful calls per second in the steady part of the trial:
            the slope of their completions over time from the first completion
            on, so the ramp-up is left out.
        p50_ms, p99_ms: latency of the successful calls, milliseconds.
    """

    limit: int
    ok: int
    errors: int
    seconds: float
    throughput: float
    p50_ms: float | None
    p99_ms: float | None

    @property
    def error_rate(self) -> float:
        calls = self.ok + self.errors
        return self.errors / calls if calls else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "error_rate": self.error_rate}


def geometric_limits(max_limit: int, *, start: int = 1) -> list[int]:
    """``start, 2*start, 4*start, ...`` up to ``max_limit``, which is always included."""
    limits: list[int] = []
    limit = start
    while limit < max_limit:
        limits.append(limit)
        limit *= 2
    limits.append(max_limit)
    return limits


def _percentile_ms(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank] * 1e3


def _clock() -> float:
    # perf_counter, not loop.time(): uvloop's clock ticks in whole milliseconds,
    # too coarse for the latency of a fast call. A module function so a test
    # can put the trial on a virtual clock.
    return time.perf_counter()


async def run_trial(fn: Fn, items: Iterator[Any], limit: int, seconds: float) -> Trial:
    """Run ``fn`` over ``items`` (pulled as needed) at ``limit`` for about ``seconds``.

    The trial lasts at least ``seconds`` and until ``4 * limit`` calls have
    ended, so a slow target still gives each slot a few turns; it never lasts
    beyond ``10 * seconds``: calls still running then are cancelled and not
    counted. The calls in flight when the trial has enough are left to end
    (for up to another ``seconds``, within that cap) but not counted, so the
    next trial starts on an idle target. Exceptions from ``fn`` are counted as
    errors, never raised.
    """
    import corral

    clock = _clock

    async def timed(item: Any) -> tuple[float, float] | None:
        began = clock()
        try:
            await fn(item)
        except Exception:
            return None  # the workload's failure is a measurement here
        now = clock()
        return now, now - began

    latencies: list[float] = []
    ended: list[float] = []  # when each successful call ended
    errors = 0
    start = clock()
    deadline = start + seconds
    end: float | None = None  # when the trial had enough; its calls still running then drain

    def until_enough() -> Iterator[Any]:
        # Stop starting calls, and let those in flight end rather than cancel
        # them: a server goes on working for a client that went away, so
        # cancelled calls would still hold its slots when the next trial
        # starts, and that trial would be refused at a limit the server takes.
        # `end` is checked before each pull: the sweep's next trial gets the next item.
        while end is None:
            try:
                item = next(items)
            except StopIteration:
                return
            yield item

    loop = asyncio.get_running_loop()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(10 * seconds) as cap:
            async with corral.map(timed, until_enough(), limit=limit, ordered=False) as results:
                async for outcome in results:
                    if end is not None:
                        continue  # draining: past the trial, not counted
                    if outcome is None:
                        errors += 1
                    else:
                        ended.append(outcome[0])
                        latencies.append(outcome[1])
                    if clock() >= deadline and len(latencies) + errors >= 4 * limit:
                        end = clock()
                        # A call that hangs must not hold the sweep for long:
                        # the drain gets one more trial's length at most.
                        cap.reschedule(min(cap.when() or math.inf, loop.time() + seconds))
    if end is None:
        end = clock()
    throughput = _completion_rate(sorted(ended))
    if throughput is None:
        throughput = len(latencies) / (end - start) if end > start else 0.0
    latencies.sort()
    return Trial(
        limit=limit,
        ok=len(latencies),
        errors=errors,
        seconds=end - start,
        throughput=throughput,
        p50_ms=_percentile_ms(latencies, 50),
        p99_ms=_percentile_ms(latencies, 99),
    )


def _completion_rate(ended: list[float]) -> float | None:
    """Calls per second: the least-squares slope of the calls ended so far against time.

    ``ended`` holds the instants the calls ended, ascending. Counting the calls
    that ended after the first one, over the time from it to the last, would
    overstate the rate whenever calls end together: those ending with the first
    are counted, but none of the time it took to run them is. A fixed-latency
    target ends calls in batches of ``limit``, and a trial of four batches
    then read a third high. The slope of the staircase of completions is exact
    for whole batches, needs no guess at which calls ended "together", and
    still leaves out the ramp-up before the first completion; a trial that
    stops partway into a batch reads at most a few percent low. ``None`` when
    there are fewer than two distinct instants.
    """
    count = len(ended)
    if count < 2:
        return None
    mean_t = math.fsum(ended) / count
    mean_n = (count + 1) / 2
    spread = math.fsum((t - mean_t) ** 2 for t in ended)
    if spread <= 0:
        return None
    return math.fsum((t - mean_t) * (n - mean_n) for n, t in enumerate(ended, 1)) / spread


def stop_reason(trials: list[Trial]) -> str | None:
    """Why the sweep should stop after ``trials``, or ``None`` to go on."""
    last = trials[-1]
    if last.errors:
        return f"errors appeared at limit {last.limit} ({last.error_rate:.1%} of calls)"
    best = max(t.throughput for t in trials)
    if last.throughput < FALL_SHARE * best:
        return (
            f"throughput fell to {last.throughput:,.0f}/s at limit {last.limit}, "
            f"{last.throughput / best:.0%} of the best"
        )
    if len(trials) >= 3:
        before = max(t.throughput for t in trials[:-2])
        if before > 0 and max(t.throughput for t in trials[-2:]) < PLATEAU_GAIN * before:
            return (
                f"throughput stopped growing: limits {trials[-2].limit} and {last.limit} "
                f"gained less than {PLATEAU_GAIN - 1:.0%}"
            )
    return None


async def sweep(
    fn: Fn,
    items: Iterable[Any],
    *,
    limits: list[int],
    seconds: float,
    stop_early: bool = True,
    on_trial: Callable[[Trial], None] | None = None,
) -> list[Trial]:
    """Run a trial at each of ``limits`` in turn, all pulling from the same ``items``.

    With ``stop_early``, stops after the first trial for which
    :func:`stop_reason` gives a reason.
    """
    source = iter(items)
    trials: list[Trial] = []
    for limit in limits:
        trial = await run_trial(fn, source, limit, seconds)
        trials.append(trial)
        if on_trial is not None:
            on_trial(trial)
        if stop_early and stop_reason(trials) is not None:
            break
    return trials


def _knee(clean: list[Trial], peak: Trial) -> tuple[Trial, Trial] | None:
    """The first doubling past which the target is saturated: ``(before, after)``, or None.

    Below a target's capacity, twice the calls in flight give about twice the
    throughput at the same latency. Once it is saturated they only queue:
    throughput barely moves and latency grows with the queue. That step, less
    than :data:`KNEE_GAIN` more throughput for over :data:`KNEE_LATENCY` times
    the median latency, is the knee; the limit before it is already near the
    peak (>= :data:`KNEE_FLOOR` of it).
    """
    ordered = sorted(clean, key=_limit)
    for before, after in itertools.pairwise(ordered):
        if (
            before.p50_ms
            and after.p50_ms
            and before.throughput >= KNEE_FLOOR * peak.throughput
            and after.throughput < KNEE_GAIN * before.throughput
            and after.p50_ms > KNEE_LATENCY * before.p50_ms
        ):
            return before, after
    return None


def recommend(trials: list[Trial], *, max_limit: int | None = None) -> tuple[int, str]:
    """The limit to use, and one sentence saying why.

    The smallest error-free limit reaching :data:`PEAK_SHARE` of the best
    throughput, or the knee of the curve if that comes first (see
    :func:`_knee`): a target that queues requests often serves a few percent
    more with a queue in front of it, at twice the latency, and that is not a
    limit worth recommending. When every trial had errors, the one with the
    fewest (the sentence says so: the target needs fixing before tuning means
    much).
    """
    if not trials:
        raise ValueError("recommend() needs at least one trial; got trials=[]")
    clean = [t for t in trials if t.errors == 0 and t.ok > 0]
    if not clean:
        fewest = min(trials, key=lambda t: (t.error_rate, -t.throughput, t.limit))
        return fewest.limit, (
            f"Every trial had errors, limit {fewest.limit} the fewest "
            f"({fewest.error_rate:.1%} of calls), so fix the errors before trusting a limit."
        )
    peak = max(clean, key=lambda t: t.throughput)
    chosen = min((t for t in clean if t.throughput >= PEAK_SHARE * peak.throughput), key=_limit)
    knee = _knee(clean, peak)
    if knee is not None and knee[0].limit < chosen.limit:
        before, after = knee
        p50_before, p50_after = before.p50_ms or 0.0, after.p50_ms or 0.0  # set: see _knee
        share = before.throughput / peak.throughput
        return before.limit, (
            f"Limit {before.limit} is the knee: it reaches {share:.0%} of the peak throughput "
            f"({before.throughput:,.0f}/s of {peak.throughput:,.0f}/s at limit {peak.limit}) "
            f"with no errors, and doubling it to {after.limit} gained "
            f"{after.throughput / before.throughput - 1:.0%} throughput for "
            f"{p50_after / p50_before - 1:.0%} more latency "
            f"(p50 {p50_before:,.0f} ms, then {p50_after:,.0f} ms)."
        )
    if chosen is peak:
        head = (
            f"Limit {chosen.limit} gave the highest throughput ({chosen.throughput:,.0f}/s) "
            "with no errors"
        )
    else:
        head = (
            f"Limit {chosen.limit} reaches {chosen.throughput / peak.throughput:.0%} of the "
            f"peak throughput ({chosen.throughput:,.0f}/s of {peak.throughput:,.0f}/s at limit "
            f"{peak.limit}) with no errors"
        )
    failing = [t for t in trials if t.errors and t.limit > chosen.limit]
    highest = max(trials, key=_limit)
    if failing:
        first = min(failing, key=_limit)
        tail = f", while limit {first.limit} already failed {first.error_rate:.1%} of calls"
    elif highest.limit > chosen.limit and chosen.p99_ms and highest.p99_ms:
        tail = (
            f"; going higher only raises p99 latency ({chosen.p99_ms:,.0f} ms, "
            f"{highest.p99_ms:,.0f} ms at limit {highest.limit})"
        )
    elif max_limit is not None and chosen.limit >= max_limit:
        tail = f", the largest limit tried: raise --max-limit above {max_limit} to look further"
    else:
        tail = ""
    return chosen.limit, head + tail + "."


def _limit(trial: Trial) -> int:
    return trial.limit


# --------------------------------------------------------------------------------------
# Targets and items from the command line
# --------------------------------------------------------------------------------------


class TargetError(ValueError):
    """A TARGET or --items the command cannot use; the message says what would work."""


_DOTTED = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def _import_attribute(text: str, what: str) -> Any:
    module_name, _, attribute = text.partition(":")
    # `python -m` semantics: the current directory is importable.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        value: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise TargetError(f"{what} {text!r}: cannot import {module_name!r}: {exc}") from exc
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise TargetError(f"{what} {text!r}: {module_name!r} has no {attribute!r}") from None
    return value


def load_function(text: str) -> Fn:
    """``module:function`` -> the async function it names."""
    if not _DOTTED.match(text):
        raise TargetError(
            f"TARGET must be a URL (http://... or https://...) or module:function, "
            f"like myapp.jobs:fetch; got {text!r}"
        )
    fn = _import_attribute(text, "TARGET")
    from corral._numbers import is_async_callable

    if not is_async_callable(fn):
        raise TargetError(
            f"TARGET {text!r} must be an async function of one item (async def fn(item)); "
            f"got {fn!r}"
        )
    return fn  # type: ignore[no-any-return]


def load_items(text: str | None) -> Iterable[Any]:
    """``--items``: a file of lines, ``range:N`` or ``module:attr``; ``None``: 0, 1, 2, ..."""
    if text is None:
        return itertools.count()
    if text.startswith("range:"):
        try:
            count = int(text.removeprefix("range:"))
        except ValueError:
            count = 0
        if count < 1:
            raise TargetError(f"--items range:N needs an int N >= 1; got --items {text!r}")
        return range(count)
    path = Path(text)
    if path.is_file():
        try:
            text_read = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TargetError(
                f"--items {text!r}: cannot read it as UTF-8 text, one item per line ({exc})"
            ) from None
        lines = [line for line in text_read.splitlines() if line.strip()]
        if not lines:
            raise TargetError(f"--items {text!r}: the file has no non-empty line")
        return lines
    if _DOTTED.match(text):
        value = _import_attribute(text, "--items")
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise TargetError(f"--items {text!r} must name an iterable; got {value!r}")
        return value
    raise TargetError(
        f"--items must be a file of lines, range:N or module:attr; got {text!r} "
        "(no such file, and not range:N or module:attr)"
    )


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def _check_url(url: str) -> str:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsed lazily: an out-of-range port raises only here
    except ValueError as exc:
        raise TargetError(
            f"TARGET must be a valid URL, like http://127.0.0.1:8080/; got {url!r} ({exc})"
        ) from None
    if not parts.hostname:
        raise TargetError(f"TARGET URL needs a host, like http://127.0.0.1:8080/; got {url!r}")
    return url


def _nonempty_cycle(items: Iterable[Any]) -> Iterator[Any]:
    # Trials need more calls than a short list holds: the items are reused in
    # turn. itertools.cycle keeps one copy of a one-shot generator's items.
    source = iter(items)
    try:
        first = next(source)
    except StopIteration:
        raise TargetError("--items is empty: tuning needs at least one item") from None
    return itertools.cycle(itertools.chain([first], source))


# --------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``corral tune``'s arguments on ``parser``."""
    add = parser.add_argument
    add(
        "target",
        metavar="TARGET",
        help="a URL to GET (only that URL is ever requested) or module:function, an async "
        "function of one item",
    )
    add(
        "--items",
        metavar="ITEMS",
        help="for module:function: a file (one item per line), range:N, or module:attr "
        "(an iterable); reused in turn across trials (default: 0, 1, 2, ...)",
    )
    add(
        "--max-limit",
        type=int_option(1),
        default=1024,
        metavar="N",
        help="largest limit tried, an int >= 1 (1024)",
    )
    add(
        "--trial-seconds",
        type=number_option(MIN_TRIAL_S, MAX_TRIAL_S, what="a number of seconds"),
        default=1.0,
        metavar="S",
        help=f"length of each trial, from {show_number(MIN_TRIAL_S)} to "
        f"{show_number(MAX_TRIAL_S)} (default 1.0)",
    )
    add("--json", action="store_true", help="print one JSON object (recommended_limit, ...)")
    add(
        "--out",
        type=directory_option,
        default=Path("corral-tune"),
        metavar="DIR",
        help="where tune.png and tune.json go (default: ./corral-tune/)",
    )


def tune_command(args: argparse.Namespace) -> int:
    """Run ``corral tune`` with parsed ``args``; return the exit status.

    With ``--json``, stdout carries the one JSON object and nothing else: what
    the TARGET's module or function prints (at import, on every call) goes to
    stderr, with the progress, so that ``corral tune ... --json | jq`` holds.
    """
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        return _tune_command(args, stdout)


def _tune_command(args: argparse.Namespace, stdout: TextIO) -> int:
    if args.max_limit < 1:
        print(
            f"corral tune: error: --max-limit must be >= 1; got {args.max_limit}", file=sys.stderr
        )
        return 2
    if not MIN_TRIAL_S <= args.trial_seconds <= MAX_TRIAL_S:  # False for nan too
        print(
            f"corral tune: error: --trial-seconds must be a number of seconds between "
            f"{show_number(MIN_TRIAL_S)} and {show_number(MAX_TRIAL_S)}; "
            f"got {args.trial_seconds}",
            file=sys.stderr,
        )
        return 2
    try:
        if _is_url(args.target):
            if args.items is not None:
                raise TargetError("--items is for module:function targets; a URL is GET as is")
            _check_url(args.target)
            fn: Fn | None = None
            items: Iterable[Any] = itertools.count()
        else:
            fn = load_function(args.target)
            items = load_items(args.items)
        source = _nonempty_cycle(items)
    except TargetError as exc:
        print(f"corral tune: error: {exc}", file=sys.stderr)
        return 2
    from corral.lab.runner import prepare_out, run_main

    problem = prepare_out(args.out)
    if problem is not None:
        print(f"corral tune: error: {problem}", file=sys.stderr)
        return 2

    try:
        return run_main(_tune(args, fn, source, stdout))
    except KeyboardInterrupt:
        print("corral tune: interrupted", file=sys.stderr)
        return 130


async def _tune(
    args: argparse.Namespace, fn: Fn | None, items: Iterator[Any], stdout: TextIO
) -> int:
    from corral.lab.runner import write_text_whole

    out = sys.stderr if args.json else stdout
    limits = geometric_limits(args.max_limit)
    print(
        f"corral tune {args.target}: trials of {args.trial_seconds:g} s at limits "
        f"{', '.join(map(str, limits[:5]))}, ... up to {args.max_limit}",
        file=out,
        flush=True,
    )

    def show(trial: Trial) -> None:
        p50 = "-" if trial.p50_ms is None else f"{trial.p50_ms:,.1f}"
        p99 = "-" if trial.p99_ms is None else f"{trial.p99_ms:,.1f}"
        print(
            f"  limit {trial.limit:>5}: {trial.throughput:>9,.0f} ok/s  p50 {p50:>7} ms  "
            f"p99 {p99:>7} ms  errors {trial.errors} ({trial.error_rate:.1%})",
            file=out,
            flush=True,
        )

    first_error: list[Exception] = []

    def recording(call: Fn) -> Fn:
        async def recorded(item: Any) -> Any:
            try:
                return await call(item)
            except Exception as exc:
                # A sweep in which nothing succeeds has nothing to show but this.
                if not first_error:
                    first_error.append(exc)
                raise

        return recorded

    async with contextlib.AsyncExitStack() as stack:
        call = fn if fn is not None else await stack.enter_async_context(_url_target(args.target))
        trials = await sweep(
            recording(call), items, limits=limits, seconds=args.trial_seconds, on_trial=show
        )
    stopped = stop_reason(trials) or "every limit up to --max-limit was tried"
    summary: dict[str, Any]
    if any(t.ok for t in trials):
        limit, reason = recommend(trials, max_limit=args.max_limit)
        summary = {"recommended_limit": limit, "reason": reason}
    else:
        # No call succeeded: any limit named here would be a guess dressed up as a result.
        limit = None
        if first_error:
            error = f"{type(first_error[0]).__name__}: {first_error[0]}"
            reason = (
                f"Every call failed ({sum(t.errors for t in trials):,} of them), so there is "
                f"no limit to recommend; the first error was {error}"
            )
        else:
            error = "no call ended within ten times the trial time"
            reason = f"No call succeeded, so there is no limit to recommend: {error}"
        # The JSON's recommended_limit is always an int (scripts read it as
        # one): 1, the most careful, with the error beside it and exit 1.
        summary = {"recommended_limit": 1, "reason": reason, "error": error}
    summary.update(target=args.target, stopped=stopped, trials=[t.as_dict() for t in trials])
    unwritten: OSError | None = None
    try:
        plot = None if limit is None else _plot(args, trials, limit)
        summary["plot"] = None if plot is None else str(plot)
        # --out was checked before the sweep, but it can vanish or fill up since.
        args.out.mkdir(parents=True, exist_ok=True)
        write_text_whole(args.out / "tune.json", json.dumps(summary, indent=2) + "\n")
    except OSError as exc:
        plot, unwritten = None, exc
        summary["plot"] = None
    if args.json:
        print(json.dumps(summary), file=stdout, flush=True)
    else:
        print(f"Stopped: {stopped}.", file=stdout)
        if limit is None:
            print(f"No limit recommended. {reason}.", file=stdout)
        else:
            print(f"Recommended limit: {limit}. {reason}", file=stdout)
        if plot is not None:
            print(f"Plot: {plot}", file=stdout)
    if unwritten is not None:
        print(
            f"corral tune: error: cannot write into --out {str(args.out)!r}: {unwritten}",
            file=sys.stderr,
        )
        return 1
    return 0 if limit is not None else 1


@contextlib.asynccontextmanager
async def _url_target(url: str) -> Any:
    import aiohttp

    from corral.lab.runner import raise_open_files_limit

    raise_open_files_limit()
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def get(_: Any) -> None:
            # No redirects: a Location elsewhere is not a place the user named.
            async with session.get(url, allow_redirects=False) as response:
                await response.read()
                response.raise_for_status()

        yield get


def _plot(args: argparse.Namespace, trials: list[Trial], limit: int) -> Path | None:
    """tune.png, or ``None`` without matplotlib (the result does not need the picture)."""
    try:
        from corral.lab import plots
    except ImportError:
        return None
    path: Path = args.out / "tune.png"
    plots.tune_curve(trials, limit, path, title=f"corral tune {args.target}")
    return path
