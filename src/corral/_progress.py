"""Progress of a map: a live display on stderr, or stats snapshots to a function.

A map over a million URLs runs for an hour; the user wants to know how far it
got, how fast it goes, whether calls are failing, and when it will end. tqdm
cannot tell: it wraps the *input*, which is pulled long before a call ends, and
a generator has no length. corral knows all of that from the engine's counters,
so ``progress=`` shows it::

    pages = await corral.gather(fetch, urls, limit=100, progress=True)

    corral ━━━━━━━━━━━━━━━━━━━━━━━━ 1,234/10,000 12.3% 456.7/s · 100 in flight · ...

- ``progress=True`` draws a live bar on stderr with `rich`_ (the
  ``corral[progress]`` extra): done / total when the input has a length (the
  count alone when it does not), the rate, the calls in flight, the limit in
  force (it moves with a shared or adaptive limiter), failures and retries,
  and the ETA when the total is known. Whether stderr is a terminal is
  rich's call (a tty, or ``FORCE_COLOR``/``TTY_COMPATIBLE`` set); rich is
  needed either way, so a script behaves the same in a terminal and in CI.
  When it is not one (a log file, CI), a plain line is written every
  :data:`LINE_INTERVAL` seconds instead of redrawing, and a final line (the
  first is folded here)::

      corral: 1,234/10,000 done (12.3%), 456.7/s, 100 in flight, limit 100, 0 failed,
      2 retried, ETA 20s
      corral: 10,000/10,000 done (100.0%) in 21.9s, 456.6/s, 0 failed, 2 retried

  A map that ended early (a deadline, ``results.cancel()``, a budget, a
  failure) says so on its final line: the calls it cut short are
  "cancelled", and with a known total the items it never reached are "not
  started" (``…, 100 cancelled, 8,700 not started``).

- ``progress=callable`` receives :class:`corral.Stats` snapshots instead, a
  few per second (every :data:`CALLBACK_INTERVAL` seconds) and a final one
  when the map ends, whichever way it ends. It runs on the event loop, so it
  must be quick and must not block; an ``async def`` function is refused.

How it stays cheap
------------------
Nothing happens per item. The display is a timer (``loop.call_later``) that
pulls a snapshot from the engine's counters, the ones ``results.stats`` reads,
and draws it; no thread and no task. Rich is imported only for
``progress=True``, and its own refresh thread is off: the timer redraws.
Several maps drawing on the same terminal at once share one live display, one
row each, so their redraws do not overwrite each other; a map that ends while
others run prints its final row above the display, which keeps the running
rows only. While the display is drawn, what goes through ``sys.stdout`` or
``sys.stderr`` (``print()``) shows above it when it was going to the
display's own terminal, pipe or file; a stdout sent elsewhere
(``python app.py > out.txt``) keeps its output.

The rate shown while running is over the last :data:`RATE_WINDOW` seconds (it
follows a limit that changes); the final line gives the average over the run.

When the progress function raises
---------------------------------
A progress function is an observer: a bug in it must not throw away the
results of the calls that succeeded, nor go unnoticed. So corral logs the
exception once, with its traceback, as an error on the ``corral`` logger,
stops calling the function for the rest of that map, and the map carries on.
The same holds when drawing fails (say, stderr was closed). ``KeyboardInterrupt``
and ``SystemExit`` are not caught.

.. _rich: https://rich.readthedocs.io/
"""

from __future__ import annotations

import abc
import asyncio
import enum
import importlib.util
import logging
import math
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Sized
from typing import TYPE_CHECKING, Any, TextIO

from ._numbers import is_async_callable, positive_seconds
from ._stats import Stats

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.text import Text

logger = logging.getLogger("corral")

#: What ``progress=`` accepts.
ProgressLike = bool | Callable[[Stats], object]

#: Seconds between snapshots handed to a ``progress=`` function.
CALLBACK_INTERVAL = 0.25
#: Seconds between redraws of the live display on a terminal.
LIVE_INTERVAL = 0.2
#: Seconds between plain lines when the stream is not a terminal.
LINE_INTERVAL = 5.0
#: The rate (and so the ETA) shown while running is over about this many seconds.
RATE_WINDOW = 10.0

_INSTALL_HINT = "pip install 'corral[progress]'"


# ---------------------------------------------------------------------------
# Argument checks (at map() time, before anything starts)
# ---------------------------------------------------------------------------


def check_progress(progress: object) -> None:
    """Fail at once, naming ``progress=``, for a value corral cannot use.

    Raises:
        TypeError: ``progress`` is neither a bool nor a plain function of one
            :class:`corral.Stats`.
        ImportError: ``progress=True`` and rich is not installed.
    """
    if progress is True:
        if importlib.util.find_spec("rich") is None:
            raise ImportError(
                "progress=True draws a live progress bar with rich, which is not installed: "
                f"{_INSTALL_HINT}. Or pass progress=callable to receive corral.Stats snapshots "
                "without rich."
            )
        return
    if progress is False:
        return
    if not callable(progress):
        raise TypeError(
            "progress must be True (a live display on stderr), False, or a function that "
            f"receives corral.Stats snapshots; got progress={progress!r}"
        )
    if is_async_callable(progress):
        raise TypeError(
            f"progress= must be a plain function, called on the event loop with each "
            f"corral.Stats snapshot; got the async function progress={progress!r}. Use a "
            "`def` that records or prints the snapshot (and must not block)."
        )


def total_of(items: object) -> int | None:
    """``len(items)`` when ``items`` has a length, else ``None``; never consumes it.

    Call it on the input as the user passed it, before it is turned into an
    iterator. A length that cannot be computed (``__len__`` raising, say a
    lazy collection's ``TypeError`` or ``ValueError``, or a length too large
    for ``len``) counts as no length: the display is an observer, and must not
    fail a map that would run without it.
    """
    if not isinstance(items, Sized):
        return None
    try:
        total = len(items)
    except Exception:
        return None
    return total


# ---------------------------------------------------------------------------
# Formatting: one set of words for the plain lines and the live display
# ---------------------------------------------------------------------------


def _count(n: int) -> str:
    return f"{n:,}"


def _percent(done: int, total: int) -> str:
    return f"{100.0 * done / total if total else 100.0:.1f}%"


def _rate(per_second: float) -> str:
    return f"{per_second:,.1f}/s" if per_second >= 1 else f"{per_second:.2f}/s"


def _clock(seconds: float) -> str:
    """19s, 4m05s, 2h07m: short, and exact enough for an ETA (rounded up: 0.3 s is 1s)."""
    whole = max(0, math.ceil(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    hours, minutes = divmod(math.ceil(whole / 60), 60)
    return f"{hours}h{minutes:02d}m"


def _elapsed(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 60 else _clock(seconds)


def _limit(limit: int | None) -> str:
    return "no limit" if limit is None else f"limit {limit:,}"


def _eta(stats: Stats, total: int, rate: float) -> str:
    remaining = total - stats.completed - stats.failed
    if remaining <= 0:
        return "ETA 0s"
    if rate <= 0:
        return "ETA ?"
    return f"ETA {_clock(remaining / rate)}"


class _RateWindow:
    """Items ended per second over the last :data:`RATE_WINDOW` seconds of snapshots."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int]] = deque([(0.0, 0)])

    def add(self, stats: Stats) -> float:
        samples = self._samples
        now, done = stats.elapsed, stats.completed + stats.failed
        samples.append((now, done))
        # Keep one sample at or before the window's start, so the window is full.
        while len(samples) > 2 and samples[1][0] <= now - RATE_WINDOW:
            samples.popleft()
        then, done_then = samples[0]
        if now <= then:
            return stats.throughput
        return (done - done_then) / (now - then)


def running_line(stats: Stats, total: int | None, rate: float) -> str:
    """The plain line written while the map runs (see the module docstring)."""
    if total is None:
        counts = f"{_count(stats.completed + stats.failed)} done"
    else:
        done = stats.completed + stats.failed
        counts = f"{_count(done)}/{_count(total)} done ({_percent(done, total)})"
    parts = [
        f"corral: {counts}",
        _rate(rate),
        f"{_count(stats.in_flight)} in flight",
        _limit(stats.limit),
        f"{_count(stats.failed)} failed",
        f"{_count(stats.retried)} retried",
    ]
    if total is not None:
        parts.append(_eta(stats, total, rate))
    return ", ".join(parts)


def _cancelled(stats: Stats) -> int:
    """Calls started that neither completed nor failed: cut short when the map ended."""
    return max(0, stats.started - stats.completed - stats.failed)


def _not_started(stats: Stats, total: int | None) -> int:
    """Items of the input never handed to a call: the map ended first (0 without a total).

    A deadline, ``cancel()``, a budget, a failure or a ``break`` ends a map
    before its input runs out; "done" and "cancelled" alone would leave the
    reader to work out that the rest never ran. The engine's ``started``
    includes the items a checkpoint had already recorded and leaves out the
    items taken from the input that never ran (held back for the consumer),
    so a complete run, resumed or not, gives 0. ``max``: an input whose
    ``__len__`` understated it must not give a negative count.
    """
    if total is None:
        return 0
    return max(0, total - stats.started)


def final_line(stats: Stats, total: int | None) -> str:
    """The plain line written once the map has ended, however it ended.

    Calls still in flight when the map ended were cancelled (after a failure,
    ``break`` or cancellation); they are counted as such. With a known total,
    the items that never started (the map ended first) are counted too.
    """
    done = stats.completed + stats.failed
    if total is None:
        counts = f"{_count(done)} done"
    else:
        counts = f"{_count(done)}/{_count(total)} done ({_percent(done, total)})"
    parts = [
        f"corral: {counts} in {_elapsed(stats.elapsed)}",
        _rate(stats.throughput),
        f"{_count(stats.failed)} failed",
        f"{_count(stats.retried)} retried",
    ]
    if cancelled := _cancelled(stats):
        parts.append(f"{_count(cancelled)} cancelled")
    if not_started := _not_started(stats, total):
        parts.append(f"{_count(not_started)} not started")
    return ", ".join(parts)


# ---------------------------------------------------------------------------
# Sinks: where the snapshots go
# ---------------------------------------------------------------------------


class _Sink(abc.ABC):
    """Receives each snapshot, then the final one."""

    def begin(self, stats: Stats) -> None:  # noqa: B027 - an optional hook: no-op by default
        """The map started; ``stats`` is its first snapshot."""

    @abc.abstractmethod
    def update(self, stats: Stats) -> None:
        """A snapshot while the map runs."""

    @abc.abstractmethod
    def finish(self, stats: Stats) -> None:
        """The final snapshot, however the map ended."""

    def abandon(self) -> None:  # noqa: B027 - an optional hook: no-op by default
        """Drawing failed: release what the sink holds (best effort, must not raise)."""


class _CallbackSink(_Sink):
    def __init__(self, fn: Callable[[Stats], object]) -> None:
        self._fn = fn

    def update(self, stats: Stats) -> None:
        result = self._fn(stats)
        if asyncio.iscoroutine(result):
            # An async function the check could not see through (a lambda
            # around one, say): never awaited, so close it and say so.
            result.close()
            raise TypeError(
                f"progress={self._fn!r} returned a coroutine; it must be a plain function"
            )

    def finish(self, stats: Stats) -> None:
        self.update(stats)


class _LineSink(_Sink):
    """Plain lines for logs and CI: one per interval and a final one, no escape codes."""

    def __init__(self, stream: TextIO, total: int | None) -> None:
        self._stream = stream
        self._total = total
        self._rate = _RateWindow()

    def _write(self, line: str) -> None:
        self._stream.write(line + "\n")
        self._stream.flush()

    def update(self, stats: Stats) -> None:
        self._write(running_line(stats, self._total, self._rate.add(stats)))

    def finish(self, stats: Stats) -> None:
        self._write(final_line(stats, self._total))


#: Width of the bar, in cells; the numbers follow it.
BAR_WIDTH = 24
#: The bar shrinks to this many cells on a narrow terminal before details are dropped.
MIN_BAR_WIDTH = 10
#: Width of the moving block that says "working" when there is no total.
_PULSE_WIDTH = 6


def _same_destination(a: object, b: object) -> bool:
    """Whether text streams ``a`` and ``b`` write to the same place.

    The same object, or descriptors of one terminal, pipe or file (a shell's
    ``2>&1``). A live display redirects ``print()`` through itself so that the
    output appears above it; that is right only when the output was going
    there anyway: ``python app.py > results.txt`` must still fill results.txt
    while the display is drawn on stderr.
    """
    a = getattr(a, "rich_proxied_file", a)  # another live display's redirection
    b = getattr(b, "rich_proxied_file", b)
    if a is b:
        return a is not None
    try:
        first = os.fstat(a.fileno())  # type: ignore[attr-defined]
        second = os.fstat(b.fileno())  # type: ignore[attr-defined]
        if first.st_ino == 0 or second.st_ino == 0:
            # No identity to compare (Windows consoles and pipes): one
            # terminal is the best guess only when both are terminals.
            return bool(a.isatty() and b.isatty())  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):  # no stream, a closed one, no descriptor
        return False
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


class _Board:
    """One rich live display per stream, shared by the maps drawing on it at the same time.

    Two live displays on one terminal each move the cursor back over what they
    drew last and overwrite the other's lines; one display with a row per map
    does not. The display starts with its first row and stops (leaving the
    final row on screen) when its last row leaves. A row that leaves before
    then is printed above the display, which keeps only the running rows: a
    long map running short ones, each with its own progress, must not redraw
    (nor keep) every row that ever joined.

    Rows are single lines of ``rich.text.Text`` built by hand rather than a
    ``rich.progress.Progress`` table: laying out a table costs about 3 ms per
    redraw, a line of text a tenth of that.
    """

    _boards: dict[int, _Board] = {}  # by id() of the stream; a board holds its stream
    _lock = threading.Lock()  # maps on loops in different threads may share stderr

    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console, Group
        from rich.live import Live

        self._key = id(stream)
        self._group = Group
        # The rows of the maps still running, by number, in the order they joined.
        self.rows: dict[int, Text] = {}
        self._joined = 0
        self.live = Live(
            console=Console(file=stream, force_terminal=True),
            # The map's timer redraws; rich's refresh thread would redraw a
            # finished display forever and costs a thread per display.
            auto_refresh=False,
            get_renderable=self._render,
            # print() and logging show above the display when they write
            # where it draws; anywhere else (stdout piped to a file), their
            # output must stay where it was going.
            redirect_stdout=_same_destination(sys.stdout, stream),
            redirect_stderr=_same_destination(sys.stderr, stream),
        )

    def _render(self) -> RenderableType:
        # tuple() copies in one step under the GIL: another thread may join.
        return self._group(*tuple(self.rows.values()))

    @classmethod
    def join(cls, stream: TextIO, first: Text) -> tuple[_Board, int]:
        """Add a row showing ``first``; returns the board and the row's number."""
        with cls._lock:
            board = cls._boards.get(id(stream))
            if board is None:
                board = cls._boards[id(stream)] = cls(stream)
            row = board._joined
            board._joined += 1
            board.rows[row] = first
            if len(board.rows) == 1:
                try:
                    board.live.start(refresh=True)
                except BaseException:
                    del cls._boards[id(stream)]
                    raise
            return board, row

    def draw(self, row: int, line: Text) -> None:
        self.rows[row] = line
        self.live.refresh()

    def leave(self, row: int, final: Text | None) -> None:
        """Remove ``row``, leaving ``final`` (if any) on screen; the last row stops the display."""
        with self._lock:
            if final is not None:
                self.rows[row] = final
            if len(self.rows) == 1:
                del self._boards[self._key]
                self.live.stop()  # its last refresh draws the final row, and leaves it
                return
            self.rows.pop(row)
            # Redraw without the row first: printing re-renders the display as
            # last drawn below what it prints, which would still show the row.
            self.live.refresh()
            if final is not None:
                self.live.console.print(final)  # above the display


#: A detail of a live row: its text, its rich style, and how much it is worth
#: keeping on a narrow terminal (the lowest goes first).
_Detail = tuple[str, str, int]


class _LiveSink(_Sink):
    """A row of the live display: ``corral ━━━━╸━━━━━ 1,234/10,000 12.3% 456.7/s · ...``."""

    def __init__(self, stream: TextIO, total: int | None) -> None:
        from rich.text import Text

        self._text = Text
        self._stream = stream
        self._total = total
        self._rate = _RateWindow()
        self._board: _Board | None = None
        self._row = 0
        self._frame = 0  # pulse position when there is no total

    def begin(self, stats: Stats) -> None:
        self._board, self._row = _Board.join(self._stream, self._text())
        self.update(stats)

    def _fitted(self, stats: Stats, details: list[_Detail], final: bool) -> Text:
        """The row, made to fit the terminal's width without losing what matters most.

        The full row takes about 120 columns and most terminals open at 80:
        cut at the edge, it would hide the ETA while running and, on the final
        row, why the map ended (failed, cancelled, not started). So the bar
        shrinks first, then the details least worth keeping go, one by one.
        """
        board = self._board
        width = board.live.console.width if board is not None else None
        kept = list(details)
        bar = BAR_WIDTH
        while True:
            line = self._line(stats, kept, final, bar)
            if width is None or line.cell_len <= width:
                return line
            if bar > MIN_BAR_WIDTH:
                bar = max(MIN_BAR_WIDTH, bar - (line.cell_len - width))
            elif kept:
                kept.remove(min(kept, key=lambda detail: detail[2]))
            else:
                return line  # still too wide: rich's ellipsis cuts the rest

    def _line(self, stats: Stats, details: list[_Detail], final: bool, bar: int) -> Text:
        line = self._text(no_wrap=True, overflow="ellipsis")
        line.append("corral ", style="bold")
        done = stats.completed + stats.failed
        total = self._total
        if total is not None:
            fraction = min(1.0, done / total) if total else 1.0
            halves = int(fraction * 2 * bar)
            style = "green" if final and fraction >= 1.0 else "bar.complete"
            line.append("━" * (halves // 2), style=style)
            if halves % 2:
                line.append("╸", style=style)
            line.append("━" * (bar - (halves + 1) // 2), style="bar.back")
            line.append(f" {_count(done)}/{_count(total)} {_percent(done, total)} ")
        else:
            if final:
                line.append("━" * bar, style="green")
            else:
                # A block sliding along the bar: alive, but no claim about how far.
                start = self._frame % (bar - _PULSE_WIDTH + 1)
                line.append("━" * start, style="bar.back")
                line.append("━" * _PULSE_WIDTH, style="bar.pulse")
                line.append("━" * (bar - _PULSE_WIDTH - start), style="bar.back")
            line.append(f" {_count(done)} done ")
        for index, (part, style, _) in enumerate(details):
            if index:
                line.append(" · ")
            line.append(part, style=style)
        return line

    def _draw(self, line: Text) -> None:
        assert self._board is not None
        self._board.draw(self._row, line)

    @staticmethod
    def _failures(stats: Stats) -> list[_Detail]:
        # Failures and retries that happened matter more than the limit; zeros less.
        return [
            (
                f"{_count(stats.failed)} failed",
                "red" if stats.failed else "",
                8 if stats.failed else 5,
            ),
            (f"{_count(stats.retried)} retried", "", 6 if stats.retried else 1),
        ]

    def update(self, stats: Stats) -> None:
        rate = self._rate.add(stats)
        details: list[_Detail] = [
            (_rate(rate), "", 7),
            (f"{_count(stats.in_flight)} in flight", "", 4),
            (_limit(stats.limit), "", 3),
            *self._failures(stats),
        ]
        if self._total is not None:
            details.append((_eta(stats, self._total, rate), "", 9))
        self._draw(self._fitted(stats, details, final=False))
        self._frame += 1  # here, not in _line: fitting a row may build it several times

    def finish(self, stats: Stats) -> None:
        details: list[_Detail] = [
            (f"in {_elapsed(stats.elapsed)}", "", 4),
            (_rate(stats.throughput), "", 3),
            *self._failures(stats),
        ]
        # Why the map ended early is what the final row is for: kept to the last.
        if cancelled := _cancelled(stats):
            details.append((f"{_count(cancelled)} cancelled", "yellow", 9))
        if not_started := _not_started(stats, self._total):
            details.append((f"{_count(not_started)} not started", "yellow", 9))
        line: Text | None = None
        try:
            line = self._fitted(stats, details, final=True)
        finally:
            self._release(line)

    def abandon(self) -> None:
        try:
            self._release(None)
        except Exception:
            pass  # the failure that got us here is already logged

    def _release(self, final: Text | None) -> None:
        board, self._board = self._board, None
        if board is not None:
            board.leave(self._row, final)


# ---------------------------------------------------------------------------
# The component the engine starts and stops
# ---------------------------------------------------------------------------


class _State(enum.Enum):
    IDLE = "idle"  # created; the map has not started
    RUNNING = "running"  # the timer is set; snapshots go to the sink
    STOPPED = "stopped"  # the final snapshot was delivered (or the sink broke)


class Progress:
    """Delivers a map's stats snapshots to a display or a function, on a timer.

    Build it with :meth:`create` when the map is set up (that is where bad
    ``progress=`` values fail), call :meth:`start` from the running loop when
    the map starts and :meth:`stop` once the map has ended and its stats are
    final. Nothing runs per item: a ``loop.call_later`` timer pulls a snapshot
    every ``interval`` seconds.
    """

    def __init__(
        self,
        sink: _Sink,
        snapshot: Callable[[], Stats],
        interval: float,
        target: object,
    ) -> None:
        self._sink = sink
        self._snapshot = snapshot
        self._interval = interval
        self._target = target
        self._state = _State.IDLE
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def create(
        cls,
        target: ProgressLike,
        snapshot: Callable[[], Stats],
        total: int | None,
        *,
        stream: TextIO | None = None,
        interval: float | None = None,
        terminal: bool | None = None,
    ) -> Progress | None:
        """The progress display ``progress=target`` asks for, or ``None`` for ``False``.

        Args:
            target: ``True`` (a display on ``stream``), ``False``, or a function
                of one :class:`corral.Stats`.
            snapshot: returns the map's current stats (``Engine.stats``).
            total: the number of items, when the input has a length.
            stream: where ``True`` draws; default: ``sys.stderr`` as it is now.
            interval: seconds between updates; default: :data:`CALLBACK_INTERVAL`,
                :data:`LIVE_INTERVAL` or :data:`LINE_INTERVAL` for the mode.
            terminal: draw live (``True``) or write plain lines (``False``);
                default: whatever rich says of ``stream`` (a tty, or
                ``FORCE_COLOR``/``TTY_COMPATIBLE`` set).

        Raises:
            TypeError, ImportError: as :func:`check_progress`.
        """
        check_progress(target)
        if target is False:
            return None
        sink: _Sink
        if target is True:
            if stream is None:
                stream = sys.stderr
                if stream is None:  # pythonw, or a daemon without one: nowhere to draw
                    return None
            # While a live display runs, rich replaces sys.stderr with a proxy
            # that writes above the display; a second map must find the same
            # board, so look through the proxy.
            stream = getattr(stream, "rich_proxied_file", stream)
            if terminal is None:
                from rich.console import Console

                terminal = Console(file=stream).is_terminal
            if terminal:
                sink, default = _LiveSink(stream, total), LIVE_INTERVAL
            else:
                sink, default = _LineSink(stream, total), LINE_INTERVAL
        else:
            sink, default = _CallbackSink(target), CALLBACK_INTERVAL
        if interval is None:
            interval = default
        else:
            seconds = positive_seconds(interval)
            if seconds is None:
                raise ValueError(
                    f"interval must be a finite number of seconds > 0; got interval={interval!r}"
                )
            interval = seconds
        return cls(sink, snapshot, interval, target)

    def start(self) -> None:
        """Begin: draw the empty display, set the timer. Call from the running loop."""
        if self._state is not _State.IDLE:
            return
        self._state = _State.RUNNING
        self._loop = asyncio.get_running_loop()
        stats = self._snapshot()
        if self._deliver(lambda: self._sink.begin(stats)):
            self._timer = self._loop.call_later(self._interval, self._tick)

    def _tick(self) -> None:
        if self._state is not _State.RUNNING:
            return
        stats = self._snapshot()
        if self._deliver(lambda: self._sink.update(stats)):
            assert self._loop is not None
            self._timer = self._loop.call_later(self._interval, self._tick)

    def stop(self) -> None:
        """Deliver the final snapshot and stop; idempotent, never raises ``Exception``."""
        if self._state is not _State.RUNNING:
            self._state = _State.STOPPED
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        stats = self._snapshot()
        self._deliver(lambda: self._sink.finish(stats))
        self._state = _State.STOPPED

    def _deliver(self, action: Callable[[], Any]) -> bool:
        """Run ``action``; on failure log it once and stop for good (see the module docs)."""
        try:
            action()
        except Exception:
            self._state = _State.STOPPED
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._sink.abandon()
            if self._target is True:
                message = (
                    "progress=True: drawing failed; no more progress for this map, which goes on"
                )
            else:
                message = (
                    f"progress={self._target!r} raised; corral will not call it again "
                    "for this map, which goes on"
                )
            logger.error(message, exc_info=True)
            return False
        return True
