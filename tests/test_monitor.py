"""corral._monitor: the loop watch names the code that blocks the event loop."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import pytest

from _loops import LOOP_KINDS, run
from corral import _monitor
from corral._monitor import BlockReport, LoopWatch, monitor_from_env, watch_loop

WATCHDOG = "corral-loop-watchdog"


def line_of(fn: Callable[..., Any], marker: str) -> int:
    """The line number in ``fn``'s source that carries ``# <marker>``."""
    lines, first = inspect.getsourcelines(fn)
    hits = [first + i for i, line in enumerate(lines) if line.rstrip().endswith(f"# {marker}")]
    assert len(hits) == 1, f"marker {marker!r} found {len(hits)} times"
    return hits[0]


# Blocking code under test. Each is a plain function so that the frame to blame
# has a known name and the blocking line a marker.


def blocker(seconds: float) -> None:
    time.sleep(seconds)  # blocker-sleep


def crunch(seconds: float) -> int:
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:  # crunch-loop
        n += 1  # crunch-body
    return n


def wait_on_event(seconds: float) -> None:
    threading.Event().wait(seconds)  # event-wait


def watchdog_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == WATCHDOG]


# ---------------------------------------------------------------------------
# Blocking calls are found and blamed on the right line
# ---------------------------------------------------------------------------


@pytest.mark.slow
async def test_sleep_is_reported_once_at_the_line_of_the_call() -> None:
    """A 0.3 s time.sleep gives one report naming its function, file and exact line."""
    async with watch_loop(threshold=0.05) as watch:
        blocker(0.3)
    [report] = watch.reports
    assert report.function == "blocker"
    assert report.filename == __file__
    assert report.lineno == line_of(blocker, "blocker-sleep")
    # A lower bound only: a loaded machine can only make the stall longer.
    assert report.duration >= 0.25
    assert "time.sleep(seconds)" in report.stack


@pytest.mark.slow
async def test_cpu_loop_is_blamed_on_a_line_inside_the_loop() -> None:
    """A pure-Python busy loop is blamed on its function, at a line of the loop."""
    async with watch_loop(threshold=0.05) as watch:
        crunch(0.3)
    [report] = watch.reports
    assert report.function == "crunch"
    assert report.filename == __file__
    assert report.lineno in {line_of(crunch, "crunch-loop"), line_of(crunch, "crunch-body")}
    assert report.duration >= 0.25


@pytest.mark.slow
async def test_blocking_stdlib_call_is_blamed_on_the_user_caller() -> None:
    """A block inside threading's Event.wait names the caller; the stack still shows threading."""
    async with watch_loop(threshold=0.05) as watch:
        wait_on_event(0.3)
    [report] = watch.reports
    assert report.function == "wait_on_event"
    assert report.lineno == line_of(wait_on_event, "event-wait")
    # The standard-library frames where it actually waited stay visible.
    assert f'File "{threading.__file__}", line' in report.stack
    assert report.stack.rstrip().endswith("gotit = waiter.acquire(True, timeout)")


@pytest.mark.slow
async def test_short_awaits_are_never_reported() -> None:
    """A loop that only awaits (sleep(0) for 0.3 s) stays under the threshold: no report."""
    async with watch_loop(threshold=0.5, interval=0.01) as watch:
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            await asyncio.sleep(0)  # one turn of the loop per iteration
    assert watch.reports == []
    assert watch.stats().beats >= 5  # the heartbeat did run: the test is not vacuous
    assert watch.max_lag < 0.5


@pytest.mark.slow
async def test_each_stall_gets_its_own_report_once_the_loop_turns() -> None:
    """Two stalls give two reports; the first appears as soon as the loop runs again."""
    async with watch_loop(threshold=0.1) as watch:
        blocker(0.3)
        await asyncio.sleep(0.05)  # the loop turns: the overdue heartbeat closes the stall
        assert len(watch.reports) == 1
        crunch(0.3)
    assert [r.function for r in watch.reports] == ["blocker", "crunch"]
    stats = watch.stats()
    assert stats.blocked == 2
    assert stats.max == watch.max_lag >= 0.25
    assert stats.p50 <= stats.p99 <= stats.max
    assert stats.beats >= 2
    assert sorted(stats.as_dict()) == ["beats", "blocked", "max", "mean", "p50", "p99"]


@pytest.mark.slow
async def test_stall_without_python_code_counts_as_lag_but_blames_nobody() -> None:
    """A C callback that blocks (no Python frame to blame) raises max_lag, gives no report."""
    loop = asyncio.get_running_loop()
    async with watch_loop(threshold=0.05) as watch:
        await asyncio.sleep(0.05)  # let the first heartbeats learn the loop's own frames
        loop.call_soon(time.sleep, 0.3)
        await asyncio.sleep(0.35)
    assert watch.reports == []
    assert watch.max_lag >= 0.25


@pytest.mark.slow
async def test_report_is_logged_as_a_warning_on_the_corral_logger(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each report is logged once on "corral" at WARNING, with its location and stack."""
    with caplog.at_level(logging.WARNING, logger="corral"):
        async with watch_loop(threshold=0.05) as watch:
            blocker(0.2)
    [record] = [r for r in caplog.records if r.name == "corral"]
    [report] = watch.reports
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    line = line_of(blocker, "blocker-sleep")
    assert message.startswith(f"event loop blocked for {report.duration:.3f} s by blocker() ")
    assert message.splitlines()[0].endswith(f" at {__file__}:{line}")
    assert "time.sleep(seconds)" in message
    assert record.__dict__["corral_block_report"] is report


@pytest.mark.slow
async def test_leaving_the_watch_leaves_no_thread_or_heartbeat() -> None:
    """After exit the watchdog thread is gone and the heartbeat never runs again."""
    async with watch_loop(threshold=0.05, interval=0.005) as watch:
        assert len(watchdog_threads()) == 1
        await asyncio.sleep(0.02)  # a few heartbeats
    assert watchdog_threads() == []
    beats = watch.stats().beats
    assert beats >= 1
    await asyncio.sleep(0.05)  # ten intervals: a heartbeat still scheduled would run
    blocker(0.1)
    await asyncio.sleep(0.01)  # a turn that would close a stall if anyone watched
    assert watch.stats().beats == beats
    assert watch.reports == []
    watch.stop()  # stopping again is harmless


@pytest.mark.slow
async def test_a_watch_runs_once() -> None:
    """Starting a watch a second time fails with a message that says what to do."""
    watch = watch_loop()
    async with watch:
        pass
    with pytest.raises(
        RuntimeError,
        match=r"^this LoopWatch is stopped; a watch runs once, "
        r"create a new one with corral\.watch_loop\(\)$",
    ):
        await watch.__aenter__()


@pytest.mark.slow
async def test_stop_must_be_called_on_the_loop_thread() -> None:
    """stop() from another thread is refused; the watch keeps running until stopped properly."""
    async with watch_loop() as watch:
        with pytest.raises(
            RuntimeError,
            match=r"^LoopWatch\.stop\(\) must be called on the thread of the watched loop$",
        ):
            await asyncio.to_thread(watch.stop)
        assert repr(watch).startswith("<LoopWatch running threshold=0.1 max_lag=")
    assert repr(watch).endswith(" reports=0>")


@pytest.mark.slow
@pytest.mark.parametrize("kind", LOOP_KINDS)
def test_watchdog_ends_when_its_loop_closes_without_stop(kind: str) -> None:
    """A watch never stopped (a bug in the caller) does not outlive its loop."""

    async def leak() -> None:
        watch_loop(threshold=0.01).start()

    run(leak, kind)  # runs leak(), then closes the loop
    for thread in watchdog_threads():
        thread.join(timeout=5)
    assert watchdog_threads() == []


def test_time_between_runs_of_the_loop_is_not_lag() -> None:
    """A loop stopped between run_until_complete calls is idle, not late."""
    loop = asyncio.new_event_loop()
    try:
        watch = watch_loop(threshold=0.1)

        async def start() -> None:
            watch.start()

        async def stop() -> None:
            watch.stop()

        loop.run_until_complete(start())
        loop.run_until_complete(asyncio.sleep(0.05))
        time.sleep(2.0)  # nothing runs on the loop meanwhile
        loop.run_until_complete(asyncio.sleep(0.05))
        loop.run_until_complete(stop())
    finally:
        loop.close()
    assert watch.max_lag < 1.0  # the watchdog's ticks, not the 2 s the loop was idle
    assert watch.reports == []


def test_start_needs_a_running_loop() -> None:
    """start() outside a running loop says where to call it from."""
    with pytest.raises(
        RuntimeError,
        match=r"^LoopWatch\.start\(\) needs a running event loop: call it \(or enter "
        r"`async with corral\.watch_loop\(\)`\) from a coroutine$",
    ):
        LoopWatch().start()


# ---------------------------------------------------------------------------
# Arguments and values
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -0.1, math.nan, math.inf, "0.1", None, True, 10**400])
def test_bad_threshold_is_rejected_naming_the_argument(bad: object) -> None:
    """threshold must be a finite positive number; the message names it and its value."""
    expected = f"threshold must be a finite number of seconds > 0, like 0.1; got threshold={bad!r}"
    with pytest.raises(ValueError) as info:
        watch_loop(threshold=bad)  # type: ignore[arg-type]
    assert str(info.value) == expected


@pytest.mark.parametrize("bad", [0, -1, math.nan, "fast"])
def test_bad_interval_is_rejected_naming_the_argument(bad: object) -> None:
    """interval must be None or a finite positive number."""
    expected = (
        "interval must be a finite number of seconds > 0, or None to derive it "
        f"from threshold; got interval={bad!r}"
    )
    with pytest.raises(ValueError) as info:
        watch_loop(interval=bad)  # type: ignore[arg-type]
    assert str(info.value) == expected


def test_interval_defaults_to_a_quarter_of_threshold_within_bounds() -> None:
    """The heartbeat runs every threshold/4 s, but never under 5 ms nor over 0.25 s."""
    assert watch_loop(threshold=0.1).interval == pytest.approx(0.025)
    assert watch_loop(threshold=0.001).interval == 0.005
    assert watch_loop(threshold=10).interval == 0.25
    assert watch_loop(threshold=1, interval=0.5).interval == 0.5
    assert watch_loop(threshold=2).threshold == 2.0


def test_report_reads_as_one_line_and_its_repr_leaves_out_the_stack() -> None:
    """str(report) is the log line; repr omits the (long) stack."""
    report = BlockReport("blocker", "/path/file.py", 12, 0.5034, stack="  File ...\n")
    assert str(report) == "event loop blocked for 0.503 s by blocker() at /path/file.py:12"
    assert "stack" not in repr(report)


def test_stats_before_any_heartbeat_are_zero() -> None:
    """A watch that never ran reports zero lag, not an error."""
    stats = watch_loop().stats()
    assert stats.as_dict() == {
        "beats": 0,
        "mean": 0.0,
        "p50": 0.0,
        "p99": 0.0,
        "max": 0.0,
        "blocked": 0,
    }


def test_lag_percentiles_are_close_upper_bounds() -> None:
    """The histogram's percentiles are at most ~12% above the truth and never above max."""
    hist = _monitor._LagHistogram()
    lags = [i / 1000 for i in range(1, 1001)]  # 1 ms .. 1 s
    for lag in lags:
        hist.add(lag)
    for q, true in ((0.5, 0.5), (0.99, 0.99)):
        assert true <= hist.percentile(q) <= true * 1.13
    assert hist.percentile(1.0) == hist.max == 1.0
    hist.add(0.0)  # a lag below the first bucket
    assert hist.percentile(0.0001) == 1e-5


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, False),
        ("", False),
        ("0", False),
        ("off", False),
        ("No", False),
        ("1", True),
        (" true ", True),
        ("YES", True),
        ("on", True),
    ],
)
def test_corral_monitor_environment_variable_turns_monitoring_on(
    monkeypatch: pytest.MonkeyPatch, value: str | None, expected: bool
) -> None:
    """CORRAL_MONITOR=1 (or true/yes/on) means monitor; unset, 0, off, no mean not."""
    if value is None:
        monkeypatch.delenv("CORRAL_MONITOR", raising=False)
    else:
        monkeypatch.setenv("CORRAL_MONITOR", value)
    assert monitor_from_env() is expected


def test_unknown_corral_monitor_value_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A typo in CORRAL_MONITOR fails loudly instead of silently meaning off."""
    monkeypatch.setenv("CORRAL_MONITOR", "maybe")
    with pytest.raises(
        ValueError,
        match=r"^CORRAL_MONITOR must be 1 or 0 \(or true/false, yes/no, on/off\); "
        r"got CORRAL_MONITOR='maybe'$",
    ):
        monitor_from_env()


# ---------------------------------------------------------------------------
# Blame: which frame of a sampled stack is the culprit
# ---------------------------------------------------------------------------


def test_files_are_classified_as_user_library_corral_or_stdlib() -> None:
    """Paths are sorted into the application, installed packages, corral and the stdlib."""
    kind = _monitor._Kind
    assert _monitor._classify(__file__) is kind.USER
    assert _monitor._classify(pytest.__file__) is kind.LIBRARY
    assert _monitor._classify(_monitor.__file__) is kind.CORRAL
    assert _monitor._classify(json.__file__) is kind.STDLIB
    assert _monitor._classify(threading.__file__) is kind.STDLIB
    assert _monitor._classify("<frozen importlib._bootstrap>") is kind.STDLIB
    assert _monitor._classify("<string>") is kind.USER
    assert _monitor._classify("/opt/app/.venv/lib/python3.11/site-packages/x.py") is kind.LIBRARY


def frame(filename: str, name: str, lineno: int = 1) -> tuple[Any, int]:
    """A fake (code, line) stack entry whose code lives in ``filename``."""
    code = compile(f"def {name}(): pass", filename, "exec").co_consts[0]
    return code, lineno


def test_blame_prefers_user_code_then_libraries_then_the_innermost_frame() -> None:
    """The innermost user frame wins; without one, a library frame; else the innermost frame."""
    stdlib = frame(json.__file__, "dumps", 3)
    library = frame("/v/site-packages/lib/api.py", "get", 7)
    corral = frame(_monitor.__file__, "_run", 9)
    user = frame("/app/main.py", "handler", 12)
    outer_user = frame("/app/main.py", "main", 40)
    blame = _monitor._blame
    assert blame((stdlib, library, user, outer_user), frozenset()) == (
        "handler",
        "/app/main.py",
        12,
    )
    assert blame((stdlib, library, corral), frozenset()) == (
        "get",
        "/v/site-packages/lib/api.py",
        7,
    )
    assert blame((stdlib, corral), frozenset()) == ("dumps", json.__file__, 3)


def test_blame_ignores_frames_that_run_the_loop_and_an_idle_loop() -> None:
    """Frames below the running callback are never blamed; a loop waiting for I/O is not stuck."""
    import asyncio.base_events
    import selectors

    run_once = frame(asyncio.base_events.__file__, "_run_once", 1900)
    select = frame(selectors.__file__, "select", 468)
    stdlib = frame(json.__file__, "dumps", 3)
    main = frame("/app/main.py", "main", 40)
    machinery = frozenset({run_once[0], main[0]})
    blame = _monitor._blame
    # Only asyncio code inside the callback: blame it, not main() that started the loop.
    assert blame((stdlib, run_once, main), machinery) == ("dumps", json.__file__, 3)
    # Waiting in select(), with or without the machinery known yet: idle.
    assert blame((select, run_once, main), machinery) is None
    assert blame((select, run_once, main), frozenset()) is None
    # A C callback (no Python frame above the machinery): nothing to blame.
    assert blame((run_once, main), machinery) is None
    # User code calling a selector itself is a block like any other.
    assert blame((select, frame("/app/poll.py", "poll", 5), run_once), machinery) == (
        "poll",
        "/app/poll.py",
        5,
    )


@pytest.mark.slow
async def test_watchdog_failure_is_logged_and_the_watch_still_stops(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the watchdog thread is logged on "corral", not raised into the program."""

    def broken(*args: object) -> None:
        raise RuntimeError("bug in blame")

    monkeypatch.setattr(_monitor, "_blame", broken)
    with caplog.at_level(logging.ERROR, logger="corral"):
        async with watch_loop(threshold=0.05) as watch:
            blocker(0.2)
    assert watch.reports == []
    [record] = [r for r in caplog.records if r.name == "corral"]
    assert record.getMessage() == "the event loop watchdog failed; the loop is no longer watched"
    assert record.exc_info is not None
    assert str(record.exc_info[1]) == "bug in blame"
    assert watchdog_threads() == []


# ---------------------------------------------------------------------------
# monitor= on a map: the watch runs exactly as long as the map
# ---------------------------------------------------------------------------


async def block_on_item(item: int) -> int:
    if item == 3:
        blocker(0.3)
    await asyncio.sleep(0)
    return item


@pytest.mark.slow
async def test_map_with_monitor_reports_the_blocking_call_and_the_lag(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """monitor=0.05 names the blocking line on the corral logger and fills max_loop_lag."""
    import corral

    with caplog.at_level(logging.WARNING, logger="corral"):
        async with corral.map(block_on_item, range(6), limit=2, monitor=0.05) as results:
            got = [r async for r in results]
        stats = results.stats
    assert got == list(range(6))
    assert stats.max_loop_lag is not None
    assert stats.max_loop_lag >= 0.25
    [record] = [r for r in caplog.records if r.name == "corral"]
    assert f"{__file__}:{line_of(blocker, 'blocker-sleep')}" in record.getMessage()
    assert watchdog_threads() == []


async def test_map_without_monitor_has_no_watch() -> None:
    import corral

    async with corral.map(block_on_item, range(2)) as results:
        assert watchdog_threads() == []
        assert [r async for r in results] == [0, 1]
    assert results.stats.max_loop_lag is None


async def test_gather_with_monitor_true_stops_the_watch_on_failure() -> None:
    """A failing map still stops its watch: no watchdog thread outlives it."""
    import corral

    async def fail(item: int) -> int:
        raise KeyError(item)

    with pytest.raises(KeyError):
        await corral.gather(fail, range(3), monitor=True)
    assert watchdog_threads() == []


async def test_corral_monitor_in_the_environment_watches_every_map(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import corral

    monkeypatch.setenv("CORRAL_MONITOR", "1")
    async with corral.map(block_on_item, range(2)) as results:
        assert len(watchdog_threads()) == 1
        assert [r async for r in results] == [0, 1]
    assert results.stats.max_loop_lag is not None
    assert watchdog_threads() == []


@pytest.mark.parametrize("bad", [0, -1, float("nan"), "yes", None, 10**400])
def test_bad_monitor_is_rejected_naming_the_argument(bad: object) -> None:
    import corral

    with pytest.raises(ValueError, match=r"monitor=") as info:
        corral.map(block_on_item, range(2), monitor=bad)  # type: ignore[arg-type]
    assert repr(bad) in str(info.value)


async def test_monitor_takes_any_real_number_of_seconds() -> None:
    """As watch_loop(threshold=) does: a Fraction is a threshold like a float."""
    import corral

    async with corral.map(block_on_item, range(2), monitor=Fraction(1, 5)) as results:
        assert [r async for r in results] == [0, 1]
    assert results.stats.max_loop_lag is not None


def test_monitor_is_refused_with_processes() -> None:
    import corral

    with pytest.raises(ValueError, match=r"monitor= is not available with processes=N"):
        corral.map(block_on_item, range(2), monitor=True, processes=2)
