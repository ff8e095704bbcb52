"""backend="ray" at its edges: setup= closed on every exit, values that cannot travel
(or cannot be loaded here), a cancelled close, an address where no cluster answers or
of another cluster than the connected one, stats after an early end.

Shares the local cluster of test_ray_backend (its module fixture, loopback only).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import types
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import corral
import test_ray_backend as base  # skips this module too where Ray is not installed
from corral import _ray
from test_ray_backend import Boom, mark, marked

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

cluster = base.cluster  # one local cluster for the module, checked after


@pytest.fixture(scope="module", autouse=True)
def by_value(cluster: str) -> None:
    """The actors cannot import this module by name: its functions travel by value."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


# -- what the actors run ------------------------------------------------------


class SyncState:
    """A setup= value with a plain close(), leaving a marker per close."""

    def __init__(self, marker_dir: str) -> None:
        self.marker_dir = marker_dir
        self.token = f"{os.getpid()}-{os.urandom(4).hex()}"
        mark(marker_dir, f"opened-{self.token}")

    def close(self) -> None:
        mark(self.marker_dir, f"closed-{self.token}-{os.urandom(4).hex()}")


class AsyncState(SyncState):
    """A setup= value with an async aclose() (and no close())."""

    close = None  # type: ignore[assignment]

    async def aclose(self) -> None:
        await asyncio.sleep(0)
        mark(self.marker_dir, f"closed-{self.token}-{os.urandom(4).hex()}")


async def fail_at_300(item: int, state: SyncState) -> int:
    if item == 300:
        raise Boom("item 300")
    return item


async def hang_from_10_000(item: int, state: SyncState) -> int:
    if item >= 10_000:
        await asyncio.sleep(60)  # cancelled when the map ends
    return item


def _closes(directory: Path) -> tuple[set[str], Counter[str]]:
    """The states opened, and how many times each was closed."""
    opened = marked(directory, "opened")
    closes = Counter(name.rsplit("-", 1)[0] for name in marked(directory, "closed"))
    return opened, closes


# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ending", "state_type"),
    [
        ("first failure", SyncState),
        ("cancel()", AsyncState),
        ("break", SyncState),
        ("deadline", AsyncState),
    ],
)
def test_setup_state_is_closed_once_per_actor_however_the_map_ends(
    tmp_path: Path, ending: str, state_type: type[SyncState]
) -> None:
    """Not only a clean end: every state setup= made is closed exactly once."""
    # One loop kind: the ending is the driver's, whichever loop runs it.
    asyncio.run(_end_a_map_with_setup(tmp_path, ending, state_type))


async def _end_a_map_with_setup(tmp_path: Path, ending: str, state_type: type[SyncState]) -> None:
    marker_dir = str(tmp_path)
    items: Any = itertools.count() if ending in ("cancel()", "break") else range(20_000)
    options: dict[str, Any] = {"backend": "ray", "ray_actors": 2, "limit": 8}
    if ending == "deadline":
        options["deadline"] = 10.0  # the actors start within it; items from 10,000 hang
    got: list[int] = []
    async with asyncio.timeout(120):
        try:
            async with corral.map(
                fail_at_300 if ending == "first failure" else hang_from_10_000,
                items,
                setup=lambda: state_type(marker_dir),
                **options,
            ) as results:
                async for value in results:
                    got.append(value)
                    if ending != "first failure" and len(got) == 200:
                        if ending == "break":
                            break
                        if ending == "cancel()":
                            results.cancel()
        except Boom:
            assert ending == "first failure"
        except corral.DeadlineExceeded:
            assert ending == "deadline"
        else:
            assert ending in ("cancel()", "break")
    assert got == list(range(len(got)))
    stats = results.stats
    assert stats.in_flight == 0
    assert stats.completed + stats.failed <= stats.started
    if ending == "first failure":
        assert stats.failed == 1
    opened, closes = _closes(tmp_path)
    assert opened, "setup= never ran"
    assert set(closes) == opened, f"opened {sorted(opened)}, closed {dict(closes)}"
    assert set(closes.values()) == {1}, f"a state was closed more than once: {dict(closes)}"


class SlowToClose(SyncState):
    async def aclose(self) -> None:
        mark(self.marker_dir, f"closing-{self.token}")
        await asyncio.sleep(60)  # the driver's grace ends this


async def with_state(item: int, state: SyncState) -> int:
    await asyncio.sleep(0)
    return item


async def test_a_close_cancelled_while_setup_state_closes_still_kills_the_actors(
    tmp_path: Path,
) -> None:
    """Cancelled while waiting for the actors to close their state: they are killed all
    the same, not left holding their CPUs until this process exits."""
    marker_dir = str(tmp_path)
    streams: list[Any] = []

    async def consume() -> None:
        async with corral.map(
            with_state,
            range(10),
            backend="ray",
            ray_actors=2,
            setup=lambda: SlowToClose(marker_dir),
        ) as results:
            streams.append(results)
            assert [r async for r in results] == list(range(10))

    async with asyncio.timeout(120):
        task = asyncio.ensure_future(consume())
        while not marked(tmp_path, "closing"):
            assert not task.done(), task
            await asyncio.sleep(0.02)
        # The map is over, its state closing: it waits for the actors' close now.
        handles = streams[0]._run.actor_handles
        assert len(handles) == 2
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for handle in handles:
            await base._dead(handle)


def broken_setup() -> None:
    raise Boom("no session")


async def test_a_failing_setup_says_it_was_setup_and_which_actor() -> None:
    """setup= raising: its own exception, a note naming setup= and the actor; no hang."""
    async with asyncio.timeout(120):
        with pytest.raises(Boom, match="no session") as caught:
            await corral.gather(
                with_state,
                range(500),
                backend="ray",
                ray_actors=2,
                setup=broken_setup,
                return_exceptions=True,  # the map's failure, not an item's
            )
    notes = "\n".join(caught.value.__notes__)
    assert "setup=<function broken_setup" in notes
    assert "Ray actor " in notes
    assert "fn was not called there" in notes


async def test_fn_or_setup_that_cannot_be_pickled_is_refused_by_name() -> None:
    """A fn closing over a lock: a TypeError naming fn= at once, before any actor starts."""
    lock = threading.Lock()

    async def holds_a_lock(item: int) -> bool:
        return lock.locked()

    async with asyncio.timeout(60):
        with pytest.raises(TypeError, match=r"^backend='ray' sends fn to its actors, but fn="):
            await corral.gather(holds_a_lock, range(5), backend="ray", ray_actors=1)
        with pytest.raises(TypeError, match=r"^backend='ray' sends setup to its actors"):
            await corral.gather(
                with_state, range(5), backend="ray", ray_actors=1, setup=lambda: lock
            )


async def lock_for_120(item: Any) -> Any:
    return threading.Lock() if item == 120 else item


async def test_an_item_or_result_that_cannot_be_pickled_fails_its_own_item_only() -> None:
    """As with processes=N: a lock as item 50, a lock as item 120's result; both fail,
    named, in their places; every other item comes back."""
    items: list[Any] = list(range(200))
    items[50] = threading.Lock()
    async with asyncio.timeout(120):
        async with corral.map(
            lock_for_120, items, backend="ray", ray_actors=2, limit=8, return_exceptions=True
        ) as results:
            out = [r async for r in results]
    assert len(out) == 200
    assert [x for i, x in enumerate(out) if i not in (50, 120)] == [
        i for i in range(200) if i not in (50, 120)
    ]
    assert type(out[50]) is TypeError
    assert "(index 50) cannot be sent to a Ray actor" in str(out[50])
    assert "_thread.lock" in str(out[50])
    assert type(out[120]) is TypeError
    assert "cannot be sent back from Ray actor" in str(out[120])
    stats = results.stats
    assert (stats.started, stats.completed, stats.failed, stats.in_flight) == (200, 198, 2, 0)

    async with asyncio.timeout(120):
        with pytest.raises(
            TypeError, match=r"^the result <.*> of fn cannot be sent back from Ray actor \d"
        ):
            await corral.gather(lock_for_120, range(200), backend="ray", ray_actors=2)
        with pytest.raises(TypeError, match=r"\(index 50\) cannot be sent to a Ray actor"):
            await corral.gather(lock_for_120, items, backend="ray", ray_actors=2)


async def test_an_empty_input_ends_with_zero_stats() -> None:
    async with asyncio.timeout(60):
        async with corral.map(with_state, [], backend="ray", ray_actors=1, setup=dict) as out:
            assert [r async for r in out] == []
    stats = out.stats
    assert (stats.started, stats.completed, stats.failed, stats.in_flight) == (0, 0, 0, 0)


def test_an_address_where_no_cluster_answers_fails_soon_naming_it(tmp_path: Path) -> None:
    """ray_address= of a port nothing listens on: a ConnectionError naming it within
    seconds, where Ray alone would retry for minutes. (Its own process: this one is
    connected to the module's cluster already.)"""
    with socket.socket() as bound:  # bound, not listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{bound.getsockname()[1]}"
        script = textwrap.dedent(
            f"""
            import corral
            try:
                corral.run(abs, [1], backend="ray", ray_address={address!r})
            except ConnectionError as exc:
                print("ConnectionError:", exc)
            """
        )
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        done = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=tmp_path,
            check=False,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(
        f"ConnectionError: backend='ray' found no Ray cluster at ray_address='{address}'"
    ), done.stdout


class SlowToOpen(SyncState):
    """A setup that is still running when the map ends, and finishes all the same."""

    @classmethod
    async def open(cls, marker_dir: str) -> SlowToOpen:
        mark(marker_dir, "opening-1")
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            pass  # e.g. a connect that cannot be interrupted: it ends, and returns its state
        return cls(marker_dir)


def test_a_setup_still_running_when_the_map_ends_is_stopped_and_its_state_closed(
    tmp_path: Path,
) -> None:
    """cancel() while setup= runs: the setup is cancelled; the state it returns all the same
    is closed once; the map ends without waiting for the setup's minute."""
    marker_dir = str(tmp_path)

    async def main() -> None:
        async with asyncio.timeout(60):
            async with corral.map(
                with_state,
                itertools.count(),
                backend="ray",
                ray_actors=1,
                setup=lambda: SlowToOpen.open(marker_dir),
            ) as results:
                waiting = asyncio.ensure_future(anext(aiter(results)))
                while not marked(tmp_path, "opening"):
                    assert not waiting.done()
                    await asyncio.sleep(0.02)
                results.cancel()
                with pytest.raises(StopAsyncIteration):
                    await waiting
            assert results.stats.completed == 0

    asyncio.run(main())
    opened, closes = _closes(tmp_path)
    assert len(opened) == 1
    assert closes == dict.fromkeys(opened, 1)


async def same(item: Any) -> Any:
    return item


async def test_an_item_the_actors_cannot_load_fails_its_own_item_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An item of a class only this process can import: Ray cannot load its chunk in the
    actor; the chunk goes again an item at a time, and only that item fails, named."""
    (tmp_path / "only_here.py").write_text("class Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # this process's path, not the actors'
    monkeypatch.delitem(sys.modules, "only_here", raising=False)
    import only_here

    items: list[Any] = list(range(300))
    items[70] = only_here.Thing()
    async with asyncio.timeout(120):
        async with corral.map(
            same, items, backend="ray", ray_actors=2, limit=8, return_exceptions=True
        ) as results:
            out = [r async for r in results]
    sys.modules.pop("only_here", None)
    assert [x for i, x in enumerate(out) if i != 70] == [i for i in range(300) if i != 70]
    assert type(out[70]) is RuntimeError
    assert "(index 70) cannot be loaded in Ray actor" in str(out[70])
    assert "only_here" in str(out[70])
    stats = results.stats
    assert (stats.started, stats.completed, stats.failed, stats.in_flight) == (300, 299, 1, 0)


# -- stats after an early end --------------------------------------------------

#: Calls that can run at once in the maps below: 2 actors with a share of 2 each,
#: each holding two chunks of 64 (so 256 items are sent, 4 run, the rest queue).
RUNNING = 4
#: Results the consumer takes before the calls start to hang.
TAKEN = 100


async def started_then_hang(marker_dir: str, item: int) -> int:
    """Leave a marker per call; return at once until a ``hang`` marker exists, then hang."""
    mark(marker_dir, f"started-{item}")
    if not _hanging(marker_dir):
        return item
    mark(marker_dir, f"hung-{item}")
    await asyncio.sleep(60)  # cancelled when the map ends
    return item


def _hanging(marker_dir: str) -> bool:
    return Path(marker_dir, "hang").exists()


async def fourth_fails(marker_dir: str, item: int) -> int:
    """Once RUNNING calls have started (all there is room for), the lowest fails, the rest hang."""
    mark(marker_dir, f"started-{item}")
    for _ in range(6000):  # bounded: 60 s
        started = {int(x) for x in marked(Path(marker_dir), "started")}
        if len(started) >= RUNNING:
            break
        await asyncio.sleep(0.01)
    if item == min(started):
        raise Boom(f"item {item}")
    await asyncio.sleep(60)  # cancelled when the map ends
    return item


@pytest.mark.parametrize("backend", ["ray", "local"])
@pytest.mark.parametrize("ending", ["first failure", "cancel()", "consumer cancelled"])
def test_stats_count_the_calls_that_started_not_the_items_queued_in_actors(
    tmp_path: Path, ending: str, backend: str
) -> None:
    """After an early end, stats.started is the calls that ran (one marker each), as
    the local backend counts them, not the items sent to actors that never started."""
    asyncio.run(_end_early_and_count(tmp_path, ending, backend))


async def _end_early_and_count(tmp_path: Path, ending: str, backend: str) -> None:
    marker_dir = str(tmp_path)
    options: dict[str, Any] = {"limit": RUNNING}
    if backend == "ray":
        options |= {"backend": "ray", "ray_actors": 2}
    fn: Any = functools.partial(fourth_fails, marker_dir)
    if ending != "first failure":
        fn = functools.partial(started_then_hang, marker_dir)
    got: list[int] = []
    streams: list[Any] = []

    async def consume() -> None:
        async with corral.map(fn, range(100_000), **options) as results:
            streams.append(results)
            async for value in results:
                got.append(value)
                if len(got) == TAKEN:
                    # From now on every call that starts hangs, until they hold
                    # every slot, with items queued behind them in the actors.
                    mark(tmp_path, "hang")

    async with asyncio.timeout(120):
        if ending == "first failure":
            with pytest.raises(Boom):
                await consume()
        else:
            consuming = asyncio.ensure_future(consume())
            while len(marked(tmp_path, "hung")) < RUNNING:
                assert not consuming.done(), consuming
                await asyncio.sleep(0.01)
            if ending == "cancel()":
                streams[0].cancel()
                await consuming
            else:
                consuming.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await consuming
    started = marked(tmp_path, "started")
    stats = streams[0].stats
    assert stats.in_flight == 0
    assert stats.started == len(started), (stats, sorted(started, key=int))
    if ending == "first failure":
        assert (stats.completed, stats.failed) == (0, 1)
        if backend == "local":
            assert len(started) == RUNNING
        else:
            # An actor may start a queued item in the place of one cancelled
            # before it (or of the one that failed): that call started, and counts.
            assert RUNNING <= len(started) <= 2 * RUNNING
        return
    assert got == list(range(len(got)))
    assert TAKEN <= len(got) <= stats.completed
    assert stats.failed == 0
    hung = marked(tmp_path, "hung")
    if backend == "local":
        assert len(hung) == RUNNING
        assert stats.started == stats.completed + RUNNING
    else:
        # Calls that ended in a chunk cut short started, and are not completed.
        assert stats.started >= stats.completed + len(hung) >= stats.completed + RUNNING


# -- ray_address while this process is connected already -----------------------


def test_a_ray_address_of_another_cluster_than_the_connected_one_is_refused() -> None:
    """This process is connected to the module's cluster: another address is an error
    naming both (not a map on the wrong cluster); the same cluster, or 'auto', runs."""
    connected = ray.get_runtime_context().gcs_address
    port = int(connected.rpartition(":")[2])
    other = f"127.0.0.1:{port + 1 if port < 65535 else port - 1}"
    with pytest.raises(ValueError, match="ray_address") as caught:
        corral.run(abs, [-1], backend="ray", ray_actors=1, ray_address=other)
    message = str(caught.value)
    assert f"ray_address={other!r}" in message
    assert repr(connected) in message
    with pytest.raises(ValueError, match=re.escape(f"ray_address='ray://{other}'")):
        corral.run(abs, [-1], backend="ray", ray_actors=1, ray_address=f"ray://{other}")
    for same in (connected, f"localhost:{port}", "auto"):
        assert corral.run(abs, [-1, -2], backend="ray", ray_actors=1, ray_address=same) == [1, 2]


# -- results this process cannot load -------------------------------------------


def _refuse_to_load() -> None:
    raise ValueError("refused to load here")


class LoadsNowhere:
    """Pickles fine; loading it raises (its __reduce__ names a function that raises)."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_refuse_to_load, ())


def only_in_the_actor() -> Any:
    """An instance of a class of a module that exists in the actor's process only."""
    module = sys.modules.get("only_in_actor")
    if module is None:
        module = types.ModuleType("only_in_actor")
        exec("class Thing:\n    pass\n", module.__dict__)
        sys.modules["only_in_actor"] = module
    return module.Thing()


async def unloadable_at_70_and_120(item: int) -> Any:
    if item == 70:
        return only_in_the_actor()
    if item == 120:
        return LoadsNowhere()
    return {"item": item}  # not of the plainest types: the chunk travels pickled as one


async def test_a_result_this_process_cannot_load_fails_its_own_item_only() -> None:
    """A result of a class only the actor has, and one whose loading raises: each fails
    its own item, named, in its place; the rest of their chunks comes back."""
    async with asyncio.timeout(120):
        async with corral.map(
            unloadable_at_70_and_120,
            range(200),
            backend="ray",
            ray_actors=2,
            limit=8,
            return_exceptions=True,
        ) as results:
            out = [r async for r in results]
    assert [x for i, x in enumerate(out) if i not in (70, 120)] == [
        {"item": i} for i in range(200) if i not in (70, 120)
    ]
    for index, why in ((70, "only_in_actor"), (120, "refused to load here")):
        assert type(out[index]) is RuntimeError, out[index]
        assert f"(index {index}) came back from Ray actor" in str(out[index])
        assert "cannot be loaded in this process" in str(out[index])
        assert why in str(out[index])
    stats = results.stats
    assert (stats.started, stats.completed, stats.failed, stats.in_flight) == (200, 198, 2, 0)

    async with asyncio.timeout(120):
        with pytest.raises(RuntimeError, match=r"\(index 70\) came back from Ray actor \d"):
            await corral.gather(unloadable_at_70_and_120, range(100), backend="ray", ray_actors=2)


async def test_an_actor_keeps_values_pickled_as_one_only_until_the_driver_loaded_them() -> None:
    """The actor's side, in this process: values pickled as one are kept for repack until
    the driver says it loaded them (or the map ends); a cancelled chunk's calls started
    are reported by close()."""
    actor = _ray._Actor(0, as_dict, None, 2, None, None, None, True)
    packed = (await actor.run_chunk([1, 2], 0))[0]
    assert isinstance(packed, bytes)
    assert ray.cloudpickle.loads(packed) == [{"item": 1}, {"item": 2}]
    pieces = await actor.repack(0)
    assert pieces is not None
    assert [ray.cloudpickle.loads(piece) for piece in pieces] == [{"item": 1}, {"item": 2}]
    assert await actor.repack(0) is None  # handed over once
    await actor.run_chunk([3], 2)
    await actor.run_chunk([4], 3, None, [2])  # the driver loaded chunk 2
    assert set(actor._kept) == {3}
    outcome = await actor.run_chunk([5, 6], 4)
    assert outcome[5] == 2  # calls started

    gate = asyncio.Event()
    began: list[int] = []
    hold = functools.partial(wait_for, gate, began)
    waiting = _ray._Actor(1, hold, None, 2, None, None, None, True)
    chunk = asyncio.ensure_future(waiting.run_chunk(list(range(10)), 0))
    for _ in range(1000):  # bounded
        if len(began) == 2:
            break
        await asyncio.sleep(0)
    for _ in range(100):  # the share of 2 lets no third call start: the rest queue
        await asyncio.sleep(0)
    assert len(began) == 2
    chunk.cancel()  # as ray.cancel does: the chunk returns nothing
    with pytest.raises(asyncio.CancelledError):
        await chunk
    assert await waiting.close() == (2, 0)
    assert await actor.close() == (0, 0)
    assert actor._kept == {}


async def test_a_close_that_comes_before_ray_cancel_counts_the_calls_still_running() -> None:
    """The driver closes an actor once it has given up on its chunks; ray.cancel reaches
    the actor on its own and may come after the close. The close stops such a chunk and
    counts its calls that started, which a tally counts once they have ended."""
    gate = asyncio.Event()
    began: list[int] = []
    actor = _ray._Actor(
        0, functools.partial(wait_for, gate, began), None, 2, None, None, None, True
    )
    chunk = asyncio.ensure_future(actor.run_chunk(list(range(10)), 0))
    for _ in range(1000):  # bounded
        if len(began) == 2:
            break
        await asyncio.sleep(0)
    assert len(began) == 2
    async with asyncio.timeout(10):
        assert await actor.close() == (2, 0)  # no ray.cancel before it
    assert chunk.cancelled()
    assert began == [0, 1]  # the freed slots started nothing more


async def as_dict(item: int) -> dict[str, int]:
    return {"item": item}


async def wait_for(gate: asyncio.Event, began: list[int], item: int) -> int:
    began.append(item)
    await gate.wait()
    return item
