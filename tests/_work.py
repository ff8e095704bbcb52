"""Module-level functions for tests that send work to other processes."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import faulthandler
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def square(x: int) -> int:
    return x * x


def pid_of(_: object) -> int:
    return os.getpid()


class Unpicklable(Exception):
    def __init__(self, handle: object) -> None:
        super().__init__("cannot travel")
        self.handle = handle

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("this exception cannot be pickled")


def fail_on_three(x: int) -> int:
    if x == 3:
        raise KeyError(f"bad item {x}")
    return x


def fail_unpicklably(x: int) -> int:
    raise Unpicklable(lambda: x)


# -- crashes: each ends its worker process the way a real crash would -------


def exit_on_three(x: int) -> int:
    """Ends its process with os._exit(3) on item 3."""
    if x == 3:
        os._exit(3)
    return x


def kill_on_three(x: int) -> int:
    """Sends itself SIGKILL on item 3 (like the OOM killer)."""
    if x == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def segfault_on_three(x: int) -> int:
    """Segfaults on item 3 (a crash in C code)."""
    if x == 3:
        faulthandler.disable()  # no "Fatal Python error" dump on the test's stderr
        ctypes.string_at(0)
    return x


def crash_once(arg: tuple[str, int, bool]) -> int:
    """Ends its process the first time it sees an item marked to crash, then succeeds.

    ``arg`` is (directory, item, crash): the marker file in ``directory``
    remembers across processes that the item already crashed once.
    """
    directory, x, crash = arg
    if crash:
        marker = os.path.join(directory, f"crashed-{x}")
        if not os.path.exists(marker):
            with open(marker, "w"):
                pass
            os._exit(1)
    return x


def sleep_then_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def spin(x: int) -> int:
    """About 50 µs of pure-Python work."""
    total = 0
    for i in range(300):
        total += i * i
    return x


# -- async functions for processes=N ----------------------------------------


async def async_square(x: int) -> int:
    await asyncio.sleep(0)
    return x * x


async def async_pid(_: object) -> int:
    await asyncio.sleep(0.001)
    return os.getpid()


async def async_fail_on_three(x: int) -> int:
    await asyncio.sleep(0)
    if x % 10 == 3:
        raise KeyError(f"bad item {x}")
    return x


async def async_exit_on_three(x: int) -> int:
    await asyncio.sleep(0.01)
    if x == 3:
        os._exit(3)
    return x


async def async_sleep(seconds: float) -> int:
    await asyncio.sleep(seconds)
    return os.getpid()


async def async_logged(arg: tuple[str, int]) -> int:
    """``x * x`` for ``(log, x)``, appending ``"pid x"`` to the file ``log`` first.

    Every call, in any process, leaves a line (one small O_APPEND write each,
    so lines from several processes never mix): the tests count the calls.
    A negative ``x`` fails with ValueError(x); ``x`` of 10**6 and more sleeps
    a minute (for deadlines and kills).
    """
    log, x = arg
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, b"%d %d\n" % (os.getpid(), x))
    finally:
        os.close(fd)
    await asyncio.sleep(60 if x >= 10**6 else 0.0005 * (x % 5))
    if x < 0:
        raise ValueError(x)
    return x * x


async def async_logged_dies_at_25(arg: tuple[str, int]) -> int:
    """:func:`async_logged`, but the process running item 25 dies (exit code 7)."""
    if arg[1] == 25:
        await asyncio.sleep(0.05)  # let some results reach the parent first
        os._exit(7)
    return await async_logged(arg)


def logged_calls(log: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """The ``(pid, x)`` of every call :func:`async_logged` started, complete lines only."""
    if not os.path.exists(log):
        return []
    with open(log, "rb") as file:
        data = file.read()
    lines = data[: data.rfind(b"\n") + 1].split(b"\n")
    return [(int(pid), int(x)) for pid, x in (line.split() for line in lines if line)]


async def async_start_time(x: int) -> float:
    """The time.monotonic() at which the call started (the same clock in every process)."""
    return time.monotonic()


_running = 0
_peak = 0


async def async_peak(x: int) -> tuple[int, int]:
    """(pid, the most calls this process has had in flight so far)."""
    global _running, _peak
    _running += 1
    _peak = max(_peak, _running)
    try:
        for _ in range(3):
            await asyncio.sleep(0.001)
    finally:
        _running -= 1
    return os.getpid(), _peak


_attempts: dict[int, int] = {}


async def async_flaky(x: int) -> int:
    """Fails its first attempt with a transient error, succeeds on the second."""
    _attempts[x] = _attempts.get(x, 0) + 1
    await asyncio.sleep(0)
    if _attempts[x] == 1:
        raise ConnectionResetError(f"flaky {x}")
    return x


async def async_sleep_or_fail(x: int) -> int:
    """Fails at once on item 5; every other item sleeps for a minute."""
    if x == 5:
        raise ValueError("item 5 fails")
    await asyncio.sleep(60)
    return x


def record_pid_and_sleep(arg: tuple[str, float]) -> int:
    """Leaves a file named after this process's pid in a directory, then sleeps."""
    directory, seconds = arg
    with open(os.path.join(directory, str(os.getpid())), "w"):
        pass
    time.sleep(seconds)
    return os.getpid()


async def async_record_pid_and_sleep(arg: tuple[str, float]) -> int:
    directory, seconds = arg
    os.close(os.open(os.path.join(directory, str(os.getpid())), os.O_CREAT | os.O_WRONLY))
    await asyncio.sleep(seconds)
    return os.getpid()


def worker_processes() -> set[int]:
    """PIDs of the live processes descended from this one, multiprocessing's helpers aside.

    The fork server and the resource tracker are started once per program by
    multiprocessing and stay on purpose; workers are forked by the fork
    server, so they are its children. Zombies are dead and not counted.
    """
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                stat = file.read()
        except OSError:
            continue  # it ended meanwhile
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        if state != "Z":
            children.setdefault(int(ppid), []).append(int(entry))
    from multiprocessing import forkserver, resource_tracker

    # Private names: multiprocessing offers no public way to ask for these pids.
    helpers = {
        getattr(forkserver._forkserver, "_forkserver_pid", None),
        getattr(resource_tracker._resource_tracker, "_pid", None),
    }
    found: set[int] = set()
    stack = [os.getpid()]
    while stack:
        for child in children.get(stack.pop(), []):
            stack.append(child)
            found.add(child)
    return found - helpers


async def no_worker_left(tries: int = 200) -> None:
    """Every worker process has exited (a bounded wait: ``tries`` x 0.05 s)."""
    for _ in range(tries):
        if not worker_processes():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"worker processes outlived their map: {sorted(worker_processes())}")


def crash_once_or_fail(arg: tuple[str, int, bool]) -> int:
    """crash_once, and a ValueError(x) for a negative x."""
    x = crash_once(arg)
    if x < 0:
        raise ValueError(x)
    return x


def returns_a_lambda(x: int) -> object:
    """A result that cannot be pickled back to the parent."""
    return lambda: x


async def async_returns_a_lambda(x: int) -> object:
    return lambda: x


def ctrl_c(call: str, directory: Path, *, workers: int) -> tuple[bytes, list[int]]:
    """Run ``call`` in a script, press Ctrl-C once ``workers`` pid files are in ``directory``.

    Returns the script's stderr and the pids (from the files) still alive
    shortly after it exited. SIGINT goes to the script's whole process group,
    as a terminal sends it.
    """
    script = f"import corral\nfrom _work import *\nif __name__ == '__main__':\n    {call}\n"
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, *sys.path])}
    child = subprocess.Popen(
        [sys.executable, "-c", script], env=env, start_new_session=True, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 30
        while len(os.listdir(directory)) < workers:
            assert time.monotonic() < deadline, "the workers never started"
            assert child.poll() is None, child.stderr.read() if child.stderr else ""
            time.sleep(0.01)
        os.killpg(child.pid, signal.SIGINT)
        _, stderr = child.communicate(timeout=20)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    pids = [int(name) for name in os.listdir(directory)]
    deadline = time.monotonic() + 5  # the script has exited; give the kernel a moment
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.01)
    return stderr, [pid for pid in pids if alive(pid)]


def complete_lines(path: Path) -> list[int]:
    """The ints on the complete lines of a file a (possibly killed) process appends to."""
    if not path.exists():
        return []
    data = path.read_bytes()
    return [int(line) for line in data[: data.rfind(b"\n") + 1].split()]


def run_killed(
    command: list[str], started: Callable[[], int], target: int | None, *, context: str
) -> None:
    """Run ``command``; SIGKILL it once ``started()`` reaches ``target`` (None: let it end).

    Asserts it died of the kill, or (no target) exited 0, within two minutes.
    """
    process = subprocess.Popen(command)
    if target is not None:
        deadline = time.monotonic() + 120
        while started() < target and process.poll() is None:
            assert time.monotonic() < deadline, f"{context}: the run stalled"
            time.sleep(0.002)
        process.send_signal(signal.SIGKILL)
    expected = 0 if target is None else -signal.SIGKILL
    assert process.wait(timeout=120) == expected, context


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            stat = file.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


# -- values that cross between processes badly ------------------------------


def _in_main_process() -> bool:
    import multiprocessing

    return multiprocessing.parent_process() is None


def _load_thing(x: int) -> LoadsOnlyInWorkers:
    if _in_main_process():
        raise LookupError(f"a LoadsOnlyInWorkers({x}) cannot be loaded in the main process")
    return LoadsOnlyInWorkers(x)


class LoadsOnlyInWorkers:
    """Pickles anywhere; unpickling it fails in the main process (the test's), not in a worker."""

    def __init__(self, x: int) -> None:
        self.x = x

    def __reduce__(self) -> tuple[object, ...]:
        return (_load_thing, (self.x,))


def _load_error(x: int) -> ErrorLoadsOnlyInWorkers:
    if _in_main_process():
        raise LookupError(f"an ErrorLoadsOnlyInWorkers({x}) cannot be loaded in the main process")
    return ErrorLoadsOnlyInWorkers(x)


class ErrorLoadsOnlyInWorkers(Exception):
    """Round-trips through pickle in a worker; unpickling it fails in the main process."""

    def __init__(self, x: int) -> None:
        super().__init__(x)
        self.x = x

    def __reduce__(self) -> tuple[object, ...]:
        return (_load_error, (self.x,))


def odd_result(arg: tuple[str, int, str]) -> object:
    """For ``(log, x, kind)``: logs the call (a line ``x`` appended to the file ``log``), then
    returns ``x``, or by ``kind``: ``"lambda"`` returns a result that cannot be pickled,
    ``"unloadable"`` one the main process cannot unpickle, ``"raise-unloadable"`` raises an
    exception the main process cannot unpickle.
    """
    log, x, kind = arg
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, b"%d\n" % x)
    finally:
        os.close(fd)
    if kind == "lambda":
        return lambda: x
    if kind == "unloadable":
        return LoadsOnlyInWorkers(x)
    if kind == "raise-unloadable":
        raise ErrorLoadsOnlyInWorkers(x)
    return x


async def async_odd_result(arg: tuple[str, int, str]) -> object:
    """:func:`odd_result` as an async function."""
    await asyncio.sleep(0)
    return odd_result(arg)


def echo(x: object) -> object:
    return x


async def async_echo(x: object) -> object:
    await asyncio.sleep(0)
    return x


# -- a start method whose workers run out (as when file descriptors do) --------


class Unstartable:
    """A worker process whose start fails as when the file descriptors run out."""

    pid = None

    def start(self) -> None:
        raise OSError(errno.EMFILE, "Too many open files")


class StartsRunOut:
    """The real start method, but only the first ``allowed`` workers of a pool start."""

    def __init__(self, allowed: int) -> None:
        from corral import _offload

        self._real = _offload.mp_context()
        self.allowed = allowed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def Process(self, *args: Any, **kwargs: Any) -> Any:
        if str(kwargs.get("name", "")).startswith("corral-process-"):
            if self.allowed <= 0:
                return Unstartable()
            self.allowed -= 1
        return self._real.Process(*args, **kwargs)
