"""Worker processes are stopped on every way out of a map, even ones that ignore SIGTERM.

DESIGN.md: worker processes corral started are stopped on every exit path; on
cancellation or failure a busy worker is terminated (killed if it has not
stopped within a second), not waited for. Each test runs calls that ignore
SIGTERM and sleep a minute, leaves the map one way, and checks that every
worker is gone well before the grace of a clean end would have run out (five
seconds, raised to a minute here), and long before the calls would have ended.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import corral
from _loops import run
from _work import alive, worker_processes
from corral import _offload, _shard

#: Seconds from the way out to the last worker gone: the one-second wait after
#: SIGTERM, and room for a loaded machine; a wait for the calls or for the grace
#: of a clean end (each a minute here) before the kill would exceed it.
PROMPT = 15.0
#: The grace of a clean end in these tests: a wrong wait for it is unmistakable.
CLEAN_GRACE = 60.0
GO = "go"


@pytest.fixture(autouse=True)
def long_clean_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_offload, "EXIT_GRACE", CLEAN_GRACE)
    monkeypatch.setattr(_shard, "EXIT_GRACE", CLEAN_GRACE)


def _record_pid(directory: str) -> None:
    os.close(os.open(os.path.join(directory, str(os.getpid())), os.O_CREAT | os.O_WRONLY))


def stubborn(arg: tuple[str, int, float]) -> int:
    """``x`` after ``seconds``, in a process that ignores SIGTERM from now on.

    Leaves a file named after the process's pid in ``directory`` first. A
    negative ``x`` instead raises ValueError once the test creates the file
    ``go`` in ``directory``.
    """
    directory, x, seconds = arg
    if x < 0:
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(directory, GO)):
            if time.monotonic() > deadline:
                raise AssertionError("the test never said go")
            time.sleep(0.01)
        raise ValueError(f"item {x} fails")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _record_pid(directory)
    time.sleep(seconds)
    return x


async def async_stubborn(arg: tuple[str, int, float]) -> int:
    """:func:`stubborn` for ``processes=N``: busy, it blocks its process's event loop.

    Blocked, the process cannot notice that the map is over, nor stop the
    call: only a signal ends it (as with CPU-bound work). A negative ``x``
    waits for ``go`` without blocking the loop.
    """
    directory, x, seconds = arg
    if x < 0:
        deadline = time.monotonic() + 30
        # A stat of a local file, every 10 ms: no loop is worse for it.
        while not os.path.exists(os.path.join(directory, GO)):  # noqa: ASYNC240
            if time.monotonic() > deadline:
                raise AssertionError("the test never said go")
            await asyncio.sleep(0.01)
        raise ValueError(f"item {x} fails")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _record_pid(directory)
    time.sleep(seconds)  # the point: a call that holds its loop
    return x


#: How a map reaches worker processes: its fn and keywords. ``limit=2`` over
#: two processes: one call at a time in each.
MODES: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
    "processes": (async_stubborn, {"processes": 2, "limit": 2}),
    "processes+engine": (async_stubborn, {"processes": 2, "limit": 2, "progress": lambda s: None}),
    "executor=process": (stubborn, {"executor": "process", "limit": 2}),
}

#: For a failing item, its call must not wait behind a minute-long one in the
#: same worker. processes=2: the first item goes first to a process that runs
#: one call at a time (the next item, to the process with more room: the
#: other). executor='process': a timeout sends each call to an idle worker on
#: its own.
FAILING = {
    "processes": MODES["processes"],
    "processes+engine": MODES["processes+engine"],
    "executor=process": (stubborn, {**MODES["executor=process"][1], "timeout": 300.0}),
}


def _pids(directory: Path) -> list[int]:
    return [int(name) for name in os.listdir(directory) if name.isdigit()]


async def _until_busy(directory: Path) -> None:
    """Until a worker is inside a call that ignores SIGTERM."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while not _pids(directory):
        assert loop.time() < deadline, "no call started"
        await asyncio.sleep(0.01)


def _check_all_gone(directory: Path) -> None:
    pids = _pids(directory)
    assert pids, "no worker ever ran a call"
    assert [pid for pid in pids if alive(pid)] == []
    assert worker_processes() == set()


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_a_normal_end_leaves_no_worker(mode: str, tmp_path: Path) -> None:
    """Every call ended: the workers, though they ignore SIGTERM, exit at once."""
    fn, keywords = MODES[mode]
    items = [(str(tmp_path), x, 0.0) for x in range(6)]

    async def main() -> None:
        async with asyncio.timeout(60):  # hang guard
            assert await corral.gather(fn, items, **keywords) == list(range(6))

    run(main)
    _check_all_gone(tmp_path)


def _busy_map(mode: str, directory: Path, how: str) -> Callable[[], Any]:
    """``main`` for :func:`run`: leave a map of busy, SIGTERM-ignoring workers by ``how``.

    Returns the seconds from the way out to the end of the map.
    """
    fn, keywords = MODES[mode]
    d = str(directory)
    items = [(d, x, 60.0) for x in range(6)]

    class Stop(Exception):
        pass

    async def leave() -> float:
        loop = asyncio.get_running_loop()
        began = loop.time()
        if how == "break":
            quick = directory / "quick"  # its pid is no sign that a worker is busy
            quick.mkdir()
            async with corral.map(fn, [(str(quick), 0, 0.0), *items], **keywords) as out:
                async for _ in out:
                    await _until_busy(directory)
                    began = loop.time()
                    break
        elif how == "raise":
            with pytest.raises(Stop):
                async with corral.map(fn, items, **keywords):
                    await _until_busy(directory)
                    began = loop.time()
                    raise Stop
        elif how == "cancel":
            task = asyncio.create_task(corral.gather(fn, items, **keywords))
            await _until_busy(directory)
            began = loop.time()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        elif how == "fail":
            failing_fn, failing_keywords = FAILING[mode]
            failing = [(d, -1, 0.0), *items]
            task = asyncio.create_task(corral.gather(failing_fn, failing, **failing_keywords))
            await _until_busy(directory)
            began = loop.time()
            (directory / GO).touch()
            with pytest.raises(ValueError, match=r"^item -1 fails"):
                await task
        else:  # pragma: no cover
            raise AssertionError(how)
        return loop.time() - began

    async def main() -> float:
        async with asyncio.timeout(60):  # hang guard: the calls sleep a minute
            return await leave()

    return main


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "how"),
    [(mode, how) for mode in MODES for how in ("break", "raise", "cancel")]
    + [(mode, "fail") for mode in FAILING],
)
def test_busy_workers_that_ignore_sigterm_are_killed_not_waited_for(
    mode: str, how: str, tmp_path: Path
) -> None:
    """break, an exception in the consumer, cancellation, a failing item: out in ~1 s."""
    took = run(_busy_map(mode, tmp_path, how))
    assert took < PROMPT
    _check_all_gone(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_ctrl_c_kills_busy_workers_that_ignore_sigterm(mode: str, tmp_path: Path) -> None:
    """SIGINT to a script's process group during corral.run: it exits, its workers with it."""
    items = [(str(tmp_path), x, 60.0) for x in range(6)]
    script = (
        "import corral\n"
        "from corral import _offload, _shard\n"
        "from test_process_exits import CLEAN_GRACE, MODES\n"
        "_offload.EXIT_GRACE = _shard.EXIT_GRACE = CLEAN_GRACE\n"
        "if __name__ == '__main__':\n"
        f"    fn, keywords = MODES[{mode!r}]\n"
        f"    corral.run(fn, {items!r}, **keywords)\n"
    )
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, *sys.path])}
    child = subprocess.Popen(
        [sys.executable, "-c", script], env=env, start_new_session=True, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 30
        while not _pids(tmp_path):
            assert time.monotonic() < deadline, "no call started"
            assert child.poll() is None, child.stderr.read() if child.stderr else ""
            time.sleep(0.01)
        began = time.monotonic()
        os.killpg(child.pid, signal.SIGINT)
        _, stderr = child.communicate(timeout=30)
        took = time.monotonic() - began
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    assert b"KeyboardInterrupt" in stderr, stderr.decode(errors="replace")
    assert took < PROMPT
    assert [pid for pid in _pids(tmp_path) if alive(pid)] == []


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_busy_workers_that_ignore_sigterm_do_not_outlive_a_dropped_map(
    mode: str, tmp_path: Path
) -> None:
    """``break`` out of a plain ``async for`` (no ``async with``), then asyncio.run ends."""
    fn, keywords = MODES[mode]
    quick = tmp_path / "quick"  # its pid is no sign that a worker is busy
    quick.mkdir()
    items = [(str(quick), 0, 0.0)] + [(str(tmp_path), x, 60.0) for x in range(1, 6)]

    async def main() -> None:
        async for _ in corral.map(fn, items, **keywords):
            await _until_busy(tmp_path)
            break

    asyncio.run(main())
    # The map is closed in the background, which asyncio.run may not let finish:
    # the workers are ending, or will be within a second, not gone yet.
    began = time.monotonic()
    pids = _pids(tmp_path)
    assert pids
    while worker_processes() or any(alive(pid) for pid in pids):
        assert time.monotonic() - began < 10, "a busy worker outlived the map"
        time.sleep(0.01)
    assert time.monotonic() - began < PROMPT


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
async def test_cancelled_while_the_workers_start_leaves_none(mode: str, tmp_path: Path) -> None:
    """Cancelled as soon as a worker process exists, before any call: none is left."""
    fn, keywords = MODES[mode]
    items = [(str(tmp_path), x, 60.0) for x in range(6)]
    loop = asyncio.get_running_loop()
    # The fork server's first start runs a throwaway process: not a worker, and
    # not the map's to stop. Out of the way before.
    await asyncio.to_thread(_offload.warm_up_start_method, _offload.mp_context())
    async with asyncio.timeout(60):  # hang guard
        task = asyncio.create_task(corral.gather(fn, items, **keywords))
        deadline = loop.time() + 30
        while not worker_processes():
            assert loop.time() < deadline, "no worker started"
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert worker_processes() == set()
