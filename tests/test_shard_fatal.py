"""processes=N: what fn raises that is no Exception ends the map as itself, never as a crash.

A worker process that meets such an exception sends it to the parent and exits
at once. The parent must read that last message even when it was writing to
the worker at the moment it went: a write to a peer that is gone fails, the
event loop then drops the connection, and what was still unread in it was
lost, so the map ended with WorkerCrashed ("died (exit code 0)") instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import pytest

import corral
from _loops import LOOP_KINDS, run
from _work import worker_processes

pytestmark = pytest.mark.slow

#: Seconds any wait of these tests may take before it fails instead of hanging.
GUARD = 30.0


class Halt(BaseException):
    """A BaseException that is no SystemExit nor KeyboardInterrupt (some libraries raise one)."""


def make(kind: str, x: int) -> BaseException:
    if kind == "SystemExit":
        return SystemExit(f"exit at {x}")
    if kind == "KeyboardInterrupt":
        return KeyboardInterrupt(f"interrupted at {x}")
    if kind == "ValueError":
        return ValueError(f"bad at {x}")
    return Halt(f"halted at {x}")


EXPECTED: dict[str, type[BaseException]] = {
    "SystemExit": SystemExit,
    "KeyboardInterrupt": KeyboardInterrupt,
    "Halt": Halt,
}

# The worker keeps its end of the test's socket open until the process exits:
# the test sees the worker gone when that socket reaches its end.
_held: list[object] = []


async def raise_when_told(arg: tuple[int, int, str]) -> int:
    """Item 0 returns; item 1 waits for the test's go-ahead, then raises ``kind``."""
    port, x, kind = arg
    if x == 0:
        return x
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    _held.append(writer)
    await asyncio.wait_for(reader.readexactly(1), GUARD)
    raise make(kind, x)


def _items_that_outlast_their_worker(listener: socket.socket, kind: str) -> Iterator[Any]:
    """Items 0 and 1, then a third only once the worker that got them has exited.

    A plain iterator is pulled on the parent's loop: while it waits, the loop
    reads nothing. The third item is pulled when item 0's result frees room,
    and sent to the worker that is gone by then, before its last message is
    read.
    """
    port = listener.getsockname()[1]
    yield (port, 0, kind)
    yield (port, 1, kind)
    connection, _ = listener.accept()  # item 1 is waiting for the go-ahead
    with connection:
        connection.settimeout(GUARD)
        connection.sendall(b"!")
        # The end of this socket: the worker process has exited, after it sent
        # the exception and closed its link to the parent.
        assert connection.recv(1) == b""
    for x in range(2, 6):
        yield (port, x, kind)


@contextlib.contextmanager
def _listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(GUARD)
        yield listener


@pytest.mark.parametrize("loop_kind", LOOP_KINDS)
@pytest.mark.parametrize("kind", list(EXPECTED))
def test_the_last_message_of_a_worker_is_read_though_the_parent_wrote_to_it_after_it_went(
    kind: str, loop_kind: str
) -> None:
    """The worker sends the exception and exits; the parent writes to it, then reads."""

    async def main() -> None:
        with _listener() as listener:
            async with asyncio.timeout(GUARD):  # hang guard
                await corral.gather(
                    raise_when_told,
                    _items_that_outlast_their_worker(listener, kind),
                    processes=1,
                    limit=1,
                    return_exceptions=True,
                )

    with pytest.raises(EXPECTED[kind], match=r"at 1$"):
        run(main, loop_kind)
    assert worker_processes() == set()


# ---------------------------------------------------------------------------
# As in one process: raised as itself, not captured, no worker crashed
# ---------------------------------------------------------------------------

#: Maps run back to back in one test: with limit=2 the parent is often still
#: sending to the worker that raises as it exits, when its last message could
#: be lost.
REPEATS = 6


async def raise_on_three(arg: tuple[int, str]) -> int:
    x, kind = arg
    if x == 3:
        raise make(kind, x)
    await asyncio.sleep(0)
    return x


#: Far more than a socket holds: the worker must finish writing before it exits.
LARGE = 8 << 20


async def raise_a_large_one(x: int) -> int:
    if x == 3:
        raise Halt("x" * LARGE)
    await asyncio.sleep(0)
    return x


def _raised_as_itself(error: BaseException, kind: str) -> None:
    assert type(error) is EXPECTED[kind]
    assert str(error) == str(make(kind, 3))
    assert any("Traceback in the worker process" in note for note in error.__notes__)


@pytest.mark.parametrize("hosted", [False, True], ids=["direct", "engine-in-front"])
@pytest.mark.parametrize("kind", list(EXPECTED))
def test_what_fn_raises_that_is_no_exception_ends_a_sharded_map_as_itself(
    kind: str, hosted: bool
) -> None:
    """limit=2 over 2 processes, return_exceptions=True: still raised, every time; also
    with corral's engine in front of the processes (deadline= puts it there)."""
    extra: dict[str, Any] = {"deadline": GUARD} if hosted else {}

    async def main() -> None:
        async with asyncio.timeout(GUARD):  # hang guard
            await corral.gather(
                raise_on_three,
                [(x, kind) for x in range(8)],
                processes=2,
                limit=2,
                return_exceptions=True,
                **extra,
            )

    for _ in range(1 if hosted else REPEATS):
        with pytest.raises(EXPECTED[kind]) as caught:
            run(main)
        _raised_as_itself(caught.value, kind)
        assert worker_processes() == set()


def test_a_large_base_exception_arrives_whole() -> None:
    """The worker exits only once all of it is written, and the parent reads all of it."""

    async def main() -> None:
        async with asyncio.timeout(GUARD):  # hang guard
            await corral.gather(
                raise_a_large_one, range(8), processes=2, limit=2, return_exceptions=True
            )

    with pytest.raises(Halt) as caught:
        run(main)
    assert str(caught.value) == "x" * LARGE
    assert worker_processes() == set()


def test_an_exception_from_fn_is_still_an_items_outcome() -> None:
    """Only what is no Exception ends the map: an Exception stays its item's result."""

    async def main() -> list[object]:
        async with asyncio.timeout(GUARD):  # hang guard
            return await corral.gather(
                raise_on_three,
                [(x, "ValueError") for x in range(8)],
                processes=2,
                limit=2,
                return_exceptions=True,
            )

    results = run(main)
    assert results[:3] == [0, 1, 2]
    assert results[4:] == [4, 5, 6, 7]
    assert isinstance(results[3], ValueError)
    assert str(results[3]) == "bad at 3"
    assert worker_processes() == set()
