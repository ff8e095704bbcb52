"""progress=: stats snapshots to a function, plain lines to a log, a live display on a terminal."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import logging
import os
import pty
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import pytest

import corral
from corral._progress import (
    LINE_INTERVAL,
    Progress,
    _Board,
    _clock,
    final_line,
    running_line,
    total_of,
)
from corral._stats import Stats

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def snapshot(**fields: Any) -> Stats:
    """A Stats with plausible defaults, overridden by ``fields``."""
    values: dict[str, Any] = {
        "started": 0,
        "completed": 0,
        "failed": 0,
        "retried": 0,
        "in_flight": 0,
        "elapsed": 0.0,
        "throughput": 0.0,
        "limit": 100,
        "latency_p50": None,
        "latency_p90": None,
        "latency_p99": None,
    }
    values.update(fields)
    return Stats(**values)


def sleeper(seconds: float) -> Any:
    async def nap(item: int) -> int:
        await asyncio.sleep(seconds)
        return item

    return nap


# pytest swaps its own capture into sys.stderr as each test phase starts, so
# the environments rich reads are fixtures (``plain``, ``terminal``: see
# conftest.py) but the StringIO is put in place from the test body, with
# stderr_to().


def stderr_to(monkeypatch: pytest.MonkeyPatch, stream: io.StringIO | None = None) -> io.StringIO:
    """Point sys.stderr at ``stream`` (a new StringIO by default) for the rest of the test."""
    stream = io.StringIO() if stream is None else stream
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


# ---------------------------------------------------------------------------
# The words
# ---------------------------------------------------------------------------


def test_running_line_shows_done_of_total_rate_limits_failures_and_eta() -> None:
    """With a total: done/total and percent, rate, in flight, limit, failed, retried, ETA."""
    stats = snapshot(started=1334, completed=1234, retried=2, in_flight=100, elapsed=2.7)
    assert running_line(stats, 10_000, 456.7) == (
        "corral: 1,234/10,000 done (12.3%), 456.7/s, 100 in flight, limit 100, "
        "0 failed, 2 retried, ETA 20s"
    )


def test_running_line_without_total_shows_the_count_and_no_eta() -> None:
    """An input with no length gets the count alone, and no ETA."""
    stats = snapshot(completed=1200, failed=34, in_flight=7, limit=None)
    assert running_line(stats, None, 0.5) == (
        "corral: 1,234 done, 0.50/s, 7 in flight, no limit, 34 failed, 0 retried"
    )


def test_eta_is_unknown_until_something_ends() -> None:
    """A rate of zero gives 'ETA ?' rather than a division error."""
    assert running_line(snapshot(in_flight=5), 10, 0.0).endswith(", ETA ?")


def test_final_line_gives_duration_average_rate_and_cancelled_calls() -> None:
    """The final line replaces in flight/limit/ETA with the duration; leftovers were cancelled."""
    # Once a map has ended nothing is in flight: calls started that neither
    # completed nor failed were cut short.
    stats = snapshot(started=45, completed=40, failed=1, elapsed=125.0, throughput=0.328)
    assert final_line(stats, 100) == (
        "corral: 41/100 done (41.0%) in 2m05s, 0.33/s, 1 failed, 0 retried, 4 cancelled, "
        "55 not started"
    )
    assert final_line(snapshot(started=3, completed=3, elapsed=0.25, throughput=12.0), None) == (
        "corral: 3 done in 0.2s, 12.0/s, 0 failed, 0 retried"
    )


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0s"), (0.3, "1s"), (59.2, "1m00s"), (125, "2m05s"), (7325, "2h03m")],
)
def test_durations_are_short_and_rounded_up(seconds: float, text: str) -> None:
    """ETAs read 19s, 4m05s, 2h07m, rounded up so a near end never shows 0s."""
    assert _clock(seconds) == text


# ---------------------------------------------------------------------------
# Total
# ---------------------------------------------------------------------------


class _BadLength:
    def __iter__(self) -> Iterator[int]:
        return iter([1])

    def __len__(self) -> int:
        raise TypeError("no length today")


async def _agen() -> AsyncGenerator[int, None]:
    yield 1


def test_total_is_len_when_the_input_has_one() -> None:
    """Lists and ranges have a total; generators, async iterables and broken lengths do not."""
    assert total_of([1, 2, 3]) == 3
    assert total_of(range(10_000)) == 10_000
    assert total_of({}) == 0
    assert total_of(i for i in range(3)) is None
    assert total_of(iter([1, 2])) is None
    assert total_of(_BadLength()) is None
    assert total_of(range(10**30)) is None  # len() overflows
    agen = _agen()
    assert total_of(agen) is None
    asyncio.run(agen.aclose())


# ---------------------------------------------------------------------------
# progress=callable
# ---------------------------------------------------------------------------


@pytest.mark.virtual_time
async def test_callable_receives_a_snapshot_every_quarter_second_and_a_final_one() -> None:
    """Snapshots arrive every 0.25 s of loop time while the map runs, then the final stats."""
    snaps: list[Stats] = []
    async with corral.map(sleeper(0.3), range(20), limit=5, progress=snaps.append) as results:
        assert [r async for r in results] == list(range(20))
    ticks, final = snaps[:-1], snaps[-1]
    assert [s.elapsed for s in ticks] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert [s.completed for s in ticks] == [0, 5, 10, 15]
    assert [s.in_flight for s in ticks] == [5, 5, 5, 5]
    assert final.completed == 20
    assert final.in_flight == 0
    assert final.elapsed == pytest.approx(1.2)
    assert final == results.stats


@pytest.mark.virtual_time
async def test_gather_delivers_the_final_snapshot_with_every_item_done() -> None:
    """gather with progress=callable: several snapshots, the last with completed == n."""
    snaps: list[Stats] = []
    assert await corral.gather(sleeper(1.0), range(100), limit=7, progress=snaps.append) == list(
        range(100)
    )
    assert len(snaps) > 10
    assert [s.completed for s in snaps] == sorted(s.completed for s in snaps)
    assert snaps[-1].completed == 100
    assert snaps[-1].limit == 7


@pytest.mark.virtual_time
async def test_leaving_early_delivers_a_final_snapshot_and_stops_the_timer() -> None:
    """break out of the map: one final snapshot, then no more calls."""
    snaps: list[Stats] = []
    async with corral.map(sleeper(1.0), range(1000), limit=5, progress=snaps.append) as results:
        async for item in results:
            if item == 2:
                break
    count = len(snaps)
    assert snaps[-1].completed >= 3
    assert snaps[-1].completed < 1000
    await asyncio.sleep(10)  # ten seconds of virtual time: the timer would have fired 40 times
    assert len(snaps) == count


@pytest.mark.virtual_time
async def test_failing_map_still_delivers_its_final_snapshot() -> None:
    """A map that raises delivers a final snapshot counting the failure."""
    snaps: list[Stats] = []

    async def fail_on_seven(item: int) -> int:
        await asyncio.sleep(1)
        if item == 7:
            raise ValueError("seven")
        return item

    with pytest.raises(ValueError, match=r"^seven$"):
        await corral.gather(fail_on_seven, range(20), limit=5, progress=snaps.append)
    assert snaps[-1].failed == 1


@pytest.mark.virtual_time
async def test_a_raising_callback_is_logged_once_and_not_called_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The policy: the error is logged with its traceback, the map completes, no more calls."""
    calls: list[Stats] = []

    def flaky(stats: Stats) -> None:
        calls.append(stats)
        if len(calls) == 2:
            raise ZeroDivisionError("bug in the progress function")

    with caplog.at_level(logging.ERROR, logger="corral"):
        results = await corral.gather(sleeper(1.0), range(50), limit=5, progress=flaky)
    assert results == list(range(50))
    assert len(calls) == 2
    [record] = [r for r in caplog.records if r.name == "corral"]
    assert record.levelno == logging.ERROR
    assert record.getMessage() == (
        f"progress={flaky!r} raised; corral will not call it again for this map, which goes on"
    )
    assert record.exc_info is not None
    assert record.exc_info[0] is ZeroDivisionError


@pytest.mark.virtual_time
async def test_a_callback_returning_a_coroutine_is_stopped_without_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A lambda around an async function: its coroutine is closed (no 'never awaited'), logged."""

    async def record(stats: Stats) -> None:
        pass

    with caplog.at_level(logging.ERROR, logger="corral"):
        await corral.gather(sleeper(1.0), range(10), limit=5, progress=lambda s: record(s))
    [record_] = [r for r in caplog.records if r.name == "corral"]
    assert record_.exc_info is not None
    assert "returned a coroutine; it must be a plain function" in str(record_.exc_info[1])


# ---------------------------------------------------------------------------
# Bad values and the missing extra
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_a_bad_progress_value_is_refused_at_once(value: object) -> None:
    """map() refuses a progress that is neither a bool nor a function, naming it."""
    with pytest.raises(
        TypeError,
        match=r"^progress must be True \(a live display on stderr\), False, or a function "
        rf"that receives corral\.Stats snapshots; got progress={re.escape(repr(value))}$",
    ):
        corral.map(sleeper(0), range(3), progress=value)  # type: ignore[call-overload]


def test_an_async_progress_function_is_refused_at_once() -> None:
    """An async def progress function would never be awaited: refused when map() is called."""

    async def show(stats: Stats) -> None:
        pass

    with pytest.raises(TypeError, match=r"^progress= must be a plain function, .*async function"):
        corral.map(sleeper(0), range(3), progress=show)


def test_missing_rich_says_how_to_install_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """progress=True without rich fails at map() time with the pip command."""
    find_spec = importlib.util.find_spec

    def no_rich(name: str, package: str | None = None) -> Any:
        return None if name == "rich" else find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", no_rich)
    message = (
        r"^progress=True draws a live progress bar with rich, which is not installed: "
        r"pip install 'corral\[progress\]'\. Or pass progress=callable to receive "
        r"corral\.Stats snapshots without rich\.$"
    )
    with pytest.raises(ImportError, match=message):
        corral.map(sleeper(0), range(3), progress=True)
    with pytest.raises(ImportError, match=message):
        corral.run(sleeper(0), range(3), progress=True)
    # A function needs no rich.
    assert corral.run(sleeper(0), range(3), progress=lambda stats: None) == [0, 1, 2]


# ---------------------------------------------------------------------------
# progress=True on a stream that is not a terminal: plain lines
# ---------------------------------------------------------------------------


@pytest.mark.virtual_time
async def test_a_non_terminal_gets_a_plain_line_every_few_seconds_and_a_final_one(
    plain: pytest.MonkeyPatch,
) -> None:
    """A log or CI stderr: one line per LINE_INTERVAL (no redraws, no escapes), then a final one."""
    assert LINE_INTERVAL == 5.0
    plain_stderr = stderr_to(plain)
    await corral.gather(sleeper(0.7), list(range(100)), limit=10, progress=True)
    assert plain_stderr.getvalue().splitlines() == [
        "corral: 70/100 done (70.0%), 14.0/s, 10 in flight, limit 10, 0 failed, 0 retried, ETA 3s",
        "corral: 100/100 done (100.0%) in 7.0s, 14.3/s, 0 failed, 0 retried",
    ]


@pytest.mark.virtual_time
async def test_an_input_without_length_shows_the_count_only(plain: pytest.MonkeyPatch) -> None:
    """A generator has no total: the lines give the count, no percent and no ETA."""
    plain_stderr = stderr_to(plain)
    await corral.gather(sleeper(0.7), (i for i in range(100)), limit=10, progress=True)
    assert plain_stderr.getvalue().splitlines() == [
        "corral: 70 done, 14.0/s, 10 in flight, limit 10, 0 failed, 0 retried",
        "corral: 100 done in 7.0s, 14.3/s, 0 failed, 0 retried",
    ]


@pytest.mark.virtual_time
async def test_a_failed_map_ends_with_a_line_counting_failure_and_cancelled_calls(
    plain: pytest.MonkeyPatch,
) -> None:
    """The final line is written on the failure path too, with what was cut short."""
    plain_stderr = stderr_to(plain)

    async def fail_on_seven(item: int) -> int:
        await asyncio.sleep(1 + item / 100)
        if item == 7:
            raise ValueError("seven")
        return item

    with pytest.raises(ValueError, match=r"^seven$"):
        await corral.gather(fail_on_seven, range(20), limit=5, progress=True)
    [line] = plain_stderr.getvalue().splitlines()
    assert line.startswith("corral: ")
    assert "/20 done (" in line
    assert line.endswith(", 1 failed, 0 retried, 4 cancelled, 8 not started")


class _BrokenStream(io.StringIO):
    """A stream that fails after ``good`` writes, like a stderr whose reader went away."""

    def __init__(self, good: int = 0) -> None:
        super().__init__()
        self.good = good

    def write(self, text: str) -> int:
        if self.good <= 0:
            raise OSError("stderr is gone")
        self.good -= 1
        return super().write(text)


@pytest.mark.virtual_time
async def test_a_stream_that_fails_stops_the_display_not_the_map(
    plain: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Drawing errors follow the callback policy: logged once, display off, map completes."""
    stderr_to(plain, _BrokenStream())
    with caplog.at_level(logging.ERROR, logger="corral"):
        results = await corral.gather(sleeper(1.0), range(100), limit=5, progress=True)
    assert results == list(range(100))
    [record] = [r for r in caplog.records if r.name == "corral"]
    assert record.getMessage() == (
        "progress=True: drawing failed; no more progress for this map, which goes on"
    )


# ---------------------------------------------------------------------------
# progress=True on a terminal: the live display (rich)
# ---------------------------------------------------------------------------


@pytest.mark.virtual_time
async def test_a_terminal_gets_a_live_display_with_counts_and_a_final_row(
    terminal: pytest.MonkeyPatch,
) -> None:
    """Redraws show done/total, in flight, limit and ETA; the final row stays; cursor restored."""
    terminal_stderr = stderr_to(terminal)
    stdout = sys.stdout
    await corral.gather(sleeper(0.7), list(range(100)), limit=10, progress=True)
    raw = terminal_stderr.getvalue()
    text = ANSI.sub("", raw)
    assert "0/100 0.0%" in text  # drawn at once, before anything ended
    assert "10 in flight · limit 10 · 0 failed · 0 retried · ETA " in text
    final = text.rstrip().splitlines()[-1]
    assert final.startswith("corral ")
    assert final.endswith("100/100 100.0% in 7.0s · 14.3/s · 0 failed · 0 retried")
    assert raw.endswith("\x1b[?25h")  # the cursor is shown again
    assert sys.stdout is stdout  # rich's redirection of print() is undone
    assert sys.stderr is terminal_stderr
    assert _Board._boards == {}


@pytest.mark.virtual_time
async def test_live_display_without_total_shows_the_count(terminal: pytest.MonkeyPatch) -> None:
    """A generator input: the row shows the count and no ETA."""
    terminal_stderr = stderr_to(terminal)
    await corral.gather(sleeper(0.7), (i for i in range(30)), limit=10, progress=True)
    text = ANSI.sub("", terminal_stderr.getvalue())
    assert "ETA" not in text
    assert (
        text.rstrip().splitlines()[-1].endswith("30 done in 2.1s · 14.3/s · 0 failed · 0 retried")
    )


@pytest.mark.virtual_time
async def test_concurrent_maps_share_one_live_display(terminal: pytest.MonkeyPatch) -> None:
    """Two maps at once draw one row each in one display, and leave both final rows.

    The first to end is printed above the display, once, and leaves it; the
    last one's final row is the display's last drawing.
    """
    terminal_stderr = stderr_to(terminal)
    await asyncio.gather(
        corral.gather(sleeper(0.7), list(range(30)), limit=10, progress=True),
        corral.gather(sleeper(0.7), list(range(50)), limit=10, progress=True),
    )
    lines = ANSI.sub("", terminal_stderr.getvalue()).replace("\r", "\n").rstrip().splitlines()
    first = "30/30 100.0% in 2.1s · 14.3/s · 0 failed · 0 retried"
    [printed] = [i for i, line in enumerate(lines) if line.endswith(first)]
    assert lines[-1].endswith("50/50 100.0% in 3.5s · 14.3/s · 0 failed · 0 retried")
    assert all("/30 " not in line for line in lines[printed + 1 :])  # its row left the display
    assert _Board._boards == {}


@pytest.mark.virtual_time
async def test_a_terminal_that_fails_releases_the_display(
    terminal: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A live display whose stream breaks is torn down: print() goes to stdout again."""
    stderr_to(terminal, _BrokenStream(good=3))
    stdout = sys.stdout
    with caplog.at_level(logging.ERROR, logger="corral"):
        results = await corral.gather(sleeper(1.0), range(100), limit=5, progress=True)
    assert results == list(range(100))
    assert sys.stdout is stdout
    assert _Board._boards == {}
    [record] = [r for r in caplog.records if r.name == "corral"]
    assert record.getMessage().startswith("progress=True: drawing failed")


@pytest.mark.slow
async def test_a_pseudo_terminal_shows_the_live_display(monkeypatch: pytest.MonkeyPatch) -> None:
    """progress=True with stderr on a real pty draws with escape codes and ends on the totals."""
    monkeypatch.setenv("COLUMNS", "200")
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(name, raising=False)
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:  # a full pty buffer would block the loop's writes
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # the slave side was closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    terminal = os.fdopen(slave, "w", encoding="utf-8")  # closed below
    try:
        monkeypatch.setattr(sys, "stderr", terminal)
        results = await corral.gather(sleeper(0.01), range(60), limit=10, progress=True)
    finally:
        monkeypatch.undo()
        terminal.close()
    reader.join(timeout=10)
    os.close(master)
    assert results == list(range(60))
    raw = b"".join(chunks).decode("utf-8")
    assert "\x1b[" in raw  # drawn, not written as plain lines
    final = ANSI.sub("", raw).replace("\r", "\n").rstrip().splitlines()[-1]
    assert " 60/60 100.0% in " in final
    assert final.endswith(" · 0 failed · 0 retried")


# ---------------------------------------------------------------------------
# The component itself
# ---------------------------------------------------------------------------


def test_progress_false_creates_nothing() -> None:
    """progress=False: no component, nothing scheduled."""
    assert Progress.create(False, snapshot, None) is None


def test_a_bad_interval_is_refused() -> None:
    """The interval must be a positive number of seconds."""
    with pytest.raises(
        ValueError, match=r"^interval must be a finite number of seconds > 0; got interval=0$"
    ):
        Progress.create(print, snapshot, None, interval=0)


@pytest.mark.virtual_time
async def test_stop_is_idempotent_and_a_never_started_progress_says_nothing() -> None:
    """stop() delivers the final snapshot once; stop() before start() delivers nothing."""
    snaps: list[Stats] = []
    unused = Progress.create(snaps.append, snapshot, None)
    assert unused is not None
    unused.stop()
    unused.start()  # too late: stopped for good
    assert snaps == []

    progress = Progress.create(snaps.append, lambda: snapshot(completed=len(snaps)), 5)
    assert progress is not None
    progress.start()
    await asyncio.sleep(0.6)  # two ticks of 0.25 s
    progress.stop()
    progress.stop()
    assert [s.completed for s in snaps] == [0, 1, 2]


@pytest.mark.slow
def test_a_progress_function_does_not_import_rich() -> None:
    """progress=callable works on the standard library alone."""
    code = (
        "import asyncio, sys, corral\n"
        "async def f(x):\n"
        "    await asyncio.sleep(0)\n"
        "    return x\n"
        "snaps = []\n"
        "assert corral.run(f, range(10), progress=snaps.append) == list(range(10))\n"
        "assert snaps[-1].completed == 10\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'rich'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


# -- whichever way the map ends -----------------------------------------------


def _others() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


@pytest.mark.virtual_time
async def test_a_second_cancellation_while_closing_still_closes_everything() -> None:
    """A second Ctrl-C or an outer timeout during the close: the calls are still
    awaited, the display gets its final snapshot and stops, then it is raised."""
    snapshots: list[Stats] = []
    cleaned = asyncio.Event()

    async def slow_to_cancel(item: int) -> int:
        try:
            await asyncio.sleep(100)
        except asyncio.CancelledError:
            await cleaned.wait()  # cleanup that takes a while
            raise
        return item

    async def user() -> None:
        async with corral.map(slow_to_cancel, range(4), progress=snapshots.append) as results:
            async for _ in results:
                pass

    task = asyncio.create_task(user())
    await asyncio.sleep(1)
    task.cancel()  # leaving the block: the close waits for the calls' cleanup
    await asyncio.sleep(1)
    task.cancel()  # and is cancelled itself: it cancels the calls again, and waits
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _others() == set()  # no call outlives the block
    final = len(snapshots)
    assert snapshots[-1].in_flight == 0
    await asyncio.sleep(10)
    assert len(snapshots) == final  # the display's timer is stopped
    assert _others() == set()


async def test_cancelled_before_it_starts_the_display_still_gets_a_final_snapshot() -> None:
    async def same(item: int) -> int:
        return item

    snapshots: list[Stats] = []
    results = corral.map(same, range(5), progress=snapshots.append)
    results.cancel()
    async with results:
        assert [r async for r in results] == []
    assert [(s.started, s.completed) for s in snapshots] == [(0, 0)]


async def test_a_final_snapshot_that_raises_system_exit_still_shuts_the_threads_down() -> None:
    def work(item: int) -> int:  # a plain def: runs in corral's own threads
        return item

    def enough(stats: Stats) -> None:
        if stats.completed == 10:
            raise SystemExit("enough")

    with pytest.raises(SystemExit):
        await corral.gather(work, range(10), limit=4, progress=enough)
    assert [t.name for t in threading.enumerate() if t.name.startswith("corral")] == []


async def test_the_final_snapshot_has_the_watchs_final_lag() -> None:
    """The loop watch records the last stall before the display takes its final snapshot."""

    async def same(item: int) -> int:
        return item

    snapshots: list[Stats] = []
    async with corral.map(same, range(3), progress=snapshots.append, monitor=True) as results:
        async for item in results:
            if item == 2:  # the last one: the map is still open
                await asyncio.sleep(0.05)  # the watch's heartbeat runs
                time.sleep(0.3)  # block the loop, then leave the block at once
                break
    lag = results.stats.max_loop_lag
    assert lag is not None
    assert lag >= 0.2
    assert snapshots[-1] == results.stats
