"""The public contract of map / gather / run: argument checking and ``stats``, from outside.

Bad input fails at once, the same way through ``corral.map`` (at the call),
``corral.gather`` and ``corral.run``, before any call of ``fn``, with a
TypeError or ValueError naming the argument and showing the value. ``stats``
snapshots are consistent at every moment a consumer, ``fn`` or a
``progress=`` function can see one, and the final one adds up.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import fields
from typing import Any

import pytest

import corral
from _work import async_square
from corral import _api, _progress
from corral._engine import _Retried
from corral._shard import check_shardable

NAN = float("nan")
INF = float("inf")

STATS_FIELDS = [
    "started",
    "completed",
    "failed",
    "retried",
    "in_flight",
    "elapsed",
    "throughput",
    "limit",
    "latency_p50",
    "latency_p90",
    "latency_p99",
    "max_loop_lag",
]


# ---------------------------------------------------------------------------
# 1. Bad arguments: at once, by name and value, alike in map, gather and run
# ---------------------------------------------------------------------------


class Started(Exception):
    """A map on processes or Ray got as far as starting: its arguments were taken."""


class NeverRuns:
    """Stands for the worker processes or Ray actors behind an engine in this process."""

    def __init__(self) -> None:
        self.retried = _Retried()

    def __call__(self, item: object) -> Any:
        raise Started

    async def close(self, clean: bool) -> None:
        pass

    def abandon(self) -> None:
        pass

    def unstarted(self) -> int:
        return 0


@pytest.fixture
def nothing_starts(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Calls of fn in this process; worker processes and Ray clusters are never started.

    What processes=N checks before it starts (check_shardable) still runs.
    """

    def map_sharded(fn: Any, items: object, *, limit: object, retry: Any, **_: object) -> Any:
        check_shardable(fn, limit, retry)
        raise Started

    def sharded_call(fn: Any, *, limit: object, retry: Any, **_: object) -> NeverRuns:
        check_shardable(fn, limit, retry)
        return NeverRuns()  # an engine here in front: its own checks come next

    def map_on_ray(*args: object, **kwargs: object) -> Any:
        raise Started

    def ray_call(*args: object, **kwargs: object) -> NeverRuns:
        return NeverRuns()

    for replacement in (map_sharded, sharded_call, map_on_ray, ray_call):
        monkeypatch.setattr(_api, replacement.__name__, replacement)
    monkeypatch.delenv("CORRAL_MONITOR", raising=False)
    return []


def _recorder(calls: list[object], *, plain: bool = False) -> Callable[[Any], Any]:
    if plain:

        def record_plain(item: Any) -> Any:
            calls.append(item)
            return item

        return record_plain

    async def record(item: Any) -> Any:
        calls.append(item)
        return item

    return record


def _refusals(fn: Callable[..., Any], options: dict[str, Any]) -> list[BaseException]:
    """What map (at the call), gather and run raise for ``options``; each must raise."""
    raised: list[BaseException] = []
    for caller in ("map", "gather", "run"):
        try:
            if caller == "map":
                stream = corral.map(fn, range(3), **options)
                # Refused at the call, before there is a stream to enter.
                raise AssertionError(f"corral.map() took {options!r}, returned {stream!r}")
            if caller == "gather":
                asyncio.run(corral.gather(fn, range(3), **options))
            else:
                corral.run(fn, range(3), **options)
        except (TypeError, ValueError) as exc:
            raised.append(exc)
        except Started:
            raise AssertionError(f"corral.{caller}() took {options!r} and started") from None
        else:
            raise AssertionError(f"corral.{caller}() ran with {options!r}")
    return raised


def _shows(name: str, value: object) -> str:
    return f"{name}={value!r}"


LOCAL_REFUSALS: list[tuple[str, object]] = [
    # limit: an int >= 1, None, "auto", an Adaptive or a Limiter
    ("limit", NAN),
    ("limit", INF),
    ("limit", False),
    ("limit", -1),
    ("limit", ""),
    ("limit", "10"),
    ("limit", 1.0),
    # rate
    ("rate", NAN),
    ("rate", INF),
    ("rate", -INF),
    ("rate", True),
    ("rate", False),
    ("rate", ""),
    ("rate", "0/s"),
    ("rate", "-5/s"),
    ("rate", "5/0s"),
    ("rate", "nan/s"),
    ("rate", []),
    ("rate", [None]),
    ("rate", {}),
    # flags
    ("ordered", None),
    ("ordered", 0),
    ("ordered", ""),
    ("return_exceptions", None),
    ("return_exceptions", 0),
    ("return_exceptions", "yes"),
    # seconds
    ("timeout", ""),
    ("timeout", -INF),
    ("deadline", ""),
    # retries: an int >= 0 or a Retry
    ("retries", True),
    ("retries", False),
    ("retries", 2.5),
    ("retries", NAN),
    ("retries", INF),
    ("retries", ""),
    ("retries", "3"),
    # budget: a non-empty dict of finite amounts >= 0
    ("budget", 5),
    ("budget", 0),
    ("budget", ""),
    ("budget", {}),
    ("budget", [("requests", 5)]),
    ("budget", {"requests": -1}),
    ("budget", {"requests": NAN}),
    ("budget", {"requests": INF}),
    ("budget", {"requests": True}),
    ("budget", {"requests": "5"}),
    ("budget", {"": 5}),
    ("budget", {1: 5}),
    # cost= and usage=: functions
    ("cost", 5),
    ("cost", ""),
    ("cost", True),
    ("usage", 5),
    ("usage", {"tokens": 1}),
    # progress: a bool or a function
    ("progress", None),
    ("progress", 0),
    ("progress", 1),
    ("progress", ""),
    ("progress", "yes"),
    # monitor: a bool or a threshold in seconds >= 1 ms
    ("monitor", None),
    ("monitor", 0),
    ("monitor", 0.0),
    ("monitor", ""),
    ("monitor", "yes"),
    # checkpoint: a non-empty path
    ("checkpoint", 0),
    ("checkpoint", ""),
    ("checkpoint", True),
    ("checkpoint", b"run.sqlite"),
    # checkpoint's own keywords, without it
    ("item_id", str),
    ("fingerprint", "v2"),
    ("fingerprint", ""),
    ("resume", "ignore-fingerprint"),
    ("resume", ""),
    ("serializer", "json"),
    ("serializer", "yaml"),
    # processes: an int from 1 to 1,024, or None
    ("processes", 0),
    ("processes", -1),
    ("processes", True),
    ("processes", False),
    ("processes", 2.0),
    ("processes", NAN),
    ("processes", INF),
    ("processes", ""),
    ("processes", "2"),
    # backend: "local" or "ray"
    ("backend", ""),
    ("backend", "Ray"),
    ("backend", "LOCAL"),
    ("backend", None),
    ("backend", True),
    # Ray's own keywords with backend="local"
    ("ray_address", "127.0.0.1:6379"),
    ("ray_address", ""),
    ("ray_actors", 2),
    ("ray_actors", 0),
    ("setup", dict),
]


@pytest.mark.parametrize(
    ("name", "value"), LOCAL_REFUSALS, ids=[f"{n}={v!r}" for n, v in LOCAL_REFUSALS]
)
def test_a_bad_keyword_is_refused_alike_by_map_gather_and_run(
    nothing_starts: list[object], name: str, value: object
) -> None:
    """map() at the call, gather() and run() before any call; same type, same message."""
    calls = nothing_starts
    raised = _refusals(_recorder(calls), {name: value})
    assert calls == []
    messages = {str(exc).replace("corral.run()", "corral.map()") for exc in raised}
    messages = {m.replace("corral.gather()", "corral.map()") for m in messages}
    assert len(messages) == 1, messages
    assert len({type(exc) for exc in raised}) == 1, raised
    message = messages.pop()
    assert _shows(name, value) in message, message


@pytest.mark.parametrize(
    ("options", "shown"),
    [
        ({"executor": ""}, "executor=''"),
        ({"executor": "threads"}, "executor='threads'"),
        ({"executor": 0}, "executor=0"),
        ({"executor": True}, "executor=True"),
    ],
)
def test_a_bad_executor_is_refused_alike_for_a_plain_fn(
    nothing_starts: list[object], options: dict[str, Any], shown: str
) -> None:
    calls = nothing_starts
    raised = _refusals(_recorder(calls, plain=True), options)
    assert calls == []
    assert all(type(exc) is ValueError and shown in str(exc) for exc in raised), raised


def test_an_executor_for_an_async_fn_is_refused_alike(nothing_starts: list[object]) -> None:
    calls = nothing_starts
    for executor in ("thread", "process"):
        raised = _refusals(_recorder(calls), {"executor": executor})
        assert all(f"executor={executor!r} runs plain functions" in str(e) for e in raised)
    assert calls == []


#: Keywords that contradict processes=N or backend="ray", each with the value shown.
CONFLICTS: list[tuple[dict[str, Any], str]] = [
    ({"processes": 1, "executor": "process"}, "executor='process'"),
    ({"processes": 1, "budget": {"requests": 5}}, "budget={'requests': 5}"),
    ({"processes": 1, "cost": len}, "cost=<built-in function len>"),
    ({"processes": 1, "usage": len}, "usage=<built-in function len>"),
    ({"processes": 1, "monitor": True}, "monitor=True"),
    ({"processes": 1, "monitor": 0.5}, "monitor=0.5"),
    ({"processes": 1, "rate": "auto"}, "rate='auto'"),
    ({"processes": 1, "rate": corral.Rate({"requests": 5, "tokens": 9})}, "rate=Rate("),
    ({"processes": 1, "limit": "auto"}, "limit='auto'"),
    ({"processes": 1, "limit": corral.Adaptive()}, "limit=Adaptive("),
    ({"processes": 1, "limit": 0}, "limit=0"),
    ({"processes": 1, "timeout": 0}, "timeout=0"),
    ({"processes": 1, "retries": -1}, "retries=-1"),
    ({"processes": 1, "ordered": None}, "ordered=None"),
    ({"processes": 1, "deadline": -1}, "deadline=-1"),
    ({"processes": 1, "checkpoint": ""}, "checkpoint=''"),
    ({"processes": 1, "progress": "yes"}, "progress='yes'"),
    ({"backend": "ray", "processes": 2}, "processes=2"),
    ({"backend": "ray", "rate": "20/s"}, "rate='20/s'"),
    ({"backend": "ray", "executor": "thread"}, "executor='thread'"),
    ({"backend": "ray", "budget": {"requests": 5}}, "budget={'requests': 5}"),
    ({"backend": "ray", "cost": len}, "cost=<built-in function len>"),
    ({"backend": "ray", "monitor": True}, "monitor=True"),
    ({"backend": "ray", "limit": "auto"}, "limit='auto'"),
    ({"backend": "ray", "limit": 0}, "limit=0"),
    ({"backend": "ray", "ray_actors": 0}, "ray_actors=0"),
    ({"backend": "ray", "ray_actors": True}, "ray_actors=True"),
    ({"backend": "ray", "ray_address": ""}, "ray_address=''"),
    ({"backend": "ray", "ray_address": 6379}, "ray_address=6379"),
    ({"backend": "ray", "setup": 5}, "setup=5"),
    ({"backend": "ray", "deadline": 0}, "deadline=0"),
    ({"backend": "ray", "progress": None}, "progress=None"),
]


@pytest.mark.parametrize(("options", "shown"), CONFLICTS, ids=[s for _, s in CONFLICTS])
def test_a_keyword_processes_or_ray_cannot_take_is_refused_alike(
    nothing_starts: list[object], options: dict[str, Any], shown: str
) -> None:
    """Refused before any worker process or Ray cluster is started, naming the value."""
    for exc in _refusals(async_square, options):
        assert shown in str(exc), exc


def test_a_shared_limiter_is_refused_alike_by_processes_and_ray(
    nothing_starts: list[object],
) -> None:
    limiter = corral.Limiter(limit=4)
    for extra in ({"processes": 1}, {"backend": "ray"}):
        for exc in _refusals(async_square, {"limit": limiter, **extra}):
            assert f"limit={limiter!r}" in str(exc)


@pytest.mark.parametrize(
    ("options", "shown"),
    [
        # 0 == False: these used to pass for "not given" and were ignored.
        ({"processes": 1, "monitor": 0}, "monitor=0"),
        ({"processes": 1, "monitor": 0.0}, "monitor=0.0"),
        ({"processes": 1, "progress": 0}, "progress=0"),
        ({"processes": 1, "progress": 0.0}, "progress=0.0"),
        ({"backend": "ray", "monitor": 0}, "monitor=0"),
        ({"backend": "ray", "monitor": 0.0}, "monitor=0.0"),
        ({"backend": "ray", "progress": 0}, "progress=0"),
        ({"backend": "ray", "progress": 0.0}, "progress=0.0"),
    ],
)
def test_a_false_looking_number_is_not_taken_for_the_default_on_processes_or_ray(
    nothing_starts: list[object], options: dict[str, Any], shown: str
) -> None:
    """monitor=0 and progress=0 are refused in this process; on processes or Ray too."""
    for exc in _refusals(async_square, options):
        assert shown in str(exc), exc


@pytest.mark.parametrize("uvloop", ["no", "", 0, 1, "false"])
def test_run_refuses_a_uvloop_that_is_not_a_bool(
    nothing_starts: list[object], uvloop: object
) -> None:
    """uvloop="no" (or 0) used to pick uvloop, being neither False nor None."""
    calls = nothing_starts
    with pytest.raises(TypeError, match=rf"got uvloop={re.escape(repr(uvloop))}$"):
        corral.run(_recorder(calls), range(3), uvloop=uvloop)  # type: ignore[call-overload]
    assert calls == []


@pytest.mark.parametrize("uvloop", [None, False])
def test_run_takes_none_and_false_for_uvloop(uvloop: bool | None) -> None:
    assert corral.run(async_square, range(3), uvloop=uvloop) == [0, 1, 4]


@pytest.mark.parametrize("name", ["resume", "serializer"])
def test_none_for_resume_or_serializer_is_refused_without_a_checkpoint(
    nothing_starts: list[object], name: str
) -> None:
    calls = nothing_starts
    for exc in _refusals(_recorder(calls), {name: None}):
        assert f"{name}=None" in str(exc)
    assert calls == []


WITH_A_CHECKPOINT: list[tuple[str, object, type[Exception]]] = [
    ("resume", None, ValueError),
    ("resume", "", ValueError),
    ("resume", "STRICT", ValueError),
    ("serializer", None, ValueError),
    ("serializer", "yaml", ValueError),
    ("fingerprint", 5, TypeError),
    ("fingerprint", b"v2", TypeError),
    ("item_id", 5, TypeError),
    ("item_id", "id", TypeError),
]


@pytest.mark.parametrize(
    ("name", "value", "kind"),
    WITH_A_CHECKPOINT,
    ids=[f"{n}={v!r}" for n, v, _ in WITH_A_CHECKPOINT],
)
@pytest.mark.parametrize("extra", [{}, {"processes": 1}], ids=["local", "processes"])
def test_a_bad_checkpoint_keyword_is_refused_alike(
    nothing_starts: list[object],
    tmp_path: Any,
    name: str,
    value: object,
    kind: type[Exception],
    extra: dict[str, Any],
) -> None:
    """Refused before the file is made or any call runs, on processes too."""
    calls = nothing_starts
    path = tmp_path / "run.sqlite"
    fn = async_square if extra else _recorder(calls)
    for exc in _refusals(fn, {name: value, "checkpoint": path, **extra}):
        assert type(exc) is kind
        assert _shows(name, value) in str(exc), exc
    assert calls == []
    assert list(tmp_path.iterdir()) == []


def test_the_first_bad_keyword_is_reported_the_same_way_on_every_path(
    nothing_starts: list[object],
) -> None:
    """A misspelt keyword names itself and a close match, in map, gather and run."""
    calls = nothing_starts
    for options in ({"limt": 5}, {"limt": 5, "processes": 1}, {"limt": 5, "backend": "ray"}):
        for exc in _refusals(_recorder(calls), options):
            assert type(exc) is TypeError
            assert "unexpected keyword argument 'limt'; did you mean limit=?" in str(exc)
    assert calls == []


def test_bad_fn_and_items_are_refused_alike(nothing_starts: list[object]) -> None:
    for extra in ({}, {"processes": 1}, {"backend": "ray"}):
        for caller in (corral.map, corral.run):
            with pytest.raises(TypeError, match=r"got items=5$"):
                caller(async_square, 5, **extra)  # type: ignore[call-overload]
            with pytest.raises(TypeError, match=r"got fn='f'$"):
                caller("f", range(3), **extra)  # type: ignore[call-overload]
        with pytest.raises(TypeError, match=r"got items=None$"):
            asyncio.run(corral.gather(async_square, None, **extra))  # type: ignore[call-overload]


# ---------------------------------------------------------------------------
# 2. Stats
# ---------------------------------------------------------------------------


def _consistent(stats: corral.Stats, limit: int | None = None) -> None:
    """What holds of every snapshot, at any moment."""
    for name in ("started", "completed", "failed", "retried", "in_flight"):
        value = getattr(stats, name)
        assert type(value) is int, stats
        assert value >= 0, stats
    assert stats.completed + stats.failed + stats.in_flight <= stats.started, stats
    assert math.isfinite(stats.elapsed), stats
    assert stats.elapsed >= 0.0, stats
    assert math.isfinite(stats.throughput), stats
    assert stats.throughput >= 0.0, stats
    if limit is not None:
        assert stats.in_flight <= limit, stats
    percentiles = (stats.latency_p50, stats.latency_p90, stats.latency_p99)
    if stats.completed + stats.failed == 0:
        assert percentiles == (None, None, None), stats
    elif None not in percentiles:  # None too when only calls a deadline cut short ended
        p50, p90, p99 = percentiles
        assert 0.0 <= p50 <= p90 <= p99, stats  # type: ignore[operator]


MONOTONIC = ("started", "completed", "failed", "retried", "elapsed")


def _in_order(snapshots: list[corral.Stats]) -> None:
    """Counters and elapsed never go back from one snapshot to the next."""
    for before, after in itertools.pairwise(snapshots):
        for name in MONOTONIC:
            assert getattr(after, name) >= getattr(before, name), (name, before, after)


def _ended_normally(stats: corral.Stats, items: int, failed: int = 0) -> None:
    assert stats.in_flight == 0, stats
    assert stats.started == stats.completed + stats.failed == items, stats
    assert stats.failed == failed, stats


class Watched:
    """An ``async def`` fn that counts its calls running and checks every snapshot it sees."""

    def __init__(
        self,
        durations: Callable[[int], float],
        *,
        failing: frozenset[int] = frozenset(),
        exact: bool = True,
    ) -> None:
        self.durations = durations
        # Exact unless a worker can be between its release from the ordered
        # window and its call's start (one loop step): in flight, not yet running.
        self.exact = exact
        self.failing = failing
        self.running = 0
        self.peak = 0
        self.stream: corral.ResultStream[int] | None = None
        self.snapshots: list[corral.Stats] = []
        self.limit: int | None = None

    def look(self) -> corral.Stats | None:
        """The stream's stats now: consistent, and in flight exactly the calls running."""
        if self.stream is None:
            return None
        stats = self.stream.stats
        _consistent(stats, self.limit)
        if self.exact:
            assert stats.in_flight == self.running, (stats, self.running)
        else:
            assert stats.in_flight >= self.running, (stats, self.running)
        self.snapshots.append(stats)
        return stats

    async def __call__(self, item: int) -> int:
        self.running += 1
        self.peak = max(self.peak, self.running)
        self.look()
        try:
            await asyncio.sleep(self.durations(item))
        finally:
            self.running -= 1
        if item in self.failing:
            raise LookupError(item)
        return item


def _varied(item: int) -> float:
    return 0.01 * (1 + item % 7)


def _slow_head(item: int) -> float:
    return 5.0 if item == 0 else 0.01


@pytest.mark.virtual_time
@pytest.mark.parametrize("ordered", [True, False])
@pytest.mark.parametrize("durations", [_varied, _slow_head], ids=["varied", "slow-head"])
async def test_stats_add_up_at_every_moment_with_an_int_limit(
    ordered: bool, durations: Callable[[int], float]
) -> None:
    fn = Watched(durations, exact=not ordered)
    fn.limit = 4
    async with corral.map(fn, range(200), limit=4, ordered=ordered) as results:
        fn.stream = results
        async for _ in results:
            fn.look()
    _in_order(fn.snapshots)
    assert fn.peak == 4
    _ended_normally(results.stats, 200)
    assert results.stats.limit == 4


def _limits() -> dict[str, Callable[[], Any]]:
    return {
        "none": lambda: None,
        "auto": lambda: "auto",
        "adaptive": lambda: corral.Adaptive(initial=2, max=16),
        "limiter": lambda: corral.Limiter(limit=3),
        "limiter-auto": lambda: corral.Limiter(limit="auto"),
        "limiter-adaptive": lambda: corral.Limiter(limit=corral.Adaptive(initial=2, max=500)),
        "limiter-rate": lambda: corral.Limiter(limit=3, rate="50/s"),
        "limiter-rate-only": lambda: corral.Limiter(rate="50/s"),
    }


@pytest.mark.virtual_time
@pytest.mark.parametrize("kind", list(_limits()))
async def test_in_flight_counts_the_calls_running_whatever_the_limit(kind: str) -> None:
    """An item waiting for a Limiter's slot has not started: it is not in flight.

    A map on a shared adaptive Limiter runs a worker per slot its limit may
    ever reach (``max``), and they all wait in the Limiter's line: in flight
    read 199 under a limit of 4. A rate's waiters, the same.
    """
    limit = _limits()[kind]()
    fn = Watched(_varied)
    limits_seen: list[int] = []
    async with corral.map(fn, range(200), limit=limit, ordered=False) as results:
        fn.stream = results
        async for _ in results:
            stats = fn.look()
            assert stats is not None
            if stats.limit is not None:
                limits_seen.append(stats.limit)
                # A cut does not stop calls already running; none starts beyond the highest.
                assert stats.in_flight <= max(limits_seen), (stats, limits_seen)
    _in_order(fn.snapshots)
    final = results.stats
    _ended_normally(final, 200)
    if kind == "none" or kind == "limiter-rate-only":
        assert final.limit is None
    elif isinstance(limit, corral.Limiter):
        assert final.limit == limit.limit
    else:
        assert type(final.limit) is int
        assert final.limit >= 1


@pytest.mark.virtual_time
async def test_in_flight_leaves_out_the_items_waiting_for_the_rate() -> None:
    """rate= spaces the starts: an item waiting for its start has not started."""
    fn = Watched(lambda item: 0.5)
    async with corral.map(fn, range(40), limit=10, rate="4/s", ordered=False) as results:
        fn.stream = results
        async for _ in results:
            fn.look()
    _in_order(fn.snapshots)
    assert fn.peak == 2  # 0.5 s calls, one start every 0.25 s
    _ended_normally(results.stats, 40)


@pytest.mark.virtual_time
async def test_a_map_on_a_shared_adaptive_limiter_shows_its_calls_not_its_queue() -> None:
    """Its workers (one per slot the limit may reach) wait in the Limiter's line, not in flight."""
    limiter = corral.Limiter(limit="auto")
    fn = Watched(lambda item: 1.0)
    async with corral.map(fn, range(1000), limit=limiter) as results:
        fn.stream = results
        async for _ in results:
            stats = results.stats
            assert stats.limit is not None
            assert stats.in_flight <= stats.limit, stats
            assert stats.started <= stats.completed + stats.limit, stats
            break
    final = results.stats
    assert final.in_flight == 0
    assert final.completed + final.failed <= final.started
    # Items cancelled while they waited for a slot still count as cut short once
    # the map is over (they were taken from the input): see corral.Stats.


RETRY_LIMITS: dict[str, Callable[[], dict[str, Any]]] = {
    "limiter": lambda: {"limit": corral.Limiter(limit=3)},
    # 100 workers queue for one key's 3 slots, retries included.
    "keyed": lambda: {"limit": corral.Limiter(limit=3, key=lambda item: "host")},
    "rate": lambda: {"limit": 3, "rate": "40/s"},
    "limiter-and-rate": lambda: {"limit": corral.Limiter(limit=3, key=len), "rate": "40/s"},
}


@pytest.mark.virtual_time
@pytest.mark.parametrize("retry_budget", [True, False], ids=["budget", "no-budget"])
@pytest.mark.parametrize("kind", list(RETRY_LIMITS))
async def test_stats_with_retries_count_each_item_once_and_each_retry(
    kind: str, retry_budget: bool
) -> None:
    """An item waiting for a slot to be retried has started: started never goes back.

    It is in flight too, having given its slot back for the wait: with retries
    ``in_flight`` may pass the limit, by the items waiting to be retried.
    """
    attempts: dict[int, int] = {}
    stream: list[corral.ResultStream[int]] = []
    snapshots: list[corral.Stats] = []
    running = 0

    async def flaky(item: int) -> int:
        nonlocal running
        running += 1
        snapshots.append(stream[0].stats)
        _consistent(snapshots[-1])
        attempts[item] = attempts.get(item, 0) + 1
        await asyncio.sleep(0.1)
        running -= 1
        if attempts[item] <= item % 3:
            raise ConnectionError(item)
        return item

    budget = corral.RetryBudget(floor=1000) if retry_budget else None
    retry = corral.Retry(attempts=3, backoff=0.05, budget=budget)
    items = [str(i) for i in range(30)] if kind == "limiter-and-rate" else range(30)

    async def call(item: Any) -> int:
        return await flaky(int(item))

    async with corral.map(call, items, retries=retry, **RETRY_LIMITS[kind]()) as results:
        stream.append(results)
        async for _ in results:
            snapshots.append(results.stats)
            _consistent(snapshots[-1])
            assert snapshots[-1].in_flight >= running
    _in_order(snapshots)
    final = results.stats
    _ended_normally(final, 30)
    assert final.retried == sum(item % 3 for item in range(30))


@pytest.mark.virtual_time
async def test_stats_with_return_exceptions_count_failures() -> None:
    fn = Watched(_varied, failing=frozenset(range(0, 60, 4)))
    fn.limit = 5
    async with corral.map(fn, range(60), limit=5, return_exceptions=True) as results:
        fn.stream = results
        outcomes = [r async for r in results]
    assert sum(isinstance(r, LookupError) for r in outcomes) == 15
    _ended_normally(results.stats, 60, failed=15)


@pytest.mark.virtual_time
async def test_elapsed_throughput_and_latency_follow_the_clock() -> None:
    """10 calls of 1 s, 5 at a time: 2 s, 5 items/s, every latency about 1 s."""

    async def second(item: int) -> int:
        await asyncio.sleep(1.0)
        return item

    async with corral.map(second, range(10), limit=5) as results:
        assert results.stats == corral.Stats(0, 0, 0, 0, 0, 0.0, 0.0, 5, None, None, None)
        assert [r async for r in results] == list(range(10))
    final = results.stats
    assert final.elapsed == pytest.approx(2.0)
    assert final.throughput == pytest.approx(5.0)
    for p in (final.latency_p50, final.latency_p90, final.latency_p99):
        assert p == pytest.approx(1.0, rel=0.033)
    assert final.max_loop_lag is None


def _one_at_a_time() -> dict[str, dict[str, Any]]:
    """Ways to make five 1 s calls wait for each other: at a slot, at the rate, or both."""
    return {
        "keyed": {"limit": corral.Limiter(limit=1, key=lambda item: "host")},
        "shared": {"limit": corral.Limiter(limit=1)},
        "adaptive": {"limit": corral.Limiter(limit=corral.Adaptive(initial=1, min=1, max=1))},
        "rate": {"limit": 5, "rate": corral.Rate(1, per=1.01)},
        "shared-with-rate": {"limit": corral.Limiter(limit=5, rate=corral.Rate(1, per=1.01))},
        # The Limiter's wrapper hands the timing on to the rate's, inside it.
        "map-rate-and-limiter": {
            "limit": corral.Limiter(limit=5),
            "rate": corral.Rate(1, per=1.01),
        },
        "weighted": {"limit": corral.Limiter(limit=1), "cost": lambda item: {"tokens": 1}},
        "weighted-keyed": {
            "limit": corral.Limiter(limit=1, key=lambda item: "host"),
            "cost": lambda item: {"tokens": 1},
        },
        "retried": {"limit": corral.Limiter(limit=1), "retries": 2},
    }


@pytest.mark.virtual_time
@pytest.mark.parametrize("how", list(_one_at_a_time()))
async def test_latency_counts_the_call_not_the_wait_for_a_slot(how: str) -> None:
    """Stats: latency runs "from the start of its first attempt"; the wait for a
    Limiter's slot or the rate's turn is no part of an attempt (``timeout=`` does
    not count it either)."""

    async def second(item: int) -> int:
        await asyncio.sleep(1.0)
        return item

    async with corral.map(second, range(5), **_one_at_a_time()[how]) as results:
        assert [r async for r in results] == list(range(5))
    # Each waited for the one before it: p99 read 5 s.
    for latency in (results.stats.latency_p50, results.stats.latency_p99):
        assert latency == pytest.approx(1.0, rel=0.033), results.stats


@pytest.mark.virtual_time
async def test_latency_of_a_retried_item_runs_from_its_first_attempt() -> None:
    """A retry waits for its slot again: that wait is inside the item's latency
    (first attempt to end); the wait before the first attempt is not."""
    limiter = corral.Limiter(limit=1)
    loop = asyncio.get_running_loop()
    attempts = 0

    async def hold(seconds: float) -> None:
        async with limiter:
            await asyncio.sleep(seconds)

    async def flaky(item: int) -> int:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(1.0)
        if attempts == 1:
            raise ConnectionError("once")
        return item

    # Two holders take the slot 0-1 and 1-2; a third arrives at 2.5 and takes
    # it when the first attempt fails at 3, so the retry runs 4-5.
    holders = [asyncio.create_task(hold(1.0)) for _ in range(2)]
    await asyncio.sleep(0)
    loop.call_at(2.5, lambda: holders.append(asyncio.create_task(hold(1.0))))
    retry = corral.Retry(attempts=2, backoff=0.0, jitter=False)
    async with corral.map(flaky, [7], limit=limiter, retries=retry) as results:
        assert [r async for r in results] == [7]
    await asyncio.gather(*holders)
    assert loop.time() == pytest.approx(5.0)
    # From 2 (the first attempt) to 5: the retry's wait counts, the first one's not.
    assert results.stats.latency_p50 == pytest.approx(3.0, rel=0.033), results.stats


def _json_plain(value: object) -> bool:
    return value is None or type(value) in (int, float)


@pytest.mark.parametrize("kind", ["int", "numpy", *list(_limits())])
async def test_as_dict_is_flat_and_json_ready_with_exactly_the_documented_names(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CORRAL_MONITOR", raising=False)
    if kind == "int":
        limit: Any = 7
    elif kind == "numpy":
        numpy = pytest.importorskip("numpy")
        limit = corral.Limiter(limit=numpy.int64(3))
    else:
        limit = _limits()[kind]()
    results = corral.map(async_square, range(20), limit=limit)
    before = results.stats.as_dict()
    async with results:
        during = results.stats.as_dict()
        assert [r async for r in results] == [x * x for x in range(20)]
    after = results.stats.as_dict()
    for data in (before, during, after):
        assert list(data) == STATS_FIELDS
        assert [f.name for f in fields(corral.Stats)] == STATS_FIELDS
        assert all(_json_plain(v) for v in data.values()), data
        assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert after["max_loop_lag"] is None
    assert after["started"] == after["completed"] == 20


async def test_max_loop_lag_is_a_number_only_when_monitored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CORRAL_MONITOR", raising=False)
    async with corral.map(async_square, range(5), monitor=True) as results:
        assert [r async for r in results] == [0, 1, 4, 9, 16]
    lag = results.stats.max_loop_lag
    assert type(lag) is float
    assert lag >= 0.0
    assert json.loads(json.dumps(results.stats.as_dict()))["max_loop_lag"] == lag


# -- progress=callable -------------------------------------------------------


class Snapshots:
    """A progress= function: records each snapshot and checks it as it comes."""

    def __init__(self, limit: int | None = None) -> None:
        self.seen: list[corral.Stats] = []
        self.limit = limit
        self.closed = False

    def __call__(self, stats: corral.Stats) -> None:
        assert not self.closed, "a snapshot after the map ended"
        _consistent(stats, self.limit)
        self.seen.append(stats)

    def final(self, stats: corral.Stats) -> corral.Stats:
        """The run is over: its last snapshot is final and equals ``stats``."""
        self.closed = True
        assert self.seen, "no final snapshot"
        _in_order(self.seen)
        assert self.seen[-1] == stats
        assert stats.in_flight == 0
        return stats


@pytest.fixture
def one_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    """No snapshot while the map runs (a timer that never comes): only the final one."""
    monkeypatch.setattr(_progress, "CALLBACK_INTERVAL", 1e9)


async def _second(item: int) -> int:
    await asyncio.sleep(1.0)
    return item


async def _fails_at_three(item: int) -> int:
    await asyncio.sleep(0.1 * item)
    if item == 3:
        raise LookupError(item)
    return item


async def _through_map(**options: Any) -> list[Any]:
    async with corral.map(options.pop("fn", _second), range(10), **options) as results:
        return [r async for r in results]


async def _break_out(**options: Any) -> list[Any]:
    async with corral.map(_second, range(10), **options) as results:
        async for r in results:
            return [r]
    raise AssertionError("no result")


async def _cancel_early(**options: Any) -> list[Any]:
    async with corral.map(_second, range(10), **options) as results:
        out = []
        async for r in results:
            results.cancel()
            out.append(r)
        return out


async def _consumer_raises(**options: Any) -> list[Any]:
    async with corral.map(_second, range(10), **options) as results:
        async for _ in results:
            raise KeyError("consumer")
    raise AssertionError("no result")


async def _abandoned(**options: Any) -> list[Any]:
    """A plain async for, left by a break: the stream closes in the background."""
    stream = corral.map(_second, range(10), **options)
    async for r in stream:
        first = r
        break
    del stream
    gc.collect()
    for _ in range(100):  # bounded: the background close takes a few loop turns
        await asyncio.sleep(0)
    return [first]


async def _cancelled_from_outside(**options: Any) -> list[Any]:
    task = asyncio.ensure_future(corral.gather(_second, range(10), **options))
    await asyncio.sleep(1.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return []


ENDINGS: dict[str, tuple[Callable[..., Awaitable[list[Any]]], dict[str, Any], Any]] = {
    "normal": (_through_map, {}, None),
    "gather": (lambda **o: corral.gather(_second, range(10), **o), {}, None),
    "failure": (_through_map, {"fn": _fails_at_three}, LookupError),
    "gather-failure": (lambda **o: corral.gather(_fails_at_three, range(10), **o), {}, LookupError),
    "return-exceptions": (_through_map, {"fn": _fails_at_three, "return_exceptions": True}, None),
    "break": (_break_out, {}, None),
    "cancel": (_cancel_early, {}, None),
    "consumer-raises": (_consumer_raises, {}, KeyError),
    "abandoned": (_abandoned, {}, None),
    "outer-cancel": (_cancelled_from_outside, {}, None),
    "deadline": (_through_map, {"deadline": 2.5}, corral.DeadlineExceeded),
    "deadline-return-exceptions": (
        _through_map,
        {"deadline": 2.5, "return_exceptions": True},
        None,
    ),
    "budget": (_through_map, {"budget": {"requests": 4}}, corral.BudgetExhausted),
}


@pytest.mark.virtual_time
@pytest.mark.parametrize("every_tick", [True, False], ids=["ticks", "final-only"])
@pytest.mark.parametrize("ending", list(ENDINGS))
async def test_progress_gets_consistent_snapshots_and_one_final_however_the_map_ends(
    ending: str, every_tick: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not every_tick:
        monkeypatch.setattr(_progress, "CALLBACK_INTERVAL", 1e9)
    how, options, raises = ENDINGS[ending]
    progress = Snapshots(limit=3)
    if raises is None:
        await how(limit=3, progress=progress, **options)
    else:
        with pytest.raises(raises):
            await how(limit=3, progress=progress, **options)
    assert progress.seen
    final = progress.seen[-1]
    progress.final(final)
    if not every_tick:
        assert len(progress.seen) == 1
    if ending in ("normal", "gather", "return-exceptions"):
        _ended_normally(final, 10, failed=1 if ending == "return-exceptions" else 0)
    else:
        assert final.completed + final.failed <= final.started
    # Nothing more comes once the map has ended.
    for _ in range(10):
        await asyncio.sleep(1.0)


@pytest.mark.virtual_time
async def test_progress_final_snapshot_is_the_streams_final_stats() -> None:
    progress = Snapshots(limit=2)
    async with corral.map(_second, range(6), limit=2, progress=progress) as results:
        assert [r async for r in results] == list(range(6))
    final = progress.final(results.stats)
    assert len(progress.seen) >= 3  # 3 s of calls, a snapshot every 0.25 s
    _ended_normally(final, 6)
    assert final.elapsed == pytest.approx(3.0)


@pytest.mark.virtual_time
@pytest.mark.parametrize("kind", list(_limits()))
async def test_progress_snapshots_with_every_kind_of_limit(kind: str, one_snapshot: None) -> None:
    limit = _limits()[kind]()
    progress = Snapshots()
    assert await corral.gather(_second, range(12), limit=limit, progress=progress) == list(
        range(12)
    )
    assert len(progress.seen) == 1
    final = progress.final(progress.seen[-1])
    _ended_normally(final, 12)
    if isinstance(limit, corral.Limiter):
        assert final.limit == limit.limit
    elif limit is None:
        assert final.limit is None


@pytest.mark.virtual_time
async def test_progress_of_a_map_cancelled_before_it_started_gets_one_final_of_zeros(
    one_snapshot: None,
) -> None:
    progress = Snapshots()
    stream = corral.map(_second, range(5), limit=2, progress=progress)
    stream.cancel()
    async with stream as results:
        assert [r async for r in results] == []
    assert progress.seen == [corral.Stats(0, 0, 0, 0, 0, 0.0, 0.0, 2, None, None, None)]


class Unreadable:
    """An async input whose ``__aiter__`` fails: the map fails as it starts."""

    def __aiter__(self) -> AsyncIterator[int]:
        raise OSError("the input cannot be opened")


@pytest.mark.virtual_time
async def test_progress_gets_a_final_snapshot_when_the_input_cannot_be_read() -> None:
    progress = Snapshots()
    with pytest.raises(OSError, match="cannot be opened"):
        await corral.gather(_second, Unreadable(), limit=2, progress=progress)
    assert len(progress.seen) == 1


@pytest.mark.virtual_time
async def test_in_flight_leaves_out_the_queue_with_weighted_accounting_too() -> None:
    fn = Watched(_varied)
    limiter = corral.Limiter(limit="auto")
    async with corral.map(
        fn, range(200), limit=limiter, ordered=False, cost=lambda item: {"tokens": 1}
    ) as results:
        fn.stream = results
        async for _ in results:
            fn.look()
    _ended_normally(results.stats, 200)


@pytest.mark.virtual_time
async def test_in_flight_leaves_out_the_items_waiting_for_an_adaptive_rate() -> None:
    fn = Watched(lambda item: 0.5)
    async with corral.map(fn, range(40), limit=10, rate="auto", ordered=False) as results:
        fn.stream = results
        async for _ in results:
            fn.look()
    _ended_normally(results.stats, 40)


async def _load() -> list[int]:
    return [1, 2, 3]


@pytest.mark.parametrize("extra", [{}, {"processes": 1}, {"backend": "ray"}])
def test_a_coroutine_as_items_is_refused_and_closed(
    nothing_starts: list[object], extra: dict[str, Any]
) -> None:
    """items=load() instead of await load(): explained, and closed (no "never awaited")."""
    for caller in ("map", "gather", "run"):
        items = _load()
        with pytest.raises(TypeError, match=r"not a coroutine: await it .*got items=<coroutine"):
            if caller == "map":
                corral.map(async_square, items, **extra)  # type: ignore[call-overload]
            elif caller == "gather":
                asyncio.run(corral.gather(async_square, items, **extra))  # type: ignore[call-overload]
            else:
                corral.run(async_square, items, **extra)  # type: ignore[call-overload]
        assert items.cr_frame is None  # closed
