"""checkpoint= combined with the other long-run features: unordered output, async
inputs, retries and timeouts, budgets, processes=N, a stop of any kind and a kill.

Each test stops a run (break, cancel(), a spent budget, SIGKILL) and resumes it,
then checks the contract: every item gets its id's one outcome, in input order
when ordered, and fn runs once per id that was not recorded.
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest

import corral
from _work import async_logged, complete_lines, logged_calls, run_killed
from corral._checkpoint_file import FAILED, read_checkpoint

SAME = "same results"  # a fingerprint shared by runs with different fns


def recorded(path: Path) -> dict[Any, tuple[int, Any]]:
    return {key: (kind, value) for key, kind, value in read_checkpoint(path)}


class Gated:
    """fn: ``x * 10`` for int items (or ``{"id": x}``); items of ``hold`` and above wait
    for ``gate``, which no test sets: they are in flight until the map stops them."""

    def __init__(self, hold: int = 10**9) -> None:
        self.calls: list[Any] = []
        self.hold = hold
        self.gate = asyncio.Event()

    async def __call__(self, item: Any) -> Any:
        x = item["id"] if isinstance(item, dict) else item
        self.calls.append(x)
        await asyncio.sleep(0)
        if x >= self.hold:
            await self.gate.wait()
        return x * 10


async def agen(xs: Iterable[Any]) -> AsyncIterator[Any]:
    for x in xs:
        await asyncio.sleep(0)
        yield x


async def test_an_unordered_run_left_by_break_resumes_ordered_with_another_limit(
    tmp_path: Path,
) -> None:
    """The first run hands out results as completed and is left by ``break``; the calls it
    had in flight are cancelled and not recorded; the resume (ordered, another limit)
    gives every result in input order and calls fn only for what was not recorded."""
    path = tmp_path / "run.sqlite"
    first = Gated(hold=6)
    got: list[int] = []
    async with corral.map(first, range(12), limit=8, ordered=False, checkpoint=path) as results:
        async for value in results:
            got.append(value)
            if len(got) == 6:
                break
    assert sorted(got) == [x * 10 for x in range(6)]
    assert set(recorded(path)) == set(range(6))  # the held calls were not recorded
    again = Gated()
    assert await corral.gather(again, range(12), limit=3, checkpoint=path) == [
        x * 10 for x in range(12)
    ]
    assert again.calls == list(range(6, 12))


async def test_an_async_input_cancelled_then_resumed_longer_and_shorter(tmp_path: Path) -> None:
    """An async iterable goes item by item (no screen): repeated ids share one call, a
    cancel keeps what was handed out, and a resume may read more or fewer items."""
    path = tmp_path / "run.sqlite"
    xs = [0, 1, 2, 1, 3, 0, 4, 5, 6, 7, 5]
    first = Gated(hold=5)
    got: list[int] = []
    async with corral.map(first, agen(xs), limit=4, checkpoint=path) as results:
        async for value in results:
            got.append(value)
            if len(got) == 7:  # every item before the first held one
                results.cancel()
    assert got == [x * 10 for x in xs[:7]]
    assert len(first.calls) == len(set(first.calls))
    assert {0, 1, 2, 3, 4} <= set(first.calls)
    assert set(recorded(path)) == {0, 1, 2, 3, 4}

    longer = [*xs, 8, 0, 9]
    again = Gated()
    assert await corral.gather(again, agen(longer), limit=2, checkpoint=path) == [
        x * 10 for x in longer
    ]
    assert sorted(again.calls) == [5, 6, 7, 8, 9]

    shorter = Gated()
    assert await corral.gather(shorter, agen(xs[:3]), checkpoint=path) == [0, 10, 20]
    assert shorter.calls == []


async def test_failures_of_repeated_ids_in_an_unordered_run_replay_without_a_call(
    tmp_path: Path,
) -> None:
    """With return_exceptions and ordered=False every occurrence of a failing id gets its
    failure, in both runs; the resume calls nothing; without return_exceptions the
    recorded failure ends the map as a fresh one would."""
    path = tmp_path / "run.sqlite"
    calls: list[int] = []

    async def odd_fails(x: int) -> int:
        calls.append(x)
        await asyncio.sleep(0)
        if x % 2:
            raise ValueError(x)
        return x

    xs = [1, 2, 1, 3, 2, 3, 4, 1]
    options: dict[str, Any] = {"checkpoint": path, "ordered": False, "limit": 3}

    def outcomes(results: list[Any]) -> Counter[str]:
        return Counter(map(repr, results))

    fresh = await corral.gather(odd_fails, xs, return_exceptions=True, **options)
    assert sorted(calls) == [1, 2, 3, 4]
    expected = outcomes([ValueError(x) if x % 2 else x for x in xs])
    assert outcomes(fresh) == expected
    assert {key: kind for key, (kind, _) in recorded(path).items()} == {
        1: FAILED,
        2: 0,
        3: FAILED,
        4: 0,
    }
    calls.clear()
    async with corral.map(odd_fails, xs, return_exceptions=True, **options) as results:
        assert outcomes([value async for value in results]) == expected
    assert calls == []
    with pytest.raises(ValueError, match=r"^(1|3)$"):
        await corral.gather(odd_fails, agen(xs), **options)
    assert calls == []


async def test_retried_and_timed_out_items_record_their_final_outcome_once(
    tmp_path: Path,
) -> None:
    """retries= and timeout= sit inside the checkpoint: an item that succeeded on a retry
    is recorded once with that result, one that timed out on every attempt is recorded
    (return_exceptions) as its TimeoutError, and a resume calls neither again."""
    path = tmp_path / "run.sqlite"
    attempts: Counter[int] = Counter()
    never = asyncio.Event()

    async def flaky(x: int) -> int:
        attempts[x] += 1
        if x == 3:
            await never.wait()  # every attempt times out
        if x % 2 and attempts[x] == 1:
            raise ConnectionError(x)
        return x * 10

    options: dict[str, Any] = {
        "checkpoint": path,
        "retries": corral.Retry(attempts=2, backoff=0.001),
        "timeout": 0.05,
        "return_exceptions": True,
        "ordered": False,
    }
    first = await corral.gather(flaky, range(6), **options)
    assert isinstance(first[3], TimeoutError)
    assert [r for i, r in enumerate(first) if i != 3] == [0, 10, 20, 40, 50]
    assert attempts == Counter({0: 1, 1: 2, 2: 1, 3: 2, 4: 1, 5: 2})
    assert recorded(path)[3][0] == FAILED
    attempts.clear()
    again = await corral.gather(flaky, range(6), **options)
    assert attempts == Counter()
    assert isinstance(again[3], TimeoutError)
    assert [r for i, r in enumerate(again) if i != 3] == [0, 10, 20, 40, 50]


async def test_repeated_ids_spend_no_budget_and_a_resume_keeps_what_was_spent(
    tmp_path: Path,
) -> None:
    """A repeat of an id replays (no call, no request of the budget): three ids in six
    items fit a budget of three requests; a map whose budget runs out mid-input hands
    out every result before the item that needed one more call, and its resume with a
    new budget calls only the ids left."""
    path = tmp_path / "run.sqlite"
    spy = Gated()
    xs = [1, 2, 3, 1, 2, 3]
    assert await corral.gather(spy, xs, limit=1, checkpoint=path, budget={"requests": 3}) == [
        x * 10 for x in xs
    ]
    assert spy.calls == [1, 2, 3]

    more = [*xs, 4, 1, 5, 6, 5]
    spy = Gated()
    got: list[int] = []
    with pytest.raises(corral.BudgetExhausted):
        async with corral.map(
            spy, more, limit=1, ordered=False, checkpoint=path, budget={"requests": 1}
        ) as results:
            async for value in results:
                got.append(value)
    assert spy.calls == [4]
    assert Counter(got) == Counter(x * 10 for x in more[:8])
    spy = Gated()
    assert await corral.gather(spy, more, checkpoint=path, budget={"requests": 2}) == [
        x * 10 for x in more
    ]
    assert spy.calls == [5, 6]


async def test_replayed_results_spend_no_tokens_of_a_budget(tmp_path: Path) -> None:
    """usage= is read from the calls made, not from recorded results or repeats: a
    resume over ten recorded items and five new ones (some repeated) fits a token budget
    of the five new calls."""
    path = tmp_path / "run.sqlite"
    calls: list[int] = []
    used: list[int] = []

    async def answer(x: int) -> dict[str, int]:
        calls.append(x)
        await asyncio.sleep(0)
        return {"n": x, "tokens": 100}

    def usage(result: dict[str, int]) -> dict[str, int]:
        used.append(result["n"])
        return {"output_tokens": result["tokens"]}

    options: dict[str, Any] = {
        "checkpoint": path,
        "usage": usage,
        "cost": lambda x: {"output_tokens": 100},
        "limit": 2,
    }
    await corral.gather(answer, range(10), budget={"output_tokens": 1000}, **options)
    calls.clear()
    used.clear()
    xs = [*range(15), 1, 12, 14, 0]
    got = await corral.gather(answer, xs, budget={"output_tokens": 500}, **options)
    assert [r["n"] for r in got] == xs
    assert calls == used == [10, 11, 12, 13, 14]


async def test_a_resume_with_another_fn_ignoring_the_fingerprint_keeps_order_and_ids(
    tmp_path: Path,
) -> None:
    """resume="ignore-fingerprint" with another fn, another limit and ordered=False after
    an ordered first run stopped by a deadline: the recorded results come back, the
    new fn runs only for the rest."""
    path = tmp_path / "run.sqlite"
    first = Gated(hold=4)
    got: list[int] = []
    with pytest.raises(corral.DeadlineExceeded):
        async with corral.map(first, range(8), limit=6, checkpoint=path, deadline=0.3) as results:
            async for value in results:
                got.append(value)
    # Items 0-3 finish at once, 4-7 never: a loaded machine may reach fewer by the deadline.
    assert got == [0, 10, 20, 30][: len(got)]
    done = set(recorded(path))
    assert set(range(len(got))) <= done <= {0, 1, 2, 3}
    calls: list[int] = []

    async def other(x: int) -> int:
        calls.append(x)
        return -x

    async with corral.map(
        other, range(8), limit=2, ordered=False, checkpoint=path, resume="ignore-fingerprint"
    ) as results:
        again = [value async for value in results]
    assert sorted(again) == sorted(x * 10 if x in done else -x for x in range(8))
    assert sorted(calls) == sorted(set(range(8)) - done)


def test_processes_with_an_async_input_and_item_id_resume_after_cancel(tmp_path: Path) -> None:
    """processes=2: the parent pulls an async input, screens ids from item_id=, records
    and replays; a cancel keeps what was handed out and the resume calls the rest."""
    path = tmp_path / "run.sqlite"
    log = tmp_path / "calls.log"
    # async_logged returns x * x for (log, x); the id x % 20 repeats each id once.
    xs = list(range(40))

    async def source() -> AsyncIterator[tuple[str, int]]:
        for x in xs:
            yield (str(log), x)

    def ident(arg: tuple[str, int]) -> int:
        return arg[1] % 20

    async def first() -> list[int]:
        got: list[int] = []
        async with corral.map(
            async_logged, source(), processes=2, limit=4, checkpoint=path, item_id=ident
        ) as results:
            async for value in results:
                got.append(value)
                if len(got) == 10:
                    results.cancel()
        return got

    got = asyncio.run(first())
    assert got[:10] == [x * x for x in range(10)]
    done = set(recorded(path))
    assert set(range(10)) <= done
    log.unlink()
    again = asyncio.run(
        corral.gather(async_logged, source(), processes=2, limit=4, checkpoint=path, item_id=ident)
    )
    # The second twenty items repeat the first twenty's ids: their results.
    assert again == [(x % 20) ** 2 for x in xs]
    called = [x for _, x in logged_calls(log)]
    assert sorted(called) == sorted(set(range(20)) - done)


_KILLED_RUN = textwrap.dedent(
    """
    import asyncio, os, sys
    import corral

    path, calls_file, out_file = sys.argv[1:4]
    never = asyncio.Event()

    def append(name, x):
        fd = os.open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, b"%d\\n" % x)
        finally:
            os.close(fd)

    async def fn(item):
        x = item["id"]
        append(calls_file, x)
        for _ in range(x % 3):
            await asyncio.sleep(0)
        if x >= 1000:
            await never.wait()  # the run never ends: it is killed
        if x % 7 == 3:
            raise ValueError(x)
        return x

    async def source():
        for k in range(600):
            yield {"id": k % 400}
        for k in range(50):
            yield {"id": 1000 + k}

    async def main():
        async with corral.map(fn, source(), limit=20, ordered=False, return_exceptions=True,
                              checkpoint=path, item_id=lambda item: item["id"],
                              fingerprint="killed") as results:
            async for value in results:
                append(out_file, value.args[0] if isinstance(value, ValueError) else value)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("target", [1, 150, 560])
def test_a_killed_unordered_async_run_with_failures_resumes_exactly_once(
    tmp_path: Path, target: int
) -> None:
    """SIGKILL during an unordered map over an async input with item_id=, repeated ids
    and recorded failures: every outcome handed out was recorded, no id was called
    twice, and the resume calls exactly the ids the file lacks, giving each item its
    id's outcome."""
    script = tmp_path / "run.py"
    script.write_text(_KILLED_RUN)
    path, calls_file, out_file = tmp_path / "run.sqlite", tmp_path / "calls", tmp_path / "out"
    run_killed(
        [sys.executable, str(script), str(path), str(calls_file), str(out_file)],
        lambda: len(complete_lines(out_file)),
        target,
        context=f"killed after {target} results",
    )
    calls, out = complete_lines(calls_file), complete_lines(out_file)
    assert len(calls) == len(set(calls)), "an id was called twice"
    rows = recorded(path)
    assert set(out) <= set(rows), "a result was handed out, not recorded"
    assert all((kind == FAILED) == (x % 7 == 3) for x, (kind, _) in rows.items())

    ids = [k % 400 for k in range(600)] + [1000 + k for k in range(50)]
    again: list[int] = []

    async def fn(item: dict[str, int]) -> int:
        x = item["id"]
        again.append(x)
        if x % 7 == 3:
            raise ValueError(x)
        return x

    resumed: list[Any] = asyncio.run(
        corral.gather(
            fn,
            agen({"id": x} for x in ids),
            return_exceptions=True,
            checkpoint=path,
            item_id=lambda item: item["id"],
            fingerprint="killed",
        )
    )
    assert [r.args[0] if isinstance(r, ValueError) else r for r in resumed] == ids
    assert sorted(again) == sorted(set(ids) - set(rows))


class Unprintable(Exception):
    """A failure whose ``str()`` raises and whose pickle does not load back."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(code)
        self.detail = detail

    def __str__(self) -> str:
        raise RuntimeError("no text")


@pytest.mark.parametrize("serializer", ["pickle", "json"])
async def test_a_failure_whose_str_raises_is_recorded_and_replayed(
    tmp_path: Path, serializer: str
) -> None:
    """With return_exceptions the failure takes its item's place, as without checkpoint=,
    and replays as a RecordedFailure, not as the error its str() raised."""
    path = tmp_path / "run.sqlite"

    async def fails_at_2(x: int) -> int:
        await asyncio.sleep(0)
        if x == 2:
            raise Unprintable(x, "teapot")
        return x

    options: dict[str, Any] = {
        "checkpoint": path,
        "return_exceptions": True,
        "serializer": serializer,
        "fingerprint": SAME,
    }
    first = await corral.gather(fails_at_2, range(4), **options)
    assert isinstance(first[2], Unprintable)
    assert first[:2] + first[3:] == [0, 1, 3]
    spy = Gated()
    again = await corral.gather(spy, range(4), **options)
    assert spy.calls == []
    failure = again[2]
    assert isinstance(failure, corral.RecordedFailure)
    assert failure.type_name == f"{__name__}.Unprintable"
    assert failure.message == "<exception str() failed>"


@pytest.mark.parametrize("parent", ["missing", "a-file"])
async def test_a_checkpoint_in_a_missing_directory_says_the_directory_is_missing(
    tmp_path: Path, parent: str
) -> None:
    """SQLite's own words ("unable to open database file") do not say why: the error
    names checkpoint= and the directory that does not exist (or is a file)."""
    (tmp_path / "a-file").write_text("")
    path = tmp_path / parent / "run.sqlite"
    spy = Gated()
    with pytest.raises(OSError) as caught:
        await corral.gather(spy, range(3), checkpoint=path)
    why = "does not exist" if parent == "missing" else "is not a directory"
    assert str(caught.value).startswith(
        f"checkpoint={str(path)!r} cannot be opened: its directory {str(path.parent)!r} {why}"
    )
    assert spy.calls == []
