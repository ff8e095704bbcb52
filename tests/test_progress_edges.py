"""progress= at its edges: where print() goes while the display is drawn, a missing stderr."""

from __future__ import annotations

import asyncio
import io
import logging
import math
import os
import pty
import re
import sys
from collections.abc import Iterator
from typing import Any, TextIO

import pytest

import corral
from corral._progress import Progress, _Board, _same_destination
from corral._stats import Stats

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def printer(seconds: float) -> Any:
    async def show(item: int) -> int:
        await asyncio.sleep(seconds)
        print(f"result {item}")  # the program's own output, meant for stdout
        return item

    return show


# ---------------------------------------------------------------------------
# Where print() goes while a live display is drawn
# ---------------------------------------------------------------------------


@pytest.mark.virtual_time
async def test_print_still_goes_to_a_stdout_that_is_not_the_display(
    terminal: pytest.MonkeyPatch,
) -> None:
    """`python app.py > results.txt` with the display on stderr: results.txt gets the output.

    The live display used to redirect stdout into itself whatever stdout was,
    so a program's output went to the terminal and never reached its file or
    pipe.
    """
    stderr, stdout = io.StringIO(), io.StringIO()
    terminal.setattr(sys, "stderr", stderr)
    terminal.setattr(sys, "stdout", stdout)
    assert await corral.gather(printer(0.7), range(30), limit=10, progress=True) == list(range(30))
    assert sorted(stdout.getvalue().splitlines()) == sorted(f"result {i}" for i in range(30))
    drawn = ANSI.sub("", stderr.getvalue())
    assert "result" not in drawn
    assert "30/30 100.0% in 2.1s" in drawn  # the display was drawn all the same
    assert sys.stdout is stdout
    assert _Board._boards == {}


@pytest.mark.virtual_time
async def test_print_to_the_display_s_own_stream_shows_above_it(
    terminal: pytest.MonkeyPatch,
) -> None:
    """stdout and the display on one stream (one terminal): print() goes through the display."""
    shared = io.StringIO()
    terminal.setattr(sys, "stderr", shared)
    terminal.setattr(sys, "stdout", shared)
    redirected: list[bool] = []

    async def show(item: int) -> int:
        await asyncio.sleep(0.7)
        redirected.append(sys.stdout is not shared)  # rich's proxy, which writes above the rows
        print(f"result {item}")
        return item

    await corral.gather(show, range(20), limit=10, progress=True)
    assert redirected == [True] * 20
    text = ANSI.sub("", shared.getvalue())
    assert all(f"result {i}\n" in text for i in range(20))
    assert sys.stdout is shared


@pytest.fixture
def ttys() -> Iterator[tuple[TextIO, TextIO, TextIO]]:
    """Two streams on one pseudo-terminal (as stdout and stderr are in a shell), one on another."""
    first_master, first = pty.openpty()
    second_master, second = pty.openpty()
    streams = (
        os.fdopen(first, "w"),
        os.fdopen(os.dup(first), "w"),
        os.fdopen(second, "w"),
    )
    try:
        yield streams
    finally:
        for stream in streams:
            stream.close()
        os.close(first_master)
        os.close(second_master)


def test_same_destination_is_one_object_or_one_terminal(
    ttys: tuple[TextIO, TextIO, TextIO],
) -> None:
    """Two descriptors of one terminal are one destination; another terminal or a file is not."""
    out, err, other = ttys
    assert _same_destination(out, err)
    assert _same_destination(out, out)
    assert not _same_destination(out, other)
    assert not _same_destination(sys.__stdin__, err)  # not the terminal under test
    buffer = io.StringIO()
    assert _same_destination(buffer, buffer)
    assert not _same_destination(buffer, err)  # a pipe or a file for stdout, a terminal for stderr
    assert not _same_destination(None, err)  # pythonw: no stdout at all
    assert not _same_destination(None, None)
    closed = io.StringIO()
    closed.close()
    assert not _same_destination(closed, err)


def test_same_destination_follows_a_shell_s_2_to_1(tmp_path: Any) -> None:
    """`> out.log 2>&1` or `2>&1 | tee`: one file or pipe behind both; `2> err.log`: two files."""
    read_end, write_end = os.pipe()
    log = open(tmp_path / "out.log", "w")  # noqa: SIM115 - closed below, with the others
    other = open(tmp_path / "err.log", "w")  # noqa: SIM115
    streams = [
        os.fdopen(write_end, "w"),
        os.fdopen(os.dup(write_end), "w"),
        log,
        open(os.dup(log.fileno()), "w"),  # noqa: SIM115
        other,
    ]
    try:
        pipe, pipe_again, file, file_again, another = streams
        assert _same_destination(pipe, pipe_again)
        assert _same_destination(file, file_again)
        assert not _same_destination(file, another)
        assert not _same_destination(pipe, file)
    finally:
        for stream in streams:
            stream.close()
        os.close(read_end)


# ---------------------------------------------------------------------------
# No stderr at all
# ---------------------------------------------------------------------------


@pytest.mark.virtual_time
@pytest.mark.parametrize("mode", ["plain", "terminal"])
async def test_no_stderr_means_no_display_and_nothing_on_stdout(
    mode: str, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    """pythonw or a daemon has sys.stderr = None: progress=True draws nothing, anywhere.

    A None stream used to fall through to rich's default, stdout: the display
    was drawn into the program's output, or every line failed and was logged.
    """
    patch: pytest.MonkeyPatch = request.getfixturevalue(mode)
    stdout = io.StringIO()
    patch.setattr(sys, "stdout", stdout)
    patch.setattr(sys, "stderr", None)
    with caplog.at_level(logging.ERROR, logger="corral"):
        results = await corral.gather(printer(0.7), range(20), limit=10, progress=True)
    assert results == list(range(20))
    assert sorted(stdout.getvalue().splitlines()) == sorted(f"result {i}" for i in range(20))
    assert [r for r in caplog.records if r.name == "corral"] == []
    assert _Board._boards == {}


# ---------------------------------------------------------------------------
# The component's own interval
# ---------------------------------------------------------------------------


def _snapshot() -> Stats:
    return Stats(0, 0, 0, 0, 0, 0.0, 0.0, None, None, None, None)


@pytest.mark.parametrize(
    "bad",
    [0, -1, math.nan, math.inf, True, "1", 10**400],
    ids=["zero", "negative", "nan", "inf", "bool", "str", "huge-int"],
)
def test_a_bad_interval_is_refused_naming_it(bad: object) -> None:
    """Only a finite number of seconds > 0 is an interval: not inf, not True, not a string."""
    expected = f"interval must be a finite number of seconds > 0; got interval={bad!r}"
    with pytest.raises(ValueError, match=rf"^{re.escape(expected)}$"):
        Progress.create(print, _snapshot, None, interval=bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Rows of maps that ended, while another map still draws
# ---------------------------------------------------------------------------


@pytest.mark.virtual_time
async def test_a_finished_row_leaves_the_live_display_while_another_map_runs(
    terminal: pytest.MonkeyPatch,
) -> None:
    """A long map running short ones, each with progress: the display keeps the running rows only.

    Every finished row used to stay in the display until the last map ended:
    one more row to redraw per short map, rows past the terminal's height cut
    off, and memory that grew for as long as the long map ran.
    """
    stream = io.StringIO()
    terminal.setattr(sys, "stderr", stream)
    rows: list[int] = []

    async def outer(item: int) -> int:
        await corral.gather(printer(0.5), range(3), limit=3, progress=True)
        board = _Board._boards[id(stream)]
        rows.append(len(board._render().renderables))  # type: ignore[attr-defined]
        return item

    assert await corral.gather(outer, range(10), limit=1, progress=True) == list(range(10))
    assert rows == [1] * 10  # the long map's row alone, each time a short one has ended
    lines = ANSI.sub("", stream.getvalue()).replace("\r", "\n").rstrip().splitlines()
    finals = [line for line in lines if "3/3 100.0% in 0.5s" in line]
    assert len(finals) == 10  # each short map's final row is printed once, above the display
    last = "10/10 100.0% in 5.0s · 2.0/s · 0 failed · 0 retried"
    assert lines[-1].endswith(last)
    assert _Board._boards == {}


# ---------------------------------------------------------------------------
# An input whose length cannot be taken
# ---------------------------------------------------------------------------


class _LazyRows:
    """A lazy collection whose length is unknown until it has been read through."""

    def __iter__(self) -> Iterator[int]:
        return iter(range(5))

    def __len__(self) -> int:
        raise ValueError("length unknown until the cursor is exhausted")


@pytest.mark.virtual_time
async def test_an_input_whose_len_raises_is_shown_without_a_total() -> None:
    """progress= must not fail a map that runs without it: a raising __len__ means no total."""
    snaps: list[Stats] = []
    assert await corral.gather(printer(0), _LazyRows(), progress=snaps.append) == list(range(5))
    assert snaps[-1].completed == 5


# ---------------------------------------------------------------------------
# The final counts, whichever way the map ends
# ---------------------------------------------------------------------------


@pytest.mark.virtual_time
async def test_a_deadline_ends_with_every_started_call_counted() -> None:
    """Past the deadline: the final snapshot has the done, and the cut short as neither."""
    snaps: list[Stats] = []

    async def nap(item: int) -> int:
        await asyncio.sleep(1.0)
        return item

    with pytest.raises(corral.DeadlineExceeded):
        await corral.gather(nap, range(100), limit=5, deadline=3.5, progress=snaps.append)
    final = snaps[-1]
    assert (final.started, final.completed, final.failed, final.in_flight) == (20, 15, 0, 0)
    assert final.elapsed == pytest.approx(3.5)


async def test_a_resumed_map_ends_with_its_whole_total_done(tmp_path: Any) -> None:
    """A re-run from a checkpoint counts the recorded items as done: the bar ends full."""
    path = str(tmp_path / "run.sqlite")
    fail = True

    async def flaky(item: int) -> int:
        await asyncio.sleep(0)
        if fail and item == 30:
            raise ValueError("thirty")
        return item

    with pytest.raises(ValueError, match=r"^thirty$"):
        await corral.gather(flaky, range(50), limit=4, checkpoint=path)
    fail = False
    snaps: list[Stats] = []
    assert await corral.gather(
        flaky, range(50), limit=4, checkpoint=path, progress=snaps.append
    ) == (list(range(50)))
    final = snaps[-1]
    assert (final.completed, final.failed, final.in_flight) == (50, 0, 0)


# ---------------------------------------------------------------------------
# An early end: how many items never started
# ---------------------------------------------------------------------------


async def nap(item: int) -> int:
    await asyncio.sleep(1.0)
    return item


def final_row(mode: str, stream: io.StringIO) -> str:
    """The last line drawn: a plain line, or the live display's final row (escapes removed)."""
    text = stream.getvalue() if mode == "plain" else ANSI.sub("", stream.getvalue())
    return text.replace("\r", "\n").rstrip().splitlines()[-1]


@pytest.mark.virtual_time
@pytest.mark.parametrize("mode", ["plain", "terminal"])
async def test_a_map_cancelled_early_says_how_many_items_never_started(
    mode: str, request: pytest.FixtureRequest
) -> None:
    """cancel() from the consumer after 25 results: the final line counts the 1,000 - started.

    The final line used to say "30/1,000 done (3.0%), ..., 10 cancelled" and
    leave the reader to work out that 960 items never ran.
    """
    patch: pytest.MonkeyPatch = request.getfixturevalue(mode)
    stream = io.StringIO()
    patch.setattr(sys, "stderr", stream)
    seen: list[int] = []
    async with corral.map(nap, range(1000), limit=10, progress=True) as results:
        async for result in results:
            seen.append(result)
            if len(seen) == 25:
                results.cancel()
    stats = results.stats
    done, cut = stats.completed + stats.failed, stats.started - stats.completed - stats.failed
    not_started = 1000 - stats.started
    assert (done, cut, not_started) == (30, 10, 960)  # the three add up to the input
    assert sorted(seen) == list(range(30))
    if mode == "plain":
        expected = (
            "corral: 30/1,000 done (3.0%) in 3.0s, 10.0/s, 0 failed, 0 retried, "
            "10 cancelled, 960 not started"
        )
        assert final_row(mode, stream) == expected
    else:
        row = final_row(mode, stream)
        assert row.endswith(
            " 30/1,000 3.0% in 3.0s · 10.0/s · 0 failed · 0 retried"
            " · 10 cancelled · 960 not started"
        )
    assert _Board._boards == {}


@pytest.mark.virtual_time
@pytest.mark.parametrize("mode", ["plain", "terminal"])
async def test_a_deadline_with_return_exceptions_counts_the_items_it_never_reached(
    mode: str, request: pytest.FixtureRequest
) -> None:
    """Items past the deadline get a DeadlineExceeded each, and count as not started."""
    patch: pytest.MonkeyPatch = request.getfixturevalue(mode)
    stream = io.StringIO()
    patch.setattr(sys, "stderr", stream)
    results = await corral.gather(
        nap, range(100), limit=5, deadline=3.5, return_exceptions=True, progress=True
    )
    assert results[:15] == list(range(15))
    assert all(isinstance(r, corral.DeadlineExceeded) for r in results[15:])
    row = final_row(mode, stream)
    if mode == "plain":
        assert row == (
            "corral: 20/100 done (20.0%) in 3.5s, 5.7/s, 5 failed, 0 retried, 80 not started"
        )
    else:
        assert row.endswith(" 20/100 20.0% in 3.5s · 5.7/s · 5 failed · 0 retried · 80 not started")


@pytest.mark.virtual_time
@pytest.mark.parametrize("mode", ["plain", "terminal"])
async def test_a_complete_run_and_an_input_without_length_say_nothing_of_not_started(
    mode: str, request: pytest.FixtureRequest
) -> None:
    """A run that reached its total ends as before; without a total there is nothing to count."""
    patch: pytest.MonkeyPatch = request.getfixturevalue(mode)
    stream = io.StringIO()
    patch.setattr(sys, "stderr", stream)
    assert await corral.gather(nap, range(30), limit=10, progress=True) == list(range(30))
    complete = final_row(mode, stream)
    if mode == "plain":
        assert complete == "corral: 30/30 done (100.0%) in 3.0s, 10.0/s, 0 failed, 0 retried"
    else:
        assert complete.endswith(" 30/30 100.0% in 3.0s · 10.0/s · 0 failed · 0 retried")

    stream.seek(0)
    stream.truncate()
    async with corral.map(nap, iter(range(1000)), limit=10, progress=True) as results:
        async for result in results:
            if result == 24:
                results.cancel()
    unknown = final_row(mode, stream)
    assert "not started" not in unknown
    assert unknown.endswith("10 cancelled")
    assert _Board._boards == {}
