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
  memory and the reorder buffer behind a slow chunk is bounded too. Items
  are cut into chunks by what each actor lacks of twice its share, so a
  few items at a time (a slow input, an engine in front) keep every actor
  busy, not one.
- **Exactly once**: results come back per chunk, tagged with the chunk's
  first index; a chunk is accepted once, when it is still outstanding, and
  must hold exactly its items. Ordered delivery merges chunks in input order
  (``ordered=False``: as chunks complete).
  Calls start in input order only roughly: Ray may start an async actor's
  later chunk before an earlier one (its documented task order), and an
  actor's calls take its slots as their chunks arrive.
- **Errors as themselves**: an item's exception travels back as its own
  type, with the actor's traceback as a note; an error Ray wraps
  (``RayTaskError``, e.g. from ``setup=``, noted as coming from there) is
  unwrapped to its cause. The first failure (``return_exceptions=False``)
  ends the map and cancels the chunks in flight with ``ray.cancel``, which
  raises ``CancelledError`` inside their running coroutines.
- **What cannot travel fails its own item**: an item that cannot be pickled
  (a TypeError naming it and its index, in its place) or a result that
  cannot (pickled in the actor, by chunk, to find out), as with
  ``processes=N``; so does a result this process cannot load (a class only
  the actor can import, a ``__reduce__`` that fails here): the actor keeps a
  chunk's values until the driver has loaded them, and sends them again one
  by one when it could not. A ``fn`` or ``setup`` that cannot travel is
  refused before any actor starts, by name.
- **Stats** count calls, not items sent: ``started`` is the calls that ran
  in the actors (an item queued there behind the limit has not started).
  A chunk cut short by an early end returns nothing, so each actor says at
  the end how many calls its cut chunks had started; until then, of the
  items each actor holds, as many as its share lets run count as in flight.
  Once a call is cancelled (the map is ending) an actor starts no other.
- **Retries** run in the actor, per attempt; each actor keeps the retry
  budget for its own calls with a share of its floor (see _remote), so the
  map's retries stay ``floor + ratio x successes`` as in one process.
- **A dead actor** (its process killed, its node lost) is restarted by Ray
  (``max_restarts``) and the chunks it held are re-run there
  (``max_task_retries``); the driver still hands out each result exactly
  once. **Side effects are at-least-once**: the calls of a re-run chunk that
  had already finished before the actor died run again.
- **Structured**: leaving the map by any path cancels its chunks in flight,
  waits briefly for them to stop, closes each actor's ``setup=`` state
  (``aclose()`` or ``close()``, once), and kills its actors, even when that
  close is itself cancelled. A local cluster that corral started stays up
  for the next map of this process and is shut down when the interpreter
  exits. A ``ray_address`` where nothing accepts a connection fails within
  ``CONNECT_TIMEOUT`` seconds (Ray alone retries for minutes); one of another
  cluster than the one this process is connected to already is refused.

``fn`` and ``setup`` travel to the actors with Ray's serialiser (cloudpickle),
so lambdas and closures work; what they import must be importable on every
node of the cluster (corral too).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import importlib
import importlib.util
import inspect
import logging
import math
import os
import queue
import reprlib
import socket
import sys
import threading
import traceback
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

from ._engine import _Retried
from ._limits import Limiter
from ._numbers import is_async_callable, is_integral
from ._offload import PLAIN_TYPES, WorkerCrashed, no_stop_iteration
from ._remote import (
    RemoteCall,
    RemoteOptions,
    RemoteRun,
    RemoteStream,
    Submissions,
    finish_tasks,
    split_limit,
    split_retry_budget,
    worker_call,
)
from ._retry import Retry
from ._retry_budget import RetryBudget, RetryBudgetState
from ._stats import LatencyHistogram

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
#: Seconds the end of a map (any end) gives each actor to close its ``setup=`` state.
CLOSE_GRACE = 5.0
#: Seconds ``ray_address=`` gets to accept a connection before the map fails
#: (Ray itself would keep trying for minutes).
CONNECT_TIMEOUT = 10.0


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
# The ray_address corral connected with, and the GCS address that connection
# had: a Ray Client's ray:// address is not the GCS address it leads to.
_connected_with: tuple[str, str | None] | None = None


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
    connected (``ray.init`` was called, or an earlier map connected), that
    connection is used, provided ``address`` is unset, ``'auto'`` or names
    the same cluster. Blocking (starting a cluster takes seconds): run it
    through :func:`connect_async`.

    Raises:
        ValueError: ``address`` names another cluster than the one this
            process is connected to.
    """
    global _started_here, _connected_with
    given = address
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None and "ray" not in sys.modules:
        # A Linux node advertises (and binds) its network address unless Ray
        # is told it runs on one machine; read once, when ray is imported.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray = _ray()
    if ray.is_initialized():
        # RAY_ADDRESS is not checked: a connection this process made on
        # purpose (ray.init) comes before what the environment says.
        if given is not None:
            _check_connected_to(ray, given)
        return ray
    if address is None:
        _keep_on_loopback(ray)
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
        _started_here = True
        atexit.register(shutdown)
    else:
        _check_reachable(address, named="ray_address" if address == given else "RAY_ADDRESS")
        ray.init(address=address, logging_level=logging.WARNING)
    _connected_with = (address or "local", _gcs_address(ray))
    return ray


def _gcs_address(ray: Any) -> str | None:
    """The GCS address (``host:port``) of the cluster this process is connected to."""
    try:
        address = ray.get_runtime_context().gcs_address
    except Exception:  # pragma: no cover - a connection that does not say
        return None
    return address if isinstance(address, str) and address else None


def _check_connected_to(ray: Any, address: str) -> None:
    """Refuse ``ray_address=address`` when this process is connected to another cluster.

    Ray connects a process to one cluster at a time, and a second ``ray.init``
    does not move it: a map must not run on another cluster than the one it
    was told to. ``'auto'`` (the cluster of this machine, whichever) accepts
    the connection there is; so does an address of the same cluster, or the
    very address corral connected with.
    """
    if address == "auto":
        return
    connected = _gcs_address(ray)
    if connected is not None and _same_host_port(address, connected):
        return
    if _connected_with is not None and _connected_with == (address, connected):
        return
    raise ValueError(
        f"backend='ray' was given ray_address={address!r}, but this process is already "
        f"connected to the Ray cluster at {connected or 'an unknown address'!r} (by ray.init(), "
        "or an earlier map), and Ray connects a process to one cluster at a time. Leave "
        "ray_address unset (or 'auto') to run on that cluster, or call ray.shutdown() first "
        f"to run on {address!r}."
    )


def _same_host_port(given: str, connected: str) -> bool:
    """Whether two ``host:port`` addresses name the same place (hosts compared resolved)."""
    ours, theirs = _host_port(given), _host_port(connected)
    if ours is None or theirs is None or ours[1] != theirs[1]:
        return False
    return ours[0] == theirs[0] or bool(_resolved(ours[0]) & _resolved(theirs[0]))


def _host_port(address: str) -> tuple[str, int] | None:
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not host or not port.isdigit():
        return None  # not host:port ('ray://...', 'local')
    return host.strip("[]").lower(), int(port)


def _resolved(host: str) -> set[str]:
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except OSError:
        return set()


def _check_reachable(address: str, *, named: str) -> None:
    """Fail within CONNECT_TIMEOUT when nothing listens at a ``host:port`` address.

    Ray itself keeps trying an address where no cluster answers for minutes,
    logging warnings, before it gives up: a map would seem to hang. ``auto``
    (found in this machine's Ray session files) is left to Ray.
    """
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        return  # not host:port ('auto'): Ray says what is wrong with it
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        raise ConnectionError(
            f"backend='ray' found no Ray cluster at {named}={address!r}: nothing accepted a "
            f"connection there within {CONNECT_TIMEOUT:g} s ({exc}). Start one there "
            "(`ray start --head`), or leave ray_address and RAY_ADDRESS unset for a local "
            "cluster on this machine."
        ) from None


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

#: What one chunk brings back: (values, or them pickled as one (see _pack), or
#: None; failed offsets; the first failure when the map stops at one; attempts
#: retried; latency histogram growth; calls started).
ChunkOutcome = tuple[
    list[Any] | bytes | None, list[int], BaseException | None, int, dict[int, int], int
]

_NO_STATE = object()


class _Tally:
    """One chunk's latency histogram, calls cut short and attempts retried, in the actor."""

    __slots__ = ("cut", "histogram", "retried")

    def __init__(self) -> None:
        self.histogram = LatencyHistogram()
        self.cut = 0
        self.retried = _Retried()

    @property
    def started(self) -> int:
        """The chunk's calls started so far, once they have all ended.

        A call that ends (a result or a failure) adds its duration to the
        histogram; one cut short (cancelled) is counted in ``cut`` instead,
        as its time says nothing of the calls' latency. Nothing else counts:
        counting calls as they start would cost every call, for a number
        wanted once per chunk.
        """
        return self.histogram.total + self.cut


class _Actor:
    """One long-lived worker slot: its share of the limit, its setup state, its engine.

    Ray runs every ``async def`` method of an actor on the actor's own event
    loop, several at once, so the chunks an actor holds share one Limiter.
    """

    def __init__(
        self,
        number: int,
        fn: Callable[..., Any],
        setup: Callable[[], Any] | None,
        share: int | None,
        timeout: float | None,
        retry: Retry | None,
        budget: RetryBudget | None,
        return_exceptions: bool,
    ) -> None:
        self._number = number
        self._fn = fn
        self._setup = setup
        self._timeout = timeout
        self._retry = retry
        self._return_exceptions = return_exceptions
        # This actor's share of the retry budget (see split_retry_budget), shared by its chunks.
        self._retry_budget = None if budget is None else RetryBudgetState(budget)
        self._limiter = None if share is None else Limiter(limit=share)
        self._threads = (
            None
            if is_async_callable(fn)
            else concurrent.futures.ThreadPoolExecutor(
                max_workers=share or 64, thread_name_prefix="corral-ray"
            )
        )
        self._state_task: asyncio.Future[Any] | None = None
        self._closed = False
        # Set when a call is cancelled: the map is ending (the driver cancels
        # every chunk in flight, or a chunk leaves its map on a failure, which
        # ends it). The driver cancels chunks one by one, and each cancelled
        # call frees a slot of this actor's Limiter: without the flag, the
        # calls of chunks not yet cancelled would start in those slots (paid
        # calls, after cancel()).
        self._stopping = False
        # The tallies of chunks whose outcome has not gone back: a chunk that
        # ray.cancel stops returns nothing, so the driver asks at the end (close).
        self._unreported: set[_Tally] = set()
        # The chunks running here, which close() stops before it counts them:
        # ray.cancel reaches the actor on its own, possibly after close().
        self._running: set[asyncio.Task[Any]] = set()
        # By first index: the values of chunks sent back pickled as one, kept
        # until the driver says it loaded them, so that it can ask for them
        # again one by one when it cannot (see repack).
        self._kept: dict[int, list[Any]] = {}

    async def _state(self) -> Any:
        """The setup state, made once per actor (a restarted actor makes it again)."""
        if self._setup is None:
            return _NO_STATE
        if self._closed:
            raise RuntimeError(f"Ray actor {self._number}: its map has ended")
        if self._state_task is None:
            self._state_task = asyncio.ensure_future(self._make_state(self._setup))
        # Shielded: a cancelled chunk does not cancel the setup other chunks wait for.
        return await asyncio.shield(self._state_task)

    async def _make_state(self, setup: Callable[[], Any]) -> Any:
        try:
            state = setup()
            if inspect.isawaitable(state):
                state = await state
        except Exception as exc:
            # Raised as itself, saying where it came from: fn never ran on this actor.
            exc.add_note(
                f"Raised by setup={setup!r} in Ray actor {self._number} (pid {os.getpid()}); "
                "fn was not called there."
            )
            raise _portable(exc) from None
        return state

    def _call(self, state: Any) -> Callable[[Any], Awaitable[Any]]:
        """``fn`` of one item (with the setup state as its second argument)."""
        fn, threads = self._fn, self._threads
        if threads is not None:
            loop = asyncio.get_running_loop()
            if state is _NO_STATE:
                return lambda item: loop.run_in_executor(threads, no_stop_iteration, fn, item)
            return lambda item: loop.run_in_executor(threads, no_stop_iteration, fn, item, state)
        if state is _NO_STATE:
            return fn
        return lambda item: fn(item, state)

    async def run_chunk(
        self,
        items: list[Any],
        start: int,
        skip: list[int] | None = None,
        loaded: list[int] | None = None,
    ) -> ChunkOutcome:
        """Run one chunk, items ``start`` onwards, on corral's engine; every outcome in order.

        ``skip``: offsets of items the driver could not send (placeholders
        here), whose failures it fills in itself. ``loaded``: first indexes
        of chunks whose values the driver has loaded (no longer kept here).
        """
        task = asyncio.current_task()
        assert task is not None  # Ray runs each call of an async actor as a task
        self._running.add(task)
        try:
            return await self._run_chunk(items, start, skip, loaded)
        finally:
            self._running.discard(task)

    async def _run_chunk(
        self,
        items: list[Any],
        start: int,
        skip: list[int] | None,
        loaded: list[int] | None,
    ) -> ChunkOutcome:
        from ._api import map as corral_map  # here: _api imports this module

        for done in loaded or ():
            self._kept.pop(done, None)
        tally = _Tally()
        call = worker_call(
            self._call(await self._state()),
            timeout=self._timeout,
            retry=self._retry,
            budget=self._retry_budget,
            retried=tally.retried,
        )
        clock = asyncio.get_running_loop().time
        # run_item runs once the actor's Limiter lets its item in: an item still
        # waiting for a slot has not started, and is not counted (see _Tally).
        histogram = tally.histogram

        async def run_item(pair: tuple[int, Any]) -> tuple[int, bool, Any]:
            offset, item = pair
            if self._stopping:
                # The map is ending: start nothing more, and wait for this
                # chunk's own cancellation, on its way (see _stopping).
                await asyncio.get_running_loop().create_future()
            began = clock()
            try:
                value = await call(item)
            except Exception as exc:
                histogram.add(clock() - began)
                return (offset, False, exc)
            except BaseException as exc:
                # Cut short (cancelled, or a BaseException that ends the map):
                # started, but not an end whose time is a latency.
                tally.cut += 1
                if isinstance(exc, asyncio.CancelledError):
                    self._stopping = True
                raise
            histogram.add(clock() - began)
            return (offset, True, value)

        values: list[Any] = [None] * len(items)
        failed: list[int] = []
        stop: BaseException | None = None
        pairs: Iterable[tuple[int, Any]] = enumerate(items)
        if skip:
            unsent = set(skip)
            pairs = [pair for pair in pairs if pair[0] not in unsent]
        self._unreported.add(tally)
        async with corral_map(run_item, pairs, limit=self._limiter, ordered=False) as outcomes:
            async for offset, ok, value in outcomes:
                if ok:
                    values[offset] = value
                    continue
                error = _portable(value)
                if not self._return_exceptions:
                    stop, failed = error, [offset]
                    break  # leaving the map cancels this chunk's other calls at once
                failed.append(offset)
                values[offset] = error
        # Its calls have all ended (the map above awaited them): the tally is final.
        self._unreported.discard(tally)
        packed: list[Any] | bytes | None = None
        if stop is None:
            packed, stop = self._pack(start, values, failed)
            if stop is not None:
                packed, failed = None, [failed[-1]]
        return (packed, failed, stop, tally.retried.count, _growth(histogram), tally.started)

    def _pack(
        self, start: int, values: list[Any], failed: list[int]
    ) -> tuple[list[Any] | bytes, Any]:
        """The chunk's values ready to travel back, and the first failure that stops the map.

        Values of the plainest types go as they are. Others are pickled here,
        as one, so that a result that cannot be pickled fails its own item
        (a TypeError in its place, ``failed`` gaining its offset) instead of
        the whole chunk and the map, as it would in Ray's own serialiser; and
        kept until the driver has loaded them (see repack).
        """
        if PLAIN_TYPES.issuperset(map(type, values)):  # ~17 ns an item
            return values, None
        pickler = _ray().cloudpickle
        try:
            packed = pickler.dumps(values)
        except Exception:
            pass  # find which
        else:
            self._kept[start] = values
            return packed, None
        errors = set(failed)
        for offset, value in enumerate(values):
            if offset in errors:
                continue  # an exception already made portable
            try:
                pickler.dumps(value)
            except Exception as exc:
                error = TypeError(
                    f"the result {reprlib.repr(value)} of fn cannot be sent back from Ray "
                    f"actor {self._number}: it cannot be pickled ({exc})"
                )
                values[offset] = error
                failed.append(offset)
                if not self._return_exceptions:
                    return values, error
        self._kept[start] = values
        return pickler.dumps(values), None

    async def repack(self, start: int) -> list[bytes] | None:
        """The values of the chunk starting at ``start``, each pickled alone (None: not kept).

        Asked for when the driver cannot load them pickled as one (a class
        only this process can import, a ``__reduce__`` that fails on load):
        apart, only the values it cannot load fail, each its own item.
        """
        values = self._kept.pop(start, None)
        if values is None:
            return None
        dumps = _ray().cloudpickle.dumps
        return [dumps(value) for value in values]  # they pickled together: each does alone

    async def close(self) -> tuple[int, int]:
        """Close the setup state (``aclose()`` or ``close()``, when it has one), once.

        The driver calls it at the end of a map with ``setup=`` or that ended
        early, once the chunks have stopped. A setup still running then is
        cancelled; one that finishes all the same is closed too. A close that
        fails is not the map's error.

        Returns:
            The calls started and attempts retried by the chunks whose outcome
            never went back (those ray.cancel stopped), for the map's stats.
            A chunk still running is stopped first: the driver closes once it
            has given up on its chunks, and the ray.cancel of one may arrive
            after this call; counted while running, its calls would be missed
            (a tally counts the calls that ended).
        """
        self._stopping = True  # no call starts from here on
        running = [task for task in self._running if task is not asyncio.current_task()]
        for task in running:
            task.cancel()
        if running:
            # Within the driver's wait for this close (CLOSE_GRACE).
            await asyncio.wait(running, timeout=CLOSE_GRACE / 2)
        unreported, self._unreported = self._unreported, set()
        self._kept.clear()
        try:
            await self._close_state()
        except Exception:
            pass  # the state's own close failed: nothing the map can do about it
        finally:
            if self._threads is not None:
                self._threads.shutdown(wait=False, cancel_futures=True)
        return (
            sum(tally.started for tally in unreported),
            sum(tally.retried.count for tally in unreported),
        )

    async def _close_state(self) -> None:
        task, self._state_task = self._state_task, None
        self._closed = True  # no chunk comes after this: none may make a new state
        if task is None:
            return
        if not task.done():
            task.cancel()
            await asyncio.wait([task])
        if task.cancelled() or task.exception() is not None:
            return
        state = task.result()
        closer = getattr(state, "aclose", None) or getattr(state, "close", None)
        if callable(closer):
            result = closer()
            if inspect.isawaitable(result):
                await result

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


class _Slot:
    """The driver's view of one actor."""

    __slots__ = ("handle", "held", "items", "loaded", "number", "share")

    def __init__(self, number: int, handle: Any, share: int | None) -> None:
        self.number = number
        self.handle = handle
        self.share = share  # its share of the limit (None: no limit)
        self.held = 0  # chunks sent, outcome not back
        self.items = 0  # the items of those chunks that it runs (not those unsent)
        # First indexes of its chunks whose values came pickled as one and were
        # loaded here: told with the next chunk sent to it, which stops keeping them.
        self.loaded: list[int] = []

    def take_loaded(self) -> list[int] | None:
        loaded, self.loaded = self.loaded, []
        return loaded or None


class _Chunk:
    __slots__ = ("items", "ref", "size", "slot", "start", "unsent")

    def __init__(
        self,
        start: int,
        items: list[Any],
        slot: _Slot,
        ref: Any,
        unsent: dict[int, BaseException],
    ) -> None:
        self.start = start
        self.size = len(items)
        # Kept until the outcome is in: sent again one by one if the actor cannot load them.
        self.items = items
        self.slot = slot
        self.ref = ref
        self.unsent = unsent  # by offset: the failures of items that could not be sent


class RayRun(RemoteRun[R]):
    """The driver's side of a map on Ray: connection, actors, chunks in flight.

    Feeding, merging, stats and cleanup are :class:`RemoteRun`'s.
    """

    workers_name = "Ray actors"

    def __init__(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any] | AsyncIterable[Any] | Submissions,
        options: RemoteOptions,
        *,
        address: str | None,
        setup: Callable[[], Any] | None,
        actors: int | None,
    ) -> None:
        super().__init__(fn, items, options)
        self._address = address
        self._setup = setup
        self._actors_wanted = actors
        self._ray: Any = None
        self._slots: list[_Slot] = []
        self._chunk_size = MAX_CHUNK
        self._per_actor = CHUNKS_PER_ACTOR
        self._window = 0  # set with the actors
        self._chunk_tasks: set[asyncio.Task[None]] = set()
        self._outstanding: dict[int, _Chunk] = {}  # by first index: sent, not back
        self._retried = 0
        # Calls that started in the actors but whose outcome was not handed out:
        # cut short by the end of the map, or back after it.
        self._cut_short = 0

    # -- the actors -------------------------------------------------------

    async def _boot(self) -> None:
        ray = self._ray = await connect_async(self._address)
        self._start_actors(ray)
        await self._feed()

    def _start_actors(self, ray: Any) -> None:
        # Said plainly and at once, before an actor starts: Ray's own error
        # names neither the argument nor what to do.
        for name, value in (("fn", self._fn), ("setup", self._setup)):
            try:
                ray.cloudpickle.dumps(value)
            except Exception as exc:
                raise TypeError(
                    f"backend='ray' sends {name} to its actors, but {name}={value!r} cannot "
                    f"be pickled ({exc}). Make what it holds (a lock, a client, an open "
                    "file) inside the actors instead: setup= runs there, once per actor."
                ) from None
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
        options = self._options
        budgets = split_retry_budget(options.retry, len(shares))
        for number, (share, budget) in enumerate(zip(shares, budgets, strict=True)):
            handle = actor_class.remote(
                number,
                self._fn,
                self._setup,
                share,
                options.timeout,
                options.retry,
                budget,
                options.return_exceptions,
            )
            self._slots.append(_Slot(number, handle, share))

    def _all_done(self) -> bool:
        return self._input_done and not self._outstanding

    def _stop_workers(self) -> None:
        ray = self._ray
        if ray is not None:
            for chunk in list(self._outstanding.values()):
                try:
                    ray.cancel(chunk.ref)  # CancelledError inside the actor's coroutines
                except Exception:  # pragma: no cover - the actor is already gone
                    pass

    async def _settle(self) -> None:
        await super()._settle()
        # Cancelled chunks report back once their coroutines have stopped.
        await finish_tasks(self._chunk_tasks, cancel=False, grace=CANCEL_GRACE)

    async def _release(self, clean: bool) -> None:
        # Every end closes the setup= state, not only a clean one: the chunks
        # have stopped by now (_settle), and what setup opened (a session, a
        # connection, a file being written) is closed as the docstring says.
        ray = self._ray
        if ray is None or not self._slots:
            return
        try:
            # After an early end, the actors also say how many calls the
            # cancelled chunks had started (stats.started).
            if self._setup is not None or not clean:
                closing = [
                    # Not retried: a restarted actor has no state to close.
                    asyncio.ensure_future(slot.handle.close.options(max_task_retries=0).remote())
                    for slot in self._slots
                ]
                try:
                    await asyncio.wait(closing, timeout=CLOSE_GRACE)
                finally:
                    for future in closing:
                        if not future.done():
                            future.cancel()
                        elif not future.cancelled() and future.exception() is None:
                            started, retried = future.result()
                            self._cut_short += started
                            self._retried += retried
        finally:
            # Even when this close is cancelled while the states close: an
            # actor left alive holds its CPU of the cluster until this process exits.
            for slot in self._slots:
                try:
                    ray.kill(slot.handle, no_restart=True)
                except Exception:  # pragma: no cover - already dead
                    pass

    def _counts(self, done: int, running: bool) -> tuple[int, int, int]:
        started = done + self._cut_short
        if not running or self.finished:
            return started, 0, self._retried
        # Until the end the actors are not asked (a round trip per snapshot):
        # of the items each holds, as many as its share lets run stand for
        # the calls running. Once closed, the count is theirs (see _release).
        in_flight = 0
        for slot in self._slots:
            share = slot.share
            in_flight += slot.items if share is None or slot.items < share else share
        return started + in_flight, in_flight, self._retried

    @property
    def actor_handles(self) -> list[Any]:
        """The actors' handles, in slot order (for tests and diagnostics)."""
        return [slot.handle for slot in self._slots]

    # -- feeding ----------------------------------------------------------

    def _worker_room(self) -> int:
        """A chunk's worth when an actor has room for one, else 0."""
        if any(slot.held < self._per_actor for slot in self._slots):
            return self._chunk_size
        return 0

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
                self._dispatch(chunk)
                await asyncio.sleep(0)
        finally:
            if not pumping.done():
                pumping.cancel()
                await asyncio.gather(pumping, return_exceptions=True)

    def _dispatch(self, batch: list[Any]) -> None:
        for slot, piece in self._pieces(batch):
            if not self._send(slot, piece):
                return  # the map failed: nothing more goes

    def _pieces(self, batch: list[Any]) -> list[tuple[_Slot, list[Any]]]:
        """``batch`` cut for the actors: what each lacks of twice its share first.

        A batch smaller than a chunk (the input had no more ready, or an
        engine in front hands items over a few at a time) would otherwise go
        whole to one actor, which runs only its share of it while the others
        idle: with the engine in front, which hands over twice the limit, the
        map ran at half its limit on two actors. What is left once every
        actor holds twice its share (a full chunk of a fast input) goes to
        the actor that then holds the fewest items.
        """
        slots = self._slots
        if self._limit is None or len(slots) == 1:
            return [(min(slots, key=lambda s: s.held), batch)]
        pieces: list[tuple[_Slot, list[Any]]] = []
        holds = {slot.number: slot.items for slot in slots}
        taken = 0
        for slot in sorted(slots, key=lambda s: s.items - 2 * (s.share or 0)):
            lack = 2 * (slot.share or 0) - slot.items
            if lack <= 0 or taken == len(batch):
                break
            piece = batch[taken : taken + lack]
            pieces.append((slot, piece))
            holds[slot.number] += len(piece)
            taken += len(piece)
        if taken < len(batch):
            fewest = min(slots, key=lambda s: holds[s.number])
            pieces.append((fewest, batch[taken:]))
        return pieces

    def _send(self, slot: _Slot, batch: list[Any]) -> bool:
        """Send ``batch`` to ``slot``'s actor as one chunk; False if that failed the map."""
        start = self._next_index
        unsent: dict[int, BaseException] = {}
        loaded = slot.take_loaded()
        try:
            ref = slot.handle.run_chunk.remote(batch, start, None, loaded)
        except Exception:
            unsent = self._unpicklable(start, batch)
            if not unsent:
                raise  # not one item's fault: the map's
            if not self._return_exceptions:
                # The first failure ends the map, as it would in the actor.
                self._next_index += 1
                self._failed += 1
                self._fail(next(iter(unsent.values())))
                return False
            # The others go, with placeholders keeping their offsets.
            batch = [None if offset in unsent else item for offset, item in enumerate(batch)]
            ref = slot.handle.run_chunk.remote(batch, start, sorted(unsent), loaded)
        self._next_index += len(batch)
        self._track(_Chunk(start, batch, slot, ref, unsent))
        return True

    def _track(self, chunk: _Chunk) -> None:
        chunk.slot.held += 1
        chunk.slot.items += chunk.size - len(chunk.unsent)
        self._outstanding[chunk.start] = chunk
        self._spawn(self._await_chunk(chunk), self._chunk_tasks)

    def _resend_one_by_one(self, chunk: _Chunk) -> None:
        """Send a chunk the actor could not load again, an item at a time.

        Ray could not load its items in the actor (one of a class the actor
        cannot import, say), so none of them ran; alone, only the items that
        cannot be loaded fail (see _await_chunk).
        """
        for offset, item in enumerate(chunk.items):
            start = chunk.start + offset
            if offset in chunk.unsent:
                self._deliver_chunk(start, [chunk.unsent[offset]], [0])
                continue
            slot = min(self._slots, key=lambda s: s.held)
            ref = slot.handle.run_chunk.remote([item], start, None, slot.take_loaded())
            self._track(_Chunk(start, [item], slot, ref, {}))
        self._check_end()

    async def _await_chunk(self, chunk: _Chunk) -> None:
        try:
            try:
                outcome = await chunk.ref
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._outstanding.get(chunk.start) is not chunk:
                    return  # already settled: a chunk counts once
                self._forget(chunk)
                if not self._live():
                    return  # already failed, cancelled or closing: nothing more to say
                if isinstance(exc, self._ray.exceptions.RaySystemError):
                    # Ray could not load the chunk's items in the actor.
                    if chunk.size > 1:
                        self._resend_one_by_one(chunk)
                        return
                    why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    error = RuntimeError(
                        f"the item {reprlib.repr(chunk.items[0])} (index {chunk.start}) cannot "
                        f"be loaded in Ray actor {chunk.slot.number}: {why}"
                    )
                    error.__cause__ = exc
                    stop = None if self._return_exceptions else error
                    self._on_outcome(chunk, ([error], [0], stop, 0, {}, 0))
                    return
                self._fail(self._explain(chunk, exc))
                return
            if self._outstanding.get(chunk.start) is not chunk:
                return  # already settled: a chunk counts once
            if isinstance(outcome[0], bytes) and self._live():
                # Pickled as one in the actor (see _Actor._pack): loaded here,
                # by the chunk's own task, which may have to ask the actor again.
                outcome = await self._load(chunk, outcome)
            self._forget(chunk)
            self._on_outcome(chunk, outcome)
        except Exception as bug:  # pragma: no cover - never leave the consumer waiting
            self._fail(bug)

    async def _load(self, chunk: _Chunk, outcome: ChunkOutcome) -> ChunkOutcome:
        """``outcome`` with its values, pickled as one in the actor, loaded here.

        When they cannot all be loaded, the actor sends them again one by one
        (see _Actor.repack), and each value that cannot be loaded fails its
        own item, named; without ``return_exceptions``, the first one ends
        the map.
        """
        packed, failed, _, retried, latency, started = outcome
        assert isinstance(packed, bytes)
        loads = self._ray.cloudpickle.loads
        try:
            values = loads(packed)
        except Exception as exc:
            whole = exc
        else:
            chunk.slot.loaded.append(chunk.start)  # the actor may stop keeping them
            return (values, failed, None, retried, latency, started)
        pieces: list[bytes] | None = None
        try:
            pieces = await chunk.slot.handle.repack.options(max_task_retries=0).remote(chunk.start)
        except Exception:  # pragma: no cover - the actor died meanwhile
            pass
        values = []
        errors = set(failed)
        for offset in range(chunk.size):
            try:
                if pieces is None:  # pragma: no cover - not kept (the actor restarted)
                    raise whole
                values.append(loads(pieces[offset]))
                continue
            except Exception as exc:
                what = "exception" if offset in errors else "result"
                error = RuntimeError(
                    f"the {what} of fn for the item {reprlib.repr(chunk.items[offset])} (index "
                    f"{chunk.start + offset}) came back from Ray actor {chunk.slot.number} but "
                    f"cannot be loaded in this process ({type(exc).__name__}: {exc}); is its "
                    "type importable here, and does it unpickle outside the actor?"
                )
                error.__cause__ = exc
            if not self._return_exceptions:
                return (None, [offset], error, retried, latency, started)
            values.append(error)
            errors.add(offset)
        return (values, sorted(errors), None, retried, latency, started)

    def _unpicklable(self, start: int, batch: list[Any]) -> dict[int, BaseException]:
        """By offset in ``batch``: a TypeError naming each item that cannot be pickled."""
        pickler = self._ray.cloudpickle
        found: dict[int, BaseException] = {}
        for offset, item in enumerate(batch):
            try:
                pickler.dumps(item)
            except Exception as exc:
                found[offset] = TypeError(
                    f"the item {reprlib.repr(item)} (index {start + offset}) cannot be sent "
                    f"to a Ray actor: it cannot be pickled ({exc})"
                )
        return found

    def _forget(self, chunk: _Chunk) -> None:
        if self._outstanding.get(chunk.start) is chunk:
            del self._outstanding[chunk.start]
            chunk.slot.held -= 1
            chunk.slot.items -= chunk.size - len(chunk.unsent)
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
        values, failed, error, retried, latency, started = outcome
        self._retried += retried
        self._add_latency(latency)
        if not self._live():
            self._cut_short += started  # back after the end: not handed out
            return
        if error is not None:
            self._failed += 1
            # The chunk's other calls ended or were cut short; none is handed out.
            self._cut_short += max(0, started - 1)
            self._fail(error)
            return
        assert not isinstance(values, bytes)  # loaded by _await_chunk (see _load)
        if chunk.unsent and values is not None:
            for offset, unsent_error in chunk.unsent.items():
                values[offset] = unsent_error
            failed = [*failed, *chunk.unsent]
        if values is None or len(values) != chunk.size:  # pragma: no cover - a bug, loudly
            self._fail(
                RuntimeError(
                    f"corral bug: a chunk of {chunk.size} items starting at {chunk.start} "
                    f"came back with {None if values is None else len(values)} results"
                )
            )
            return
        self._deliver_chunk(chunk.start, values, failed)
        self._check_end()


class RayStream(RemoteStream[R]):
    """The results of ``corral.map(..., backend="ray")``: same protocol as :class:`ResultStream`.

    ``async with`` it and ``async for`` over it; ``stats`` counts what came
    back from the actors; ``cancel()`` ends early keeping what is done;
    ``aclose()`` (or leaving ``async with``) cancels the chunks in flight and
    kills the actors.
    """


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


#: The most actors ``ray_actors=`` asks for: each takes a CPU of the cluster
#: (and a process), and a huge number would not fail until a list of that
#: many shares of the limit was built (never, for 10**400).
MAX_ACTORS = 100_000


def check_actors(actors: object) -> int | None:
    if actors is None:
        return None
    if not is_integral(actors) or actors < 1:
        raise ValueError(
            "ray_actors must be an int >= 1 (Ray actors, each with its own event loop) or "
            f"None (one per CPU of the cluster); got ray_actors={actors!r}"
        )
    if actors > MAX_ACTORS:
        raise ValueError(
            f"ray_actors must be at most {MAX_ACTORS:_} (Ray actors, each taking a CPU "
            f"of the cluster); got ray_actors={actors!r}"
        )
    return int(actors)  # a numpy int, as limit= takes, made a plain one


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
    options = RemoteOptions(limit, ordered, timeout, retry, return_exceptions)
    run: RayRun[Any] = RayRun(fn, items, options, address=address, setup=setup, actors=actors)
    return RayStream(run)


def ray_call(
    fn: Callable[..., Any],
    *,
    address: str | None,
    setup: Callable[[], Any] | None,
    actors: int | None,
    limit: int | None,
    timeout: float | None,
    retry: Retry | None,
) -> RemoteCall:
    """The actors of ``backend="ray"`` as a call of one item (see RemoteCall).

    Raises:
        ImportError: at once, when Ray is not installed.
    """
    require_ray()
    submissions = Submissions()
    options = RemoteOptions(limit, False, timeout, retry, True)
    run: RayRun[Any] = RayRun(fn, submissions, options, address=address, setup=setup, actors=actors)
    return RemoteCall(run, submissions, _Retried())
