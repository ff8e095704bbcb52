"""``backend="ray"``: one map run by long-lived async actors on a Ray cluster.

When one machine is not enough, corral runs on an existing distributed engine
instead of a cluster of its own. ``corral.map(fetch, urls, backend="ray",
limit=400)`` starts one async actor per worker slot (default: one per CPU of
the cluster), each running corral's own engine on its event loop with its
share of ``limit``; this process feeds them chunks of the input and merges
what comes back::

    driver: input ──> feeder ──chunks──> actor 0: loop + engine (limit 100) ──┐
                        ^                actor 1: loop + engine (limit 100) ──┤
                        └── room ──  results (in input order) <── merge <────┘

What each guarantee becomes
---------------------------
- **Limit**: split across the actors (400 over 4: 100 each), each actor
  holding one :class:`corral.Limiter` of its share for every chunk it runs,
  so never more than ``limit`` calls in flight in all. Fewer actors are
  started when ``limit`` is smaller than their number.
- **Lazy input, constant driver memory**: the driver pulls a chunk only when
  an actor has room for it (each actor holds about twice its share, so it
  never idles between two chunks), and runs at most a fixed number of chunks
  ahead of the consumer, so an endless input streams through in bounded
  memory and the reorder buffer behind a slow chunk is bounded too.
- **Exactly once**: results come back per chunk, tagged with the chunk's
  first index; a chunk is accepted once, when it is still outstanding, and
  must hold exactly its items. Ordered delivery merges chunks in input order
  (``ordered=False``: as chunks complete).
- **Errors as themselves**: an item's exception travels back as its own
  type, with the actor's traceback as a note; an error Ray wraps
  (``RayTaskError``, e.g. from ``setup=``) is unwrapped to its cause. The
  first failure (``return_exceptions=False``) ends the map and cancels the
  chunks in flight with ``ray.cancel``, which raises ``CancelledError``
  inside their running coroutines.
- **A dead actor** (its process killed, its node lost) is restarted by Ray
  (``max_restarts``) and the chunks it held are re-run there
  (``max_task_retries``); the driver still hands out each result exactly
  once. **Side effects are at-least-once**: the calls of a re-run chunk that
  had already finished before the actor died run again.
- **Structured**: leaving the map by any path cancels its chunks in flight,
  waits briefly for them to stop, and kills its actors. A local cluster that
  corral started stays up for the next map of this process and is shut down
  when the interpreter exits.

``fn`` and ``setup`` travel to the actors with Ray's serialiser (cloudpickle),
so lambdas and closures work; what they import must be importable on every
node of the cluster (corral too).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import enum
import importlib
import importlib.util
import inspect
import itertools
import logging
import math
import os
import queue
import sys
import threading
import traceback
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

from ._engine import ResultStream
from ._limits import Limiter
from ._offload import WorkerCrashed, is_async_callable
from ._retry import Retry
from ._retry_budget import RetryBudgetState
from ._shard import split_limit
from ._stats import LatencyHistogram, Stats

R = TypeVar("R")

#: The oldest Ray the backend is tested with.
MIN_RAY = (2, 50)
INSTALL_HINT = "pip install 'corral[ray]'"

#: Items per chunk: at least this many, so one actor call carries enough work
#: to hide its round trip (about a millisecond)...
MIN_CHUNK = 64
#: ...and at most this many, so results stream back and a re-run chunk is small.
MAX_CHUNK = 1024
#: Chunks each actor holds at least (one running, one queued behind it).
CHUNKS_PER_ACTOR = 2
#: The driver runs at most this many times the chunks in flight ahead of the consumer.
CHUNKS_AHEAD = 2
#: Times Ray restarts a dead actor, and re-runs the chunks it held, before giving up.
MAX_RESTARTS = 3
#: Seconds the chunks in flight get to stop after ``ray.cancel`` before their actors are killed.
CANCEL_GRACE = 5.0
#: Seconds a clean end gives each actor to close its ``setup=`` state.
CLOSE_GRACE = 5.0


# ---------------------------------------------------------------------------
# Ray itself: found, imported and connected on first use only
# ---------------------------------------------------------------------------


def require_ray() -> None:
    """Fail at once, saying how to install it, when Ray is missing or too old.

    Raises:
        ImportError: Ray is not installed, or older than 2.50.
    """
    import importlib.metadata  # here, not at the top: it costs `import corral` ~25 ms

    if importlib.util.find_spec("ray") is None:
        raise ImportError(
            "backend='ray' needs Ray, which is not installed: "
            f"{INSTALL_HINT} (or pip install 'ray>=2.50')"
        )
    try:
        version = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a source checkout
        return
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < MIN_RAY:
        raise ImportError(
            f"backend='ray' needs Ray >= {MIN_RAY[0]}.{MIN_RAY[1]}; Ray {version} is "
            f"installed: {INSTALL_HINT}"
        )


def _ray() -> Any:
    """The ``ray`` module (typed as Any: corral talks to a few of its documented calls)."""
    return importlib.import_module("ray")


class _Host:
    """The one thread that starts (and stops) a local Ray cluster, alive until exit.

    Ray ties the processes of a local cluster to the thread that started them
    (they are told to die with it), so ``ray.init`` must not run on a pool
    thread that may end, and blocking the caller's event loop for the seconds
    it takes is no better. This daemon thread lives as long as the cluster
    corral started; at exit, corral's handler asks it to shut the cluster
    down, waits, and the thread ends.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(
        self, job: Callable[[], Any], *, last: bool = False
    ) -> concurrent.futures.Future[Any]:
        """Run ``job`` on the thread; ``last``: the thread may end after it (nothing to host)."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            self._jobs.put((job, future, last))
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="corral-ray", daemon=True)
                self._thread.start()
        return future

    def _serve(self) -> None:
        while True:
            job, future, last = self._jobs.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(job())
                except BaseException as exc:
                    future.set_exception(exc)
            if last:
                with self._lock:
                    if self._jobs.empty() and not _started_here:
                        self._thread = None
                        return


_Job = tuple[Callable[[], Any], "concurrent.futures.Future[Any]", bool]
_host = _Host()
_started_here = False  # this process started the local cluster it is connected to


async def connect_async(address: str | None) -> Any:
    """:func:`connect` on corral's Ray thread, awaited without blocking the loop."""
    return await asyncio.wrap_future(_host.submit(lambda: connect(address)))


def connect_sync(address: str | None) -> Any:
    """:func:`connect` on corral's Ray thread, from synchronous code."""
    return _host.submit(lambda: connect(address)).result()


def connect(address: str | None) -> Any:
    """Connect this process to Ray, starting a local cluster when no address is known.

    ``address`` (else ``RAY_ADDRESS``) names an existing cluster. Without one,
    a local cluster starts bound to 127.0.0.1, without a dashboard; corral
    shuts it down when the interpreter exits. When this process is already
    connected (``ray.init`` was called), that connection is used. Blocking
    (starting a cluster takes seconds): run it through :func:`connect_async`.
    """
    global _started_here
    address = address or os.environ.get("RAY_ADDRESS") or None
    local = address is None
    if local and "ray" not in sys.modules:
        # A Linux node advertises (and binds) its network address unless Ray
        # is told it runs on one machine; read once, when ray is imported.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray = _ray()
    if ray.is_initialized():
        return ray
    if local:
        _keep_on_loopback(ray)
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
        _started_here = True
        atexit.register(shutdown)
    else:
        ray.init(address=address, logging_level=logging.WARNING)
    return ray


def _keep_on_loopback(ray: Any) -> None:
    """Make a local cluster bind to 127.0.0.1 even when ray was imported before corral."""
    constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
    if constants is not None and getattr(constants, "ENABLE_RAY_CLUSTER", False):
        constants.ENABLE_RAY_CLUSTER = False


def shutdown() -> bool:
    """Shut down the local cluster corral started, if any; True when there was one.

    Runs at interpreter exit (on corral's Ray thread, which started it). A
    cluster this process only connected to is left alone.
    """
    return bool(_host.submit(_shutdown_here, last=True).result())


def _shutdown_here() -> bool:
    global _started_here
    if not _started_here:
        return False
    _started_here = False
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    return True


def _unwrap(exc: BaseException) -> BaseException:
    """The user's exception inside Ray's wrapper, with the remote traceback as a note."""
    ray = sys.modules.get("ray")
    if ray is None:  # pragma: no cover - only Ray raises these
        return exc
    if isinstance(exc, ray.exceptions.RayTaskError):
        # Ray raises a class deriving from both its wrapper and the cause's
        # type; the caller gets the cause itself, its type exactly as raised.
        cause = exc.cause
        if isinstance(cause, BaseException):
            if not any("Traceback in the Ray actor" in n for n in getattr(cause, "__notes__", ())):
                cause.add_note(f"Traceback in the Ray actor:\n{str(exc).strip()}")
            return cause
    return exc


# ---------------------------------------------------------------------------
# The actor (runs on a Ray worker)
# ---------------------------------------------------------------------------

#: What one chunk brings back: (values or None, failed offsets, the first
#: failure when the map stops at one, attempts retried, latency histogram growth).
ChunkOutcome = tuple[list[Any] | None, list[int], BaseException | None, int, dict[int, int]]

_NO_STATE = object()


class _Actor:
    """One long-lived worker slot: its share of the limit, its setup state, its engine.

    Ray runs every ``async def`` method of an actor on the actor's own event
    loop, several at once, so the chunks an actor holds share one Limiter.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        setup: Callable[[], Any] | None,
        share: int | None,
        timeout: float | None,
        retry: Retry | None,
        return_exceptions: bool,
    ) -> None:
        self._fn = fn
        self._setup = setup
        self._timeout = timeout
        self._retry = retry
        self._return_exceptions = return_exceptions
        self._limiter = None if share is None else Limiter(limit=share)
        self._threads = (
            None
            if is_async_callable(fn)
            else concurrent.futures.ThreadPoolExecutor(
                max_workers=share or 64, thread_name_prefix="corral-ray"
            )
        )
        self._state_task: asyncio.Future[Any] | None = None
        self._retry_budget: RetryBudgetState | None = None  # per actor, shared by its chunks

    async def _state(self) -> Any:
        """The setup state, made once per actor (a restarted actor makes it again)."""
        if self._setup is None:
            return _NO_STATE
        if self._state_task is None:
            self._state_task = asyncio.ensure_future(self._make_state(self._setup))
        # Shielded: a cancelled chunk does not cancel the setup other chunks wait for.
        return await asyncio.shield(self._state_task)

    @staticmethod
    async def _make_state(setup: Callable[[], Any]) -> Any:
        state = setup()
        if inspect.isawaitable(state):
            state = await state
        return state

    def _call(self, state: Any) -> Callable[[Any], Awaitable[Any]]:
        """``fn`` of one item (with the setup state as its second argument)."""
        fn, threads = self._fn, self._threads
        if threads is not None:
            loop = asyncio.get_running_loop()
            if state is _NO_STATE:
                return lambda item: loop.run_in_executor(threads, fn, item)
            return lambda item: loop.run_in_executor(threads, fn, item, state)
        if state is _NO_STATE:
            return fn
        return lambda item: fn(item, state)

    async def run_chunk(self, items: list[Any]) -> ChunkOutcome:
        """Run one chunk on corral's engine; every outcome in the chunk's order."""
        # Imported here: _api imports this module.
        from ._api import _with_retries, _with_timeout
        from ._api import map as corral_map
        from ._engine import _Retried

        call = self._call(await self._state())
        if self._timeout is not None:
            call = _with_timeout(call, self._timeout)
        retried = _Retried()
        if self._retry is not None:
            if self._retry_budget is None and self._retry.budget is not None:
                assert not isinstance(self._retry.budget, float | int)  # normalised by Retry
                self._retry_budget = RetryBudgetState(self._retry.budget)
            call = _with_retries(call, self._retry, retried, self._retry_budget)
        clock = asyncio.get_running_loop().time
        histogram = LatencyHistogram()

        async def run_item(pair: tuple[int, Any]) -> tuple[int, bool, Any]:
            offset, item = pair
            began = clock()
            try:
                return (offset, True, await call(item))
            except Exception as exc:
                return (offset, False, exc)
            finally:
                histogram.add(clock() - began)

        values: list[Any] = [None] * len(items)
        failed: list[int] = []
        async with corral_map(
            run_item, enumerate(items), limit=self._limiter, ordered=False
        ) as outcomes:
            async for offset, ok, value in outcomes:
                if ok:
                    values[offset] = value
                    continue
                error = _portable(value)
                if not self._return_exceptions:
                    # Leaving the map cancels this chunk's other calls at once.
                    return (None, [offset], error, retried.count, _growth(histogram))
                failed.append(offset)
                values[offset] = error
        return (values, failed, None, retried.count, _growth(histogram))

    async def close(self) -> None:
        """Close the setup state (``aclose()`` or ``close()``, when it has one)."""
        task = self._state_task
        if task is not None and task.done() and not task.cancelled() and not task.exception():
            state = task.result()
            closer = getattr(state, "aclose", None) or getattr(state, "close", None)
            if callable(closer):
                result = closer()
                if inspect.isawaitable(result):
                    await result
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)

    async def pid(self) -> int:
        """The actor's process id (tests use it to kill one)."""
        return os.getpid()


def _portable(exc: BaseException) -> BaseException:
    """The exception with the actor's traceback as a note, made safe to send back.

    Checked with Ray's serialiser (cloudpickle), which also carries classes
    defined in a script; one it still cannot carry becomes a RuntimeError.
    """
    note = f"Traceback in the Ray actor (pid {os.getpid()}):\n" + "".join(
        traceback.format_exception(exc)
    )
    exc.add_note(note)
    pickler = _ray().cloudpickle
    try:
        pickler.loads(pickler.dumps(exc))
    except Exception:
        fallback = RuntimeError(f"{type(exc).__qualname__}: {exc} (cannot be sent back)")
        fallback.add_note(note)
        return fallback
    return exc


def _growth(histogram: LatencyHistogram) -> dict[int, int]:
    return {index: count for index, count in enumerate(histogram.counts) if count}


# ---------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------


class _Phase(enum.Enum):
    IDLE = "idle"  # created; nothing started
    RUNNING = "running"  # connecting, actors starting or running, chunks flowing
    CLOSING = "closing"  # ended, failed or left: chunks being cancelled, actors killed
    CLOSED = "closed"  # every actor killed, every task finished


class _Slot:
    """The driver's view of one actor."""

    __slots__ = ("handle", "held", "number")

    def __init__(self, number: int, handle: Any) -> None:
        self.number = number
        self.handle = handle
        self.held = 0  # chunks sent, outcome not back


class _Chunk:
    __slots__ = ("ref", "size", "slot", "start")

    def __init__(self, start: int, size: int, slot: _Slot, ref: Any) -> None:
        self.start = start
        self.size = size
        self.slot = slot
        self.ref = ref


class RayRun(Generic[R]):
    """The driver's side of a map on Ray: connection, actors, feeder, merge, cleanup."""

    def __init__(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any] | AsyncIterable[Any],
        *,
        address: str | None,
        setup: Callable[[], Any] | None,
        actors: int | None,
        limit: int | None,
        ordered: bool,
        timeout: float | None,
        retry: Retry | None,
        return_exceptions: bool,
    ) -> None:
        self._fn = fn
        self._items = items
        self._address = address
        self._setup = setup
        self._actors_wanted = actors
        self._limit = limit
        self._ordered = ordered
        self._timeout = timeout
        self._retry = retry
        self._return_exceptions = return_exceptions

        self._phase = _Phase.IDLE
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ray: Any = None
        self._slots: list[_Slot] = []
        self._chunk_size = MAX_CHUNK
        self._per_actor = CHUNKS_PER_ACTOR
        self._window = 0  # items the driver may run ahead of the consumer
        self._tasks: set[asyncio.Task[None]] = set()
        self._chunk_tasks: set[asyncio.Task[None]] = set()
        self._outstanding: dict[int, _Chunk] = {}  # by first index: sent, not back
        self._error: BaseException | None = None
        self._halted = False
        self._input_done = False
        self._next_index = 0
        self._ready: deque[Any] = deque()
        self._pending: dict[int, list[Any]] = {}  # ordered: chunks done early, by first index
        self._next_delivery = 0
        self._consumed = 0
        self._consumer: asyncio.Future[None] | None = None
        self._room: asyncio.Future[None] | None = None
        self._completed = 0
        self._failed = 0
        self._retried = 0
        self._sent = 0
        self._histogram = LatencyHistogram()
        self._started_at = 0.0
        self._ended_at: float | None = None
        self._closed: asyncio.Future[None] | None = None

    # -- lifecycle --------------------------------------------------------

    def start(self) -> None:
        if self._phase is not _Phase.IDLE:
            return
        loop = self._loop = asyncio.get_running_loop()
        self._started_at = loop.time()
        self._phase = _Phase.RUNNING
        self._spawn(self._boot())

    def _spawn(self, coro: Awaitable[None], into: set[asyncio.Task[None]] | None = None) -> None:
        assert self._loop is not None
        tasks = self._tasks if into is None else into
        task: asyncio.Task[None] = self._loop.create_task(coro)  # type: ignore[arg-type]
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    @property
    def finished(self) -> bool:
        return self._phase is _Phase.CLOSED

    async def _boot(self) -> None:
        assert self._loop is not None
        try:
            ray = self._ray = await connect_async(self._address)
            self._start_actors(ray)
        except Exception as exc:
            self._fail(exc)
            return
        await self._feed()

    def _start_actors(self, ray: Any) -> None:
        count = self._actors_wanted
        if count is None:
            count = max(1, int(ray.cluster_resources().get("CPU", 1)))
        shares: list[int | None]
        if self._limit is None:
            shares = [None] * count
            self._chunk_size = MAX_CHUNK
        else:
            split = split_limit(self._limit, count)
            shares = list(split)
            self._chunk_size = min(MAX_CHUNK, max(MIN_CHUNK, 2 * split[0]))
            # Enough chunks per actor to hold twice its share (it never idles).
            self._per_actor = max(CHUNKS_PER_ACTOR, math.ceil(2 * split[0] / self._chunk_size))
        self._window = CHUNKS_AHEAD * len(shares) * self._per_actor * self._chunk_size
        actor_class = ray.remote(_Actor).options(
            max_restarts=MAX_RESTARTS,
            max_task_retries=MAX_RESTARTS,
            scheduling_strategy="SPREAD",
        )
        for number, share in enumerate(shares):
            handle = actor_class.remote(
                self._fn, self._setup, share, self._timeout, self._retry, self._return_exceptions
            )
            self._slots.append(_Slot(number, handle))

    def _all_done(self) -> bool:
        return self._input_done and not self._outstanding

    # -- feeding ----------------------------------------------------------

    def _room_left(self) -> int:
        """Items the feeder may send now (0: wait)."""
        if not any(slot.held < self._per_actor for slot in self._slots):
            return 0
        ahead = self._consumed + self._window - self._next_index
        return max(0, min(self._chunk_size, ahead))

    async def _wait_for_room(self) -> int:
        assert self._loop is not None
        while (room := self._room_left()) <= 0:
            self._room = self._loop.create_future()
            try:
                await self._room
            finally:
                self._room = None
        return room

    def _wake_feeder(self) -> None:
        room = self._room
        if room is not None and not room.done():
            room.set_result(None)

    async def _feed(self) -> None:
        items = self._items
        try:
            if isinstance(items, AsyncIterable):
                await self._feed_async(aiter(items))
            else:
                await self._feed_sync(iter(items))
        except Exception as exc:  # the input itself raised (or a chunk could not be sent)
            self._fail(exc)
            return
        self._input_done = True
        self._check_end()

    async def _feed_sync(self, iterator: Iterator[Any]) -> None:
        while True:
            room = await self._wait_for_room()
            chunk = list(itertools.islice(iterator, room))
            if not chunk:
                return
            self._send(chunk)
            await asyncio.sleep(0)  # let outcomes in before pulling more

    async def _feed_async(self, iterator: AsyncIterator[Any]) -> None:
        # A pump pulls ahead into a buffer of one chunk, so a slow source sends
        # what it has as soon as an actor has room instead of waiting for a full chunk.
        assert self._loop is not None
        buffer: deque[Any] = deque()
        pumped = False  # the pump has ended (input exhausted, or it raised)
        changed = asyncio.Event()
        space = asyncio.Event()
        space.set()

        async def pump() -> None:
            nonlocal pumped
            try:
                while True:
                    while len(buffer) >= self._chunk_size:
                        space.clear()
                        await space.wait()
                    try:
                        item = await anext(iterator)
                    except StopAsyncIteration:
                        return
                    buffer.append(item)
                    changed.set()
            finally:
                pumped = True
                changed.set()

        pumping = self._loop.create_task(pump())
        try:
            while True:
                room = await self._wait_for_room()
                while not buffer and not pumped:
                    changed.clear()
                    await changed.wait()
                if not buffer:
                    await pumping  # the input's own error, if it raised
                    return
                chunk = [buffer.popleft() for _ in range(min(room, len(buffer)))]
                space.set()
                self._send(chunk)
                await asyncio.sleep(0)
        finally:
            if not pumping.done():
                pumping.cancel()
                await asyncio.gather(pumping, return_exceptions=True)

    def _send(self, chunk: list[Any]) -> None:
        slot = min(self._slots, key=lambda s: s.held)
        start = self._next_index
        ref = slot.handle.run_chunk.remote(chunk)
        self._next_index += len(chunk)
        self._sent += len(chunk)
        slot.held += 1
        record = _Chunk(start, len(chunk), slot, ref)
        self._outstanding[start] = record
        self._spawn(self._await_chunk(record), self._chunk_tasks)

    async def _await_chunk(self, chunk: _Chunk) -> None:
        try:
            try:
                outcome = await chunk.ref
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._forget(chunk)
                if self._phase is _Phase.RUNNING:
                    self._fail(self._explain(chunk, exc))
                return
            if self._outstanding.get(chunk.start) is not chunk:
                return  # already settled: a chunk counts once
            self._forget(chunk)
            self._on_outcome(chunk, outcome)
        except Exception as bug:  # pragma: no cover - never leave the consumer waiting
            self._fail(bug)

    def _forget(self, chunk: _Chunk) -> None:
        if self._outstanding.get(chunk.start) is chunk:
            del self._outstanding[chunk.start]
            chunk.slot.held -= 1
            self._wake_feeder()

    def _explain(self, chunk: _Chunk, exc: BaseException) -> BaseException:
        ray = self._ray
        if ray is not None and isinstance(exc, ray.exceptions.RayActorError):
            crashed = WorkerCrashed(
                f"Ray actor {chunk.slot.number} of backend='ray' died or could not start, and "
                f"Ray gave up on it (it restarts an actor up to {MAX_RESTARTS} times); items "
                f"{chunk.start} to {chunk.start + chunk.size - 1} did not run to the end. "
                f"Ray says: {exc}",
                exitcode=None,
            )
            crashed.__cause__ = exc
            return crashed
        return _unwrap(exc)

    # -- outcomes ---------------------------------------------------------

    def _on_outcome(self, chunk: _Chunk, outcome: ChunkOutcome) -> None:
        if self._phase is not _Phase.RUNNING or self._error is not None or self._halted:
            return
        values, failed, error, retried, latency = outcome
        self._retried += retried
        histogram = self._histogram
        for bucket, count in latency.items():
            histogram.counts[bucket] += count
            histogram.total += count
        if error is not None:
            self._failed += 1
            self._fail(error)
            return
        if values is None or len(values) != chunk.size:  # pragma: no cover - a bug, loudly
            self._fail(
                RuntimeError(
                    f"corral bug: a chunk of {chunk.size} items starting at {chunk.start} "
                    f"came back with {None if values is None else len(values)} results"
                )
            )
            return
        self._failed += len(failed)
        self._completed += chunk.size - len(failed)
        if self._ordered:
            if chunk.start != self._next_delivery:
                self._pending[chunk.start] = values
                return
            self._ready.extend(values)
            index = chunk.start + chunk.size
            pending = self._pending
            while index in pending:
                later = pending.pop(index)
                self._ready.extend(later)
                index += len(later)
            self._next_delivery = index
        else:
            self._ready.extend(values)
        self._wake_consumer()
        self._check_end()

    def _check_end(self) -> None:
        if not self._all_done():
            return
        if self._ended_at is None and self._loop is not None:
            self._ended_at = self._loop.time()
        if self._pending or self._completed + self._failed != self._next_index:
            self._fail(  # pragma: no cover - a bug, loudly
                RuntimeError(
                    f"corral bug: {self._next_index} items were sent to the Ray actors, "
                    f"{self._completed + self._failed} results came back; please report it"
                )
            )
        self._wake_consumer()

    # -- failure and early ends -------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        """End the run with ``exc`` (the first failure wins); cancel the chunks in flight."""
        if self._error is not None or self._halted:
            return
        self._error = exc
        self._stop_now()
        self._wake_consumer()

    def halt(self) -> None:
        """``cancel()``: stop sending and running chunks; keep the results already ready."""
        if self._phase is not _Phase.RUNNING or self._error is not None or self._halted:
            return
        self._halted = True
        self._pending.clear()
        self._stop_now()
        self._wake_consumer()

    def _stop_now(self) -> None:
        for task in self._tasks:
            task.cancel()  # the feeder: nothing more is pulled or sent
        ray = self._ray
        if ray is not None:
            for chunk in list(self._outstanding.values()):
                try:
                    ray.cancel(chunk.ref)  # CancelledError inside the actor's coroutines
                except Exception:  # pragma: no cover - the actor is already gone
                    pass
        if self._ended_at is None and self._loop is not None:
            self._ended_at = self._loop.time()

    # -- the consumer -----------------------------------------------------

    @property
    def ready(self) -> deque[Any]:
        return self._ready

    def take(self) -> Any:
        self._consumed += 1
        if self._room is not None:
            self._wake_feeder()
        return self._ready.popleft()

    def _wake_consumer(self) -> None:
        consumer = self._consumer
        if consumer is not None and not consumer.done():
            consumer.set_result(None)

    async def wait_next(self) -> bool:
        """Wait until a result is ready (True) or the run is over (False); raise its error."""
        self.start()
        while True:
            if self._error is not None:
                await self.aclose()
                raise self._error
            if self._ready:
                return True
            if self._halted or self._all_done() or self._phase is not _Phase.RUNNING:
                await self.aclose()
                if self._error is not None:
                    raise self._error
                return False
            assert self._loop is not None
            self._consumer = self._loop.create_future()
            try:
                await self._consumer
            finally:
                self._consumer = None

    # -- cleanup ----------------------------------------------------------

    async def aclose(self) -> None:
        """Cancel the chunks in flight, kill the actors, finish every task; idempotent."""
        if self._phase is _Phase.CLOSED:
            return
        if self._phase is _Phase.CLOSING:
            assert self._closed is not None
            await asyncio.shield(self._closed)
            return
        if self._phase is _Phase.IDLE:
            self._phase = _Phase.CLOSED
            await _close_input(self._items)
            return
        clean = self._error is None and not self._halted and self._all_done()
        assert self._loop is not None
        self._closed = self._loop.create_future()
        if not clean:
            self._stop_now()
        self._phase = _Phase.CLOSING
        try:
            await _finish(self._tasks, cancel=True)
            # Cancelled chunks report back once their coroutines have stopped.
            await _finish(self._chunk_tasks, cancel=False, grace=CANCEL_GRACE)
        finally:
            try:
                await self._stop_actors(clean)
            finally:
                if self._ended_at is None:
                    self._ended_at = self._loop.time()
                self._phase = _Phase.CLOSED
                self._closed.set_result(None)
                self._wake_consumer()
                await _close_input(self._items)

    async def _stop_actors(self, clean: bool) -> None:
        ray = self._ray
        if ray is None or not self._slots:
            return
        if clean and self._setup is not None:
            closing = [asyncio.ensure_future(slot.handle.close.remote()) for slot in self._slots]
            await asyncio.wait(closing, timeout=CLOSE_GRACE)
            for future in closing:
                if not future.done():
                    future.cancel()
                elif not future.cancelled():
                    future.exception()  # seen: a failed close is not the map's error
        for slot in self._slots:
            try:
                ray.kill(slot.handle, no_restart=True)
            except Exception:  # pragma: no cover - already dead
                pass

    def abandon(self) -> None:
        """The consumer dropped the stream unclosed: cancel now, close in the background."""
        if self._phase in (_Phase.IDLE, _Phase.CLOSED) or self._loop is None:
            return
        self._stop_now()
        if not self._loop.is_closed():
            loop = self._loop
            loop.call_soon_threadsafe(lambda: loop.create_task(self.aclose()))

    # -- stats ------------------------------------------------------------

    @property
    def actor_handles(self) -> list[Any]:
        """The actors' handles, in slot order (for tests and diagnostics)."""
        return [slot.handle for slot in self._slots]

    def stats(self) -> Stats:
        if self._phase is _Phase.IDLE or self._loop is None:
            return Stats(0, 0, 0, 0, 0, 0.0, 0.0, self._limit, None, None, None)
        ended = self._ended_at if self._ended_at is not None else self._loop.time()
        elapsed = ended - self._started_at
        done = self._completed + self._failed
        running = self._phase is _Phase.RUNNING and self._error is None and not self._halted
        in_flight = self._sent - done if running else 0
        histogram = self._histogram
        return Stats(
            started=self._sent,
            completed=self._completed,
            failed=self._failed,
            retried=self._retried,
            in_flight=in_flight,
            elapsed=elapsed,
            throughput=done / elapsed if elapsed > 0 else 0.0,
            limit=self._limit,
            latency_p50=histogram.percentile(0.50),
            latency_p90=histogram.percentile(0.90),
            latency_p99=histogram.percentile(0.99),
        )


async def _finish(
    tasks: set[asyncio.Task[None]], *, cancel: bool, grace: float | None = None
) -> None:
    """Wait for ``tasks`` (cancelling them first, or after ``grace`` seconds)."""
    while tasks:
        batch = list(tasks)
        if cancel:
            for task in batch:
                task.cancel()
            await asyncio.wait(batch)
            continue
        _, late = await asyncio.wait(batch, timeout=grace)
        cancel = True  # whatever is still waiting after the grace is cancelled
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)


async def _close_input(items: object) -> None:
    if isinstance(items, AsyncIterable):
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()


class RayStream(ResultStream[R]):
    """The results of ``corral.map(..., backend="ray")``: same protocol as :class:`ResultStream`.

    ``async with`` it and ``async for`` over it; ``stats`` counts what came
    back from the actors; ``cancel()`` ends early keeping what is done;
    ``aclose()`` (or leaving ``async with``) cancels the chunks in flight and
    kills the actors.
    """

    def __init__(self, run: RayRun[R]) -> None:  # no super().__init__: there is no engine
        self._run = run
        self._ready = run.ready

    @property
    def stats(self) -> Stats:
        """A frozen snapshot of the run's counters and latency (measured in the actors)."""
        return self._run.stats()

    async def __aenter__(self) -> RayStream[R]:
        self._run.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[R]:
        return self

    async def __anext__(self) -> R:
        run = self._run
        if self._ready:
            return run.take()  # type: ignore[no-any-return]
        if await run.wait_next():
            return run.take()  # type: ignore[no-any-return]
        raise StopAsyncIteration

    def cancel(self) -> None:
        """End the map early, keeping what is done (see :meth:`ResultStream.cancel`)."""
        self._run.halt()

    async def aclose(self) -> None:
        """Stop the map: cancel its chunks in flight and kill its actors."""
        await self._run.aclose()

    def __del__(self) -> None:
        run = getattr(self, "_run", None)
        if run is not None and not run.finished:
            try:
                run.abandon()
            except RuntimeError:  # pragma: no cover - the loop is already closed
                pass


def check_setup(setup: object) -> None:
    """``setup=`` is a function of no argument (or None)."""
    if setup is not None and not callable(setup):
        raise TypeError(
            "setup must be a function of no argument, run once per Ray actor, whose "
            f"return value is passed to fn as its second argument; got setup={setup!r}"
        )


def check_address(address: object) -> None:
    if address is not None and (not isinstance(address, str) or not address):
        raise ValueError(
            "ray_address must be a Ray cluster's address like '10.0.0.5:6379', 'auto' or "
            f"'ray://host:10001', or None (RAY_ADDRESS, else a local cluster); "
            f"got ray_address={address!r}"
        )


def check_actors(actors: object) -> int | None:
    if actors is None:
        return None
    if isinstance(actors, bool) or not isinstance(actors, int) or actors < 1:
        raise ValueError(
            "ray_actors must be an int >= 1 (Ray actors, each with its own event loop) or "
            f"None (one per CPU of the cluster); got ray_actors={actors!r}"
        )
    return actors


def map_on_ray(
    fn: Callable[..., Any],
    items: Iterable[Any] | AsyncIterable[Any],
    *,
    address: str | None,
    setup: Callable[[], Any] | None,
    actors: int | None,
    limit: int | None,
    ordered: bool,
    timeout: float | None,
    retry: Retry | None,
    return_exceptions: bool,
) -> RayStream[Any]:
    """``corral.map(..., backend="ray")`` with its arguments already checked and normalised.

    Raises:
        ImportError: at once, when Ray is not installed.
    """
    require_ray()
    run: RayRun[Any] = RayRun(
        fn,
        items,
        address=address,
        setup=setup,
        actors=actors,
        limit=limit,
        ordered=ordered,
        timeout=timeout,
        retry=retry,
        return_exceptions=return_exceptions,
    )
    return RayStream(run)
