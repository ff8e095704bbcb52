"""The fan-out strategies the lab compares: right results, and the properties they claim."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from importlib import util

import pytest

from corral.lab import strategies
from corral.lab.strategies import STRATEGIES


def _param(name: str) -> object:
    reason = strategies.unavailable(name)
    return pytest.param(
        name, id=name, marks=pytest.mark.skipif(reason is not None, reason=str(reason))
    )


ALL = [_param(name) for name in STRATEGIES]
BOUNDED = [_param(name) for name, info in STRATEGIES.items() if info.bounded]
LAZY = [_param(name) for name, info in STRATEGIES.items() if info.lazy]
EAGER = [_param(name) for name, info in STRATEGIES.items() if not info.lazy]
# Strategies whose argument checking is this module's own (corral checks its own).
CHECKED_HERE = [_param(name) for name in STRATEGIES if not name.startswith("corral")]


class Feed:
    """An input that counts how many items have been pulled from it."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.pulled = 0

    def __iter__(self) -> Iterator[int]:
        for i in range(self.n):
            self.pulled += 1
            yield i


class Spy:
    """Stand-in fn: returns 10 x item, records the most calls in flight and items read ahead."""

    def __init__(self, feed: Feed | None = None) -> None:
        self.feed = feed
        self.running = self.peak = self.done = self.ahead = 0

    async def __call__(self, item: int) -> int:
        self.running += 1
        self.peak = max(self.peak, self.running)
        if self.feed is not None:
            self.ahead = max(self.ahead, self.feed.pulled - self.done)
        for _ in range(item * 7 % 4 + 1):
            await asyncio.sleep(0)  # yield so calls overlap and finish out of input order
        self.running -= 1
        self.done += 1
        return item * 10


@pytest.mark.parametrize("limit", [1, 3, None])
@pytest.mark.parametrize("name", ALL)
async def test_results_come_back_in_input_order(name: str, limit: int | None) -> None:
    """Every strategy returns fn's results as a list in input order, at any limit."""
    async with asyncio.timeout(10):  # hang guard
        results = await STRATEGIES[name].run(Spy(), range(20), limit)
    assert results == [i * 10 for i in range(20)]


@pytest.mark.parametrize("name", ALL)
async def test_a_generator_input_is_accepted(name: str) -> None:
    """An input without len() (a generator) gives the same results, bounded or not."""
    async with asyncio.timeout(10):
        bounded = await STRATEGIES[name].run(Spy(), Feed(15), 4)
        unbounded = await STRATEGIES[name].run(Spy(), Feed(15), None)
    assert bounded == unbounded == [i * 10 for i in range(15)]


@pytest.mark.parametrize("name", ALL)
async def test_empty_input_gives_an_empty_list(name: str) -> None:
    """No items, no calls, an empty list, with or without a limit."""
    spy = Spy()
    async with asyncio.timeout(10):
        assert await STRATEGIES[name].run(spy, [], 5) == []
        assert await STRATEGIES[name].run(spy, [], None) == []
    assert spy.done == 0


@pytest.mark.parametrize("name", BOUNDED)
async def test_bounded_strategies_never_exceed_the_limit(name: str) -> None:
    """A strategy that claims to honour the limit never has more calls in flight."""
    spy = Spy()
    async with asyncio.timeout(10):
        await STRATEGIES[name].run(spy, range(50), 4)
    assert spy.peak <= 4


@pytest.mark.virtual_time
@pytest.mark.parametrize("name", BOUNDED)
async def test_bounded_strategies_fill_the_limit_when_calls_wait(name: str) -> None:
    """With calls that wait (1 s each, virtual), every bounded strategy runs `limit` at once."""
    running = peak = 0

    async def wait_a_second(item: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(1)
        running -= 1
        return item

    assert await STRATEGIES[name].run(wait_a_second, range(50), 4) == list(range(50))
    assert peak == 4


async def test_five_batches_run_a_fifth_of_the_items_at_a_time() -> None:
    """Seed 001's batching: ceil(n / 5) calls at once, whatever the limit."""
    spy = Spy()
    async with asyncio.timeout(10):
        results = await strategies.gather_five_batches(spy, range(23), 2)
    assert results == [i * 10 for i in range(23)]
    assert spy.peak == 5


async def test_gather_all_ignores_the_limit() -> None:
    """gather_all starts every call at once: what the 'no limit' note in tables means."""
    spy = Spy()
    async with asyncio.timeout(10):
        await strategies.gather_all(spy, range(30), 2)
    assert spy.peak == 30


@pytest.mark.parametrize("name", LAZY)
async def test_lazy_strategies_pull_items_only_as_capacity_frees(name: str) -> None:
    """A lazy strategy never holds more than about twice the limit in unfinished items."""
    feed = Feed(200)
    spy = Spy(feed)
    async with asyncio.timeout(10):
        await STRATEGIES[name].run(spy, feed, 3)
    # queue_workers: 3 in workers' hands, 3 in the queue, 1 waiting to be put.
    assert spy.ahead <= 2 * 3 + 1


@pytest.mark.parametrize("name", EAGER)
async def test_materialising_strategies_pull_the_whole_input_first(name: str) -> None:
    """The strategies marked 'materialises input' read every item before a call finishes."""
    feed = Feed(200)
    spy = Spy(feed)
    async with asyncio.timeout(10):
        await STRATEGIES[name].run(spy, feed, 3)
    assert spy.ahead == 200


@pytest.mark.parametrize("name", ALL)
async def test_the_first_failure_is_raised_as_itself(name: str) -> None:
    """A failing call fails the strategy with fn's own exception, not a group."""

    async def fail_on_five(item: int) -> int:
        await asyncio.sleep(0)  # let the other calls start
        if item == 5:
            raise ValueError("item 5")
        return item

    async with asyncio.timeout(10):
        with pytest.raises(ValueError, match=r"^item 5$"):
            await STRATEGIES[name].run(fail_on_five, range(20), 3)


@pytest.mark.parametrize(
    "name",
    [_param(n) for n in ("queue_workers", "iterator_workers", "corral_gather", "corral_map")],
)
async def test_worker_strategies_cancel_the_other_calls_after_a_failure(name: str) -> None:
    """After a failure, structured strategies cancel and await the other calls, start no more."""
    started: list[int] = []
    running: set[int] = set()
    gate = asyncio.Event()

    async def fail_first_wait_rest(item: int) -> int:
        started.append(item)
        running.add(item)
        try:
            if item == 0:
                for _ in range(10):
                    await asyncio.sleep(0)  # let the other calls start (corral grows its pool)
                raise ValueError("item 0")
            await gate.wait()  # never set: only cancellation ends these calls
            return item
        finally:
            running.discard(item)

    async with asyncio.timeout(10):
        with pytest.raises(ValueError, match=r"^item 0$"):
            await STRATEGIES[name].run(fail_first_wait_rest, range(100), 3)
    assert running == set()
    assert len(started) == 3


@pytest.mark.parametrize("limit", [0, -1, 1.5, True])
@pytest.mark.parametrize("name", CHECKED_HERE)
async def test_a_bad_limit_is_refused(name: str, limit: object) -> None:
    """limit must be an int >= 1 or None; the message names the value."""
    with pytest.raises(
        ValueError, match=rf"^limit must be an int >= 1 or None \(no limit\); got limit={limit!r}$"
    ):
        await STRATEGIES[name].run(Spy(), range(3), limit)  # type: ignore[arg-type]


async def test_a_bad_batch_count_is_refused() -> None:
    """batches must be an int >= 1; the message names the value."""
    with pytest.raises(ValueError, match=r"^batches must be an int >= 1 or None; got batches=0$"):
        await strategies.gather_batched(Spy(), range(3), 2, batches=0)


def test_catalogue_names_each_function() -> None:
    """Each catalogue entry is listed under its function's name, with a docstring."""
    for name, info in STRATEGIES.items():
        assert info.name == name == info.run.__name__
        assert info.run.__doc__
    assert strategies.BASELINE in STRATEGIES


def test_unavailable_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """unavailable() is None for stdlib strategies and names the package to install otherwise."""
    assert strategies.unavailable("iterator_workers") is None
    real_find_spec = util.find_spec
    monkeypatch.setattr(
        util, "find_spec", lambda name: None if name == "aiometer" else real_find_spec(name)
    )
    assert strategies.unavailable("aiometer_amap") == "needs aiometer: pip install 'corral[peers]'"
    with pytest.raises(KeyError, match="no strategy named 'nope'; choose from gather_all, "):
        strategies.unavailable("nope")


@pytest.mark.slow
def test_importing_strategies_loads_no_third_party_module() -> None:
    """aiometer, aiostream and uvloop are imported only by the strategies that use them."""
    code = "import sys, corral.lab.strategies; print(' '.join(sorted(sys.modules)))"
    loaded = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    roots = {name.partition(".")[0] for name in loaded}
    assert not roots & {"aiometer", "aiostream", "anyio", "uvloop", "rich", "aiohttp", "httpx"}
