"""The lab's command line and the progress display as a new user meets them."""

from __future__ import annotations

import asyncio
import io
import itertools
import re
import sys
from typing import Any

import pytest

import corral

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _rows(stream: io.StringIO) -> list[str]:
    """The lines a terminal would show, escape codes removed."""
    text = ANSI.sub("", stream.getvalue()).replace("\r", "\n")
    return [line.rstrip() for line in text.splitlines() if line.strip()]


def _narrow(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """Point stderr at an 80-column terminal, the size most terminals open at.

    Called in the test itself: pytest's capture replaces sys.stderr between
    the setup of fixtures and the call.
    """
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "80")
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


async def _fails_at(item: int) -> int:
    await asyncio.sleep(0.01)
    if item == 5:
        raise ValueError("five")
    return item


@pytest.mark.virtual_time
async def test_an_80_column_terminal_shows_why_a_map_ended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The final row keeps the failures, the cut-short calls and the items never started."""
    narrow = _narrow(monkeypatch)
    with pytest.raises(ValueError, match="five"):
        await corral.gather(_fails_at, range(50), limit=4, progress=True)
    final = _rows(narrow)[-1]
    assert len(final) <= 80
    assert "…" not in final
    assert re.search(r" · 1 failed · .*\d+ cancelled · \d+ not started$", final), final


async def _sleeps(item: int) -> int:
    await asyncio.sleep(1.0)
    return item


@pytest.mark.virtual_time
async def test_an_80_column_terminal_shows_the_eta_and_failures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While running, the row that fits 80 columns still has the count, rate, failures, ETA."""
    narrow = _narrow(monkeypatch)
    await corral.gather(_sleeps, range(40), limit=4, progress=True)
    running = [row for row in _rows(narrow) if "ETA" in row]
    assert running, _rows(narrow)
    assert all(len(row) <= 80 and "…" not in row for row in running), running
    assert all(" failed" in row and "/s" in row for row in running), running
    assert any(" 4 in flight" in row for row in running), running


def _refusing_beyond(capacity: int, service_s: float) -> Any:
    """A target like an API with a hard cap and no queue: past ``capacity`` it refuses.

    A slot is held for ``service_s`` whether or not the caller still waits, as
    a server finishes a request whose client went away.
    """
    busy = 0

    async def call(item: int) -> int:
        nonlocal busy
        if busy >= capacity:
            await asyncio.sleep(0.001)  # a refusal takes a round trip too
            raise RuntimeError("429: at capacity")
        busy += 1

        def free(_: object) -> None:
            nonlocal busy
            busy -= 1

        served = asyncio.ensure_future(asyncio.sleep(service_s))
        served.add_done_callback(free)
        await asyncio.shield(served)
        return item

    return call


@pytest.mark.virtual_time
async def test_a_trial_does_not_overlap_the_calls_of_the_one_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At the limit equal to a hard cap, no trial sees refusals caused by the last one.

    Cancelling a trial's calls in flight frees the caller, not the server: the
    next trial would start while the server still works for the last, and be
    refused at a limit the server takes in full.
    """
    from corral.lab import tune

    monkeypatch.setattr(tune, "_clock", lambda: asyncio.get_running_loop().time())
    trials = await tune.sweep(
        _refusing_beyond(4, 0.25), itertools.count(), limits=[4, 4, 4], seconds=1.0
    )
    assert [trial.errors for trial in trials] == [0, 0, 0]
    assert [trial.throughput for trial in trials] == pytest.approx([16.0] * 3, rel=0.05)


async def _ticks(item: int) -> int:
    await asyncio.sleep(0.5)
    return item


@pytest.mark.virtual_time
async def test_an_80_column_terminal_with_endless_input_fits_and_ends_with_the_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No total: no ETA, every row fits, and breaking out counts the cut-short calls."""
    narrow = _narrow(monkeypatch)
    seen = 0
    async with corral.map(_ticks, itertools.count(), limit=8, progress=True) as results:
        async for _ in results:
            seen += 1
            if seen == 40:
                break
    rows = _rows(narrow)
    assert all(len(row) <= 80 and "…" not in row and "ETA" not in row for row in rows), rows
    assert re.search(r" 40 done in .* · 0 failed · .*8 cancelled$", rows[-1]), rows[-1]


@pytest.mark.parametrize(
    ("argv", "command", "extra"),
    [
        (["serve", "--capcity", "4"], "serve", "--capcity 4"),
        (["tune", "pkg.mod:fn", "--josn"], "tune", "--josn"),
        (["demo", "now"], "demo", "now"),
        (["bench", "--quick", "--outdir", "x"], "bench", "--outdir x"),
    ],
)
def test_a_misspelt_option_is_reported_by_its_command(
    argv: list[str], command: str, extra: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A typo gets the command's own usage (its options), not the bare list of commands."""
    from corral.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: corral {command} "), err
    assert f"corral {command}: error: unrecognized arguments: {extra}\n" in err
