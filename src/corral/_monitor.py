"""Event-loop lag and blocking-call watchdog: ``corral.watch_loop``.

An event loop runs one callback at a time. While a callback runs, nothing else
does: no other request is sent, no timeout fires, no progress is drawn. A
coroutine that calls ``time.sleep(0.5)``, ``requests.get(...)`` or hashes a
large file without ``await`` stalls *every* task for that long, and nothing in
asyncio says so outside debug mode (whose slow-callback warning times every
callback and costs far more). This module watches the loop from the side and
names the culprit::

    async with corral.watch_loop(threshold=0.1) as watch:
        await main()
    for report in watch.reports:
        print(report.duration, report.function, report.filename, report.lineno)

It has two halves:

- a **heartbeat**, a tiny callback the loop runs every ``interval`` seconds. It
  notes how late it ran (the *lag*; a healthy loop is late by a millisecond or
  two) and keeps the largest and a histogram;
- a **watchdog** daemon thread that sleeps until the heartbeat would be overdue
  by ``threshold``. A healthy loop keeps pushing that moment back, so the
  thread wakes about once per ``threshold``. When the heartbeat *is* overdue,
  the loop is stuck in some callback, and the watchdog samples the loop
  thread's Python stack (``sys._current_frames()``) every ``threshold / 4``
  seconds until it turns again. Then the heartbeat closes
  the episode: one :class:`BlockReport` per stall, blaming the place the
  samples saw most often, appended to ``watch.reports`` (which keeps the
  latest :data:`MAX_REPORTS`) and logged as a warning on the ``corral``
  logger. The time spent logging a report is not measured: a slow log
  handler would otherwise be reported, and its report logged, and so on.

Blame goes to the innermost frame of *your* code: not the standard library,
not an installed package, not corral. ``time.sleep`` is C code, so a
``def blocker(): time.sleep(0.5)`` is blamed on ``blocker`` at the line of the
call; ``threading.Event().wait(1)`` or ``json.dumps(huge)`` are blamed on the
line of yours that called them, and the report's ``stack`` still shows the
library frames below it.

An application installed into site-packages is yours when pip installed it
from a local path (``pip install .``, or a wheel file: its
``direct_url.json``, PEP 610, holds a ``file:`` URL), so ``uvicorn myapp:app``
blames ``myapp``'s line even though uvicorn started the loop and runs the
task. One installed from an index has no such record; when the stalled code
is all installed that way, blame goes to the innermost frame of the package
that started the event loop (``myapp.cli:main`` calling ``asyncio.run``),
else of the package of the blocked task's coroutine (for a ``corral.map``,
of the function it calls). So ``myapp.fetch`` calling ``requests.get`` is
blamed on its line in ``myapp.fetch``, not on the ``urllib3`` frame deep
below it. What this cannot tell: which package is the application when it
came from an index and an installed framework both started the loop and
runs its tasks; the framework's frame is blamed there, and the report's
stack shows the rest.

What it is not: a profiler (it only looks while the loop is stuck), nor exact
about the start of a stall. ``duration`` is how late the heartbeat ran, a lower
bound that can fall short of the blocking call's true length by up to
``interval``; for the same reason a stall shorter than ``threshold +
interval`` may go unreported when it starts just after a heartbeat.

The heartbeat schedules itself with ``loop.call_later``, so on a loop whose
clock jumps over idle time (a virtual-time test loop) it makes the loop wake
every ``interval`` of *virtual* time; watch real loops.
"""

from __future__ import annotations

import asyncio
import asyncio.base_events
import collections
import dataclasses
import enum
import functools
import logging
import math
import os
import selectors
import sys
import threading
import traceback
from time import monotonic
from types import CodeType, FrameType, TracebackType

from ._numbers import positive_seconds

__all__ = ["BlockReport", "LagStats", "LoopWatch", "monitor_from_env", "watch_loop"]

_log = logging.getLogger("corral")

#: Python frames of a sampled stack, innermost first: (code, line being run).
_Stack = tuple[tuple[CodeType, int], ...]
#: The place a sample blames: (function, filename, lineno).
_Culprit = tuple[str, str, int]

# Heartbeat interval bounds when derived from threshold: below 5 ms the loop
# wakes too often for no gain; above 0.25 s max_lag reacts too slowly.
_MIN_INTERVAL = 0.005
_MAX_INTERVAL = 0.25
# The watchdog never polls faster than this, whatever the threshold.
_MIN_TICK = 0.001
# Nor sleeps longer than this: a lock's timeout overflows past
# threading.TIMEOUT_MAX (a threshold of 1e10 s is legal), and a watch whose
# loop was closed without stop() must notice soon, not after a long threshold.
_MAX_WAIT = 1.0

#: The most reports a watch keeps (the latest ones): a watch on a map that runs
#: for days must not keep every stall's stack forever. ``stats().blocked``
#: counts them all.
MAX_REPORTS = 1000

_THREAD_NAME = "corral-loop-watchdog"


# ---------------------------------------------------------------------------
# Public values: reports and lag statistics
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockReport:
    """One stall of the event loop and the code that caused it.

    Attributes:
        function: qualified name of the blamed function (``"blocker"``,
            ``"Client.fetch"``), the innermost frame of your code on the stack
            (see :mod:`corral._monitor` for an installed application).
        filename: the file of that function.
        lineno: the line it was running (for a blocking call, the call's line).
        duration: how long the loop was stuck, in seconds (a lower bound; see
            :func:`watch_loop`).
        stack: the loop thread's whole Python stack at the blamed sample,
            formatted like a traceback (most recent call last), library frames
            included.
    """

    function: str
    filename: str
    lineno: int
    duration: float
    stack: str = dataclasses.field(repr=False)

    def __str__(self) -> str:
        return (
            f"event loop blocked for {self.duration:.3f} s by {self.function}() "
            f"at {self.filename}:{self.lineno}"
        )


@dataclasses.dataclass(frozen=True)
class LagStats:
    """How late the heartbeat ran, over the whole watch (seconds).

    ``p50`` and ``p99`` come from a histogram with 20 buckets per decade, so they
    are upper bounds at most about 12% above the true percentile (and never
    above ``max``).
    """

    beats: int  #: heartbeats measured
    mean: float
    p50: float
    p99: float
    max: float
    blocked: int  #: stalls reported, all of them (``watch.reports`` keeps the latest)

    def as_dict(self) -> dict[str, float | int]:
        """The fields as a flat, JSON-serialisable dict."""
        return dataclasses.asdict(self)


class _LagHistogram:
    """Counts of lags in log-spaced buckets: constant memory, O(1) per beat."""

    _FLOOR = 1e-5  # lags below 10 µs share bucket 0
    _PER_DECADE = 20
    _BUCKETS = 1 + 9 * _PER_DECADE  # up to 10_000 s

    def __init__(self) -> None:
        self.counts = [0] * self._BUCKETS
        self.n = 0
        self.total = 0.0
        self.max = 0.0

    def add(self, lag: float) -> None:
        self.n += 1
        self.total += lag
        if lag > self.max:
            self.max = lag
        if lag < self._FLOOR:
            self.counts[0] += 1
        else:
            i = 1 + int(math.log10(lag / self._FLOOR) * self._PER_DECADE)
            self.counts[min(i, self._BUCKETS - 1)] += 1

    def percentile(self, q: float) -> float:
        if self.n == 0:
            return 0.0
        rank = max(1, math.ceil(q * self.n))
        seen = 0
        for i, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                upper = self._FLOOR * 10 ** (i / self._PER_DECADE)
                return min(upper, self.max)
        return self.max  # pragma: no cover - the counts always sum to n


# ---------------------------------------------------------------------------
# Blame: whose code is this frame?
#
# A sampled stack runs from the interpreter's entry (pytest, your main(),
# asyncio.run) through the loop's machinery (run_forever, _run_once,
# Handle._run; on uvloop those are C and leave no frame) into the callback
# that holds the loop: a task's coroutines, then whatever they called. Only
# that innermost region can be to blame, and within it, the innermost frame
# of user code: a C function (time.sleep) leaves no frame, so the frame that
# called it is the culprit, and a standard-library or third-party helper
# (threading's Event.wait, json, requests) is usually a symptom of the user
# line that called it. An installed application's code is in site-packages
# like its libraries: _blame then tells them apart by package.
# ---------------------------------------------------------------------------


class _Kind(enum.IntEnum):
    USER = 0  # the application's own code: what a report should point at
    LIBRARY = 1  # an installed package: third-party, or the application itself
    CORRAL = 2  # corral itself
    STDLIB = 3  # the standard library, frozen modules


def _path_prefixes(paths: list[str]) -> tuple[str, ...]:
    out: set[str] = set()
    for path in paths:
        for variant in (os.path.abspath(path), os.path.realpath(path)):
            out.add(os.path.join(os.path.normcase(variant), ""))
    return tuple(sorted(out))


@functools.cache
def _stdlib_and_corral_dirs() -> tuple[tuple[str, ...], tuple[str, ...]]:
    # Computed on first use, not at import: sysconfig costs milliseconds.
    import sysconfig

    paths = sysconfig.get_paths()
    stdlib = [paths["stdlib"], paths["platstdlib"], os.path.dirname(os.__file__)]
    return _path_prefixes(stdlib), _path_prefixes([os.path.dirname(__file__)])


# Installed packages live under site-packages (dist-packages on Debian), which
# can sit inside a stdlib directory (a venv's lib/pythonX.Y): test it first.
_SITE_MARKERS = tuple(os.path.join("", name, "") for name in ("site-packages", "dist-packages"))
_kinds: dict[str, _Kind] = {}
_packages: dict[str, str] = {}


def _site_of(path: str) -> tuple[str, str] | None:
    """The site-packages directory ``path`` (normalised) lies in, and its top-level name there."""
    # The last marker: the one whose directory the import system searched.
    start = max(
        (path.rfind(marker) + len(marker) for marker in _SITE_MARKERS if marker in path), default=-1
    )
    if start < 0:
        return None
    return path[:start], path[start:].split(os.sep, 1)[0].removesuffix(".py")


_local_installs: dict[str, frozenset[str]] = {}


def _installed_from_a_path(site: str) -> frozenset[str]:
    """The top-level names in ``site`` that pip installed from a local path (cached per site).

    ``pip install .`` (or a wheel file built beside it) records where the
    project came from in the distribution's ``direct_url.json`` (PEP 610), with
    a ``file:`` URL; a package from an index has no such file, and one from a
    VCS or web URL has another scheme. So a project installed from a path is
    the application, however it is started (``uvicorn myapp:app``).
    """
    names = _local_installs.get(site)
    if names is not None:
        return names
    import csv  # here: needed once per site, and only when a stall is sampled
    import json

    found: set[str] = set()
    try:
        entries = os.listdir(site)
    except OSError:
        entries = []
    for entry in entries:
        if not entry.endswith(".dist-info"):
            continue
        info = os.path.join(site, entry)
        try:
            with open(os.path.join(info, "direct_url.json"), encoding="utf-8") as origin:
                url = json.load(origin).get("url", "")
            if not (isinstance(url, str) and url.startswith("file:")):
                continue
            with open(os.path.join(info, "RECORD"), encoding="utf-8", newline="") as record:
                rows = list(csv.reader(record))
        except (OSError, ValueError, AttributeError):
            continue  # no origin recorded, or not readable: not known to be local
        for row in rows:
            if not row or row[0].startswith(("..", "/")):
                continue  # scripts and data outside site-packages
            top = row[0].replace("\\", "/").split("/", 1)[0]
            if not top.endswith((".dist-info", ".pth")) and top != "__pycache__":
                found.add(os.path.normcase(top.removesuffix(".py")))
    names = _local_installs[site] = frozenset(found)
    return names


def _classify(filename: str) -> _Kind:
    """Which kind of code ``filename`` holds (cached: called on every sample)."""
    kind = _kinds.get(filename)
    if kind is not None:
        return kind
    if filename.startswith("<"):
        # "<frozen importlib._bootstrap>" is the stdlib; "<string>", "<stdin>"
        # and the like are code the application compiled itself.
        kind = _Kind.STDLIB if filename.startswith("<frozen ") else _Kind.USER
    else:
        stdlib_dirs, corral_dirs = _stdlib_and_corral_dirs()
        path = os.path.normcase(os.path.abspath(filename))
        if path.startswith(corral_dirs):
            kind = _Kind.CORRAL
        elif (site := _site_of(path)) is not None:
            local = site[1] in _installed_from_a_path(site[0])
            kind = _Kind.USER if local else _Kind.LIBRARY
        elif path.startswith(stdlib_dirs):
            kind = _Kind.STDLIB
        else:
            kind = _Kind.USER
    _kinds[filename] = kind
    return kind


def _package(filename: str) -> str:
    """The top-level package (or module) an installed file belongs to.

    ``requests`` for ``.../site-packages/requests/api.py``, ``six`` for
    ``.../site-packages/six.py``. Only for files :func:`_classify` finds to
    be :attr:`_Kind.LIBRARY` (cached: called on every sample).
    """
    package = _packages.get(filename)
    if package is None:
        site = _site_of(os.path.normcase(os.path.abspath(filename)))
        assert site is not None  # a LIBRARY file is in site-packages
        package = _packages[filename] = site[1]
    return package


def _loop_owner(below: _Stack, loop_package: str) -> frozenset[str]:
    """The installed package that runs the event loop, given the frames below its callbacks.

    An application installed with ``pip install .`` and started by its
    console script (``myapp`` calling ``myapp.cli:main``, which calls
    ``asyncio.run``) has its own code in site-packages; the innermost frame
    below the loop that is neither the standard library, corral, nor the
    loop's own package (``uvloop.run``) is the code that started the loop.
    Empty when that is the user's own file (a script, a test), which blame
    prefers anyway, or when there is none.
    """
    for code, _ in below:
        kind = _classify(code.co_filename)
        if kind is _Kind.USER:
            break
        if kind is _Kind.LIBRARY and (package := _package(code.co_filename)) != loop_package:
            return frozenset({package})
    return frozenset()


_SELECTORS_FILE = selectors.__file__
_BASE_EVENTS_FILE = asyncio.base_events.__file__


def _is_idle(region: _Stack) -> bool:
    """Is the loop waiting for I/O rather than running a callback?

    asyncio waits in ``selectors``' ``select`` called straight from
    ``_run_once``; uvloop waits in C, leaving the callback region empty.
    """
    if not region:
        return True
    code = region[0][0]
    if code.co_filename != _SELECTORS_FILE:
        return False
    if len(region) == 1:  # the loop's own frames were cut off as machinery
        return True
    caller = region[1][0]
    return caller.co_name == "_run_once" and caller.co_filename == _BASE_EVENTS_FILE


def _blame(
    stack: _Stack, machinery: frozenset[CodeType], owners: frozenset[str] = frozenset()
) -> _Culprit | None:
    """The place to blame in a sampled stack, or ``None`` if the loop was idle.

    In order: the innermost frame of the user's own files; else, all the code
    being installed, the innermost frame of a package in ``owners`` (the
    package that started the loop, :func:`_loop_owner`), else of the blocked
    task's own package; else (the standard library and corral only) the
    innermost frame.
    """
    region = stack
    for i, (code, _) in enumerate(stack):
        if code in machinery:
            region = stack[:i]
            break
    if _is_idle(region):
        return None
    owned: tuple[CodeType, int] | None = None
    task_file: str | None = None
    for code, lineno in region:
        kind = _classify(code.co_filename)
        if kind is _Kind.USER:
            return code.co_qualname, code.co_filename, lineno
        if kind is _Kind.LIBRARY:
            if owned is None and _package(code.co_filename) in owners:
                owned = (code, lineno)
            task_file = code.co_filename  # the outermost so far: the task's own code
    if owned is None and task_file is not None:
        # The outermost installed frame is the blocked task's coroutine (under
        # corral's worker, the function a map calls): an installed
        # application's code, or the library whose task it is. Its package's
        # innermost frame is where it called what blocked; the packages
        # further in are a symptom, left in the report's stack.
        task_package = _package(task_file)
        owned = next(  # found at the latest at the task's own frame
            (code, lineno)
            for code, lineno in region
            if _classify(code.co_filename) is _Kind.LIBRARY
            and _package(code.co_filename) == task_package
        )
    code, lineno = owned if owned is not None else region[0]
    return code.co_qualname, code.co_filename, lineno


def _walk(frame: FrameType | None) -> _Stack:
    stack: list[tuple[CodeType, int]] = []
    while frame is not None:
        code = frame.f_code
        stack.append((code, frame.f_lineno or code.co_firstlineno))
        frame = frame.f_back
    return tuple(stack)


def _format_stack(stack: _Stack) -> str:
    summary = traceback.StackSummary.from_list(
        [
            traceback.FrameSummary(code.co_filename, lineno, code.co_name)
            for code, lineno in stack[::-1]
        ]
    )
    return "".join(summary.format())


class _Episode:
    """Samples of one stall, gathered by the watchdog thread.

    Samples that found nothing to blame (the loop waiting for I/O, say after
    the whole process was paused) are not kept: a stall made only of those is
    lag without a culprit, and gets no report.
    """

    __slots__ = ("counts", "first", "overdue", "stacks")

    def __init__(self) -> None:
        self.first = monotonic()  # when the first sample was taken
        self.counts: collections.Counter[_Culprit] = collections.Counter()
        self.stacks: dict[_Culprit, _Stack] = {}  # the first stack seen for each culprit
        # How late the heartbeat was at the last sample: a lower bound of the
        # stall's length that holds even when the next beat cannot measure it
        # (the loop stopped running, or the watch was stopped, in between).
        self.overdue = 0.0

    def add(self, culprit: _Culprit, stack: _Stack) -> None:
        self.counts[culprit] += 1
        self.stacks.setdefault(culprit, stack)


# ---------------------------------------------------------------------------
# The watch: heartbeat on the loop, watchdog on a thread
# ---------------------------------------------------------------------------


#: Every running watch. Watches on one loop (nested ``watch_loop`` blocks,
#: several maps with ``monitor=True``) see the same stalls; each reports them,
#: one logs them, and none measures the time another spends logging (see
#: LoopWatch._log).
_running: set[LoopWatch] = set()
_running_lock = threading.Lock()


class _State(enum.Enum):
    NEW = "new"  # created, not started
    RUNNING = "running"  # heartbeat scheduled, watchdog thread alive
    STOPPED = "stopped"  # both gone; reports and stats stay readable


def _check_seconds(name: str, value: object, *, extra: str = "") -> float:
    seconds = positive_seconds(value)
    if seconds is None:
        raise ValueError(
            f"{name} must be a finite number of seconds > 0{extra}; got {name}={value!r}"
        )
    return seconds


#: Seconds the loop may be stuck before a call is reported (``monitor=True``).
DEFAULT_THRESHOLD = 0.1
#: The smallest threshold a watch takes, in seconds (1 ms). Below it a watch
#: measures the loop's own work, not a blocking call: one turn of the loop
#: runs every ready callback before the heartbeat's, selects, and fires timers
#: with 1 ms resolution on uvloop, so the heartbeat is routinely a fraction
#: of a millisecond late on a healthy loop: such a watch would blame whichever
#: callback happened to run, up to hundreds of times a second. Nor can the
#: watchdog resolve it: it polls the overdue heartbeat every ``_MIN_TICK``
#: (1 ms) at best.
MIN_THRESHOLD = _MIN_TICK


class LoopWatch:
    """Watches the running event loop for calls that block it.

    Create it with :func:`watch_loop` and use it as an async context manager,
    or call :meth:`start` and :meth:`stop` from coroutines on the loop (corral's
    ``map`` does so for ``monitor=True``). One watch runs once.

    Attributes:
        reports: one :class:`BlockReport` per stall longer than ``threshold``,
            in order: the latest :data:`MAX_REPORTS` of them. A report is added
            when the loop turns again after the stall, or when the watch stops.
    """

    def __init__(
        self, threshold: float = DEFAULT_THRESHOLD, *, interval: float | None = None
    ) -> None:
        self._threshold = _check_seconds("threshold", threshold, extra=", like 0.1")
        if self._threshold < MIN_THRESHOLD:
            raise ValueError(
                f"threshold must be at least {MIN_THRESHOLD} s (1 ms): the event loop's own "
                "scheduling outlasts a shorter one, and nearly every turn of the loop would be "
                f"reported; got threshold={threshold!r}"
            )
        if interval is None:
            self._interval = min(_MAX_INTERVAL, max(_MIN_INTERVAL, self._threshold / 4))
        else:
            self._interval = _check_seconds(
                "interval", interval, extra=", or None to derive it from threshold"
            )
        self._tick = min(_MAX_WAIT, max(_MIN_TICK, self._threshold / 4))
        self.reports: list[BlockReport] = []
        self._blocked = 0  # stalls reported, including those no longer in reports
        self._state = _State.NEW
        self._lags = _LagHistogram()
        # Shared with the watchdog thread, guarded by _lock: when the next beat
        # is due (time.monotonic) and the stall being sampled, if any.
        self._lock = threading.Lock()
        self._due = math.inf
        self._episode: _Episode | None = None
        # Code objects of the frames that run loop callbacks (the loop's own
        # machinery and whatever called run_until_complete), learned by the
        # first beat; None until then.
        self._machinery: frozenset[CodeType] | None = None
        # The frames below the first beat (innermost first), from which the
        # watchdog works out the package that started the loop (_loop_owner):
        # classifying files costs milliseconds the first time, which the loop
        # thread must not spend inside a beat.
        self._below: _Stack | None = None
        self._owners: frozenset[str] | None = None  # the watchdog's, once _below is known
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        # When another watch on this loop last logged a stall (monotonic): a
        # stall of ours sampled from before then is that one, logged already.
        self._logged_elsewhere = -math.inf
        self._handle: asyncio.Handle | None = None
        self._thread: threading.Thread | None = None
        # The watchdog sleeps by acquiring this lock (held from start to stop)
        # with a timeout: a C call from sleep to wake-up, where Event.wait
        # runs a dozen lines of Python holding the GIL on every wake-up.
        # stop() releases it, which wakes the watchdog at once.
        self._asleep = threading.Lock()
        self._asleep.acquire()
        #: How often the watchdog woke up (for the overhead benchmark).
        self.wakeups = 0

    def __repr__(self) -> str:
        return (
            f"<LoopWatch {self._state.value} threshold={self._threshold} "
            f"max_lag={self.max_lag:.6f} reports={len(self.reports)}>"
        )

    @property
    def threshold(self) -> float:
        """Stalls longer than this many seconds are reported."""
        return self._threshold

    @property
    def interval(self) -> float:
        """Seconds between heartbeats."""
        return self._interval

    @property
    def max_lag(self) -> float:
        """The most the heartbeat has run late, in seconds (0.0 before any beat)."""
        return self._lags.max

    def stats(self) -> LagStats:
        """A snapshot of the loop's lag so far."""
        lags = self._lags
        return LagStats(
            beats=lags.n,
            mean=lags.total / lags.n if lags.n else 0.0,
            p50=lags.percentile(0.5),
            p99=lags.percentile(0.99),
            max=lags.max,
            blocked=self._blocked,
        )

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Start watching the running loop; call from a coroutine on that loop.

        Raises:
            RuntimeError: no loop is running in this thread, or the watch has
                already been started.
        """
        if self._state is not _State.NEW:
            raise RuntimeError(
                f"this LoopWatch is {self._state.value}; a watch runs once, "
                "create a new one with corral.watch_loop()"
            )
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "LoopWatch.start() needs a running event loop: call it (or enter "
                "`async with corral.watch_loop()`) from a coroutine"
            ) from None
        self._loop = loop
        self._loop_thread = threading.get_ident()
        with self._lock:
            self._due = monotonic()
        # The first beat comes at the next turn of the loop: it learns the
        # loop's machinery frames, and its lag measures this turn.
        self._handle = loop.call_soon(self._beat)
        self._thread = threading.Thread(target=self._watch, name=_THREAD_NAME, daemon=True)
        try:
            self._thread.start()  # "can't start new thread" when a pids limit is hit
        except BaseException:
            # Leave nothing behind: a heartbeat with no watchdog would run
            # forever, as stop() only stops a running watch.
            self._handle.cancel()
            self._handle = self._thread = self._loop = None
            raise
        self._state = _State.RUNNING
        with _running_lock:
            _running.add(self)

    def stop(self) -> None:
        """Stop watching; report a stall still in progress. Idempotent.

        Call on the loop's thread. Stops the watchdog thread (promptly: it waits
        on an event) and cancels the pending heartbeat.
        """
        if self._state is not _State.RUNNING:
            return
        if threading.get_ident() != self._loop_thread:
            raise RuntimeError("LoopWatch.stop() must be called on the thread of the watched loop")
        self._state = _State.STOPPED
        with _running_lock:
            _running.discard(self)
        self._asleep.release()
        assert self._thread is not None
        assert self._handle is not None
        self._thread.join()
        self._handle.cancel()
        self._handle = None
        # From a coroutine, the code that ran since the last beat has returned,
        # so this is the end of any stall: measure it like a beat would. From
        # plain code between runs of the loop (or after it closed), the time
        # since the last beat is not lag: the loop had nothing to run.
        running = self._loop is not None and self._loop.is_running()
        now = monotonic()
        with self._lock:
            lag = now - self._due if running else 0.0
            self._due = math.inf
            episode, self._episode = self._episode, None
        if lag > 0:
            self._lags.add(lag)
        self._close(episode, max(lag, 0.0))

    async def __aenter__(self) -> LoopWatch:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- loop thread ---------------------------------------------------------

    def _beat(self) -> None:
        now = monotonic()
        if self._machinery is None:
            # Every frame below this callback is machinery that runs callbacks
            # (none at all if C code runs the loop).
            self._below = _walk(sys._getframe(0).f_back)
            self._machinery = frozenset(code for code, _ in self._below)
        with self._lock:
            lag = now - self._due
            self._due = now + self._interval
            episode, self._episode = self._episode, None
        if lag < 0:  # timers fire a hair early on coarser clocks (uvloop: 1 ms)
            lag = 0.0
        self._lags.add(lag)
        assert self._loop is not None
        self._handle = self._loop.call_later(self._interval, self._beat)
        if episode is not None or lag > self._threshold:
            self._close(episode, lag)
            # Reporting runs on the loop thread, and a log handler may be slow
            # (a network or a slow disk behind it). That time is the watch's
            # own doing: measured, it would be reported, whose logging would be
            # reported in turn, one stall after another for as long as the
            # loop runs. The next beat is measured from here.
            with self._lock:
                self._due = monotonic() + self._interval
                self._episode = None

    def _close(self, episode: _Episode | None, lag: float) -> None:
        """End of a stall: turn its samples into a report (on the loop thread)."""
        if episode is not None:
            lag = max(lag, episode.overdue)
        if episode is None or not episode.counts:
            if lag > self._threshold:
                _log.debug(
                    "event loop was late by %.3f s with no Python code of its own "
                    "running (the process was paused or starved of CPU, a C "
                    "callback ran, or the watchdog thread could not sample in time)",
                    lag,
                )
            return
        culprit, _ = episode.counts.most_common(1)[0]
        function, filename, lineno = culprit
        report = BlockReport(
            function=function,
            filename=filename,
            lineno=lineno,
            duration=lag,
            stack=_format_stack(episode.stacks[culprit]),
        )
        self._blocked += 1
        if len(self.reports) >= MAX_REPORTS:
            del self.reports[0]  # O(MAX_REPORTS), at most once per threshold
        self.reports.append(report)
        if episode.first > self._logged_elsewhere:
            self._log(report)

    def _log(self, report: BlockReport) -> None:
        """Log ``report`` once for every watch on this loop (on the loop thread).

        The other watches on the loop saw the same stall: they keep their own
        report of it but do not log it again. Nor do they measure the time
        spent logging (a slow handler) as a stall, each in turn reporting the
        other's logging for as long as the loop runs: their heartbeat is
        not due, and their watchdog does not sample, until it is done.
        """
        with _running_lock:
            others = [w for w in _running if w is not self and w._loop is self._loop]
        paused = [(other, other._pause()) for other in others]
        began = monotonic()
        try:
            _log.warning(
                "%s\nStack of the event loop thread (most recent call last):\n%s",
                report,
                report.stack.rstrip("\n"),
                extra={"corral_block_report": report},
            )
        except Exception as exc:
            # A log handler or filter that raises: the watch, and whatever
            # stops it (the end of a map), must go on. Said where asyncio says
            # a callback failed, like an error in the heartbeat itself.
            assert self._loop is not None
            self._loop.call_exception_handler(
                {
                    "message": f"logging a report of the loop watch failed: {report}",
                    "exception": exc,
                }
            )
        finally:
            took = monotonic() - began
            for other, due in paused:
                other._resume(due + took, logged=began)

    def _pause(self) -> float:
        """Hold back the heartbeat and the sampling while another watch logs; return when due."""
        with self._lock:  # waits for a sample under way: none is taken of the logging
            due, self._due = self._due, math.inf
        return due

    def _resume(self, due: float, *, logged: float) -> None:
        with self._lock:
            if self._due == math.inf and self._state is _State.RUNNING:
                self._due = due
        self._logged_elsewhere = logged

    # -- watchdog thread -----------------------------------------------------

    def _watch(self) -> None:
        try:
            self._watch_until_stopped()
        except Exception:  # logged where users look for corral's warnings
            _log.exception("the event loop watchdog failed; the loop is no longer watched")
        finally:
            with _running_lock:  # a loop closed without stop(): nothing left to watch
                _running.discard(self)

    def _watch_until_stopped(self) -> None:
        loop = self._loop
        assert loop is not None
        threshold, tick = self._threshold, self._tick
        # Sleep until the heartbeat would be overdue by threshold, not a fixed
        # tick: a healthy loop keeps pushing that moment back, so we wake about
        # once per threshold (every wake-up takes the GIL from the loop), yet
        # a stall is caught the moment it crosses threshold. While it lasts,
        # sample every tick. A lock's timed acquire, not sleep: stop() wakes us
        # at once (see _asleep).
        wait = tick
        asleep = self._asleep.acquire
        while not asleep(timeout=wait):
            self.wakeups += 1
            if loop.is_closed():  # closed without stop(): nothing left to watch
                return
            overdue = monotonic() - self._due  # unlocked read: a hint
            if overdue <= threshold:
                wait = max(
                    _MIN_TICK, min(threshold - overdue, threshold + self._interval, _MAX_WAIT)
                )
                continue
            wait = tick
            if not loop.is_running():
                # Between run_until_complete calls: nothing to blame, and the
                # time the loop is not running is no lag either, so the next
                # beat is not measured from before the gap.
                with self._lock:
                    self._due = monotonic() + self._interval
                continue
            self._sample()

    def _sample(self) -> None:
        # Under the lock, so a beat cannot close the episode between our check
        # that the loop is stuck and the sample: every sample in an episode was
        # taken while the heartbeat was overdue by more than threshold.
        with self._lock:
            overdue = monotonic() - self._due
            if overdue <= self._threshold:  # pragma: no cover - a race
                return  # the loop turned between the unlocked check and now
            frame = sys._current_frames().get(self._loop_thread)
            if frame is None:  # pragma: no cover - a race: the loop's thread just ended
                return
            # Keep (code, line) pairs only: holding frames would keep the loop
            # thread's locals alive.
            stack = _walk(frame)
            del frame
            if self._episode is None:
                self._episode = _Episode()
            self._episode.overdue = overdue
            if self._owners is None and self._below is not None:
                loop_package = type(self._loop).__module__.partition(".")[0]
                self._owners = _loop_owner(self._below, loop_package)
            culprit = _blame(stack, self._machinery or frozenset(), self._owners or frozenset())
            if culprit is not None:
                self._episode.add(culprit, stack)


def watch_loop(threshold: float = DEFAULT_THRESHOLD, *, interval: float | None = None) -> LoopWatch:
    """Report every call that blocks the running event loop for over ``threshold`` s.

    ::

        async with corral.watch_loop(threshold=0.1) as watch:
            await main()
        print(watch.max_lag, watch.stats())
        for report in watch.reports:
            print(report)   # event loop blocked for 0.503 s by blocker() at app.py:12

    Each stall gives one :class:`BlockReport` (``function``, ``filename``,
    ``lineno``, ``duration``, ``stack``), also logged as a warning on the
    ``corral`` logger, blaming the innermost frame of your code (not the
    standard library, installed packages or corral; for an application
    installed in site-packages, its own package: see the module's docs) where
    the loop thread spent the stall; ``watch.reports`` keeps the latest
    :data:`MAX_REPORTS` (1000), ``stats().blocked`` counts them all. ``CORRAL_MONITOR=1`` in the
    environment turns this on for every ``corral.map`` (see
    :func:`monitor_from_env`). Several watches on one loop (nested blocks,
    maps with ``monitor=True`` at once) each keep their report of a stall,
    which is logged once.

    Cost: one tiny callback on the loop every ``interval`` seconds and a thread
    that wakes about once per ``threshold``; it samples stacks only while the
    loop is stuck.

    Args:
        threshold: seconds the loop may be stuck before it is reported: a
            finite number, at least :data:`MIN_THRESHOLD` (0.001, 1 ms); a
            huge one reports nothing, but still measures the lag. Stalls of
            pure-Python code much under the interpreter's thread switch
            interval (5 ms) are hard to sample: prefer 0.01 or more.
        interval: seconds between heartbeats; default ``threshold / 4`` within
            [0.005, 0.25]. ``duration`` may fall short of a stall's true length
            by up to ``interval``, and a stall up to ``threshold + interval``
            long may be missed.

    Raises:
        ValueError: ``threshold`` is not a finite number of seconds >= 0.001,
            or ``interval`` not a finite number > 0.
    """
    return LoopWatch(threshold, interval=interval)


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def monitor_from_env() -> bool:
    """Whether ``CORRAL_MONITOR`` asks to watch the loop of every map.

    ``1``, ``true``, ``yes``, ``on`` mean yes; unset, empty, ``0``, ``false``,
    ``no``, ``off`` mean no (any case, surrounding spaces ignored).

    Raises:
        ValueError: any other value, so that a typo does not silently turn
            monitoring off.
    """
    raw = os.environ.get("CORRAL_MONITOR", "")
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(
        f"CORRAL_MONITOR must be 1 or 0 (or true/false, yes/no, on/off); got CORRAL_MONITOR={raw!r}"
    )
