"""The engine against DESIGN.md's guarantees, through the public API only.

Here the test keeps the schedule: every call waits until the test ends it
(with its value or its error), in an order hypothesis picks, while the
consumer reads, breaks, raises, is cancelled or has its read interrupted at
points hypothesis picks too. No sleep decides anything: a map that stops
making progress fails the test after a bounded number of loop iterations.
After these schedules: a close started by ``fn`` itself, reads cut short,
inputs fed by the results or failing midway, and timeouts per attempt.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import corral
from _loops import LOOP_KINDS, run

#: Loop iterations with no call to end and no consumer done before the map
#: counts as stuck (a real map needs a handful).
IDLE_LIMIT = 1_000
#: Schedule steps at most in one example (each ends a call or lets the loop run).
STEP_LIMIT = 5_000


class Boom(Exception):
    """What a call planned to fail raises; carries its item."""

    def __init__(self, item: int) -> None:
        super().__init__(item)
        self.item = item


class InputBroke(Exception):
    """What the input raises instead of an item."""


class Reset(ConnectionResetError):
    """What a flaky call's first attempt raises (transient: retried); carries its item."""

    def __init__(self, item: int) -> None:
        super().__init__(item)
        self.item = item


def key_of(result: object) -> int:
    """The item a delivered result (a value, a Boom or a Reset) belongs to."""
    if isinstance(result, Boom | Reset):
        return result.item
    assert isinstance(result, int), result
    return result


@dataclass
class Calls:
    """``fn`` whose calls end when the test says so.

    ``outcomes`` (cycled over the items): ``"wait"``/``"wait-fail"`` wait for
    the test, then return the item or raise ``Boom``; ``"now"``/``"now-fail"``
    do so without suspending at all; ``"flaky"``: the first attempt raises
    ``Reset`` at once, a retry waits for the test and returns the item.
    """

    outcomes: list[str]
    retries: int
    attempts: dict[int, int] = field(default_factory=dict)
    waiting: dict[int, asyncio.Future[None]] = field(default_factory=dict)
    started: list[int] = field(default_factory=list)
    returned: int = 0
    raised: int = 0
    cancelled: int = 0
    running: int = 0
    peak: int = 0

    def outcome(self, item: int) -> str:
        return self.outcomes[item % len(self.outcomes)]

    def expected(self, item: int) -> type:
        """The type of the result item must have (when it has one)."""
        kind = self.outcome(item)
        if kind.endswith("fail"):
            return Boom
        return Reset if kind == "flaky" and self.retries == 0 else int

    async def __call__(self, item: int) -> int:
        self.started.append(item)
        attempt = self.attempts[item] = self.attempts.get(item, 0) + 1
        kind = self.outcome(item)
        if kind == "flaky" and attempt == 1:
            if self.retries == 0:
                self.raised += 1  # the item's last attempt
            raise Reset(item)
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            if kind == "flaky" or kind.startswith("wait"):
                assert item not in self.waiting, f"item {item} called twice at once"
                future = asyncio.get_running_loop().create_future()
                self.waiting[item] = future
                try:
                    await future
                finally:
                    del self.waiting[item]
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1
        if kind.endswith("fail"):
            self.raised += 1
            raise Boom(item)
        self.returned += 1
        return item


@dataclass
class Input:
    """The map's input, counting what was pulled and how far ahead of the consumer."""

    kind: str  # "range", "iter" (a generator) or "agen" (an async generator)
    size: int | None  # None: endless
    breaks_at: int | None  # the input raises InputBroke instead of this item
    pauses: frozenset[int]  # an async input suspends before these items
    pulled: int = 0
    consumed: int = 0  # results the consumer has taken (map only)
    ahead: int = 0  # the most pulled - consumed ever seen
    opened: bool = False  # an async input's body ran (else there is nothing to close)
    closed: bool = False

    def indices(self) -> Iterable[int]:
        return itertools.count() if self.size is None else range(self.size)

    def _pull(self, i: int) -> int:
        if i == self.breaks_at:
            raise InputBroke(f"the input broke at {i}")
        self.pulled += 1
        self.ahead = max(self.ahead, self.pulled - self.consumed)
        return i

    def _sync(self) -> Iterator[int]:
        for i in self.indices():
            yield self._pull(i)

    async def _async(self) -> AsyncIterator[int]:
        self.opened = True
        try:
            for i in self.indices():
                if i in self.pauses:
                    await asyncio.sleep(0)
                yield self._pull(i)
        finally:
            self.closed = True

    def source(self) -> Iterable[int] | AsyncIterator[int]:
        if self.kind == "range":
            assert self.size is not None
            assert self.breaks_at is None
            return range(self.size)
        return self._sync() if self.kind == "iter" else self._async()

    def lookahead_bound(self, limit: int) -> int:
        """How far ahead of the consumer the input may be pulled (Guarantee 2).

        A worker holds at most one item it has not started; it starts item
        ``i`` only while ``i < consumed + 2 * limit`` (the window); an async
        input is also read ahead into a buffer of up to ``limit`` items, plus
        the one its feeder is handing over.
        """
        bound = 3 * limit
        return bound + limit + 1 if self.kind == "agen" else bound


@dataclass
class Case:
    form: str  # "map" or "gather"
    limit: int
    ordered: bool
    reader: str  # "for": async for; "task": each read in a task the schedule may cancel
    return_exceptions: bool  # False: the first failure ends the run, raised as itself
    stop: str  # "none", "break", "raise", "cancel_task", "cancel_map"
    stop_after: int  # results read before the consumer stops itself
    pause: int  # loop iterations the consumer spends on each result
    retries: int  # retries= of the map (flaky items need one)
    cancel_at: int | None  # schedule step at which the consuming task is cancelled
    interrupts: frozenset[int]  # schedule steps at which a pending read is cancelled


class ConsumerFailed(Exception):
    """What the consumer raises from its loop body (``stop="raise"``)."""


def _check_case(
    case: Case, inp: Input, outcomes: list[str], data: st.DataObject, kind: str
) -> None:
    """Run one schedule on a fresh loop of ``kind`` and check every guarantee."""
    calls = Calls(outcomes, case.retries)
    # Backoff 0: a retry follows at once (the schedule has no clock); no
    # budget: every flaky item may retry.
    retries = corral.Retry(attempts=case.retries + 1, backoff=0, jitter=False, budget=None)
    seen: list[object] = []
    reading: list[asyncio.Task[object]] = []
    gathered: list[object] | None = None

    async def read(results: corral.ResultStream[int]) -> bool:
        """Take the next result (False at the end), noting it at once."""
        try:
            got = await anext(results)
        except StopAsyncIteration:
            return False
        seen.append(got)
        inp.consumed = len(seen)
        return True

    # Made before its consumer starts: a consumer cancelled before its first
    # step leaves a map never entered.
    source = inp.source()
    results = corral.map(
        calls,
        source,
        limit=case.limit,
        ordered=case.ordered,
        return_exceptions=case.return_exceptions,
        retries=retries,
    )

    async def consume_map() -> None:
        async with results:
            while True:
                if case.reader == "for":
                    if not await read(results):
                        return
                else:
                    reader = asyncio.ensure_future(read(results))
                    reading.append(reader)
                    try:
                        await asyncio.wait({reader})
                    finally:
                        if not reader.done():  # this task is cancelled: the read too
                            reader.cancel()
                            await asyncio.wait({reader})
                    if reader.cancelled():
                        continue  # an interrupted read: read again
                    if not reader.result():
                        return
                for _ in range(case.pause):
                    await asyncio.sleep(0)
                if len(seen) == case.stop_after:
                    if case.stop == "break":
                        return
                    if case.stop == "raise":
                        raise ConsumerFailed
                    if case.stop == "cancel_task":
                        task = asyncio.current_task()
                        assert task is not None
                        task.cancel()
                        await asyncio.sleep(0)
                    if case.stop == "cancel_map":
                        results.cancel()

    async def consume_gather() -> None:
        nonlocal gathered
        gathered = await corral.gather(
            calls,
            source,
            limit=case.limit,
            ordered=case.ordered,
            return_exceptions=case.return_exceptions,
            retries=retries,
        )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        consumer = loop.create_task(consume_map() if case.form == "map" else consume_gather())
        idle = 0
        for step in range(STEP_LIMIT):
            if consumer.done():
                break
            if step == case.cancel_at:
                consumer.cancel()
            if step in case.interrupts and reading and not reading[-1].done():
                reading[-1].cancel()
            # A call being cancelled is still in ``waiting`` until it resumes.
            endable = sorted(i for i, f in calls.waiting.items() if not f.done())
            if endable:
                idle = 0
                item = data.draw(st.sampled_from(endable), label="end")
                calls.waiting[item].set_result(None)
                for _ in range(data.draw(st.integers(0, 2), label="yields")):
                    await asyncio.sleep(0)
            else:
                idle += 1
                assert idle < IDLE_LIMIT, "the map made no progress: it hangs"
                await asyncio.sleep(0)
        else:
            pytest.fail("the schedule did not end")
        error: BaseException | None = None
        try:
            await consumer
        except BaseException as exc:
            error = exc

        # Guarantee 3: nothing the map started is left, no call is running.
        assert asyncio.all_tasks() == {asyncio.current_task()}
        assert calls.waiting == {}
        assert calls.running == 0
        if inp.opened:
            assert inp.closed, "the async input was not closed"
        # Guarantee 4: never more than limit calls at once.
        assert calls.peak <= case.limit
        # Guarantee 1: no item is called more often than its retries allow,
        # and only a flaky one more than once.
        for item, attempts in calls.attempts.items():
            assert attempts <= 1 + case.retries
            assert attempts == 1 or calls.outcome(item) == "flaky"
        check_results(error)

    def check_results(error: BaseException | None) -> None:
        if isinstance(error, Boom | Reset):
            # The first failure, raised as itself: only without return_exceptions.
            assert not case.return_exceptions
            assert calls.expected(error.item) is type(error)
            assert error.item in calls.attempts
        failed = isinstance(error, InputBroke | Boom | Reset)
        if isinstance(error, InputBroke):
            assert inp.breaks_at is not None
        if case.form == "gather":
            if error is None:
                assert gathered is not None
                n = inp.size
                assert n is not None
                assert inp.breaks_at is None or inp.breaks_at >= n
                assert [key_of(r) for r in gathered] == list(range(n))
                assert [type(r) for r in gathered] == [calls.expected(i) for i in range(n)]
            else:
                assert failed or isinstance(error, asyncio.CancelledError), error
            return

        keys = [key_of(r) for r in seen]
        assert len(set(keys)) == len(keys), f"a result was handed out twice: {keys}"
        assert set(keys) <= set(calls.started), "a result for an item never called"
        for r in seen:
            assert type(r) is calls.expected(key_of(r)), r
        if not case.return_exceptions:
            assert all(type(r) is int for r in seen), "a failure handed out, not raised"
        if case.ordered:
            assert keys == list(range(len(keys))), f"out of order: {keys}"
        # Guarantee 2: the input is pulled lazily, O(limit) ahead of the consumer.
        assert inp.ahead <= inp.lookahead_bound(case.limit), (inp.ahead, case.limit)

        stats = results.stats
        assert stats.in_flight == 0
        assert stats.started == len(calls.attempts), (stats, calls.attempts)
        assert stats.completed == calls.returned, (stats, calls.returned)
        assert stats.failed == calls.raised, (stats, calls.raised)
        retried = sum(attempts - 1 for attempts in calls.attempts.values())
        flaky = sum(calls.outcome(item) == "flaky" for item in calls.attempts)
        assert retried <= stats.retried <= (flaky if case.retries else 0), (stats, retried)

        reached_stop = case.stop != "none" and len(seen) >= case.stop_after
        if isinstance(error, InputBroke):
            assert inp.breaks_at is not None
            assert set(keys) <= set(range(inp.breaks_at))
        elif error is None and not reached_stop:
            # Read to the end: every item of a finite input, once.
            assert inp.size is not None
            n = inp.size if inp.breaks_at is None else min(inp.size, inp.breaks_at)
            assert inp.breaks_at is None or inp.breaks_at >= inp.size
            assert sorted(keys) == list(range(n))
        else:
            assert failed or reached_stop or case.cancel_at is not None, error
            if isinstance(error, ConsumerFailed):
                assert case.stop == "raise"

    run(main, kind)


OUTCOMES = st.lists(
    st.sampled_from(["wait", "wait-fail", "now", "now-fail", "flaky"]), min_size=1, max_size=7
)


@st.composite
def inputs(draw: st.DrawFn, *, endless: bool) -> Input:
    kind = draw(st.sampled_from(["range", "iter", "agen"]))
    size = None if endless and kind != "range" else draw(st.integers(0, 24))
    breaks_at = None if kind == "range" else draw(st.none() | st.integers(0, 24))
    pauses = (
        frozenset(draw(st.sets(st.integers(0, 24), max_size=6))) if kind == "agen" else frozenset()
    )
    return Input(kind, size, breaks_at, pauses)


@st.composite
def cases(draw: st.DrawFn, *, form: str, endless: bool = False) -> Case:
    stops = ["none", "break", "raise", "cancel_task", "cancel_map"] if form == "map" else ["none"]
    stop = draw(st.sampled_from(stops[1:] if endless else stops))
    return Case(
        form=form,
        limit=draw(st.integers(1, 8)),
        ordered=draw(st.booleans()),
        reader=draw(st.sampled_from(["for", "task"])),
        return_exceptions=draw(st.booleans()),
        stop=stop,
        stop_after=draw(st.integers(1, 20)),
        pause=draw(st.integers(0, 2)),
        retries=draw(st.integers(0, 1)),
        cancel_at=draw(st.none() | st.integers(0, 60)),
        interrupts=frozenset(draw(st.sets(st.integers(0, 60), max_size=8))),
    )


@settings(max_examples=150, deadline=None)
@given(
    case=cases(form="map"),
    inp=inputs(endless=False),
    outcomes=OUTCOMES,
    kind=st.sampled_from(LOOP_KINDS),
    data=st.data(),
)
def test_map_hands_out_each_item_once_whatever_the_schedule(
    case: Case, inp: Input, outcomes: list[str], kind: str, data: st.DataObject
) -> None:
    """Calls end in any order, some fail, the consumer stops or is cancelled
    anywhere: each result at most once (all of them if nobody stopped), in
    order when asked, never more than limit calls, the input O(limit) ahead,
    nothing left running, stats that match what the calls did."""
    _check_case(case, inp, outcomes, data, kind)


@settings(max_examples=60, deadline=None)
@given(
    case=cases(form="map", endless=True),
    inp=inputs(endless=True),
    outcomes=OUTCOMES,
    kind=st.sampled_from(LOOP_KINDS),
    data=st.data(),
)
def test_an_endless_input_stops_with_its_consumer(
    case: Case, inp: Input, outcomes: list[str], kind: str, data: st.DataObject
) -> None:
    """An endless input: the consumer breaks, raises, cancels the map or is cancelled."""
    _check_case(case, inp, outcomes, data, kind)


@settings(max_examples=60, deadline=None)
@given(
    case=cases(form="gather"),
    inp=inputs(endless=False),
    outcomes=OUTCOMES,
    kind=st.sampled_from(LOOP_KINDS),
    data=st.data(),
)
def test_gather_returns_each_item_once_whatever_the_schedule(
    case: Case, inp: Input, outcomes: list[str], kind: str, data: st.DataObject
) -> None:
    """gather: one result per item in input order, or the input's error, or
    cancelled anywhere with nothing left running."""
    _check_case(case, inp, outcomes, data, kind)


# -- leaving while a call still runs -----------------------------------------------


def _map_tasks(*mine: asyncio.Task[Any] | None) -> set[asyncio.Task[Any]]:
    """The tasks alive now, but the test's own."""
    return asyncio.all_tasks() - set(mine)


async def test_a_close_fn_started_itself_still_waits_for_that_call() -> None:
    """fn closes its own map and goes on waiting: the close cancels that call
    too, and leaving ``async with`` waits for it to end, as for any other call,
    instead of leaving it running. (On the eager loop, item 0's call runs in
    its worker's first step.)"""
    closed_by_fn = asyncio.Event()
    cut: list[int] = []
    main = asyncio.current_task()

    async def work(item: int) -> int:
        try:
            if item == 0:
                await results.aclose()  # returns at once: a call cannot await its own end
                closed_by_fn.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cut.append(item)
            raise
        return item

    results = corral.map(work, range(10), limit=2)
    left_with: set[asyncio.Task[Any]] = set()

    async def consume() -> None:
        async with results:
            await closed_by_fn.wait()
        left_with.update(_map_tasks(main, asyncio.current_task()))

    async with asyncio.timeout(60):  # hang guard, not the assertion
        await asyncio.create_task(consume())
    assert left_with == set(), f"left the map while these ran: {left_with}"
    assert 0 in cut
    assert set(cut) <= {0, 1}  # item 1 may not have started
    assert _map_tasks(main) == set()
    assert results.stats.in_flight == 0


async def test_a_read_pending_in_another_task_ends_when_the_map_is_closed() -> None:
    """A read waiting in one task while another closes the map ends quietly, not never."""
    gate = asyncio.Event()

    async def held(item: int) -> int:
        await gate.wait()
        return item

    async with asyncio.timeout(60):  # hang guard, not the assertion
        async with corral.map(held, range(10), limit=3) as results:
            reader = asyncio.create_task(anext(results))
            for _ in range(5):
                await asyncio.sleep(0)  # the read waits
            await results.aclose()
            with pytest.raises(StopAsyncIteration):
                await reader
    assert _map_tasks(asyncio.current_task()) == set()


async def test_a_consumer_whose_reads_time_out_loses_no_result() -> None:
    """``asyncio.timeout`` around each read (a heartbeat while waiting): a read
    cut short takes nothing, the next one gets the result."""
    gates: dict[int, asyncio.Event] = {}

    async def held(item: int) -> int:
        gates[item] = asyncio.Event()
        await gates[item].wait()
        return item

    got: list[int] = []
    cut = 0
    async with corral.map(held, range(6), limit=3, ordered=False) as results:
        for _ in range(100):
            if len(got) == 6:
                break
            try:
                async with asyncio.timeout(0):  # already due: cut at the read's first wait
                    got.append(await anext(results))
            except TimeoutError:
                cut += 1
                # The newest call waiting ends while no read waits.
                waiting = [i for i, gate in gates.items() if not gate.is_set()]
                if waiting:
                    gates[max(waiting)].set()
    assert sorted(got) == list(range(6))
    assert cut >= 6


# -- inputs ------------------------------------------------------------------------


async def test_an_input_fed_by_the_results_runs_to_its_end() -> None:
    """A crawl: the input waits for results to know its next item; the map
    must not wait for more input before handing over what it has."""
    found: asyncio.Queue[int | None] = asyncio.Queue()

    async def pages() -> AsyncIterator[int]:
        yield 0
        while (page := await found.get()) is not None:
            yield page

    async def fetch(page: int) -> int:
        await asyncio.sleep(0)
        return page

    got: list[int] = []
    async with asyncio.timeout(60):  # hang guard, not the assertion
        async with corral.map(fetch, pages(), limit=4) as results:
            async for page in results:
                got.append(page)
                found.put_nowait(page + 1 if page < 30 else None)
    assert got == list(range(31))


@pytest.mark.parametrize("use_uvloop", [False, True] if "uvloop" in LOOP_KINDS else [False])
def test_run_raises_an_async_inputs_error_and_closes_the_input(use_uvloop: bool) -> None:
    """corral.run from sync code: the error of an async generator raising
    midway, raised as itself, with the generator closed and no call left."""
    state = {"closed": False, "running": 0}

    async def items() -> AsyncIterator[int]:
        try:
            for i in range(50):
                await asyncio.sleep(0)
                if i == 17:
                    raise OSError("the feed broke")
                yield i
        finally:
            state["closed"] = True

    async def work(item: int) -> int:
        state["running"] += 1
        try:
            await asyncio.sleep(0)
        finally:
            state["running"] -= 1
        return item

    with pytest.raises(OSError, match="the feed broke"):
        corral.run(work, items(), limit=4, return_exceptions=True, uvloop=use_uvloop)
    assert state == {"closed": True, "running": 0}


# -- timeouts: per attempt, only the call -----------------------------------------

EAGER_OR_NOT = [kind for kind in LOOP_KINDS if kind in ("asyncio", "eager")]


@pytest.mark.parametrize("kind", EAGER_OR_NOT)
def test_a_timeout_does_not_count_the_wait_for_a_shared_limit_or_the_rate(kind: str) -> None:
    """timeout=1 with calls of 0.8 s: none times out, however long each waits
    for the shared Limiter's slot or for the rate to let it start."""

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def slowish(item: int) -> int:
            await asyncio.sleep(0.8)
            return item

        shared = corral.Limiter(limit=1)
        t0 = loop.time()
        assert await corral.gather(slowish, range(4), limit=shared, timeout=1) == [0, 1, 2, 3]
        assert loop.time() - t0 == pytest.approx(3.2)  # one at a time, none cut
        t0 = loop.time()
        assert await corral.gather(slowish, range(4), limit=4, rate=1, timeout=1) == [0, 1, 2, 3]
        assert loop.time() - t0 == pytest.approx(3.8)  # starts at 0, 1, 2 and 3 s

    run(main, kind, virtual_time=True)


@pytest.mark.parametrize("kind", EAGER_OR_NOT)
@pytest.mark.parametrize("ordered", [True, False])
def test_a_timed_out_call_takes_its_items_place_and_frees_its_worker(
    kind: str, ordered: bool
) -> None:
    """With return_exceptions, a call that never ends yields TimeoutError after
    exactly the timeout; the others (some ending without suspending) are
    unaffected, and the worker it held goes on to the next item."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ended: dict[int, float] = {}

        async def work(item: int) -> int:
            if item % 3 == 0:
                await asyncio.Event().wait()  # never ends
            elif item % 3 == 1:
                await asyncio.sleep(0.5)
            ended[item] = loop.time()
            return item

        got: list[object] = []
        async with corral.map(
            work, range(9), limit=2, timeout=1, ordered=ordered, return_exceptions=True
        ) as results:
            async for r in results:
                got.append(r)
        by_item = dict(enumerate(got)) if ordered else None
        timed_out = [r for r in got if isinstance(r, TimeoutError)]
        assert len(timed_out) == 3
        assert sorted(r for r in got if isinstance(r, int)) == [1, 2, 4, 5, 7, 8]
        if by_item is not None:
            assert all(isinstance(by_item[i], TimeoutError) == (i % 3 == 0) for i in range(9))
        stats = results.stats
        assert (stats.started, stats.completed, stats.failed, stats.in_flight) == (9, 6, 3, 0)
        # Two workers: 0 (cut at 1 s) and 1 (0.5 s) start at once, 2 at 0.5 s,
        # 3 at 0.5 s (cut at 1.5 s), 4 at 1 s (ends at 1.5 s), 5 at 1.5 s ...
        assert ended[1] == pytest.approx(0.5)
        assert max(ended.values()) <= 4.0
        assert asyncio.all_tasks() == {asyncio.current_task()}

    run(main, kind, virtual_time=True)


@pytest.mark.parametrize("kind", EAGER_OR_NOT)
@pytest.mark.parametrize("first", ["timeout", "cancel"])
def test_a_consumer_cancelled_as_a_timeout_falls_due_is_cancelled(kind: str, first: str) -> None:
    """The consumer is cancelled at the very moment the calls' timeout falls
    due (either callback first): it ends cancelled, no TimeoutError is
    handed out or raised, and nothing is left running."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        seen: list[object] = []

        async def hang(item: int) -> int:
            await asyncio.Event().wait()
            return item

        async def consume() -> None:
            async with corral.map(hang, range(4), limit=2, timeout=1, return_exceptions=True) as r:
                async for value in r:
                    seen.append(value)

        due = loop.time() + 1  # when the calls' timeout falls due (they start now)
        consumer = loop.create_task(consume())
        if first == "cancel":
            loop.call_at(due, consumer.cancel)  # scheduled before the calls' timers
        else:
            for _ in range(5):
                await asyncio.sleep(0)  # the calls start, their timers first
            assert loop.time() < due
            loop.call_at(due, consumer.cancel)
        with pytest.raises(asyncio.CancelledError):
            await consumer
        assert seen == []
        assert asyncio.all_tasks() == {asyncio.current_task()}

    run(main, kind, virtual_time=True)
