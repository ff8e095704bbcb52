"""Running plain ``def`` functions off the event loop: threads and worker processes.

A sync ``fn`` never runs on the loop thread: a blocking call there stalls every
other call in flight. By default it runs in a thread pool that the map creates
(as wide as the limit, so ``limit=50`` really means 50 concurrent blocking
calls; :data:`UNBOUNDED_THREADS` for ``limit=None``) and shuts down when the
map ends. A map never runs more calls than its thread pool has threads (a
given ``ThreadPoolExecutor`` too: see :func:`thread_width`), so no call waits
for a thread. ``executor="process"`` runs it in worker processes instead, for
CPU-bound work: one loop uses one core, and a pure-Python ``fn`` holds the
GIL, so threads would not help.

Worker processes, not a ``ProcessPoolExecutor``
-----------------------------------------------
``executor="process"`` starts its own workers (one per CPU the process may
use, at most ``limit``), each talking to the event loop over a socket pair
that the loop reads with no helper thread. A ``ProcessPoolExecutor`` would
work, but when one of its processes dies (``os._exit``, a segfault in C code,
the OOM killer) the whole pool is broken: every submission in flight fails
with ``BrokenProcessPool``, all workers are torn down, and nobody can tell
which item did it. With a socket per worker corral knows exactly what each
process was running, so a crash costs one respawned process, and only that
worker's items are re-run:

- the chunk it was running is re-run, its items counted as retries in
  ``stats.retried``. When that chunk held several items, they are re-run one
  per chunk, so a second crash names its item;
- chunks queued behind it had not started: they are sent again, not counted;
- an item that kills its worker :data:`MAX_CRASHES` times when run alone
  fails with :class:`WorkerCrashed`, which names it. The other items carry on;
- a worker that dies before it has loaded ``fn`` ran nothing: what it was
  sent goes again, no item blamed nor counted as retried. When
  :data:`MAX_CRASHES` workers in a row die before running anything, every
  call fails with one :class:`WorkerCrashed` saying so.

``SystemExit`` and ``KeyboardInterrupt`` from ``fn`` are no crash: the worker
sends them back and the parent raises them, as a thread would, never re-run.
A worker that cannot be started (no file descriptors or memory left) is done
without while others run; with none running, the calls fail with that error.

Nothing is lost or duplicated: a result is handed to its caller at most once
(a re-run only happens for an item whose result never arrived), and every
item ends with a result or an exception.

Items and results that cannot cross
-----------------------------------
One value that cannot make the trip fails its own item, named, never its
chunk nor the map, and no item runs twice for it:

- an item that cannot be pickled fails with ``TypeError`` before it is sent;
- a chunk a worker cannot unpickle (an item of a class it cannot import) ran
  nowhere: its items are sent again one per chunk, and the culprit fails;
- a result or exception that cannot be pickled becomes a ``TypeError``;
- results and exceptions of other types than ``int``, ``float``, ``str``,
  ``bool`` and ``None`` are pickled one by one (:func:`pack_outcome`) and
  loaded one by one here, so one this process cannot load fails its item
  with a ``RuntimeError`` naming it, and the others of its chunk arrive.

The same holds for a given ``ProcessPoolExecutor`` (corral pickles the items
and results itself, so the pool never meets a value it cannot carry) and for
``processes=N``.

Chunks, sized by measurement
----------------------------
One message to a worker and back costs a few hundred microseconds of pickling,
socket writes and wake-ups, which would dominate a 1 ms task. So calls are
sent in chunks. The worker times each chunk, and the chunk size is chosen so a
chunk holds about :data:`TARGET_CHUNK_SECONDS` of work (a 50 µs task goes 200
at a time, a 1 s task alone), never more than :data:`MAX_CHUNK` items, and
never so many that a worker would sit idle while another holds a long queue:
what is waiting is shared out evenly over the free slots. Each worker gets up
to two chunks at once, so the next one is already in its socket while it sends
results back; for slow items (over :data:`PIPELINE_BELOW` seconds each) only
one, because then the round trip is negligible and a second chunk would only
wait behind the first while another worker idles.

Backpressure comes from the engine: it runs at most ``limit`` calls at once,
and every call is one item, so the workers never hold more than ``limit``
items, whatever the input's size.

Timeouts
--------
``timeout=`` is seconds per attempt, and what its clock measures depends on
where the call runs:

- threads: the map wraps the call in ``asyncio.timeout``. Since no call waits
  for a thread, that is the call's run. A late call cannot be interrupted:
  it fails with ``TimeoutError`` while its thread runs it to the end, and
  until then a later call may wait for that thread, its clock running.
- ``executor="process"``: the pool keeps the clock itself, from when the item
  is sent to a worker process, so the wait for a free worker never counts.
  Timed items travel alone (a chunk of one) and only to a worker that has
  loaded ``fn`` and holds nothing else, so none waits inside a worker. A call
  still running when its time is up fails with ``TimeoutError`` (the type
  ``asyncio.timeout`` raises, so ``retries=`` treats it as any timeout), and
  its worker, which would go on running it, is terminated and replaced. That
  is no crash: it is not counted as one, nor re-run here; the retries decide.
- a given ``ProcessPoolExecutor``: the clock starts when the item is
  submitted, one item per submission and no more submissions than the pool
  has processes. It includes any wait for a process (the pool starts them on
  demand; others may submit to it too), and a late call cannot be stopped:
  it fails with ``TimeoutError`` but runs on in its process, which this map
  gives nothing else until it ends.

Cleanup
-------
Workers corral started are stopped on every exit path: after a clean run they
are told to exit (their socket is closed) and waited for (5 s in all, not
each); after a failure or cancellation, and whenever a worker still runs calls
nobody waits for (``cancel()``, a deadline, a timeout), they are terminated at
once (killed if still alive a second later), not waited for. They ignore
SIGINT, so Ctrl-C reaches only the parent, which cancels the map and stops
them; a worker whose parent vanished sees its socket close and exits. Workers
are daemonic, so even a parent that never reaches its cleanup terminates them
at interpreter exit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import importlib.util
import inspect
import logging
import math
import os
import pickle
import reprlib
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from multiprocessing.context import ForkServerContext, SpawnContext
    from multiprocessing.process import BaseProcess

    from ._engine import _Retried

logger = logging.getLogger("corral")

#: The most items sent to a worker process in one message.
MAX_CHUNK = 256
#: About how many seconds of work one chunk holds, once the task time is known.
TARGET_CHUNK_SECONDS = 0.01
#: Tasks slower than this (seconds each) are not queued behind another chunk.
PIPELINE_BELOW = 0.05
#: An item that kills its worker this many times (run alone) fails with WorkerCrashed.
MAX_CRASHES = 3
#: Threads a map creates for a sync ``fn`` when its limit is ``None``.
UNBOUNDED_THREADS = 100
#: Seconds a terminated worker gets before it is killed.
TERMINATE_GRACE = 1.0
#: Seconds the workers of a map that ended cleanly get to exit before they are terminated.
EXIT_GRACE = 5.0
#: Bytes per read, and reads at most, of what a lost link left unread (see drain).
DRAIN_CHUNK = 1 << 18
DRAIN_READS = 256

Call = Callable[[Any], Awaitable[Any]]
OnClose = Callable[[bool], Awaitable[None]]


class WorkerCrashed(Exception):
    """A worker process died while running an item, and corral gave up on it.

    ``executor="process"`` re-runs an item whose worker died (``os._exit``, a
    segfault, a kill), since the death may have nothing to do with the item
    (the OOM killer picked it, an operator sent SIGKILL). An item that kills
    its worker :data:`MAX_CRASHES` times in a row when run alone is the cause:
    it fails with this exception instead of being retried without end.

    With ``processes=N`` a dead worker process ends the whole map with this
    exception, naming how many items it held.

    Attributes:
        item: the item that killed its worker (``None`` when no single item is to blame).
        exitcode: the worker's exit code; negative: killed by that signal.
    """

    def __init__(self, message: str, *, item: object = None, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.item = item
        self.exitcode = exitcode

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_crash, (str(self), self.item, self.exitcode))


def _rebuild_crash(message: str, item: object, exitcode: int | None) -> WorkerCrashed:
    return WorkerCrashed(message, item=item, exitcode=exitcode)


def describe_exit(exitcode: int | None) -> str:
    """``killed by SIGKILL``, ``exit code 3``: how a process ended, for messages."""
    if exitcode is None:
        return "exit code unknown"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def offload(
    fn: Callable[[Any], Any],
    executor: str | concurrent.futures.Executor | None,
    limit: int | None,
    retried: _Retried | None = None,
    timeout: float | None = None,
) -> tuple[Call, OnClose | None]:
    """Wrap a sync ``fn`` as a coroutine function running on ``executor``.

    Returns the call and, for an executor corral created, a closer that shuts
    it down: gracefully after a clean run, at once (processes terminated)
    after a failure or cancellation. ``retried`` counts the items re-run after
    their worker process died. ``timeout`` (seconds per attempt) is applied
    here only when :func:`applies_timeout` says so; see "Timeouts" in the
    module docstring. A call that a given executor drops before running it
    (shut down with ``cancel_futures=True``) fails with a RuntimeError naming
    its item: as a CancelledError it would read as if ``fn`` had raised one.
    """
    if isinstance(executor, concurrent.futures.Executor):
        if isinstance(executor, concurrent.futures.ProcessPoolExecutor):
            check_picklable(fn, f"executor={executor!r}")
            return _ExecutorCalls(fn, executor, timeout), None
        return _thread_call(fn, lambda: executor), None
    if executor == "process":
        check_picklable(fn, "executor='process'")
        processes = usable_cpus() if limit is None else min(usable_cpus(), limit)
        pool = ProcessPool(fn, processes, retried, timeout)
        return pool, pool.close
    return _owned_thread_pool(fn, limit)


def applies_timeout(executor: str | concurrent.futures.Executor | None) -> bool:
    """Whether :func:`offload`'s call on ``executor`` times each attempt itself.

    Processes do: an attempt's clock starts when its item is handed to a
    process, not while it waits for one. Threads do not: the caller wraps
    the call in ``asyncio.timeout``, and :func:`thread_width` keeps calls
    from waiting for a thread.
    """
    return executor == "process" or isinstance(executor, concurrent.futures.ProcessPoolExecutor)


def thread_width(
    executor: str | concurrent.futures.Executor | None, limit: int | None
) -> int | None:
    """How many calls ``executor``'s threads run at once (``None``: no threads, or unknown).

    A map should not run more calls than that: the others would only wait for
    a thread, holding a limiter slot and with their timeout running.
    """
    if executor is None or executor == "thread":
        return limit if limit is not None else UNBOUNDED_THREADS
    if isinstance(executor, concurrent.futures.ThreadPoolExecutor):
        # _max_workers is private but has been there since Python 3.2; an
        # executor without it (a subclass or a lookalike) is left unbounded.
        width = getattr(executor, "_max_workers", None)
        return width if isinstance(width, int) and width >= 1 else None
    return None


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS and Windows have no affinity call
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------


def no_stop_iteration(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, run in a thread: a StopIteration it raises comes out as a RuntimeError.

    A StopIteration cannot be set on an asyncio future (it would end a
    generator's iteration instead): the future never resolves and the map
    hangs. Coroutines convert it the same way (PEP 479).
    """
    try:
        return fn(*args)
    except StopIteration as exc:
        raise RuntimeError(f"fn raised StopIteration for item {args[0]!r}") from exc


def _thread_call(
    fn: Callable[[Any], Any], get_pool: Callable[[], concurrent.futures.Executor]
) -> Call:
    warned = False

    async def call(item: Any) -> Any:
        nonlocal warned
        pool = get_pool()
        submitted = pool.submit(no_stop_iteration, fn, item)
        try:
            result = await asyncio.wrap_future(submitted, loop=asyncio.get_running_loop())
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if submitted.cancelled() and task is not None and not task.cancelling():
                # The executor dropped it, not the map (a pool shut down with
                # cancel_futures=True): this item's failure, which as a
                # CancelledError would read as if fn had raised it.
                raise dropped_by(pool, item) from None
            raise  # this call was cancelled (cancel(), a deadline, a timeout), or fn raised it
        if inspect.isawaitable(result):
            # e.g. ``lambda url: fetch(session, url)``: the coroutine was made in
            # a thread and must run on the loop. Correct, but a thread hop per call.
            if not warned:
                warned = True
                logger.warning(
                    "corral: %r is a plain function that returns an awaitable; it runs in "
                    "a thread first. Write it as `async def` to avoid a thread hop per call.",
                    fn,
                )
            result = await result
        return result

    return call


def dropped_by(executor: concurrent.futures.Executor, item: Any) -> RuntimeError:
    """The error of a call that ``executor`` cancelled before running it."""
    return RuntimeError(
        f"executor={executor!r} cancelled the call of fn(item) for item={reprlib.repr(item)} "
        "before running it (was it shut down with cancel_futures=True?)"
    )


def _owned_thread_pool(fn: Callable[[Any], Any], limit: int | None) -> tuple[Call, OnClose]:
    pool: concurrent.futures.ThreadPoolExecutor | None = None
    threads = limit if limit is not None else UNBOUNDED_THREADS

    def get_pool() -> concurrent.futures.ThreadPoolExecutor:
        nonlocal pool
        if pool is None:
            pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="corral")
        return pool

    async def close(clean: bool) -> None:
        if pool is not None:
            # A running thread cannot be interrupted: wait for the calls in
            # progress (off the loop thread), drop the queued ones.
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: pool.shutdown(wait=True, cancel_futures=True)
            )

    return _thread_call(fn, get_pool), close


# ---------------------------------------------------------------------------
# Sending work to other processes: picklability, start method, framing
#
# Messages are pickles behind an 8-byte big-endian length. The parent side is
# an asyncio Protocol on its end of a socket pair (the loop reads it, no
# thread); a sync worker reads and writes its end with blocking calls.
# ---------------------------------------------------------------------------


def check_picklable(fn: Callable[..., Any], what: str) -> None:
    """Refuse at once a function that cannot be sent to another process, saying why."""
    try:
        pickle.dumps(fn)
    except Exception as exc:
        raise TypeError(
            f"{what} needs a function it can send to another process; "
            f"{fn!r} cannot be pickled ({exc}). Define it at module level (not a lambda, "
            "closure or method of a local class) so worker processes can import it."
        ) from None


def mp_context() -> ForkServerContext | SpawnContext:
    """The start method for worker processes: forkserver where there is one, else spawn."""
    import multiprocessing  # only here: it costs import time and a __mp_main__ alias

    # Not "fork": the parent runs an event loop and often threads, and forking
    # a threaded process can deadlock the child (Python 3.12 warns about it).
    if "forkserver" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("forkserver")
    return multiprocessing.get_context("spawn")  # pragma: no cover - Windows


_warm = False  # the fork server of this program answered once: later starts are fast


def warm_up_start_method(context: ForkServerContext | SpawnContext) -> None:
    """Get the fork server running and ready (blocking: run it in a thread).

    A worker forked by the fork server starts with whatever the fork server
    imported, so corral asks it to import corral (and uvloop, when installed)
    once, instead of every worker importing them on its own (50-200 ms each on
    a busy machine). This adds to the modules the program asked it to preload,
    and has no effect if the fork server was already started.

    The fork server imports all that before it accepts anything, so the first
    start costs ~0.1-0.3 s: one throwaway process waits that out here, and
    later worker starts on the loop thread take a couple of ms.
    """
    global _warm
    if _warm or context.get_start_method() != "forkserver":
        return
    from multiprocessing import forkserver

    wanted = ["corral"]
    if importlib.util.find_spec("uvloop") is not None:
        wanted.append("uvloop")
    # No public getter: the list set by set_forkserver_preload(), ['__main__'] by default.
    current = list(getattr(getattr(forkserver, "_forkserver", None), "_preload_modules", []))
    context.set_forkserver_preload(list(dict.fromkeys([*current, *wanted])))
    probe = context.Process(target=_noop, name="corral-warm-up", daemon=True)
    probe.start()
    probe.join()
    _warm = True


def _noop() -> None:
    pass


def ignore_sigint() -> None:
    """In a worker: Ctrl-C is for the parent, which stops the workers itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


_HEADER = struct.Struct("!Q")
#: A worker's first message: it has loaded fn and waits for items.
_READY = pickle.dumps(("ready",), pickle.HIGHEST_PROTOCOL)


def send_frame(sock: socket.socket, payload: bytes) -> None:
    """Write one message on a blocking socket."""
    sock.sendall(_HEADER.pack(len(payload)))
    sock.sendall(payload)


def recv_frame(sock: socket.socket) -> bytearray | None:
    """Read one message from a blocking socket; ``None`` when the other side closed it."""
    header = _recv_exactly(sock, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    return _recv_exactly(sock, size)


def _recv_exactly(sock: socket.socket, size: int) -> bytearray | None:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        count = sock.recv_into(view[got:])
        if count == 0:
            return None
        got += count
    return buffer


def undecodable(exc: Exception) -> RuntimeError:
    error = RuntimeError(
        f"a message between corral's processes could not be unpickled: {exc!r} (a value "
        "of a type the receiving process cannot import?)"
    )
    error.__cause__ = exc
    return error


class Link(asyncio.Protocol):
    """The parent's end of a framed-pickle socket, driven by the event loop.

    ``on_message`` is called with each unpickled message, ``on_lost`` once when
    the other side is gone (it exited or closed its end). Writes never block:
    the transport buffers them. What is in flight is bounded by the callers
    (the engine's limit), so no write flow control is needed.
    """

    def __init__(self, on_message: Callable[[Any], None], on_lost: Callable[[], None]) -> None:
        self._on_message = on_message
        self._on_lost = on_lost
        self._buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        header = _HEADER.size
        while len(buffer) >= header:
            (size,) = _HEADER.unpack_from(buffer)
            end = header + size
            if len(buffer) < end:
                return
            try:
                message = pickle.loads(buffer[header:end])
            except Exception as exc:
                # E.g. an exception whose class this process cannot import. The
                # stream itself is intact: say so in place of the message.
                message = ("undecodable", undecodable(exc))
            del buffer[:end]  # cheap: a bytearray drops its head in O(1)
            self._on_message(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost()

    @property
    def open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def send_payload(self, payload: bytes) -> None:
        """Send an already pickled message (dropped if the other side is gone)."""
        if self.open:
            assert self.transport is not None
            self.transport.writelines([_HEADER.pack(len(payload)), payload])

    def send(self, message: object) -> None:
        self.send_payload(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def spare_of(sock: socket.socket) -> socket.socket:
    """A second descriptor of ``sock``, to :func:`drain` once its link is lost."""
    spare = sock.dup()
    spare.setblocking(False)  # as the loop makes its twin: they share that mode
    return spare


def drain(spare: socket.socket, link: Link) -> None:
    """Feed ``link`` what its peer wrote and the link did not read, through ``spare``.

    A write to a peer process that has just exited fails, and the event loop
    then drops the connection without reading what is left in the socket:
    the peer's last messages, written just before it went. Once the peer is
    gone, all it wrote is in this end of the socket; ``spare`` (see
    :func:`spare_of`) reads it after the link stopped reading, so nothing
    is read twice. Bounded: to the socket's end, or, should the peer live
    on and keep writing, to what it holds now.
    """
    for _ in range(DRAIN_READS):
        try:
            data = spare.recv(DRAIN_CHUNK)
        except OSError:  # nothing more for now (BlockingIOError), or reset
            return
        if not data:
            return
        link.data_received(data)


async def connect(sock: socket.socket, link: Link) -> None:
    """Attach ``link`` to the parent's end of a socket pair (closes it on failure)."""
    try:
        await asyncio.get_running_loop().create_connection(lambda: link, sock=sock)
    except BaseException:
        sock.close()
        raise


async def wait_exit(process: BaseProcess, timeout: float) -> int | None:
    """Wait (without blocking the loop) up to ``timeout`` s for ``process`` to end."""
    await wait_all_exit([process], timeout)
    return process.exitcode


async def wait_all_exit(processes: Iterable[BaseProcess], timeout: float) -> None:
    """Wait (without blocking the loop) up to ``timeout`` s in all for every process to end."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pause = 0.001
    live = [p for p in processes if p.exitcode is None]
    while live and loop.time() < deadline:
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.02)
        live = [p for p in live if p.exitcode is None]


async def stop_processes(
    processes: Iterable[BaseProcess], *, grace: float, busy: Iterable[BaseProcess] = ()
) -> None:
    """Stop worker processes: let them exit for ``grace`` s, then terminate, then kill.

    ``grace`` is one deadline for all of them, not one per process. The
    ``busy`` ones (running work nobody waits for any more) are terminated at
    once whatever ``grace`` says. Whatever happens meanwhile (even cancellation
    of this coroutine), every process is dead and reaped on return.
    """
    started = [p for p in processes if p.pid is not None]
    hurried = set(busy) if grace > 0 else set(started)
    try:
        await asyncio.gather(
            _end_processes([p for p in started if p in hurried], 0.0),
            _end_processes([p for p in started if p not in hurried], grace),
        )
    finally:
        for process in started:
            if process.exitcode is None:
                process.kill()
            process.join()
            process.close()


async def _end_processes(processes: list[BaseProcess], grace: float) -> None:
    if not processes:
        return
    if grace > 0:
        await wait_all_exit(processes, grace)
    for process in processes:
        if process.exitcode is None:
            process.terminate()
    await wait_all_exit(processes, TERMINATE_GRACE)


def kill_stragglers(processes: Iterable[BaseProcess]) -> None:
    """Kill those of ``processes`` (terminated just now) still running a second later.

    For a map dropped unclosed (``break`` out of a plain ``async for``): its
    close runs in the background, and ``asyncio.run`` may end the loop before
    that close gets to the kill. A worker that ignores SIGTERM would then run
    on, and the program hang at exit (multiprocessing joins its children). So
    a thread of its own does it, not a daemon: the interpreter waits for it
    (a second at most) before multiprocessing's exit handler joins them.
    """
    if sys.platform == "win32":  # pragma: no cover - terminate() is a kill there
        return
    watched: list[tuple[int, int]] = []
    try:
        for process in processes:
            if process.pid is not None and process.exitcode is None:
                # A copy of its sentinel (readable once it has ended): the close,
                # if it runs, closes the process and that sentinel meanwhile.
                watched.append((process.pid, os.dup(process.sentinel)))
    except BaseException:
        for _, fd in watched:
            os.close(fd)
        raise
    if not watched:
        return
    thread = threading.Thread(
        target=_kill_unless_ended, args=(watched,), name="corral-kill-stragglers"
    )
    try:
        thread.start()
    except RuntimeError:  # no new thread (the interpreter is shutting down): kill now
        _kill_unless_ended(watched, grace=0.0)


def _kill_unless_ended(watched: list[tuple[int, int]], grace: float = TERMINATE_GRACE) -> None:
    from multiprocessing.connection import wait

    deadline = time.monotonic() + grace
    running = [fd for _, fd in watched]
    try:
        # wait() returns as soon as one has ended: again for the others, to the deadline.
        while running:
            ended = wait(running, max(0.0, deadline - time.monotonic()))
            running = [fd for fd in running if fd not in ended]
            if time.monotonic() >= deadline:
                break
        for pid, fd in watched:
            if fd in running:
                # Not ended, so not reaped: the pid is still this worker's.
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    finally:
        for _, fd in watched:
            os.close(fd)


def portable(exc: BaseException) -> BaseException:
    """The exception with its remote traceback as a note, made safe to pickle."""
    remote = "".join(traceback.format_exception(exc))
    note = f"Traceback in the worker process (pid {os.getpid()}):\n{remote}"
    exc.add_note(note)
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        fallback = RuntimeError(f"{type(exc).__qualname__}: {exc} (not picklable)")
        fallback.add_note(note)
        return fallback
    return exc


#: Values of these exact types travel as they are: unpickling them cannot fail.
PLAIN_TYPES = frozenset({int, float, str, bool, type(None)})


def pack_outcome(ok: bool, value: object) -> tuple[bool, object]:
    """An item's outcome, ready to travel back: plain values as they are, others pickled alone.

    The receiver unpickles a value pickled alone on its own (see
    :func:`unpack_outcome`), so one it cannot load (a class it cannot import,
    a ``__reduce__`` that fails on load) fails its item only, not every
    outcome of the message. ``bytes`` never travel as they are: a bytes value
    in an outcome is always such a pickle. A value that cannot be pickled
    becomes a TypeError saying so.
    """
    if type(value) in PLAIN_TYPES:
        return ok, value
    try:
        return ok, pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        what = "result" if ok else "exception"
        error = TypeError(
            f"the {what} {reprlib.repr(value)} cannot be sent back from the worker "
            f"process: it cannot be pickled ({exc})"
        )
        return False, pickle.dumps(error, pickle.HIGHEST_PROTOCOL)


def unpack_outcome(ok: bool, value: object, item: object) -> tuple[bool, object]:
    """The outcome :func:`pack_outcome` made for ``item``, loaded here.

    One that cannot be loaded fails its item with a RuntimeError naming it
    (its cause: the unpickling error).
    """
    if type(value) is not bytes:
        return ok, value
    try:
        return ok, pickle.loads(value)
    except Exception as exc:
        what = "result" if ok else "exception"
        error = RuntimeError(
            f"the {what} of fn(item) for item={reprlib.repr(item)} could not be loaded in "
            f"this process: {exc!r}. It was pickled in the worker process; is its type "
            "importable here, and does it unpickle outside the worker?"
        )
        error.__cause__ = exc
        return False, error


# ---------------------------------------------------------------------------
# The worker process (runs in the child)
# ---------------------------------------------------------------------------


def _run_chunk(
    fn: Callable[[Any], Any], items: list[Any]
) -> tuple[list[tuple[bool, Any]], BaseException | None]:
    """Each item's result or its (portable) exception, in order; and what stopped the chunk.

    A BaseException that is not an Exception (``SystemExit``,
    ``KeyboardInterrupt``) is no item's failure: it is never captured nor
    retried, so the chunk stops there and it is returned apart, for the parent
    to raise. The items after it have not run.
    """
    out: list[tuple[bool, Any]] = []
    for item in items:
        try:
            out.append((True, fn(item)))
        except Exception as exc:
            out.append((False, portable(exc)))
        except BaseException as exc:
            return out, exc
    return out, None


def _results_message(
    out: list[tuple[bool, Any]], elapsed: float, escaped: BaseException | None
) -> bytes:
    """The message for a chunk's outcomes: it always unpickles (see :func:`pack_outcome`)."""
    packed = [pack_outcome(ok, value) for ok, value in out]
    if escaped is not None:
        _, escaped_blob = pack_outcome(False, portable(escaped))
    else:
        escaped_blob = None
    return pickle.dumps(("done", packed, elapsed, escaped_blob), pickle.HIGHEST_PROTOCOL)


def _process_worker(sock: socket.socket, payload: bytes) -> None:
    """A worker's main loop: read a chunk of items, run ``fn`` on each, send the results."""
    ignore_sigint()
    with sock:
        try:
            try:
                fn = pickle.loads(payload)
            except Exception as exc:
                send_frame(sock, pickle.dumps(("broken", portable(exc))))
                return
            # Loading fn may import slow modules: a timed attempt must not be
            # sent (its clock started) before this.
            send_frame(sock, _READY)
            while True:
                frame = recv_frame(sock)
                if frame is None:
                    return  # the parent closed our socket: we are done
                try:
                    items = pickle.loads(frame)
                except Exception as exc:
                    send_frame(sock, pickle.dumps(("undecodable", portable(exc))))
                    continue
                began = time.perf_counter()
                out, escaped = _run_chunk(fn, items)
                elapsed = time.perf_counter() - began
                send_frame(sock, _results_message(out, elapsed, escaped))
        except OSError:
            return  # the parent is gone


# ---------------------------------------------------------------------------
# The parent side
# ---------------------------------------------------------------------------


class _Job:
    """One call waiting for a worker process: its item and the caller's future."""

    __slots__ = ("crashes", "future", "item", "suspect")

    def __init__(self, item: Any, future: asyncio.Future[Any]) -> None:
        self.item = item
        self.future = future
        self.crashes = 0  # times its worker died while running it alone
        self.suspect = False  # was in a chunk whose worker died: runs alone from now on


def _settle(job: _Job, ok: bool, value: Any) -> None:
    future = job.future
    if future.done():
        return  # the caller was cancelled meanwhile
    if ok:
        future.set_result(value)
    elif isinstance(value, StopIteration):
        # A future refuses it (see no_stop_iteration): the job would never end.
        error = RuntimeError(f"fn raised StopIteration for item {job.item!r}")
        error.__cause__ = value
        future.set_exception(error)
    else:
        future.set_exception(value)


def _take_chunk(waiting: deque[_Job], size: int) -> list[_Job]:
    """Up to ``size`` waiting calls for one chunk, taken off the line.

    Calls whose caller was cancelled before they were sent are dropped. A
    suspect (of a crash, or of a chunk a worker could not unpickle) goes in
    a chunk of its own, so a second failure names it.
    """
    jobs: list[_Job] = []
    while waiting and len(jobs) < size:
        job = waiting[0]
        if job.future.done():
            waiting.popleft()
        elif job.suspect:
            if not jobs:
                jobs.append(waiting.popleft())
            break
        else:
            jobs.append(waiting.popleft())
    return jobs


def _pickle_chunk(jobs: list[_Job]) -> tuple[list[_Job], bytes]:
    """The chunk's items as one pickle, and the jobs it holds.

    An item that cannot be pickled fails alone, named, and is left out; the
    others still go.
    """
    try:
        return jobs, pickle.dumps([job.item for job in jobs], pickle.HIGHEST_PROTOCOL)
    except Exception:
        jobs = [job for job in jobs if _picklable_item(job)]
        return jobs, pickle.dumps([job.item for job in jobs], pickle.HIGHEST_PROTOCOL)


def _picklable_item(job: _Job) -> bool:
    try:
        pickle.dumps(job.item, pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        _settle(
            job,
            False,
            TypeError(
                f"the item {reprlib.repr(job.item)} cannot be sent to a worker process: "
                f"it cannot be pickled ({exc})"
            ),
        )
        return False
    return True


def _unloadable_chunk(
    live: list[_Job], size: int, error: BaseException, waiting: deque[_Job]
) -> None:
    """A worker could not unpickle a chunk of ``size`` items, ``live`` still awaited.

    Nothing of it ran. One item is to blame, not all: with several, they go
    again one per chunk (first in line), so only the culprit fails, named.
    """
    if size == 1:
        for job in live:
            error.add_note(
                f"It was raised for item={reprlib.repr(job.item)}, which could "
                "not be sent to its worker process."
            )
            _settle(job, False, error)
        return
    for job in live:
        job.suspect = True
    waiting.extendleft(reversed(live))


class ChunkSizer:
    """Chooses chunk sizes from the measured time per item (see the module docstring)."""

    __slots__ = ("per_item",)

    def __init__(self) -> None:
        self.per_item: float | None = None  # seconds, smoothed; None until measured

    def observe(self, elapsed: float, items: int) -> None:
        sample = elapsed / items
        if self.per_item is None:
            self.per_item = sample
        else:
            self.per_item = 0.7 * self.per_item + 0.3 * sample

    def size(self, waiting: int, free_slots: int) -> int:
        """Items for the next chunk, with ``waiting`` items to share over ``free_slots``."""
        if self.per_item is None:
            return 1  # learn the task time before sending more than one item
        share = math.ceil(waiting / max(1, free_slots))
        target = int(TARGET_CHUNK_SECONDS / max(self.per_item, 1e-7))
        return max(1, min(MAX_CHUNK, share, target))

    def depth(self) -> int:
        """Chunks a worker may hold at once: two, so the next is ready when one ends."""
        if self.per_item is not None and self.per_item >= PIPELINE_BELOW:
            return 1
        return 2


class _Worker:
    __slots__ = ("chunks", "clock", "link", "number", "process", "ready", "spare")

    def __init__(
        self, number: int, process: BaseProcess, link: Link, spare: socket.socket | None = None
    ) -> None:
        self.number = number
        self.process = process
        self.link = link
        # A second descriptor of the parent's end of the socket, to read what
        # the worker wrote before it went once the link is lost (see _drain).
        self.spare = spare
        self.chunks: deque[list[_Job]] = deque()  # sent, results not back; the head is running
        self.ready = False  # it has loaded fn
        self.clock: asyncio.TimerHandle | None = None  # with a timeout: its attempt's end


def _close_spare(worker: _Worker) -> None:
    spare, worker.spare = worker.spare, None
    if spare is not None:
        spare.close()


class _PoolState(enum.Enum):
    IDLE = "idle"  # no call yet: no process started
    RUNNING = "running"  # workers started (or starting), chunks flowing
    ABANDONED = "abandoned"  # the map was dropped unclosed: processes terminated, not reaped
    CLOSED = "closed"  # close() ran: every process is stopped


class ProcessPool:
    """Per-item coroutine calls of a sync ``fn``, run in chunks by worker processes.

    Used as the engine's call (``await pool(item)``) and closed by the engine
    with ``await pool.close(clean)``. See the module docstring for chunking
    and crash recovery.

    With ``timeout`` (seconds per attempt), items go one at a time, each to
    a worker that has nothing else to run, and a call still running
    ``timeout`` s after its item was sent fails with ``TimeoutError`` while
    its worker is terminated and replaced (see "Timeouts" in the module
    docstring).

    Attributes (for tests and benchmarks): ``chunks_sent``, ``items_sent``,
    ``peak_in_pool`` (the most items sent and not yet returned at once),
    ``crashes`` (worker processes that died), ``overruns`` (calls that ran
    past the timeout, each costing its worker process) and ``pids`` (every
    worker process started).
    """

    def __init__(
        self,
        fn: Callable[[Any], Any],
        processes: int,
        retried: _Retried | None = None,
        timeout: float | None = None,
    ) -> None:
        self._fn = fn
        self._payload = pickle.dumps(fn, pickle.HIGHEST_PROTOCOL)
        self._processes = max(1, processes)
        self._retried = retried
        self._timeout = timeout
        self._overrun_processes: list[BaseProcess] = []  # terminated for overrunning
        self._state = _PoolState.IDLE
        self._loop: asyncio.AbstractEventLoop | None = None
        self._context: ForkServerContext | SpawnContext | None = None
        self._waiting: deque[_Job] = deque()
        self._workers: list[_Worker] = []  # connected and alive
        self._started: list[BaseProcess] = []  # every process started, for cleanup
        self._tasks: set[asyncio.Task[None]] = set()
        self._dispatch_handle: asyncio.Handle | None = None
        # Set when no worker can run anything: makes the error each call fails with.
        self._broken: Callable[[], BaseException] | None = None
        self._deaths_without_work = 0
        self._sizer = ChunkSizer()
        self._in_pool = 0
        self.chunks_sent = 0
        self.items_sent = 0
        self.peak_in_pool = 0
        self.crashes = 0
        self.overruns = 0
        self.pids: list[int] = []

    # -- the call ---------------------------------------------------------

    async def __call__(self, item: Any) -> Any:
        if self._broken is not None:
            raise self._broken()
        loop = asyncio.get_running_loop()
        if self._state is _PoolState.IDLE:
            self._start(loop)
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting.append(_Job(item, future))
        self._schedule_dispatch()
        return await future

    def _cannot_load(self, cause: BaseException) -> Callable[[], BaseException]:
        def error() -> BaseException:
            exc = RuntimeError(
                f"the worker processes of executor='process' cannot load fn={self._fn!r}: "
                f"{cause!r}. Define fn at module level in a module the worker processes "
                "can import (not in an interactive session)."
            )
            exc.__cause__ = cause
            return exc

        return error

    def _schedule_dispatch(self) -> None:
        if self._dispatch_handle is None and self._loop is not None:
            self._dispatch_handle = self._loop.call_soon(self._dispatch)

    # -- workers ----------------------------------------------------------

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._state = _PoolState.RUNNING
        self._context = mp_context()
        self._spawn(self._boot())

    def _spawn(self, coro: Awaitable[None]) -> None:
        assert self._loop is not None
        task: asyncio.Task[None] = self._loop.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _boot(self) -> None:
        assert self._context is not None
        assert self._loop is not None
        try:
            # Starting the fork server blocks for ~0.1 s the first time: not on the loop.
            await self._loop.run_in_executor(None, warm_up_start_method, self._context)
            for number in range(self._processes):
                await self._start_worker(number)
        except Exception as exc:
            self._cannot_start(exc)

    def _cannot_start(self, exc: Exception) -> None:
        """A worker could not be started (e.g. out of file descriptors or memory).

        Nobody awaits the task that starts workers, so the error must reach
        the calls: with no worker alive they would wait for ever, so they fail
        with it; with some alive, the pool goes on with fewer.
        """
        if self._workers:
            logger.warning(
                "corral: executor='process' could not start a worker process (%r); "
                "going on with %d",
                exc,
                len(self._workers),
            )
        else:
            self._break(lambda: exc)

    async def _start_worker(self, number: int) -> None:
        assert self._context is not None
        if self._state is not _PoolState.RUNNING or self._broken is not None:
            return
        parent_end, child_end = socket.socketpair()
        try:
            process = self._context.Process(
                target=_process_worker,
                args=(child_end, self._payload),
                name=f"corral-process-{number}",
                daemon=True,
            )
            process.start()  # ~2 ms with a running fork server
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        self._started.append(process)
        assert process.pid is not None
        self.pids.append(process.pid)
        link = Link(lambda message: None, lambda: None)
        try:
            spare = spare_of(parent_end)
        except BaseException:
            parent_end.close()
            raise
        worker = _Worker(number, process, link, spare)
        link._on_message = lambda message: self._on_message(worker, message)
        link._on_lost = lambda: self._on_lost(worker)
        try:
            await connect(parent_end, link)
        except BaseException:
            _close_spare(worker)
            raise
        self._workers.append(worker)
        self._schedule_dispatch()

    # -- dispatch ---------------------------------------------------------

    def _dispatch(self) -> None:
        """Send waiting calls to workers with a free slot, in chunks."""
        self._dispatch_handle = None
        if self._state is not _PoolState.RUNNING or self._broken is not None:
            return
        if self._timeout is not None:
            self._dispatch_timed(self._timeout)
            return
        waiting = self._waiting
        depth = self._sizer.depth()
        workers = [w for w in self._workers if len(w.chunks) < depth]
        free = sum(depth - len(w.chunks) for w in workers)
        while waiting and free > 0:
            worker = min(workers, key=lambda w: len(w.chunks))
            size = self._sizer.size(len(waiting), free)
            jobs = _take_chunk(waiting, size)
            if jobs and self._send(worker, jobs):
                free -= 1  # a chunk whose every item could not be pickled took no slot

    def _dispatch_timed(self, timeout: float) -> None:
        """Send waiting calls one by one to idle, ready workers, starting each one's clock.

        An item queued inside a worker, or sent while it still loads fn, would
        wait there with its clock running: so nothing is sent to a worker
        until it is ready and has nothing else.
        """
        assert self._loop is not None
        waiting = self._waiting
        for worker in self._workers:
            if not waiting:
                return
            if worker.chunks or not worker.ready:
                continue
            while waiting and not worker.chunks:
                job = waiting.popleft()
                if not job.future.done():  # else its caller was cancelled before it was sent
                    self._send(worker, [job])
            if worker.chunks:
                worker.clock = self._loop.call_later(timeout, self._overrun, worker, timeout)

    def _overrun(self, worker: _Worker, timeout: float) -> None:
        """A call ran past the timeout: it fails, and its worker is replaced.

        The worker would go on running the call, and whatever were sent to it
        next would wait, their clocks running. It is no crash: not counted as
        one, its item not re-run here (``retries=`` decides, as for any
        timeout).
        """
        worker.clock = None
        if self._state is not _PoolState.RUNNING or worker not in self._workers:
            return
        self._workers.remove(worker)  # so its socket closing below is no crash
        jobs = worker.chunks.popleft()
        self._in_pool -= len(jobs)
        assert not worker.chunks  # timed calls go one at a time
        self.overruns += 1
        for job in jobs:
            _settle(
                job,
                False,
                TimeoutError(
                    f"fn(item) ran past timeout={timeout:g} s for item={reprlib.repr(job.item)}; "
                    f"its worker process (pid {worker.process.pid}) was terminated"
                ),
            )
        worker.link.close()
        _close_spare(worker)
        worker.process.terminate()
        self._overrun_processes.append(worker.process)
        self._spawn(self._replace(worker))

    async def _replace(self, worker: _Worker) -> None:
        """Start a worker in place of one terminated for overrunning; make sure that one ends."""
        try:
            await self._start_worker(worker.number)
        except Exception as exc:
            self._cannot_start(exc)
            self._schedule_dispatch()  # what waits goes to the workers left, if any
        if await wait_exit(worker.process, TERMINATE_GRACE) is None:
            worker.process.kill()  # it ignored SIGTERM; close() reaps it

    @staticmethod
    def _stop_clock(worker: _Worker) -> None:
        if worker.clock is not None:
            worker.clock.cancel()
            worker.clock = None

    def _send(self, worker: _Worker, jobs: list[_Job]) -> bool:
        """Send a chunk (its items that can be pickled); whether anything went."""
        jobs, payload = _pickle_chunk(jobs)
        if not jobs:
            return False
        worker.chunks.append(jobs)
        worker.link.send_payload(payload)
        self.chunks_sent += 1
        self.items_sent += len(jobs)
        self._in_pool += len(jobs)
        self.peak_in_pool = max(self.peak_in_pool, self._in_pool)
        return True

    # -- messages from workers --------------------------------------------

    def _on_message(self, worker: _Worker, message: Any) -> None:
        kind = message[0]
        if kind == "done":
            _, out, elapsed, escaped = message
            if worker.clock is not None:
                self._stop_clock(worker)
            if not worker.chunks:
                return  # the pool broke meanwhile and failed this chunk's calls already
            jobs = worker.chunks.popleft()
            self._in_pool -= len(jobs)
            ran = len(out) + (escaped is not None)
            if ran:
                self._sizer.observe(elapsed, ran)
            self._deaths_without_work = 0
            for job, (ok, value) in zip(jobs[: len(out)], out, strict=True):
                if type(value) is bytes:  # pickled alone: see pack_outcome
                    ok, value = unpack_outcome(ok, value, job.item)
                _settle(job, ok, value)
            if escaped is not None:
                # SystemExit or KeyboardInterrupt from fn: raised for its item,
                # never re-run; the items behind it in the chunk did not run.
                job = jobs[len(out)]
                _settle(job, *unpack_outcome(False, escaped, job.item))
                rest = [job for job in jobs[len(out) + 1 :] if not job.future.done()]
                self._waiting.extendleft(reversed(rest))
            self._schedule_dispatch()
        elif kind == "undecodable":  # one side could not unpickle the other's message
            if not worker.chunks:  # not a chunk's results: the worker's "broken" news
                self._break(lambda: message[1])
                return
            self._stop_clock(worker)
            jobs = worker.chunks.popleft()  # the head chunk's items: the worker could not load them
            self._in_pool -= len(jobs)
            live = [job for job in jobs if not job.future.done()]
            _unloadable_chunk(live, len(jobs), message[1], self._waiting)
            self._schedule_dispatch()
        elif kind == "broken":  # the worker could not load fn: no worker ever will
            self._break(self._cannot_load(message[1]))
        elif kind == "ready":
            worker.ready = True
            if self._timeout is not None:
                self._schedule_dispatch()

    def _break(self, error: Callable[[], BaseException]) -> None:
        if self._broken is not None:
            return
        self._broken = error
        jobs = list(self._waiting)
        self._waiting.clear()
        for worker in self._workers:
            self._stop_clock(worker)
            for chunk in worker.chunks:
                jobs.extend(chunk)
            worker.chunks.clear()
        for job in jobs:
            _settle(job, False, error())

    def _fail_held(self, worker: _Worker, error: Callable[[], BaseException]) -> None:
        """Fail the calls in the chunks a worker held, with the pool's error."""
        for chunk in worker.chunks:
            self._in_pool -= len(chunk)
            for job in chunk:
                _settle(job, False, error())
        worker.chunks.clear()

    def _on_lost(self, worker: _Worker) -> None:
        if self._state is _PoolState.RUNNING and worker in self._workers:
            self._drain(worker)
        _close_spare(worker)
        # A crash: a re-run item gets a clock of its own; the dead worker's must not fire.
        self._stop_clock(worker)
        if self._state is not _PoolState.RUNNING or worker not in self._workers:
            return
        self._workers.remove(worker)
        self._spawn(self._bury(worker))

    @staticmethod
    def _drain(worker: _Worker) -> None:
        """Read what the worker wrote and its link did not, before judging the worker dead.

        Its last messages ("broken" as it gives up loading fn, "ready" before
        an item kills it, the results of a chunk before it is killed) may be
        left unread (see :func:`drain`). Judged without them, a worker that
        could not load fn passes for a crash, an item that killed its worker
        goes unblamed, a chunk that ran is run again.
        """
        if worker.spare is not None:
            drain(worker.spare, worker.link)

    async def _bury(self, worker: _Worker) -> None:
        """A worker died: re-run what it held, fail a repeat killer, start a new worker."""
        exitcode: int | None = None
        if self._broken is None:
            exitcode = await wait_exit(worker.process, TERMINATE_GRACE)
            if exitcode is None:  # its socket closed but it lives on: make sure it is gone
                worker.process.kill()
                exitcode = await wait_exit(worker.process, TERMINATE_GRACE)
        if self._broken is not None:
            # No worker will run anything (fn cannot be loaded, or none can be
            # started), perhaps found while this one was being waited for: it
            # was no longer among the workers, so what it held fails here.
            self._fail_held(worker, self._broken)
            return
        self.crashes += 1
        chunks = worker.chunks
        requeue: list[_Job] = []
        self._in_pool -= sum(len(chunk) for chunk in chunks)
        ran = bool(chunks) and worker.ready
        if ran:
            self._deaths_without_work = 0
            requeue.extend(self._after_crash(chunks.popleft(), exitcode))
        # Queued behind the running chunk, or sent before the worker had loaded
        # fn (it died loading it: nothing of it ran): no blame, no retry.
        for chunk in chunks:
            requeue.extend(job for job in chunk if not job.future.done())
        chunks.clear()
        self._waiting.extendleft(reversed(requeue))
        if not ran:
            self._deaths_without_work += 1
            if self._deaths_without_work >= MAX_CRASHES:
                self._break(
                    lambda: WorkerCrashed(
                        f"the worker processes of executor='process' keep dying before "
                        f"running anything (last: {describe_exit(exitcode)}). Does fn's "
                        "module end its process when imported, or a script start work "
                        "at import (no `if __name__ == '__main__':`)?",
                        exitcode=exitcode,
                    )
                )
                return
        logger.warning(
            "corral: worker process %s (pid %s) died (%s); %d items re-run",
            worker.number,
            worker.process.pid,
            describe_exit(exitcode),
            len(requeue),
        )
        try:
            await self._start_worker(worker.number)
        except Exception as exc:
            self._cannot_start(exc)
            self._schedule_dispatch()  # what it held goes to the workers left, if any

    def _after_crash(self, running: list[_Job], exitcode: int | None) -> list[_Job]:
        """The jobs of the chunk a dead worker was running that are to be re-run."""
        live = [job for job in running if not job.future.done()]
        if len(running) == 1 and live:
            job = live[0]
            job.crashes += 1
            if job.crashes >= MAX_CRASHES:
                _settle(
                    job,
                    False,
                    WorkerCrashed(
                        f"fn(item) killed its worker process {job.crashes} times "
                        f"(last: {describe_exit(exitcode)}); giving up on "
                        f"item={reprlib.repr(job.item)}. A plain `def` run with "
                        "executor='process' must not end its process: os._exit(), a crash "
                        "in C code, or a kill (e.g. by the OOM killer) all look alike here.",
                        item=job.item,
                        exitcode=exitcode,
                    ),
                )
                return []
        for job in live:
            job.suspect = True
        if self._retried is not None:
            self._retried.count += len(live)
        return live

    # -- cleanup ----------------------------------------------------------

    def abandon(self) -> None:
        """The map was dropped unclosed (``break`` out of a plain ``async for``): terminate now.

        The map's close then runs in the background, and may never get this
        far: ``asyncio.run`` closes the loop once the main coroutine returns,
        with that close still waiting for the workers. So the workers are
        terminated here, at once and without waiting (their calls' callers
        are gone), and none is started again; the close, if it runs, reaps them.
        """
        if self._state is not _PoolState.RUNNING:
            return
        self._state = _PoolState.ABANDONED
        for process in self._started:
            if process.pid is not None and process.exitcode is None:
                process.terminate()
        kill_stragglers(self._started)
        for worker in self._workers:
            worker.link.close()
            _close_spare(worker)

    async def close(self, clean: bool) -> None:
        """Stop every worker: let idle ones exit after a clean run, terminate them otherwise."""
        if self._state is _PoolState.CLOSED:
            return
        self._state = _PoolState.CLOSED
        if self._dispatch_handle is not None:
            self._dispatch_handle.cancel()
            self._dispatch_handle = None
        try:
            while self._tasks:
                tasks = list(self._tasks)
                for task in tasks:
                    task.cancel()
                await asyncio.wait(tasks)
        finally:
            # A worker still holding a chunk is running calls whose callers are
            # gone (cancel(), a deadline, a timeout): terminated, not waited
            # for, even after an otherwise clean end.
            busy = [worker.process for worker in self._workers if worker.chunks]
            busy.extend(self._overrun_processes)  # terminated already; no grace to wait out
            for worker in self._workers:
                self._stop_clock(worker)
                worker.link.close()  # a worker waiting for work sees EOF and exits
                _close_spare(worker)  # or the socket stays open, and the worker never sees it
            for job in self._waiting:
                job.future.cancel()
            self._waiting.clear()
            await stop_processes(self._started, grace=EXIT_GRACE if clean else 0.0, busy=busy)


# ---------------------------------------------------------------------------
# A ProcessPoolExecutor given by the user
# ---------------------------------------------------------------------------


def _run_timed_chunk(fn: Callable[[Any], Any], payload: bytes) -> tuple[str, Any, float]:
    """Runs in the executor's worker: the chunk's packed outcomes and the time they took.

    corral pickles the items itself (one that cannot be pickled fails alone,
    before the submission) and packs the outcomes (see :func:`pack_outcome`),
    so the pool's own pickling never fails: a call it cannot pickle would
    fail the whole chunk, a result it cannot unpickle would break the pool.
    Items this process cannot unpickle come back as ``"undecodable"``.
    """
    try:
        items = pickle.loads(payload)
    except Exception as exc:
        return "undecodable", pack_outcome(False, portable(exc))[1], 0.0
    began = time.perf_counter()
    out, escaped = _run_chunk(fn, items)
    if escaped is not None:
        raise escaped  # the pool sends it back as the chunk's failure
    packed = [pack_outcome(ok, value) for ok, value in out]
    return "done", packed, time.perf_counter() - began


class _ExecutorCalls:
    """Per-item calls batched into chunked submissions to a user's ProcessPoolExecutor.

    Chunk sizes adapt as for corral's own workers, and at most two chunks per
    process are submitted at once (the rest wait here, so the pool's queue
    stays short). corral does not own the pool, so it cannot rebuild it: when
    a process of the pool dies, the pool is broken and the calls fail with
    ``BrokenProcessPool``. Use ``executor="process"`` for crash recovery.

    Items are pickled here and outcomes in the pool's process (see "Items and
    results that cannot cross" in the module docstring), so one value that
    cannot cross fails its own item, not its chunk, and never breaks the pool.

    With ``timeout``, items are submitted one at a time, at most one per
    process of the pool, and an attempt's clock starts when it is submitted.
    A call past it fails with ``TimeoutError`` but cannot be stopped: it
    goes on in its process, which takes no other item from this map until
    the call ends. The clock includes any wait for a process: one the pool
    starts on demand, or one busy with work submitted by others.
    """

    def __init__(
        self,
        fn: Callable[[Any], Any],
        pool: concurrent.futures.ProcessPoolExecutor,
        timeout: float | None = None,
    ) -> None:
        self._fn = fn
        self._pool = pool
        self._timeout = timeout
        # _max_workers is private (there since Python 3.2): without it, guess one per CPU.
        workers = getattr(pool, "_max_workers", None)
        processes = workers if isinstance(workers, int) and workers >= 1 else usable_cpus()
        # With a timeout, no more than the pool can start at once: a submission
        # queued in the pool would wait with its clock running.
        self._slots = processes if timeout is not None else 2 * processes
        self._busy = 0
        self._waiting: deque[_Job] = deque()
        self._sizer = ChunkSizer()
        self._dispatch_handle: asyncio.Handle | None = None

    async def __call__(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting.append(_Job(item, future))
        if self._dispatch_handle is None:
            self._dispatch_handle = loop.call_soon(self._dispatch)
        return await future

    def _dispatch(self) -> None:
        self._dispatch_handle = None
        waiting = self._waiting
        timeout = self._timeout
        while waiting and self._busy < self._slots:
            if timeout is not None:
                size = 1  # each item's own clock
            else:
                size = self._sizer.size(len(waiting), self._slots - self._busy)
            jobs, payload = _pickle_chunk(_take_chunk(waiting, size))
            if not jobs:
                continue
            try:
                submitted = self._pool.submit(_run_timed_chunk, self._fn, payload)
            except Exception as exc:  # a broken or shut-down pool
                for job in jobs:
                    _settle(job, False, exc)
                continue
            self._busy += 1
            clock = None
            if timeout is not None:
                clock = asyncio.get_running_loop().call_later(
                    timeout, self._overrun, jobs[0], submitted, timeout
                )
            asyncio.wrap_future(submitted).add_done_callback(
                lambda done, jobs=jobs, clock=clock: self._distribute(  # type: ignore[misc]
                    done, jobs, clock
                )
            )

    @staticmethod
    def _overrun(job: _Job, submitted: concurrent.futures.Future[Any], timeout: float) -> None:
        # Not started yet (the pool is busy with others' work): it never will be.
        # Running: it cannot be stopped, and its slot stays taken until it ends.
        submitted.cancel()
        _settle(
            job,
            False,
            TimeoutError(
                f"fn(item) ran past timeout={timeout:g} s for item={reprlib.repr(job.item)}; "
                "a call in a given ProcessPoolExecutor cannot be stopped and runs on"
            ),
        )

    def _distribute(
        self, done: asyncio.Future[Any], jobs: list[_Job], clock: asyncio.TimerHandle | None
    ) -> None:
        if clock is not None:
            clock.cancel()
        self._busy -= 1
        if done.cancelled():
            # The pool dropped the chunk before it ran (shut down with
            # cancel_futures=True; a timed-out item was settled already).
            # Cancelling the callers' futures would read as fn raising
            # CancelledError: each item fails instead.
            for job in jobs:
                _settle(job, False, dropped_by(self._pool, job.item))
        elif (error := done.exception()) is not None:
            for job in jobs:
                _settle(job, False, error)
        else:
            kind, out, elapsed = done.result()
            if kind == "undecodable":
                live = [job for job in jobs if not job.future.done()]
                try:
                    error = pickle.loads(out)
                except Exception as exc:
                    error = undecodable(exc)
                _unloadable_chunk(live, len(jobs), error, self._waiting)
            else:
                self._sizer.observe(elapsed, len(jobs))
                for job, (ok, value) in zip(jobs, out, strict=True):
                    if type(value) is bytes:  # pickled alone: see pack_outcome
                        ok, value = unpack_outcome(ok, value, job.item)
                    _settle(job, ok, value)
        if self._waiting and self._dispatch_handle is None:
            self._dispatch_handle = asyncio.get_running_loop().call_soon(self._dispatch)
