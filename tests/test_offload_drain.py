"""executor="process": a worker's last messages are read, though a write to it failed first.

A write to a worker process that has exited fails, and the event loop then
drops the connection without reading what is left in it. What the worker
wrote just before it went was lost, and the pool judged it from what it had
read so far:

- "broken" (it cannot load fn): taken for a crash, a worker started in vain;
- "ready" (it had loaded fn and then died running an item): the item was not
  blamed nor counted as retried, as if the worker had died loading fn;
- "done" (the results of a chunk that ran): the chunk ran again.

Each test makes the parent send an item to a worker that is gone, before it
reads the worker's last message: the write waits until the worker has exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator

import pytest

from _work import worker_processes
from corral import _offload
from corral._engine import _Retried

pytestmark = pytest.mark.slow

#: Seconds any wait of these tests may take before it fails instead of hanging.
GUARD = 30.0

# Runs in the worker processes. A worker keeps its end of the test's socket
# open until the process exits: the test sees the worker gone when that
# socket reaches its end.
_held: list[socket.socket] = []


def _wait_for_go(port: int) -> None:
    """Connect to the test and wait for its go-ahead; at once if the test no longer listens."""
    try:
        connection = socket.create_connection(("127.0.0.1", port), timeout=GUARD)
    except OSError:
        return  # a worker started after the test's moment: nothing to wait for
    _held.append(connection)
    connection.recv(1)


def _die_on_one(x: int) -> int:
    if x == 1:
        os._exit(3)
    return x


def _load_when_told(port: int, loads: bool) -> Callable[[int], int]:
    _wait_for_go(port)
    if not loads:
        raise LookupError("fn cannot be loaded here")
    return _die_on_one


class LoadsWhenTold:
    """A fn the worker loads once the test says so; then it loads, or it fails to."""

    def __init__(self, port: int, loads: bool) -> None:
        self.port = port
        self.loads = loads

    def __call__(self, x: int) -> int:  # pragma: no cover - never loaded here
        return x

    def __reduce__(self) -> tuple[object, ...]:
        return (_load_when_told, (self.port, self.loads))


def pid_when_told(arg: tuple[int, int]) -> int:
    """Item 1 waits for the test's go-ahead; every item returns the worker's pid."""
    port, x = arg
    if x == 1:
        _wait_for_go(port)
    return os.getpid()


# Runs here.


@contextlib.contextmanager
def _listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        yield listener


async def _accept(listener: socket.socket) -> socket.socket:
    """The worker's connection; the listener closes, so a later worker does not wait."""
    connection, _ = await asyncio.get_running_loop().sock_accept(listener)
    listener.close()
    connection.setblocking(True)
    connection.settimeout(GUARD)
    return connection


def _until_gone(connection: socket.socket) -> None:
    """Blocks (the loop with it) until the worker holding ``connection`` has exited."""
    assert connection.recv(1) == b""
    connection.close()


async def _holding_a_chunk(pool: _offload.ProcessPool) -> _offload._Worker:
    """The pool's only worker, once a chunk was sent to it."""
    while not (pool._workers and pool._workers[0].chunks):
        await asyncio.sleep(0.005)
    [worker] = pool._workers
    return worker


def _before_the_next_send(worker: _offload._Worker, wait: Callable[[], None]) -> None:
    """The next message to ``worker`` is written once ``wait()`` returns, on the loop.

    Meanwhile the loop reads nothing: whatever the worker writes and then
    exits is still unread in the socket when the write fails.
    """
    link = worker.link
    send = link.send_payload

    def send_later(payload: bytes) -> None:
        del link.send_payload  # once: the class's method again
        wait()
        send(payload)

    link.send_payload = send_later  # type: ignore[method-assign]


async def test_a_worker_that_cannot_load_fn_is_no_crash() -> None:
    """Its "broken" news arrives: the calls fail saying why, no worker started in vain."""
    with _listener() as listener:
        pool = _offload.ProcessPool(LoadsWhenTold(listener.getsockname()[1], False), 1)
        try:
            async with asyncio.timeout(GUARD):  # hang guard
                first = asyncio.ensure_future(pool(0))
                connection = await _accept(listener)  # the worker is loading fn
                worker = await _holding_a_chunk(pool)

                def fails_to_load() -> None:
                    connection.sendall(b"!")
                    _until_gone(connection)

                _before_the_next_send(worker, fails_to_load)
                second = asyncio.ensure_future(pool(2))
                for call in (first, second):
                    with pytest.raises(RuntimeError, match="cannot load fn"):
                        await call
        finally:
            await pool.close(False)
    assert pool.crashes == 0
    assert len(pool.pids) == 1
    assert worker_processes() == set()


async def test_an_item_that_kills_its_worker_is_blamed_though_the_ready_news_came_late() -> None:
    """The worker loaded fn, said so, and died running item 1: item 1 is blamed each time."""
    with _listener() as listener:
        retried = _Retried()
        pool = _offload.ProcessPool(LoadsWhenTold(listener.getsockname()[1], True), 1, retried)
        try:
            async with asyncio.timeout(GUARD):  # hang guard
                killer = asyncio.ensure_future(pool(1))
                connection = await _accept(listener)  # the worker is loading fn
                worker = await _holding_a_chunk(pool)

                def loads_and_dies() -> None:
                    connection.sendall(b"!")
                    _until_gone(connection)

                _before_the_next_send(worker, loads_and_dies)
                assert await pool(2) == 2
                with pytest.raises(_offload.WorkerCrashed, match="killed its worker process 3"):
                    await killer
        finally:
            await pool.close(False)
    # Three deaths, each blamed on item 1, none taken for a worker that died loading fn.
    assert pool.crashes == _offload.MAX_CRASHES
    assert retried.count == _offload.MAX_CRASHES - 1
    assert worker_processes() == set()


def _whole_message_in(worker: _offload._Worker) -> None:
    """Blocks until a whole message from ``worker`` waits unread in the parent's socket."""
    assert worker.link.transport is not None
    fileno = worker.link.transport.get_extra_info("socket").fileno()
    header = struct.Struct("!Q")
    deadline = time.monotonic() + GUARD
    # A second descriptor, to peek: it shares the non-blocking mode the loop set.
    with socket.socket(fileno=os.dup(fileno)) as peek:
        while True:
            left = deadline - time.monotonic()
            assert left > 0, "the worker's message never came"
            select.select([peek], [], [], left)
            data = peek.recv(1 << 16, socket.MSG_PEEK)
            if len(data) >= header.size and len(data) >= header.size + header.unpack_from(data)[0]:
                return


async def test_the_results_a_worker_sent_before_it_was_killed_are_not_run_again() -> None:
    """It sent item 1's result and was killed idle: that result counts, item 1 never reruns."""
    with _listener() as listener:
        port = listener.getsockname()[1]
        pool = _offload.ProcessPool(pid_when_told, 1)
        try:
            async with asyncio.timeout(GUARD):  # hang guard
                # fn is loaded and the task time known: two chunks may go to the worker.
                first_pid = await pool((port, 0))
                sent = pool.items_sent
                done = asyncio.ensure_future(pool((port, 1)))
                connection = await _accept(listener)  # item 1 is running
                [worker] = pool._workers

                def answers_then_is_killed() -> None:
                    with connection:
                        connection.sendall(b"!")
                        _whole_message_in(worker)  # item 1's result
                        os.kill(first_pid, signal.SIGKILL)
                        worker.process.join(GUARD)
                    assert worker.process.exitcode == -signal.SIGKILL

                _before_the_next_send(worker, answers_then_is_killed)
                # Item 2 goes to the dead worker, then again to its successor.
                assert await pool((port, 2)) != first_pid
                assert await done == first_pid
        finally:
            await pool.close(False)
    assert pool.items_sent - sent == 3  # item 1 once, item 2 twice
    assert pool.crashes == 1
    assert worker_processes() == set()


def _recording(
    terminate: Callable[[], None], pid: int | None, terminated: list[int | None]
) -> Callable[[], None]:
    def record() -> None:
        terminated.append(pid)
        terminate()

    return record


async def test_a_worker_closed_with_the_pool_still_sees_its_socket_end() -> None:
    """The parent keeps no descriptor of a worker's socket open once the pool closes it."""
    pool = _offload.ProcessPool(pid_when_told, 2)
    terminated: list[int | None] = []
    try:
        async with asyncio.timeout(GUARD):  # hang guard
            pids = set(await asyncio.gather(*(pool((0, x)) for x in (0, 2, 3, 4))))
            while len(pool._workers) < 2:  # both started
                await asyncio.sleep(0.005)
        for process in pool._started:
            process.terminate = _recording(process.terminate, process.pid, terminated)  # type: ignore[method-assign]
    finally:
        await pool.close(True)  # a graceful close: the workers see their socket end and exit
    assert pids <= set(pool.pids)
    assert len(pool.pids) == 2
    assert terminated == []  # none had to be stopped
    assert pool.crashes == 0
    assert worker_processes() == set()
