"""corral._monitor at its edges: extreme arguments, odd lifecycles, a watch's own reporting."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from corral import _monitor
from corral._monitor import LoopWatch, watch_loop

WATCHDOG = "corral-loop-watchdog"


def blocker(seconds: float) -> None:
    time.sleep(seconds)  # blocker-sleep


def watchdog_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == WATCHDOG]


def corral_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "corral" and r.levelno >= logging.ERROR]


class _OnReports(logging.Handler):
    """A handler on the ``corral`` logger that acts on block reports only."""

    def __init__(self, *, sleep: float = 0.0, fail: bool = False) -> None:
        super().__init__(logging.WARNING)
        self.sleep = sleep
        self.fail = fail
        self.seen = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "corral_block_report" not in record.__dict__:
            return
        self.seen += 1
        if self.sleep:
            time.sleep(self.sleep)  # a handler writing to a slow disk or a network
        if self.fail:
            raise RuntimeError("the log shipper is down")


@pytest.fixture
def on_reports() -> Iterator[list[_OnReports]]:
    """Handlers appended to the list are attached to the ``corral`` logger for the test."""
    handlers: list[_OnReports] = []
    logger = logging.getLogger("corral")
    yield handlers
    for handler in handlers:
        logger.removeHandler(handler)


def attach(handlers: list[_OnReports], handler: _OnReports) -> _OnReports:
    handlers.append(handler)
    logging.getLogger("corral").addHandler(handler)
    return handler


# ---------------------------------------------------------------------------
# Extreme but valid arguments
# ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("threshold", "interval"),
    [(1e300, None), (4e10, 4e10), (0.1, 1e300)],
    ids=["huge-threshold", "huge-both", "huge-interval"],
)
async def test_huge_threshold_or_interval_keeps_the_watchdog_alive(
    caplog: pytest.LogCaptureFixture, threshold: float, interval: float | None
) -> None:
    """A threshold of 1e300 s means "never report", not a watchdog that dies of an overflow.

    A lock's timeout cannot exceed threading.TIMEOUT_MAX (about 292 years), so a
    watchdog that slept "until the heartbeat is overdue by threshold" failed at
    once and logged an OverflowError instead of watching.
    """
    with caplog.at_level(logging.ERROR, logger="corral"):
        async with watch_loop(threshold=threshold, interval=interval) as watch:
            await asyncio.sleep(0.05)  # the watchdog has gone to sleep by now
            [thread] = watchdog_threads()
            assert thread.is_alive()
        assert watchdog_threads() == []
    assert corral_errors(caplog) == []
    assert watch.reports == []
    assert watch.stats().beats >= 1


# ---------------------------------------------------------------------------
# Lifecycles: a loop that closes first, stop() outside the loop, a failed start
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_watchdog_ends_soon_after_its_loop_closes_even_with_a_long_threshold() -> None:
    """A watch never stopped, on a loop that closed, leaves no thread behind for long.

    The watchdog used to notice the closed loop only once the heartbeat was
    overdue by threshold: an hour after the loop was gone, for threshold=3600.
    """

    async def leak() -> None:
        watch_loop(threshold=3600).start()

    asyncio.run(leak())
    for thread in watchdog_threads():
        thread.join(timeout=10)  # ten times the longest it now sleeps
    assert watchdog_threads() == []


@pytest.mark.slow
@pytest.mark.parametrize("closed", [False, True], ids=["between-runs", "after-close"])
def test_stop_outside_the_running_loop_counts_no_idle_time_as_lag(closed: bool) -> None:
    """stop() from plain code, the loop not running (or closed): the idle time is not lag."""
    loop = asyncio.new_event_loop()
    # A threshold longer than the idle gap: the watchdog leaves the heartbeat's
    # due time alone, so only stop() decides what the gap counts as.
    watch = watch_loop(threshold=5.0)

    async def start() -> None:
        watch.start()

    try:
        loop.run_until_complete(start())
        loop.run_until_complete(asyncio.sleep(0.05))  # a couple of beats
        if closed:
            loop.close()
        time.sleep(1.0)  # nothing runs on the loop meanwhile
        watch.stop()
    finally:
        loop.close()
    # The beats' own lags only (a few ms): the idle second counted as 0.75 s.
    assert watch.max_lag < 0.4
    assert watch.reports == []
    assert watchdog_threads() == []


@pytest.mark.slow
def test_a_stall_at_the_end_of_a_run_is_still_reported_by_a_stop_outside_the_loop() -> None:
    """The last callback of a run blocked: stop() after it still reports it, with its length."""
    loop = asyncio.new_event_loop()
    watch = watch_loop(threshold=0.05)

    async def start() -> None:
        watch.start()

    async def block_at_the_end() -> None:
        await asyncio.sleep(0.05)
        blocker(0.3)

    try:
        loop.run_until_complete(start())
        loop.run_until_complete(block_at_the_end())
        watch.stop()
    finally:
        loop.close()
    [report] = watch.reports
    assert report.function == "blocker"
    assert report.duration >= 0.2  # how late the heartbeat was when last sampled


async def test_a_watch_whose_thread_cannot_start_leaves_no_heartbeat(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """start() failing to start its thread (a pids limit) undoes itself and can be retried."""
    watch = watch_loop(threshold=0.05, interval=0.005)

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    with monkeypatch.context() as patch:
        patch.setattr(threading.Thread, "start", refuse)
        with pytest.raises(RuntimeError, match=r"^can't start new thread$"):
            watch.start()
    assert repr(watch).startswith("<LoopWatch new ")
    for _ in range(5):  # turns of the loop: a heartbeat left scheduled would run
        await asyncio.sleep(0)
    assert watch.stats().beats == 0
    async with watch:  # nothing was half started: the same watch starts now
        await asyncio.sleep(0.02)
    assert watch.stats().beats >= 1
    assert watchdog_threads() == []


# ---------------------------------------------------------------------------
# The watch's own reporting: slow or failing log handlers
# ---------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_slow_log_handler_does_not_make_each_report_cause_the_next(
    on_reports: list[_OnReports],
) -> None:
    """One stall, one report, though logging it blocks the loop longer than threshold.

    Reporting runs on the loop thread; the time a slow handler took used to be
    measured as a stall, reported, and its logging measured again: a report
    every 0.2 s for as long as the loop ran.
    """
    slow = attach(on_reports, _OnReports(sleep=0.2))
    async with watch_loop(threshold=0.05) as watch:
        blocker(0.2)
        await asyncio.sleep(1.0)  # room for five self-inflicted reports
    assert [r.function for r in watch.reports] == ["blocker"]
    assert slow.seen == 1


@pytest.mark.slow
async def test_a_failing_log_handler_does_not_break_stop(
    on_reports: list[_OnReports],
) -> None:
    """A handler that raises: stop() still returns, the report is kept, the loop is told."""
    attach(on_reports, _OnReports(fail=True))
    loop = asyncio.get_running_loop()
    told: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: told.append(context))
    try:
        async with watch_loop(threshold=0.05) as watch:
            await asyncio.sleep(0.02)
            blocker(0.2)  # still open when the block exits: stop() reports it
    finally:
        loop.set_exception_handler(previous)
    [report] = watch.reports
    assert report.function == "blocker"
    [context] = told
    assert context["message"] == f"logging a report of the loop watch failed: {report}"
    assert str(context["exception"]) == "the log shipper is down"
    assert watchdog_threads() == []


# ---------------------------------------------------------------------------
# Memory over a long run
# ---------------------------------------------------------------------------


def test_a_watch_keeps_the_latest_reports_and_counts_them_all(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A watch on a map that runs for days keeps MAX_REPORTS reports, not one per stall forever."""
    monkeypatch.setattr(_monitor, "MAX_REPORTS", 3)
    watch = LoopWatch(threshold=0.1)
    culprit = ("handler", "/app/main.py", 12)
    with caplog.at_level(logging.CRITICAL, logger="corral"):
        for second in range(1, 6):  # five stalls of 1..5 s, closed as the heartbeat would
            episode = _monitor._Episode()
            episode.add(culprit, ())
            watch._close(episode, float(second))
    assert [r.duration for r in watch.reports] == [3.0, 4.0, 5.0]
    assert watch.stats().blocked == 5
    assert repr(watch).endswith(" reports=3>")


# ---------------------------------------------------------------------------
# Blame in an application installed into site-packages
# ---------------------------------------------------------------------------

# Three installed packages: an application, the HTTP library it calls (which
# blocks, two modules deep) and a framework that runs the application's
# handlers in tasks of its own. Real files, imported from a directory that
# looks like a virtualenv's site-packages, so the frames are real frames.
_INSTALLED = {
    "shopapp/__init__.py": """
import asyncio

import vendorhttp


async def fetch(seconds):
    await asyncio.sleep(0)  # the rest runs from the loop, in this task
    vendorhttp.get(seconds)  # shopapp-get
    return seconds


async def handle(seconds):
    vendorhttp.get(seconds)  # shopapp-handle
    return seconds


def main(coroutine_function):
    return asyncio.run(coroutine_function())
""",
    "vendorhttp/__init__.py": """
from vendorhttp import _conn


def get(seconds):
    return _conn.read(seconds)
""",
    "vendorhttp/_conn.py": """
import time


def read(seconds):
    time.sleep(seconds)  # vendorhttp-read
""",
    "vendorweb.py": """
import asyncio

import vendorhttp


async def ping(seconds):
    await asyncio.sleep(0)
    vendorhttp.get(seconds)  # vendorweb-ping


async def _serve_one(handler, request):
    await asyncio.sleep(0)
    return await handler(request)


async def serve(handler, request):
    return await asyncio.create_task(_serve_one(handler, request))


def run(coroutine_function):
    return asyncio.run(coroutine_function())
""",
}


def marked_line(path: str, marker: str) -> int:
    with open(path) as source:
        [line] = [n for n, text in enumerate(source, 1) if text.rstrip().endswith(f"# {marker}")]
    return line


def _install(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, *, app_from_a_path: bool
) -> Iterator[dict[str, Any]]:
    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    for name, text in _INSTALLED.items():
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text(text)
    if app_from_a_path:
        # What `pip install ./shopapp` leaves (PEP 610); an index leaves no direct_url.json.
        info = site / "shopapp-1.0.dist-info"
        info.mkdir()
        origin = {"url": "file:///home/me/shopapp", "dir_info": {}}
        (info / "direct_url.json").write_text(json.dumps(origin))
        (info / "RECORD").write_text(
            "shopapp/__init__.py,sha256=AAAA,120\n"
            "shopapp-1.0.dist-info/direct_url.json,,\n"
            "shopapp-1.0.dist-info/RECORD,,\n"
            "../../../bin/shopapp,sha256=AAAA,200\n"
        )
        # A package from a VCS URL is someone else's code: still a library.
        info = site / "vendorweb-2.0.dist-info"
        info.mkdir()
        origin = {"url": "https://github.com/vendor/web.git", "vcs_info": {"vcs": "git"}}
        (info / "direct_url.json").write_text(json.dumps(origin))
        (info / "RECORD").write_text("vendorweb.py,sha256=AAAA,300\n")
    monkeypatch.syspath_prepend(str(site))
    names = ["shopapp", "vendorhttp", "vendorhttp._conn", "vendorweb"]
    modules = {name: importlib.import_module(name) for name in names}
    expected = _monitor._Kind.USER if app_from_a_path else _monitor._Kind.LIBRARY
    assert _monitor._classify(modules["shopapp"].__file__) is expected
    assert _monitor._classify(modules["vendorweb"].__file__) is _monitor._Kind.LIBRARY
    yield modules
    for name in names:
        sys.modules.pop(name, None)


@pytest.fixture
def installed(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """The packages above, importable from ``.../lib/python3.X/site-packages``, by name."""
    yield from _install(tmp_path, monkeypatch, app_from_a_path=False)


@pytest.fixture
def installed_app_from_a_path(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, Any]]:
    """The same, the application installed by ``pip install`` from a directory."""
    yield from _install(tmp_path, monkeypatch, app_from_a_path=True)


def blamed_on(report: _monitor.BlockReport, module: Any, function: str, marker: str) -> bool:
    return (report.function, report.filename, report.lineno) == (
        function,
        module.__file__,
        marked_line(module.__file__, marker),
    )


@pytest.mark.slow
async def test_an_installed_application_task_is_blamed_not_the_library_it_called(
    installed: dict[str, Any],
) -> None:
    """A task of an installed app blocks in a library two modules deep: the app's line is blamed.

    Everything in site-packages used to count as a library, so the innermost
    installed frame (the HTTP library's socket read) was blamed instead of
    the application's call.
    """
    shopapp, conn = installed["shopapp"], installed["vendorhttp._conn"]
    async with watch_loop(threshold=0.05) as watch:
        # A task of its own: the test's coroutine (a file of the user's) is not on the stack.
        await asyncio.create_task(shopapp.fetch(0.3))
    [report] = watch.reports
    assert blamed_on(report, shopapp, "fetch", "shopapp-get")
    assert f'File "{conn.__file__}", line {marked_line(conn.__file__, "vendorhttp-read")}' in (
        report.stack
    )


@pytest.mark.slow
async def test_a_map_over_an_installed_function_blames_that_function(
    installed: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """monitor= on a map whose fn is installed: fn's line, under corral's worker, is blamed."""
    import corral

    shopapp = installed["shopapp"]
    with caplog.at_level(logging.WARNING, logger="corral"):
        async with corral.map(shopapp.fetch, [0.0, 0.3, 0.0], monitor=0.05) as results:
            assert [r async for r in results] == [0.0, 0.3, 0.0]
    [report] = [r.__dict__["corral_block_report"] for r in caplog.records if r.name == "corral"]
    assert blamed_on(report, shopapp, "fetch", "shopapp-get")


@pytest.mark.slow
def test_the_installed_package_that_started_the_loop_is_blamed_in_a_framework_s_task(
    installed: dict[str, Any],
) -> None:
    """An installed app runs the loop; an installed framework's task calls its handler.

    The task belongs to the framework, but the application (which called
    asyncio.run, like a console script's main) is the code to point at.
    """
    shopapp, web = installed["shopapp"], installed["vendorweb"]
    watches: list[LoopWatch] = []

    async def serve_one_request() -> None:
        async with watch_loop(threshold=0.05) as watch:
            watches.append(watch)
            assert await web.serve(shopapp.handle, 0.3) == 0.3

    shopapp.main(serve_one_request)
    [report] = watches[0].reports
    assert blamed_on(report, shopapp, "handle", "shopapp-handle")


@pytest.mark.slow
async def test_an_installed_library_s_own_task_is_blamed_on_that_library(
    installed: dict[str, Any],
) -> None:
    """No application code on the stack: the task's own package, where it called the blocker."""
    web = installed["vendorweb"]
    async with watch_loop(threshold=0.05) as watch:
        await asyncio.create_task(web.ping(0.3))
    [report] = watch.reports
    assert blamed_on(report, web, "ping", "vendorweb-ping")


@pytest.mark.slow
def test_an_app_installed_from_a_path_is_blamed_when_a_framework_runs_everything(
    installed_app_from_a_path: dict[str, Any],
) -> None:
    """``uvicorn myapp:app``: the framework started the loop and owns the task.

    Neither rule by package can find the application there; pip's record
    of where it was installed from (a local path) can.
    """
    shopapp, web = installed_app_from_a_path["shopapp"], installed_app_from_a_path["vendorweb"]
    watches: list[LoopWatch] = []

    async def serve_one_request() -> None:
        async with watch_loop(threshold=0.05) as watch:
            watches.append(watch)
            assert await web.serve(shopapp.handle, 0.3) == 0.3

    web.run(serve_one_request)
    [report] = watches[0].reports
    assert blamed_on(report, shopapp, "handle", "shopapp-handle")


def test_only_a_file_url_marks_an_installed_distribution_as_the_application(
    tmp_path: Any,
) -> None:
    """Unreadable or odd records are skipped: no origin known, no claim made."""
    site = tmp_path / "site-packages"
    records = {
        "local-1.0.dist-info": ({"url": "file:///src/local"}, "local/__init__.py,,\nsolo.py,,\n"),
        "fromweb-1.0.dist-info": ({"url": "https://example.com/w.whl"}, "fromweb/a.py,,\n"),
        "broken-1.0.dist-info": ("{not json", "broken/a.py,,\n"),
        "odd-1.0.dist-info": ([1, 2], "odd/a.py,,\n"),
        "norecord-1.0.dist-info": ({"url": "file:///src/norecord"}, None),
    }
    for name, (origin, record) in records.items():
        (site / name).mkdir(parents=True)
        text = origin if isinstance(origin, str) else json.dumps(origin)
        (site / name / "direct_url.json").write_text(text)
        if record is not None:
            (site / name / "RECORD").write_text(record)
    assert _monitor._installed_from_a_path(str(site)) == {"local", "solo"}
    assert _monitor._installed_from_a_path(str(tmp_path / "missing")) == frozenset()


# ---------------------------------------------------------------------------
# The smallest threshold
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("small", [0.0009, 1e-6, 5e-324])
def test_a_threshold_below_a_millisecond_is_refused_naming_it(small: float) -> None:
    """Below 1 ms a watch reports the loop's own scheduling, dozens of times a second."""
    expected = (
        "threshold must be at least 0.001 s (1 ms): the event loop's own scheduling "
        "outlasts a shorter one, and nearly every turn of the loop would be reported; "
        f"got threshold={small!r}"
    )
    with pytest.raises(ValueError) as info:
        watch_loop(threshold=small)
    assert str(info.value) == expected
    with pytest.raises(ValueError, match=r"^threshold must be at least 0\.001 s"):
        LoopWatch(small)


def test_a_threshold_of_one_millisecond_is_taken() -> None:
    """The minimum itself is a threshold, as is a Fraction at it."""
    from fractions import Fraction

    assert _monitor.MIN_THRESHOLD == 0.001
    assert watch_loop(threshold=0.001).threshold == 0.001
    assert watch_loop(threshold=Fraction(1, 1000)).threshold == 0.001
