"""backend="ray" at its edges: setup= closed on every exit, values that cannot travel,
a cancelled close, an address where no cluster answers.

Shares the local cluster of test_ray_backend (its module fixture, loopback only).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import corral
import test_ray_backend as base  # skips this module too where Ray is not installed
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
