"""``processes=N``: one map sharded over N worker processes, each with its own loop.

One event loop runs on one core. When the calls of a map do real work between
their awaits (parsing what they fetched, computing on it), the loop saturates
its core long before the network does, and more concurrency only adds queueing.
``corral.map(fetch_and_parse, urls, processes=4, limit=400)`` runs N worker
processes instead, each with its own event loop (uvloop when installed) and its
own corral engine, and the parent feeds them::

    parent: input ──> feeder ──chunks──> child 0: loop + engine (limit 100) ──┐
                        ^                child 1: loop + engine (limit 100) ──┤
                        └── room ──  results (in input order) <── reader <───┘

What each guarantee becomes
---------------------------
- **Limit**: split across the children (400 over 4: 100 each; 5 over 2: 3 and
  2), so never more than ``limit`` calls in flight in all. Fewer children are
  started when ``limit < processes``.
- **Lazy input, bounded memory**: the parent pulls an item only when a child
  has room: a child holds at most twice its share (its calls in flight and as
  many waiting, so it never idles between two messages), and the parent runs
  at most ``4 * limit`` items ahead of the consumer, so the reorder buffer
  behind a slow item is bounded too.
- **Rate, global**: splitting ``rate`` over the children would multiply the
  burst by N (each child's GCRA may start ``burst`` calls at once) and waste
  the share of an idle child. So the parent keeps the one :class:`RateGate`,
  and a child asks it for a start token before each attempt (retries too):
  starts are paced exactly as in one process, up to the few hundred
  microseconds a token takes to cross the socket. Items still flow ahead of
  their tokens, so pacing costs no extra round trip per item.
- **Exactly once, errors as themselves**: each result travels back tagged
  with its input index and is delivered once; an exception comes back as its
  own type with the remote traceback as a note. ``timeout`` and ``retries``
  apply in the child, per attempt, as in one process. A value that cannot
  cross fails its own item, named, and nothing else: an item that cannot be
  pickled, or that a child cannot unpickle (its batch is sent again one item
  at a time; none of it had run), or a result or exception this process
  cannot unpickle (each is pickled on its own; see ``pack_outcome``).
- **Retry budget, for the whole map**: each child keeps ``Retry(budget=)``
  for its own calls (retries up to the ratio of its successes) with a share
  of the floor (10 over 4 children: 3, 3, 2, 2), so the map's retries stay
  ``floor + ratio x successes`` as in one process, not N floors. A retry
  the budget refuses fails its item with :class:`corral.RetryBudgetExhausted`
  (counted in ``failed``).
- **Structured**: leaving the map by any path stops the children: after a
  clean end they exit on their own; on failure, cancellation or ``break``
  they are terminated at once (killed a second later if need be). A child
  that dies ends the map with :class:`corral.WorkerCrashed` (its calls in
  flight cannot be attributed to one item, so nothing is silently re-run).
- **Stats**: ``completed`` and ``failed`` are counted in the parent as results
  arrive; ``started``, ``in_flight``, ``retried`` and the latency histogram
  are reported by the children with each batch of results (the histogram a
  few times a second) and summed; they are exact once the map has ended.
  Calls that start with no result to carry the news are reported on their
  own, within two loop iterations of the child: ``started`` and
  ``in_flight`` do not wait for a result or a timer.

``fn`` travels to the children by reference, so it must be importable: an
``async def`` at module level. A lambda or a closure is refused at once.
"""

from __future__ import annotations

import asyncio
import itertools
import pickle
import reprlib
import socket
import sys
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from ._engine import _Retried
from ._numbers import is_async_callable
from ._offload import (
    PLAIN_TYPES,
    Link,
    WorkerCrashed,
    connect,
    describe_exit,
    drain,
    ignore_sigint,
    kill_stragglers,
    mp_context,
    pack_outcome,
    portable,
    spare_of,
    stop_processes,
    undecodable,
    unpack_outcome,
    wait_exit,
    warm_up_start_method,
)
from ._rate import Rate, RateGate
from ._remote import (
    RemoteCall,
    RemoteOptions,
    RemoteRun,
    RemoteStream,
    Submissions,
    split_limit,
    split_retry_budget,
    worker_call,
)
from ._retry import Retry
from ._retry_budget import RetryBudget, RetryBudgetState
from ._stats import LatencyHistogram

if TYPE_CHECKING:
    from multiprocessing.context import ForkServerContext, SpawnContext
    from multiprocessing.process import BaseProcess

R = TypeVar("R")

#: How far (in items, times the limit) the parent runs ahead of the consumer.
WINDOW_PER_LIMIT = 4
#: The most items the parent pulls in one go when the limit is ``None``.
UNBOUNDED_SLICE = 1024
#: Seconds between a child's latency reports (its count of started calls goes
#: at once, see ``_ChildSession._report_starts``). Read when a map starts and
#: sent to its children with their settings.
STATS_INTERVAL = 0.25
#: Seconds a child that finished cleanly gets to exit before it is terminated.
EXIT_GRACE = 5.0


def _refuse_unpicklable(value: object, explain: Callable[[Exception], str]) -> None:
    """TypeError(explain(why)) when ``value`` cannot be pickled for the children."""
    try:
        pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise TypeError(explain(exc)) from None


def check_shardable(fn: Callable[..., Any], limit: object, retry: Retry | None) -> None:
    """Refuse at once what cannot run in worker processes, saying why and what to do."""
    _refuse_unpicklable(
        fn,
        lambda exc: (
            f"processes=N runs fn in other processes, which import it by name; {fn!r} "
            f"cannot be sent there ({exc}). Define it with `async def` at module level in "
            "a module (not a lambda, a closure or a function defined inside another)."
        ),
    )
    if not is_async_callable(fn):
        raise TypeError(
            f"processes=N runs an `async def` fn on N event loops; {fn!r} is a plain "
            "function. For CPU-bound work in a plain `def`, use executor='process' instead."
        )
    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    if module is not None and module.__name__ == "__main__" and not hasattr(module, "__file__"):
        raise TypeError(
            f"processes=N runs fn in other processes, which import it by name; {fn!r} was "
            "defined in an interactive session, which they cannot import. Move it into a "
            "module (a .py file) and import it from there."
        )
    if not (limit is None or (isinstance(limit, int) and not isinstance(limit, bool))):
        raise TypeError(
            "processes=N splits an int limit across its processes; a shared Limiter or an "
            "adaptive limit lives in one process and cannot be split. Pass an int or None; "
            f"got limit={limit!r}"
        )
    _refuse_unpicklable(
        retry,
        lambda exc: (
            f"processes=N sends retries= to its processes, but retries={retry!r} cannot be "
            f"pickled ({exc}). Give Retry(on=...) exception types or a module-level function."
        ),
    )


class _Child:
    """The parent's view of one worker process."""

    __slots__ = (
        "capacity",
        "done",
        "finished",
        "grants",
        "link",
        "number",
        "outbox",
        "outstanding",
        "process",
        "retried",
        "spare",
        "started",
    )

    def __init__(self, number: int, capacity: int | None) -> None:
        self.number = number
        self.capacity = capacity  # items it may hold (in flight + waiting); None: no bound
        self.process: BaseProcess | None = None
        self.link: Link | None = None
        # A second descriptor of the parent's end of the socket, to read what
        # the child wrote before it went once the link is lost (see _drain).
        self.spare: socket.socket | None = None
        self.outbox: list[tuple[int, Any]] = []  # assigned, sent at the end of this iteration
        self.outstanding = 0  # sent, result not back
        self.grants = 0  # rate tokens to send at the end of this iteration
        self.done = 0  # results received from it
        self.started = 0  # as reported by the child
        self.retried = 0  # as reported by the child
        self.finished = False  # it sent "done": every result it owed has arrived

    def free(self) -> int:
        if self.link is None or self.finished:
            return 0
        if self.capacity is None:
            return UNBOUNDED_SLICE
        return self.capacity - self.outstanding - len(self.outbox)


def _close_spare(child: _Child) -> None:
    spare, child.spare = child.spare, None
    if spare is not None:
        spare.close()


class ShardRun(RemoteRun[R]):
    """The parent's side of a sharded map: the children, their messages and rate tokens.

    Feeding, merging, stats and cleanup are :class:`RemoteRun`'s.
    """

    workers_name = "worker processes"

    def __init__(
        self,
        fn: Callable[[Any], Awaitable[R]],
        items: Iterable[Any] | AsyncIterable[Any] | Submissions,
        options: RemoteOptions,
        *,
        processes: int,
        rate: Rate | None,
    ) -> None:
        super().__init__(fn, items, options)
        self._rate = rate
        limit, timeout, retry = options.limit, options.timeout, options.retry
        shares: list[int | None]
        shares = [None] * processes if limit is None else list(split_limit(limit, processes))
        self._children = [
            _Child(number, None if share is None else 2 * share)
            for number, share in enumerate(shares)
        ]
        budgets = split_retry_budget(retry, len(shares))
        self._payloads = [
            pickle.dumps(
                (fn, share, timeout, retry, budget, rate is not None, STATS_INTERVAL),
                pickle.HIGHEST_PROTOCOL,
            )
            for share, budget in zip(shares, budgets, strict=True)
        ]
        self._window = None if limit is None else WINDOW_PER_LIMIT * limit
        self._context: ForkServerContext | SpawnContext | None = None
        self._flush_handle: asyncio.Handle | None = None
        self._token_requests: deque[_Child] = deque()
        self._token_waiter: asyncio.Future[None] | None = None
        # Items sent and not back, by index: to name an item whose result cannot
        # be loaded here, and to send again the items of a batch a child could
        # not load.
        self._sent: dict[int, Any] = {}

    # -- the children -----------------------------------------------------

    async def _boot(self) -> None:
        assert self._loop is not None
        context = self._context = mp_context()
        # Starting the fork server blocks for ~0.1 s the first time: not on the loop.
        await self._loop.run_in_executor(None, warm_up_start_method, context)
        for child, payload in zip(self._children, self._payloads, strict=True):
            await self._start_child(child, payload)
        if self._rate is not None:
            self._spawn(self._serve_tokens(RateGate(self._rate)))
        await self._feed()

    async def _start_child(self, child: _Child, payload: bytes) -> None:
        assert self._context is not None
        parent_end, child_end = socket.socketpair()
        try:
            process = child.process = self._context.Process(
                target=_child_main,
                args=(child_end, payload),
                name=f"corral-shard-{child.number}",
                daemon=True,
            )
            process.start()
        except BaseException:
            child.process = None
            parent_end.close()
            raise
        finally:
            child_end.close()

        def lost() -> None:
            self._on_lost(child, link)

        link = Link(lambda message: self._on_message(child, message), lost)
        spare = child.spare = spare_of(parent_end)
        try:
            await connect(parent_end, link)
        except BaseException:
            child.spare = None
            spare.close()
            raise
        child.link = link

    def _all_done(self) -> bool:
        return self._input_done and all(child.finished for child in self._children)

    def _stop_workers(self) -> None:
        for child in self._children:
            if child.process is not None and child.process.exitcode is None:
                child.process.terminate()

    def _close_links(self) -> None:
        for child in self._children:
            if child.link is not None:
                child.link.close()
            _close_spare(child)  # or the socket stays open, and the child never sees its end

    def _drop_links(self) -> None:
        self._close_links()
        # Dropped unclosed, the children terminated just now: the close that
        # would kill those still running a second later may never get there.
        kill_stragglers(c.process for c in self._children if c.process is not None)

    async def _settle(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        await super()._settle()

    async def _release(self, clean: bool) -> None:
        self._close_links()
        processes = [c.process for c in self._children if c.process is not None]
        await stop_processes(processes, grace=EXIT_GRACE if clean else 0.0)

    def _counts(self, done: int, running: bool) -> tuple[int, int, int]:
        in_flight = 0
        if running:
            in_flight = sum(max(0, c.started - c.done) for c in self._children)
        return done + in_flight, in_flight, sum(child.retried for child in self._children)

    # -- feeding ----------------------------------------------------------

    def _worker_room(self) -> int:
        return sum(child.free() for child in self._children)

    def _dispatch(self, batch: list[Any]) -> None:
        """Give the items, with their indexes, to the children: the least loaded get the most.

        Water-filling: children in order of room, smallest first, each taking
        an equal share of what is left or all its room, whichever is less. The
        shares are rounded down, so that what does not divide evenly (a lone
        item from an async input, say) goes to the children with the most room.
        """
        start = self._next_index
        self._next_index += len(batch)
        pairs = list(enumerate(batch, start))
        children = sorted((c for c in self._children if c.free() > 0), key=_Child.free)
        position = 0
        for number, child in enumerate(children):
            left = len(pairs) - position
            if left <= 0:
                break
            take = min(child.free(), left // (len(children) - number))
            child.outbox.extend(pairs[position : position + take])
            position += take
        assert position >= len(pairs), "assigned more items than there was room for"
        self._schedule_flush()

    def _input_ended(self) -> None:
        self._flush()
        for child in self._children:
            if child.link is not None:
                child.link.send(("end",))

    def _schedule_flush(self) -> None:
        if self._flush_handle is None and self._loop is not None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Send what the children were given in this iteration, one message each."""
        self._flush_handle = None
        for child in self._children:
            if child.grants and child.link is not None:
                child.link.send(("tokens", child.grants))
                child.grants = 0
            if not child.outbox:
                continue
            pairs, child.outbox = child.outbox, []
            try:
                payload = pickle.dumps(pairs, pickle.HIGHEST_PROTOCOL)
            except Exception:
                pairs = [pair for pair in pairs if self._picklable_item(*pair)]
                payload = pickle.dumps(pairs, pickle.HIGHEST_PROTOCOL)
            if pairs and child.link is not None:
                child.outstanding += len(pairs)
                self._sent.update(pairs)
                # The indexes travel apart from the items: a child that cannot
                # load the items can still say which they were.
                child.link.send(("items", [index for index, _ in pairs], payload))

    def _picklable_item(self, index: int, item: Any) -> bool:
        try:
            pickle.dumps(item, pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            error = TypeError(
                f"the item {reprlib.repr(item)} cannot be sent to a worker process: it "
                f"cannot be pickled ({exc})"
            )
            self._deliver_items([(index, False, error)])
            self._wake_feeder()  # its room in the child is free again
            return False
        return True

    # -- rate tokens ------------------------------------------------------

    async def _serve_tokens(self, gate: RateGate) -> None:
        """Grant start tokens to the children, first come first served, at the rate."""
        assert self._loop is not None
        requests = self._token_requests
        while True:
            while not requests:
                self._token_waiter = self._loop.create_future()
                try:
                    await self._token_waiter
                finally:
                    self._token_waiter = None
            child = requests.popleft()
            await gate.wait()
            child.grants += 1
            self._schedule_flush()

    # -- messages from the children ---------------------------------------

    def _on_message(self, child: _Child, message: Any) -> None:
        if not self._live():
            return  # over: what was still on its way is not wanted
        kind = message[0]
        if kind == "results":
            _, outcomes, child.started, child.retried = message
            child.outstanding -= len(outcomes)
            child.done += len(outcomes)
            self._deliver_items(self._received(outcomes))
            self._wake_feeder()
        elif kind == "unloadable":  # items the child could not unpickle: none of them ran
            _, indexes, packed = message
            try:
                error = pickle.loads(packed)
            except Exception as exc:
                error = undecodable(exc)
            self._unloadable(child, indexes, error)
        elif kind == "want":
            self._token_requests.extend(itertools.repeat(child, message[1]))
            waiter = self._token_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif kind == "started":  # calls began, and no results came to carry the count
            _, child.started, child.retried = message
        elif kind == "progress":
            _, child.started, child.retried, latency = message
            self._add_latency(latency)
        elif kind == "done":
            child.finished = True
            self._check_end()
        elif kind == "broken":
            cause = message[1]
            error = RuntimeError(
                f"the worker processes of processes=N cannot load fn={self._fn!r}: {cause!r}. "
                "Define fn at module level in a module they can import."
            )
            error.__cause__ = cause
            self._fail(error)
        elif kind in ("fatal", "undecodable"):  # the child's map failed, or garbled news
            self._fail(message[1])

    def _received(self, outcomes: list[tuple[int, bool, Any]]) -> list[tuple[int, bool, Any]]:
        """The outcomes a child sent, their values loaded (see pack_outcome)."""
        sent = self._sent
        loaded = []
        for index, ok, value in outcomes:
            item = sent.pop(index)
            if type(value) is bytes:  # pickled alone: see pack_outcome
                ok, value = unpack_outcome(ok, value, item)
            loaded.append((index, ok, value))
        return loaded

    def _unloadable(self, child: _Child, indexes: list[int], error: BaseException) -> None:
        """A child could not unpickle a batch of items: send them again one by one.

        One item is to blame, not all: alone, it fails (named), the others run.
        """
        if len(indexes) == 1:
            (index,) = indexes
            item = self._sent.pop(index)
            child.outstanding -= 1
            error.add_note(
                f"It was raised for item={reprlib.repr(item)}, which could not be sent to "
                "its worker process."
            )
            self._deliver_items([(index, False, error)])
            self._wake_feeder()
            return
        assert child.link is not None
        for index in indexes:
            payload = pickle.dumps([(index, self._sent[index])], pickle.HIGHEST_PROTOCOL)
            child.link.send(("again", [index], payload))

    def _on_lost(self, child: _Child, link: Link) -> None:
        if self._live():
            self._drain(child, link)
        _close_spare(child)
        if self._live() and not child.finished:
            self._spawn(self._report_crash(child))

    def _drain(self, child: _Child, link: Link) -> None:
        """Read what the child wrote and ``link`` did not, before judging the child dead.

        Its last messages ("fatal", its last results, "done"), sent just
        before it exited, as it does at once after "fatal", may be left
        unread (see :func:`drain`).
        """
        if child.spare is not None:
            drain(child.spare, link)

    async def _report_crash(self, child: _Child) -> None:
        assert child.process is not None
        exitcode = await wait_exit(child.process, 1.0)
        self._fail(
            WorkerCrashed(
                f"worker process {child.number} of processes={len(self._children)} (pid "
                f"{child.process.pid}) died ({describe_exit(exitcode)}) with "
                f"{child.outstanding} items in flight; the map was stopped, since those "
                "items cannot be told apart.",
                exitcode=exitcode,
            )
        )


class ShardedStream(RemoteStream[R]):
    """The results of ``corral.map(..., processes=N)``: same protocol as :class:`ResultStream`.

    ``async with`` it and ``async for`` over it; ``stats`` sums the children's
    counters; ``cancel()`` ends early keeping what is done; ``aclose()`` (or
    leaving ``async with``) stops every worker process.
    """


def map_sharded(
    fn: Callable[[Any], Awaitable[R]],
    items: Iterable[Any] | AsyncIterable[Any],
    *,
    processes: int,
    limit: int | None,
    rate: Rate | None,
    ordered: bool,
    timeout: float | None,
    retry: Retry | None,
    return_exceptions: bool,
) -> ShardedStream[R]:
    """``corral.map(..., processes=N)`` with its arguments already checked and normalised.

    Raises:
        TypeError: at once, when ``fn`` cannot run in another process (a lambda,
            a closure, a plain ``def``), ``limit`` is a Limiter, or ``retries``
            cannot be pickled.
    """
    check_shardable(fn, limit, retry)
    options = RemoteOptions(limit, ordered, timeout, retry, return_exceptions)
    return ShardedStream(ShardRun(fn, items, options, processes=processes, rate=rate))


def sharded_call(
    fn: Callable[[Any], Awaitable[Any]],
    *,
    processes: int,
    limit: int | None,
    rate: Rate | None,
    timeout: float | None,
    retry: Retry | None,
) -> RemoteCall:
    """The worker processes of ``processes=N`` as a call of one item (see RemoteCall).

    Raises:
        TypeError: as :func:`map_sharded`.
    """
    check_shardable(fn, limit, retry)
    submissions = Submissions()
    options = RemoteOptions(limit, False, timeout, retry, True)
    run: ShardRun[Any] = ShardRun(fn, submissions, options, processes=processes, rate=rate)
    return RemoteCall(run, submissions, _Retried())


# ---------------------------------------------------------------------------
# The child process
# ---------------------------------------------------------------------------


def _child_main(sock: socket.socket, payload: bytes) -> None:
    """A worker process: its own event loop (uvloop when installed) running a corral map."""
    ignore_sigint()
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop
    except ImportError:  # pragma: no cover - depends on the machine
        pass
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_ChildSession(payload).run(sock))


class _Escaped(Exception):
    """Carries what ``fn`` raised that is no Exception (SystemExit...) out of the child's map."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(repr(error))
        self.error = error


class _Tokens:
    """Start tokens from the parent's rate gate: ask for one per waiting attempt."""

    def __init__(self, session: _ChildSession) -> None:
        self._session = session
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._asked = 0  # asked for, not yet granted

    async def acquire(self) -> None:
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        if len(self._waiters) > self._asked:
            self._asked += 1
            self._session.ask_tokens(1)
        await future

    def grant(self, count: int) -> None:
        self._asked -= count
        waiters = self._waiters
        while count and waiters:
            waiter = waiters.popleft()
            if not waiter.done():  # a cancelled waiter passes its token on
                waiter.set_result(None)
                count -= 1
        # Tokens nobody waits for any more are dropped: a start fewer, never one too many.


class _ChildSession:
    """Everything one child does: take items, run them on a corral map, send results."""

    def __init__(self, payload: bytes) -> None:
        self._payload = payload
        self._link = Link(self._on_message, self._on_lost)
        self._inbox: deque[tuple[int, Any]] = deque()
        self._ended = False  # the parent sent "end": no more items will come
        self._owed = 0  # items of batches it could not load, that the parent sends again
        self._item_waiter: asyncio.Future[None] | None = None
        self._outbox: list[tuple[int, bool, Any]] = []
        self._flush_handle: asyncio.Handle | None = None
        self._tokens: _Tokens | None = None
        self._tokens_wanted = 0
        self._started = 0
        self._started_sent = 0  # the count of started calls the parent was last told
        self._starts_held = False  # a report of starts waits an iteration for results
        self._interval = STATS_INTERVAL
        self._retried = _Retried()
        self._histogram = LatencyHistogram()
        self._reported = [0] * len(self._histogram.counts)
        self._closed: asyncio.Future[None] | None = None
        self._main: asyncio.Task[Any] | None = None
        self._leaving = False
        self._report_handle: asyncio.TimerHandle | None = None

    async def run(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._closed = loop.create_future()
        self._main = asyncio.current_task()
        await connect(sock, self._link)
        try:
            await self._serve()
        except asyncio.CancelledError:
            if not self._link.open:
                return  # the parent is gone: nobody to report to
            raise
        finally:
            self._leaving = True
            if self._report_handle is not None:
                self._report_handle.cancel()
            self._link.close()
            await asyncio.shield(self._closed)  # the buffered results are flushed

    async def _serve(self) -> None:
        try:
            fn, limit, timeout, retry, budget, paced, self._interval = pickle.loads(self._payload)
        except Exception as exc:
            self._link.send(("broken", portable(exc)))
            return
        from ._api import map as corral_map  # here: _api imports this module

        if paced:
            self._tokens = _Tokens(self)
        loop = asyncio.get_running_loop()
        self._report_handle = loop.call_later(self._interval, self._report_progress)
        try:
            run_item = self._item_runner(fn, timeout, retry, budget)
            async with corral_map(run_item, self._items(), limit=limit, ordered=False) as out:
                async for outcome in out:
                    self._outbox.append(outcome)
                    if self._flush_handle is None:
                        self._flush_handle = loop.call_soon(self._flush)
        except Exception as exc:
            self._flush()
            error = exc.error if isinstance(exc, _Escaped) else exc
            self._link.send(("fatal", portable(error)))
            return
        finally:
            if self._report_handle is not None:
                self._report_handle.cancel()
        self._flush()
        self._send_progress()
        self._link.send(("done",))

    def _item_runner(
        self,
        fn: Callable[[Any], Awaitable[Any]],
        timeout: float | None,
        retry: Retry | None,
        budget: RetryBudget | None,
    ) -> Callable[[tuple[int, Any]], Awaitable[tuple[int, bool, Any]]]:
        """The per-item call: tokens, timeout and retries around ``fn``; never raises.

        Retries draw on this process's share of the retry budget (see
        :func:`split_retry_budget`), so the map's retries stay the budget's
        share of all its successes however many processes run it.
        """
        tokens = self._tokens
        call = worker_call(
            fn,
            timeout=timeout,
            retry=retry,
            budget=None if budget is None else RetryBudgetState(budget),
            retried=self._retried,
            pace=None if tokens is None else tokens.acquire,
        )
        histogram = self._histogram
        loop = asyncio.get_running_loop()
        clock = loop.time

        async def run_item(pair: tuple[int, Any]) -> tuple[int, bool, Any]:
            index, item = pair
            self._started += 1
            # Tell the parent soon (stats.started, in_flight): one flush per
            # loop iteration at most, whatever the number of calls it starts.
            if self._flush_handle is None:
                self._flush_handle = loop.call_soon(self._flush)
            began = clock()
            try:
                return (index, True, await call(item))
            except Exception as exc:
                return (index, False, portable(exc))
            except (asyncio.CancelledError, GeneratorExit):
                raise  # this call is being stopped, not failing
            except BaseException as exc:
                # SystemExit, KeyboardInterrupt, or another BaseException that
                # is no Exception (a library's or the program's own): never an
                # item's outcome, the parent raises it as the map's failure,
                # as one process does. Let through, it would end this
                # process's loop, and the parent would see a crash instead.
                raise _Escaped(exc) from None
            finally:
                histogram.add(clock() - began)

        return run_item

    async def _items(self) -> AsyncIterator[tuple[int, Any]]:
        inbox = self._inbox
        loop = asyncio.get_running_loop()
        while True:
            if inbox:
                yield inbox.popleft()
            elif self._ended and not self._owed:
                return
            else:
                self._item_waiter = loop.create_future()
                try:
                    await self._item_waiter
                finally:
                    self._item_waiter = None

    # -- messages ---------------------------------------------------------

    def _on_message(self, message: Any) -> None:
        kind = message[0]
        if kind in ("items", "again"):
            _, indexes, payload = message
            if kind == "again":
                self._owed -= 1
            try:
                self._inbox.extend(pickle.loads(payload))
            except Exception as exc:
                # Say which items they were: the parent sends them again one
                # by one (a batch of several), so only the culprit fails.
                if len(indexes) > 1:
                    self._owed += len(indexes)
                _, error = pack_outcome(False, portable(exc))  # loads apart, if it can
                self._link.send(("unloadable", indexes, error))
        elif kind == "end":
            self._ended = True
        elif kind == "tokens":
            assert self._tokens is not None
            self._tokens.grant(message[1])
            return
        elif kind == "undecodable":  # a message this process cannot unpickle: what it
            self._link.send(("fatal", message[1]))  # held is unknown, so the map must end
            return
        waiter = self._item_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_lost(self) -> None:
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        if not self._leaving and self._main is not None:
            self._main.cancel()  # the parent is gone: stop

    def ask_tokens(self, count: int) -> None:
        self._tokens_wanted += count
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        if self._tokens_wanted:
            self._link.send(("want", self._tokens_wanted))
            self._tokens_wanted = 0
        if not self._outbox:
            if self._started != self._started_sent:
                self._report_starts()
            return
        outcomes, self._outbox = self._outbox, []
        # Values of other types than the plainest are pickled one by one, so
        # one the parent cannot load fails its own item only (see pack_outcome).
        plain = PLAIN_TYPES
        packed = [
            outcome if type(outcome[2]) in plain else (outcome[0], *pack_outcome(*outcome[1:]))
            for outcome in outcomes
        ]
        self._started_sent = self._started
        self._starts_held = False
        self._link.send(("results", packed, self._started, self._retried.count))

    def _report_starts(self) -> None:
        """Calls started and no result carries the count: tell the parent an iteration later.

        The results of the calls an iteration starts are often handed over in
        the next one: waiting for that iteration lets them carry the count, so
        a busy child sends no more messages than results need, and one whose
        calls all wait still tells the parent within two iterations
        (``stats.started``, ``in_flight``), not at the next timed report.
        """
        if not self._starts_held:
            self._starts_held = True
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)
            return
        self._starts_held = False
        self._started_sent = self._started
        self._link.send(("started", self._started, self._retried.count))

    def _send_progress(self) -> None:
        """Counters and the latency histogram's growth since the last report."""
        counts, reported = self._histogram.counts, self._reported
        delta = {i: c - reported[i] for i, c in enumerate(counts) if c != reported[i]}
        self._reported = list(counts)
        self._started_sent = self._started
        self._link.send(("progress", self._started, self._retried.count, delta))

    def _report_progress(self) -> None:
        self._send_progress()
        loop = asyncio.get_running_loop()
        self._report_handle = loop.call_later(self._interval, self._report_progress)
