"""Long runs from the outside: checkpoint and resume, deadline, budget, cancel().

Edges tests/test_checkpoint.py leaves open: ids of mixed types end to end,
items with no id after direct chunks, resumes with another input, paths that
are no plain file, cancel() at every point of a run, deadlines that pass at a
moment the test picks, budgets spent exactly.

Deadlines run on :class:`OffsetClockLoop`: real time plus an offset the test
moves forward, so a deadline passes exactly when the test says so (and never
by itself, being an hour away). The loops of ``_loops`` do not fit here: a
checkpoint's writes run on a thread, and :class:`_loops.VirtualClockLoop`
jumps its clock whenever the loop waits for that thread, so the deadline
would pass at whichever write the thread happens to be busy with.
"""

from __future__ import annotations

import asyncio
import enum
import os
import random
import re
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

import corral
from _loops import run_offset, skip_offset, skip_offset_once
from corral import _checkpoint_file, _engine
from corral._checkpoint_file import as_key, read_checkpoint

pytestmark = pytest.mark.slow  # a checkpoint's writes run on a thread of its own

HOUR = 3600.0


def recorded(path: Path) -> dict[Any, tuple[int, Any]]:
    """What the file holds: {id: (kind, stored value)}; {} if there is no file."""
    if not path.exists():
        return {}
    return {key: (kind, value) for key, kind, value in read_checkpoint(path)}


def threads() -> set[str]:
    return {thread.name for thread in threading.enumerate()}


def no_checkpoint_thread() -> bool:
    return not any(name.startswith("corral-checkpoint") for name in threads())


class Calls:
    """A fn that counts its calls by id, and blocks the items ``blocked`` says until released."""

    def __init__(self, blocked: Callable[[Any], bool] = lambda item: False) -> None:
        self.calls: list[Any] = []
        self.finished: list[Any] = []  # the calls that returned their result
        self.blocked = blocked
        self.release = asyncio.Event()
        self.all_in = asyncio.Event()  # set once ``expect_in_flight`` blocked calls wait
        self.expect_in_flight = 0
        self.in_flight = 0

    async def __call__(self, item: Any) -> Any:
        self.calls.append(item)
        if self.blocked(item):
            self.in_flight += 1
            if self.in_flight >= self.expect_in_flight:
                self.all_in.set()
            try:
                await self.release.wait()
            finally:
                self.in_flight -= 1
        await asyncio.sleep(0)  # suspend once, like any real call
        self.finished.append(item)
        return ("result", repr(as_key(item)))


def result_of(item: Any) -> Any:
    return ("result", repr(as_key(item)))


# -- a loop whose clock the test moves forward ----------------------------------------


def skip_past_deadline() -> None:
    skip_offset(2 * HOUR)


# -- ids: types that equal, types that do not, items that have none --------------------


class Level(enum.IntEnum):
    HIGH = 3


@pytest.mark.parametrize("ordered", [True, False])
async def test_ids_of_mixed_types_record_and_replay_like_a_fresh_run(
    tmp_path: Path, ordered: bool
) -> None:
    """1, True and Level(1) are one id (they are equal), "1", b"1" and (1,) three others;
    every occurrence gets its id's one result, in a fresh run as on resume, and fn
    runs once per id over both."""
    path = tmp_path / "run.sqlite"
    items: list[Any] = [1, True, "1", b"1", (1,), (True,), 3, Level.HIGH, (Level.HIGH, b"x")]
    items += [(3, b"x"), "", b"", (), ((),), 1, "1", b"1"]
    spy = Calls()
    fresh = await corral.gather(spy, items, limit=3, checkpoint=path)
    assert fresh == [result_of(item) for item in items]
    ids = {as_key(item) for item in items}
    assert Counter(map(as_key, spy.calls)) == Counter(ids)
    assert set(recorded(path)) == ids

    again = Calls()
    async with corral.map(again, items, limit=3, ordered=ordered, checkpoint=path) as results:
        replayed = [value async for value in results]
    if ordered:
        assert replayed == fresh
    else:
        assert Counter(replayed) == Counter(fresh)
    assert again.calls == []


async def test_an_equal_id_of_another_type_in_a_later_chunk_replays_the_direct_call(
    tmp_path: Path,
) -> None:
    """Ints called directly (a screened chunk), then True and Level(3) in a later
    chunk: they are ids 1 and 3, already run; fn does not run for them again."""
    path = tmp_path / "run.sqlite"
    items: list[Any] = [*range(300), True, Level.HIGH, "299", b"299"]
    spy = Calls()
    with mock.patch.object(_engine, "CHUNK", 100):
        got = await corral.gather(spy, items, limit=10, checkpoint=path)
    assert got == [result_of(item) for item in items]
    assert Counter(map(as_key, spy.calls)) == Counter({as_key(i): 1 for i in items})
    assert len(recorded(path)) == 302


@pytest.mark.parametrize(
    "bad", [1.0, (1, 2.0), ("a", None), ((1, [2]),), bytearray(b"1"), frozenset({1})]
)
@pytest.mark.parametrize("return_exceptions", [False, True])
async def test_an_item_with_no_id_after_direct_chunks_stops_the_map_naming_it(
    tmp_path: Path, bad: object, return_exceptions: bool
) -> None:
    """An item that is no id (a float, a tuple holding one) after chunks that went
    direct stops the map with a TypeError naming it, even with return_exceptions;
    what ran before it is recorded, and a resume without it runs only the rest."""
    path = tmp_path / "run.sqlite"
    items: list[Any] = [*range(40), bad, *range(40, 60)]
    spy = Calls()
    with mock.patch.object(_engine, "CHUNK", 8), pytest.raises(TypeError) as caught:
        await corral.gather(
            spy, items, limit=1, checkpoint=path, return_exceptions=return_exceptions
        )
    assert f"item {_checkpoint_file.item_repr(bad)} has none" in str(caught.value)
    assert "Pass item_id=" in str(caught.value)
    assert not any(call is bad for call in spy.calls)
    done = set(recorded(path))
    assert done <= set(range(40))
    assert done == set(spy.calls) & set(range(40))

    again = Calls()
    good = [item for item in items if item is not bad]
    assert await corral.gather(again, good, limit=4, checkpoint=path) == list(map(result_of, good))
    assert sorted(again.calls) == sorted(set(range(60)) - done)


@pytest.mark.parametrize("ident", [1.5, (1, None), [1], None, {"id": 1}])
async def test_item_id_returning_no_id_stops_the_map_naming_item_and_value(
    tmp_path: Path, ident: object
) -> None:
    """item_id returning something that is no id, for one item among good ones."""
    path = tmp_path / "run.sqlite"
    rows = [{"n": n} for n in range(30)]

    def item_id(row: dict[str, int]) -> object:
        return ident if row["n"] == 20 else row["n"]

    spy = Calls()
    with (
        mock.patch.object(_engine, "CHUNK", 4),
        pytest.raises(TypeError) as caught,
    ):
        await corral.gather(
            spy, rows, limit=1, checkpoint=path, item_id=item_id, return_exceptions=True
        )
    text = str(caught.value)
    assert text.startswith("item_id must return a str, int, bytes or a tuple of those")
    assert f"it returned {_checkpoint_file.item_repr(ident)} for item {{'n': 20}}" in text
    assert {"n": 20} not in spy.calls
    assert set(recorded(path)) <= set(range(20))


async def test_an_item_id_that_raises_in_a_later_chunk_keeps_what_ran(tmp_path: Path) -> None:
    """item_id raising for an item after direct chunks: the map stops naming the item,
    what ran is recorded (and handed out by a map), a resume runs only the rest."""
    path = tmp_path / "run.sqlite"
    rows: list[dict[str, int]] = [{"id": n} for n in range(50)]
    rows[33] = {"other": 33}
    spy = Calls()
    seen: list[Any] = []
    with mock.patch.object(_engine, "CHUNK", 8), pytest.raises(TypeError) as caught:
        async with corral.map(
            spy,
            rows,
            limit=1,
            checkpoint=path,
            item_id=lambda row: row["id"],
            return_exceptions=True,
        ) as results:
            async for value in results:
                seen.append(value)
    assert "it raised KeyError('id') for item {'other': 33}" in str(caught.value)
    assert repr(caught.value.__cause__) == "KeyError('id')"
    done = set(recorded(path))
    assert done <= set(range(33))
    assert len(seen) <= len(done)  # nothing unrecorded was handed out
    rows[33] = {"id": 33}
    again = Calls()
    await corral.gather(again, rows, limit=5, checkpoint=path, item_id=lambda row: row["id"])
    assert sorted(row["id"] for row in again.calls) == sorted(set(range(50)) - done)


# -- resumes with another input ------------------------------------------------------


@pytest.mark.parametrize(
    "second",
    ["reversed", "shorter", "longer", "shuffled-with-repeats"],
)
@pytest.mark.parametrize("ordered", [True, False])
async def test_a_stopped_run_resumes_with_another_input(
    tmp_path: Path, second: str, ordered: bool
) -> None:
    """A first run stopped by cancel() (some calls in flight), then a resume with the
    input reversed, cut short, extended or shuffled with repeats: each item gets its
    result, fn runs only for ids not recorded, each of those once."""
    path = tmp_path / "run.sqlite"
    first_items = [*range(0, 600, 2), "a", "b", (1, "x"), b"k"]
    spy = Calls(blocked=lambda item: item in (40, 42, "b"))
    spy.expect_in_flight = 3
    handed: list[Any] = []
    with mock.patch.object(_engine, "CHUNK", 16):
        async with corral.map(
            spy, first_items, limit=8, ordered=ordered, checkpoint=path
        ) as results:
            async for value in results:
                handed.append(value)
                if len(handed) == 10:
                    await spy.all_in.wait()
                    results.cancel()
    done = set(recorded(path))
    assert done == {as_key(item) for item in spy.finished}  # none cut short, none lost
    assert done.isdisjoint({40, 42, "b"})  # cancelled in flight
    assert set(handed) <= {result_of(item) for item in first_items if as_key(item) in done}

    rng = random.Random(7)
    items: list[Any]
    if second == "reversed":
        items = first_items[::-1]
    elif second == "shorter":
        items = first_items[:25]
    elif second == "longer":
        items = [*first_items, *range(1, 400, 2), "c"]
    else:
        items = first_items + rng.sample(first_items, 100)
        rng.shuffle(items)
    again = Calls()
    with mock.patch.object(_engine, "CHUNK", 16):
        async with corral.map(again, items, limit=8, ordered=ordered, checkpoint=path) as results:
            got = [value async for value in results]
    if ordered:
        assert got == list(map(result_of, items))
    else:
        assert Counter(got) == Counter(map(result_of, items))
    called = Counter(map(as_key, again.calls))
    assert set(called.values()) <= {1}, "an id was computed twice"
    assert not set(called) & done, "a recorded id was computed again"
    assert set(called) == {as_key(item) for item in items} - done


# -- paths that are no plain file ----------------------------------------------------------


async def test_a_symlink_to_a_file_in_use_is_refused(tmp_path: Path) -> None:
    """The same file by another name (a symlink to it) is the same file: a second map
    on it would call fn again for every item the first has not recorded yet."""
    path = tmp_path / "run.sqlite"
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "elsewhere" / "link.sqlite"
    link.symlink_to(path)
    spy = Calls(blocked=lambda item: True)
    spy.expect_in_flight = 2
    first = asyncio.ensure_future(corral.gather(spy, range(4), limit=2, checkpoint=path))
    try:
        await spy.all_in.wait()  # the first map has the file open
        other = Calls()
        with pytest.raises(OSError, match="another map is using it") as caught:
            await corral.gather(other, range(4), limit=2, checkpoint=link)
        assert str(caught.value).startswith(f"checkpoint={str(link)!r} cannot be opened")
        assert other.calls == []
    finally:
        spy.release.set()
    assert await first == list(map(result_of, range(4)))
    assert Counter(map(as_key, spy.calls)) == Counter(range(4))
    # Free again once the first map is done, by either name; no lock file is left.
    again = Calls()
    assert await corral.gather(again, range(5), checkpoint=link) == list(map(result_of, range(5)))
    assert again.calls == [4]
    assert sorted(os.listdir(tmp_path)) == ["elsewhere", "run.sqlite"]
    assert os.listdir(tmp_path / "elsewhere") == ["link.sqlite"]


@pytest.mark.parametrize("path", [":memory:", "file::memory:?cache=shared", "file:run.sqlite"])
def test_sqlites_own_names_are_refused_at_once(path: str) -> None:
    """':memory:' and 'file:' URIs are SQLite's names for what is no file at that path:
    nothing would be durable (or the file would be elsewhere); refused when the map
    is made, naming the argument."""
    with pytest.raises(ValueError, match=f"^{re.escape(f'checkpoint={path!r}')} ") as caught:
        corral.map(Calls(), range(3), checkpoint=path)
    assert "pass the path of a file" in str(caught.value)


async def test_a_file_named_like_a_uri_is_used_by_its_absolute_path(tmp_path: Path) -> None:
    """What the refusal above advises works: the file is made where the path says."""
    path = tmp_path / "file:run.sqlite"
    assert await corral.gather(Calls(), range(3), checkpoint=str(path)) == list(
        map(result_of, range(3))
    )
    again = Calls()
    assert await corral.gather(again, range(4), checkpoint=path) == list(map(result_of, range(4)))
    assert again.calls == [3]
    assert os.listdir(tmp_path) == ["file:run.sqlite"]


async def test_a_checkpoint_in_a_missing_directory_calls_nothing_and_creates_nothing(
    tmp_path: Path,
) -> None:
    """fn is never called, no directory or lock file appears, no thread is left."""
    path = tmp_path / "missing" / "deeper" / "run.sqlite"
    spy = Calls()
    with pytest.raises(OSError, match=f"^checkpoint={str(path)!r} cannot be opened"):
        async with corral.map(spy, range(300), limit=4, checkpoint=path) as results:
            async for _ in results:
                pass
    assert spy.calls == []
    assert os.listdir(tmp_path) == []
    assert no_checkpoint_thread()


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes to read-only files"
)
async def test_a_read_only_checkpoint_replays_and_refuses_to_record(tmp_path: Path) -> None:
    """A file that cannot be written: what it holds replays; a new result stops the
    map with an OSError naming the file, and nothing unrecorded is handed out."""
    path = tmp_path / "run.sqlite"
    await corral.gather(Calls(), range(5), checkpoint=path)
    path.chmod(0o444)
    again = Calls()
    assert await corral.gather(again, range(5), checkpoint=path) == list(map(result_of, range(5)))
    seen: list[Any] = []
    with pytest.raises(OSError, match=f"^checkpoint={str(path)!r} cannot"):
        async with corral.map(again, range(8), checkpoint=path) as results:
            async for value in results:
                seen.append(value)
    assert seen == list(map(result_of, range(5)))
    assert again.calls == [5, 6, 7]
    assert set(recorded(path)) == set(range(5))


# -- cancel() -------------------------------------------------------------------------


async def test_cancel_before_the_map_starts_opens_no_file(tmp_path: Path) -> None:
    """cancel() on a map not entered yet: nothing runs, no file is made, stats are zeros."""
    path = tmp_path / "run.sqlite"
    spy = Calls()
    results = corral.map(spy, range(10), checkpoint=path)
    results.cancel()
    async with results:
        assert [value async for value in results] == []
    assert spy.calls == []
    assert not path.exists()
    assert results.stats.started == results.stats.completed == results.stats.in_flight == 0


@pytest.mark.parametrize("ordered", [True, False])
async def test_cancel_twice_before_the_first_result_keeps_the_file_consistent(
    tmp_path: Path, ordered: bool
) -> None:
    """Every call in flight and none done when cancel() comes (twice): nothing is handed
    out or recorded, stats are final, and a resume calls fn for every item."""
    path = tmp_path / "run.sqlite"
    spy = Calls(blocked=lambda item: True)
    spy.expect_in_flight = 4
    async with corral.map(spy, range(20), limit=4, ordered=ordered, checkpoint=path) as results:
        await spy.all_in.wait()
        results.cancel()
        results.cancel()
        assert [value async for value in results] == []
        results.cancel()
    stats = results.stats
    assert (stats.started, stats.completed, stats.failed, stats.in_flight) == (4, 0, 0, 0)
    assert recorded(path) == {}
    assert no_checkpoint_thread()
    again = Calls()
    assert await corral.gather(again, range(20), checkpoint=path) == list(map(result_of, range(20)))
    assert sorted(again.calls) == list(range(20))


@pytest.mark.parametrize("ordered", [True, False])
async def test_cancel_from_another_task_keeps_what_is_done(tmp_path: Path, ordered: bool) -> None:
    """cancel() from a task other than the consumer, with calls in flight: the results
    done are recorded and (in input order, up to the first not done) handed out; a
    resume calls fn exactly for the items not recorded."""
    path = tmp_path / "run.sqlite"
    stuck = {7, 11, 12}
    spy = Calls(blocked=lambda item: item in stuck)
    spy.expect_in_flight = len(stuck)
    handed: list[Any] = []

    async def stop(results: corral.ResultStream[Any]) -> None:
        await spy.all_in.wait()
        results.cancel()

    async with corral.map(spy, range(40), limit=5, ordered=ordered, checkpoint=path) as results:
        stopper = asyncio.ensure_future(stop(results))
        async for value in results:
            handed.append(value)
        await stopper
    done = set(recorded(path))
    assert done == set(spy.finished)  # every call that ended, none that was cut short
    assert stuck.isdisjoint(done)
    if ordered:
        assert handed == list(map(result_of, range(7)))
    else:
        assert Counter(handed) == Counter(map(result_of, done))
    stats = results.stats
    assert stats.in_flight == 0
    assert stats.completed == len(done)
    assert stats.started == len(spy.calls)
    again = Calls()
    assert await corral.gather(again, range(40), checkpoint=path) == list(map(result_of, range(40)))
    assert sorted(again.calls) == sorted(set(range(40)) - done)


async def test_cancel_after_the_end_changes_nothing(tmp_path: Path) -> None:
    """cancel() once every result was handed out, and again after the map closed."""
    path = tmp_path / "run.sqlite"
    async with corral.map(Calls(), range(30), checkpoint=path) as results:
        got = [value async for value in results]
        final = results.stats
        results.cancel()
        assert results.stats == final
    results.cancel()
    assert results.stats == final
    assert got == list(map(result_of, range(30)))
    assert set(recorded(path)) == set(range(30))


async def test_cancel_from_fn_keeps_that_calls_result(tmp_path: Path) -> None:
    """fn calling cancel(): its own call goes on and its result is recorded, so a
    resume does not call it again; the calls it cut short are run by the resume."""
    path = tmp_path / "run.sqlite"
    box: list[corral.ResultStream[Any]] = []
    calls: list[int] = []
    never = asyncio.Event()

    async def fn(item: int) -> int:
        calls.append(item)
        if item == 5:
            box[0].cancel()
        elif item > 5:
            await never.wait()
        await asyncio.sleep(0)
        return item * 10

    async with corral.map(fn, range(30), limit=4, checkpoint=path) as results:
        box.append(results)
        [value async for value in results]
    assert 5 in recorded(path)
    done = set(recorded(path))
    calls.clear()
    never.set()
    assert await corral.gather(fn, range(30), checkpoint=path) == [i * 10 for i in range(30)]
    assert sorted(calls) == sorted(set(range(30)) - done)


# -- deadline ----------------------------------------------------------------------------


def test_a_deadline_of_zero_is_refused_naming_it() -> None:
    for deadline in (0, -1, 0.0):
        with pytest.raises(ValueError, match=rf"got deadline={deadline!r}$"):
            corral.map(Calls(), range(3), deadline=deadline, checkpoint="never-made.sqlite")
    assert not os.path.exists("never-made.sqlite")


@pytest.mark.parametrize("ordered", [True, False])
@pytest.mark.parametrize("return_exceptions", [False, True])
def test_a_deadline_hands_out_every_result_done_and_loses_none(
    tmp_path: Path, ordered: bool, return_exceptions: bool
) -> None:
    """The deadline passes with calls in flight and results not yet committed: every
    result done is recorded and handed out before DeadlineExceeded (or, with
    return_exceptions, the items left are DeadlineExceeded, none recorded); a
    resume calls fn exactly for the items not recorded."""
    path = tmp_path / "run.sqlite"
    stuck = {9, 20, 21, 22}

    async def main() -> tuple[list[Any], BaseException | None, list[Any], list[Any]]:
        spy = Calls(blocked=lambda item: item in stuck)
        spy.expect_in_flight = len(stuck)
        handed: list[Any] = []
        error: BaseException | None = None
        try:
            async with corral.map(
                spy,
                range(60),
                limit=5,
                ordered=ordered,
                return_exceptions=return_exceptions,
                deadline=HOUR,
                checkpoint=path,
            ) as results:
                async for value in results:
                    handed.append(value)
                    if len(handed) == 3:
                        await spy.all_in.wait()
                        skip_past_deadline()
        except corral.DeadlineExceeded as exc:
            error = exc
        stats = results.stats  # final: nothing in flight, each call that ended counted
        assert stats.in_flight == 0
        assert stats.started == len(spy.calls)
        assert stats.completed == len(spy.finished)
        return handed, error, spy.calls, spy.finished

    handed, error, _, finished = run_offset(main)
    done = set(recorded(path))
    assert done == set(finished)  # every call that ended is recorded, none cut short
    assert stuck.isdisjoint(done)
    assert _checkpoint_file.FAILED not in {kind for kind, _ in recorded(path).values()}
    results = [value for value in handed if not isinstance(value, corral.DeadlineExceeded)]
    if return_exceptions:
        assert error is None
        assert len(handed) == 60  # one outcome per item
    else:
        assert isinstance(error, corral.DeadlineExceeded)
    if ordered and return_exceptions:  # each item's outcome in its place
        assert [None if type(value) is corral.DeadlineExceeded else value for value in handed] == [
            result_of(item) if item in done else None for item in range(60)
        ]
    elif ordered:  # up to the first item not done
        assert results == list(map(result_of, range(9)))
    else:
        assert Counter(results) == Counter(map(result_of, done))

    async def resume() -> list[Any]:
        again = Calls()
        assert await corral.gather(again, range(60), checkpoint=path) == list(
            map(result_of, range(60))
        )
        return again.calls

    assert sorted(run_offset(resume)) == sorted(set(range(60)) - done)


def test_a_deadline_during_the_files_opening_runs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deadline passes while the file is still opening: fn never runs, every item
    is reported (return_exceptions) or DeadlineExceeded is raised, and the file is
    closed: no thread, no lock file, nothing recorded."""
    entered, release = threading.Event(), threading.Event()
    open_file = _checkpoint_file.Database.open.__func__  # type: ignore[attr-defined]

    def slow_open(cls: type, *args: Any) -> Any:
        entered.set()
        release.wait(60)
        return open_file(cls, *args)

    monkeypatch.setattr(_checkpoint_file.Database, "open", classmethod(slow_open))

    for return_exceptions in (False, True):
        path = tmp_path / f"run-{return_exceptions}.sqlite"
        entered.clear()
        release.clear()

        async def main(path: Path = path, return_exceptions: bool = return_exceptions) -> Any:
            spy = Calls()

            async def pass_deadline() -> None:
                while not entered.is_set():  # bounded: the open starts with the first call
                    await asyncio.sleep(0.001)
                skip_past_deadline()
                await asyncio.sleep(0)
                release.set()

            helper = asyncio.ensure_future(pass_deadline())
            try:
                return await corral.gather(
                    spy,
                    range(10),
                    limit=3,
                    deadline=HOUR,
                    return_exceptions=return_exceptions,
                    checkpoint=path,
                ), spy.calls
            finally:
                release.set()
                await helper

        if return_exceptions:
            got, calls = run_offset(main)
            assert len(got) == 10
            assert all(type(value) is corral.DeadlineExceeded for value in got)
        else:
            with pytest.raises(corral.DeadlineExceeded):
                run_offset(main)
            calls = []
        assert calls == []
        assert recorded(path) == {}
        assert no_checkpoint_thread()
        assert not Path(f"{path}-lock").exists()


def test_a_repeated_id_in_flight_at_the_deadline_is_not_recorded_and_runs_once_on_resume(
    tmp_path: Path,
) -> None:
    """The deadline cuts the call of an id a later occurrence waits for: both are
    DeadlineExceeded (as is every item not started), nothing is recorded for them,
    and a resume runs that id once."""
    path = tmp_path / "run.sqlite"
    items = [1, 2, 3, 2, 4, 2, 5]

    async def main() -> list[Any]:
        # limit=3: 1, 2 (held), 3; then the second 2 (waits for the first) and 4 (held).
        spy = Calls(blocked=lambda item: item in (2, 4))
        spy.expect_in_flight = 2

        helper = asyncio.ensure_future(skip_offset_once(spy.all_in, 2 * HOUR))
        got = await corral.gather(
            spy, items, limit=3, deadline=HOUR, return_exceptions=True, checkpoint=path
        )
        await helper
        assert spy.calls == [1, 2, 3, 4]
        return list(got)

    got = run_offset(main)
    assert got[0] == result_of(1)
    assert got[2] == result_of(3)
    late = [got[i] for i in (1, 3, 4, 5, 6)]
    assert all(type(value) is corral.DeadlineExceeded for value in late)
    assert [str(value) for value in late[:3]] == [
        f"the deadline passed while item {item} ran" for item in (2, 2, 4)
    ]
    assert set(recorded(path)) == {1, 3}

    async def resume() -> list[Any]:
        again = Calls()
        assert await corral.gather(again, items, checkpoint=path) == list(map(result_of, items))
        return again.calls

    assert sorted(run_offset(resume)) == [2, 4, 5]


# -- budget ----------------------------------------------------------------------------


async def test_a_budget_spent_exactly_by_the_last_item_ends_normally(tmp_path: Path) -> None:
    """requests, or a usage dimension, reaching the budget with the last item: no error."""
    path = tmp_path / "requests.sqlite"
    assert await corral.gather(
        Calls(), range(10), limit=3, budget={"requests": 10}, checkpoint=path
    ) == list(map(result_of, range(10)))

    tokens = tmp_path / "tokens.sqlite"
    async with corral.map(
        Calls(),
        range(5),
        limit=1,
        usage=lambda _: {"tokens": 10},
        budget={"tokens": 50},
        checkpoint=tokens,
    ) as results:
        assert [value async for value in results] == list(map(result_of, range(5)))


async def test_a_resume_spends_its_budget_only_on_the_calls_it_makes(tmp_path: Path) -> None:
    """Recorded items cost nothing: a budget of exactly the items left suffices, with
    the recorded items before, between and after the new ones."""
    path = tmp_path / "run.sqlite"
    await corral.gather(Calls(), range(0, 30, 3), checkpoint=path)
    again = Calls()
    got = await corral.gather(again, range(30), limit=4, budget={"requests": 20}, checkpoint=path)
    assert got == list(map(result_of, range(30)))
    assert sorted(again.calls) == [i for i in range(30) if i % 3]
    with pytest.raises(corral.BudgetExhausted):
        await corral.gather(Calls(), range(31), limit=4, budget={"requests": 0}, checkpoint=path)


@pytest.mark.parametrize("ordered", [True, False])
async def test_a_spent_budget_lets_the_calls_in_flight_finish_and_records_them(
    tmp_path: Path, ordered: bool
) -> None:
    """The budget runs out with calls in flight: they finish (they are paid for), are
    recorded and handed out, then BudgetExhausted; the overshoot is at most the
    calls in flight; a resume runs exactly the rest."""
    path = tmp_path / "run.sqlite"
    spy = Calls(blocked=lambda item: item < 4)
    spy.expect_in_flight = 4
    handed: list[Any] = []

    async def open_up() -> None:
        await spy.all_in.wait()
        spy.release.set()

    helper = asyncio.ensure_future(open_up())
    with pytest.raises(corral.BudgetExhausted):
        async with corral.map(
            spy,
            range(40),
            limit=4,
            ordered=ordered,
            usage=lambda _: {"tokens": 10},
            budget={"tokens": 25},
            checkpoint=path,
        ) as results:
            async for value in results:
                handed.append(value)
    await helper
    done = set(recorded(path))
    assert done == set(spy.calls)
    assert 3 <= len(spy.calls) <= 3 + 4  # the soft cap: the calls in flight may overshoot it
    assert Counter(handed) == Counter(map(result_of, done))
    again = Calls()
    await corral.gather(again, range(40), checkpoint=path)
    assert sorted(again.calls) == sorted(set(range(40)) - done)


# -- randomised: mixed ids, stops and resumes ------------------------------------------

POOL: list[Any] = [0, 1, 2, -1, -2, True, "1", "a", b"1", (1,), (True,), ("a", b"1"), (), 2**70]


@pytest.mark.parametrize("seed", range(12))
def test_mixed_ids_stopped_and_resumed_give_each_id_one_outcome(tmp_path: Path, seed: int) -> None:
    """Random inputs of mixed ids (equal ones of other types, hash collisions, repeats)
    around a range of new ints, chunks of any size, failures returned; a run stopped
    by cancel() at a random point, a resume with another input stopped too, then a
    last one: each occurrence gets its id's outcome, fn runs at most once per id in
    a run and never again for an id recorded before."""
    rng = random.Random(seed)
    items = [rng.choice(POOL) for _ in range(rng.randint(0, 40))]
    items += list(range(rng.randint(0, 400)))
    if seed % 2:
        rng.shuffle(items)
    limit = rng.choice([1, 3, 50])
    ordered = bool(seed % 3)
    failing = {as_key(item) for item in POOL if rng.random() < 0.3}
    calls: Counter[Any] = Counter()
    path = tmp_path / "run.sqlite"

    async def fn(item: Any) -> Any:
        key = as_key(item)
        calls[key] += 1
        await asyncio.sleep(0)
        if key in failing:
            raise ValueError(repr(key))
        return result_of(item)

    def expected(item: Any) -> Any:
        key = as_key(item)
        return ("error", repr(key)) if key in failing else result_of(item)

    def outcome(value: Any) -> Any:
        return ("error", value.args[0]) if isinstance(value, ValueError) else value

    async def run_map(items: list[Any], stop_at: int | None) -> list[Any]:
        out: list[Any] = []
        async with corral.map(
            fn, items, limit=limit, ordered=ordered, return_exceptions=True, checkpoint=path
        ) as results:
            async for value in results:
                out.append(outcome(value))
                if stop_at is not None and len(out) >= stop_at:
                    results.cancel()
        return out

    with mock.patch.object(_engine, "CHUNK", rng.choice([1, 4, 32, 256])):
        for last in (False, False, True):
            done = set(recorded(path))
            calls.clear()
            stop_at = None if last else rng.randint(1, len(items) + 1)
            got = asyncio.run(run_map(items, stop_at))
            if last:
                assert (got if ordered else Counter(map(repr, got))) == (
                    list(map(expected, items))
                    if ordered
                    else Counter(map(repr, map(expected, items)))
                )
                assert set(calls) == {as_key(item) for item in items} - done
            elif ordered:
                assert got == list(map(expected, items[: len(got)]))
            else:
                assert not Counter(map(repr, got)) - Counter(map(repr, map(expected, items)))
            assert set(calls.values()) <= {1}, "an id was computed twice in one run"
            assert not set(calls) & done, "a recorded id was computed again"
            assert done <= set(recorded(path))
            # The next run: another order, some items left out, some added.
            items = items[: rng.randint(0, len(items))] + rng.sample(POOL, 5) + items
            rng.shuffle(items)


def test_a_file_with_nothing_recorded_takes_the_next_maps_fingerprint(tmp_path: Path) -> None:
    """The fingerprint guards recorded results: a first run that failed before
    recording any lets a fixed fn (another name, another serializer) use the file;
    once results are recorded, another fingerprint is refused again."""
    path = tmp_path / "run.sqlite"

    async def broken(item: int) -> int:
        raise RuntimeError(f"bug on {item}")

    async def fixed(item: int) -> int:
        return item * 2

    with pytest.raises(RuntimeError, match="bug on 0"):
        corral.run(broken, range(1), checkpoint=path)
    assert path.exists()
    assert recorded(path) == {}
    assert corral.run(fixed, range(4), checkpoint=path, serializer="json") == [0, 2, 4, 6]
    assert corral.run(fixed, range(4), checkpoint=path, serializer="json") == [0, 2, 4, 6]
    with pytest.raises(ValueError, match=r"was recorded with fingerprint .*fixed"):
        corral.run(broken, range(4), checkpoint=path, serializer="json")
    with pytest.raises(ValueError, match="was recorded with serializer='json'"):
        corral.run(fixed, range(4), checkpoint=path)
