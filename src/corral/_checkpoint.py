"""Checkpoint and resume: every result recorded in SQLite, a re-run skips what is done.

A map of 200,000 paid calls runs for hours; a crash, a deploy or Ctrl-C at hour
three should not mean paying twice. With ``checkpoint="run.sqlite"`` each
result is written to a SQLite file under its item's id before the consumer
sees it, and running the same map again with the same file hands back the
recorded results without calling ``fn`` and calls it only for the rest::

    async with corral.map(ask, prompts, checkpoint="run.sqlite",
                          item_id=lambda p: p["id"]) as answers:
        async for answer in answers:      # a re-run replays what is recorded
            ...

What is recorded, and when
--------------------------
A result is *recorded* once its row is committed to the file (SQLite in WAL
mode): from then on it survives the process dying in any way (an exception,
Ctrl-C, ``kill -9``, the OOM killer). The consumer never sees a result before
it is recorded, so whatever the consumer did with a result can rely on it
being there on resume. Commits are not synced to the disk one by one
(``PRAGMA synchronous=NORMAL``): if the *machine* loses power, the last
moments' results may be gone on reboot, as may the consumer's own unsynced
writes, but the file is never corrupt and nothing is recorded twice.

With ``return_exceptions=True`` an item's final failure (after its retries) is
recorded too and replays as the same exception (see :class:`RecordedFailure`
for the exceptions that cannot be stored as themselves). Without it a failure
ends the run unrecorded, so a re-run tries that item again.

A result that is not a plain ``str``, ``int``, ``float`` or ``None`` is stored
by the serializer, and one it cannot store *as it is* stops the map at once
with a ``TypeError`` naming the item, even with ``return_exceptions=True``: a
resume must give back what the fresh run gave. With ``"pickle"``, an
exception returned as a result is loaded back to check that (one whose
``__init__`` takes other arguments than its ``args`` stores but does not
load); other results are not (that would double what storing them costs).
``"json"`` takes lists, dicts with ``str`` keys, ``str``, ``int``, ``float``
(NaN and infinities too: Python's json reads back what it writes for them),
``bool`` and ``None``, of exactly those types: a tuple, a key of another type
or an ``IntEnum`` would come back as a list, a str or an int. On resume, a
recorded result that cannot be loaded (its class moved since) stops the map
too, naming the file and the item; it never takes the item's place.

Ids, repeated ids, fingerprints
-------------------------------
Items are identified by an *id*: by default the item itself when it is a
``str``, ``int``, ``bytes`` or a tuple of those (nested tuples too);
otherwise pass ``item_id=``, a function of the item returning such a value.
Two items with the same id are the same item: ``fn`` runs once for that id
and every occurrence yields its result, in a fresh run exactly as on resume.

The file also records what produced it: a *fingerprint*, by default ``fn``'s
``module:qualname``, or any string you pass (``fingerprint="prompt-v3"``). A
resume with another fingerprint is refused, since the recorded results may
not be what the new ``fn`` would return; ``resume="ignore-fingerprint"``
reuses them anyway. The serializer is recorded as well and must match.

One map at a time, and a file that stays in place
-------------------------------------------------
Two maps recording into one file at once would each call ``fn`` for the
items the other has not recorded yet, and record them twice, so a map takes
a lock on its file while it runs (an ``flock`` on ``<path>-lock`` beside the
file itself, symlinks resolved, removed when the map closes; Windows has no
such lock) and a second one, by any name, is refused
at once with an ``OSError`` naming the file. Reading the file meanwhile
(:func:`read_checkpoint`, another ``sqlite3`` connection) is not blocked.
A write SQLite refuses (a full disk, a lock another connection holds for
more than 10 s) ends the map with an ``OSError`` naming the file; so does
a write after the file was deleted or replaced, which SQLite would
otherwise make to the deleted file without a word. No result that was not
committed is handed out in either case, and running the map again resumes.

Cost: batched writes on one thread, chunks screened at once, a gate at the consumer
-----------------------------------------------------------------------------------
The event loop never touches the disk. All database work runs on one
dedicated thread (the sqlite3 connection lives there), and rows are written
in batches: a write takes every row recorded up to ``WRITE_DELAY`` (10 ms)
after the first of them, or goes at once when ``WRITE_BATCH`` rows wait and
the thread is free; rows recorded while a write is in progress go in the next
one. Every write costs the loop thread the same handful of GIL hand-overs to
the writing thread, and on a busy machine each of those can cost a scheduler
time slice, so fewer, larger writes are what keeps the loop going: 200k
``sleep(0)`` results take about 50 writes.

New items are screened a chunk at a time. When the input is a plain
iterable (not async), the engine pulls it up to 256 items at a time
(:class:`~corral._engine._ChunkedSource`) and the checkpoint checks the whole
chunk's ids (the items themselves, or ``item_id``'s values, computed once
for the chunk) in a few C-level passes: all ``str`` or all ``int``, every
id new to the file and to this run, none repeated within the chunk. Such a
chunk's calls go to ``fn`` as they would without a checkpoint, and the
worker records each plain result with two list appends before delivering
it (under ``item_id=``, after taking the item's id from a dict the screen
filled). A ``range`` input is pulled as ranges (slices of it), so its
chunks need no pass at all: their ids are ints and cannot repeat, and
ascending slices are kept as one range. Only a chunk that fails the check
(a recorded or repeated id, an id that is not a ``str`` or an ``int``, ids
of two types in one chunk, an ``item_id`` that raised) goes through the
per-item path, with the ids the screen computed (``item_id`` runs once per
item, except in a chunk where it raised): a call wrapper, a plain function that looks
the id up and hands the engine ``fn``'s own coroutine, and a hook the engine
runs when the call returns (:class:`~corral._engine.Recorder`). Neither adds
a coroutine: a wrapping ``async def`` would add a frame to every resumption
of every call, measured at 10-20% on ``sleep(0)`` calls. Recorded items go
through a coroutine that replays them.

Neither the call nor the hook waits for the row's commit: a worker that
waited would hold its place in ``limit`` for a disk round trip, and with
every worker waiting on the same commit the loop would sit idle while the
thread writes (measured: 3-4x slower on ``sleep(0)`` calls). Instead the
*consumer* waits: :class:`CheckpointedStream` hands out a result only once
every row recorded before it reached the ready queue is committed. One wait
covers every result queued at that moment, so the consumer waits about once
per commit, not once per result, while the workers go on computing into the
engine's window. ``gather`` returns only after the map has closed, and
closing commits every row.

Per new item the loop pays, on the direct path, for the screen's passes
(none for a range; else a type check and, for a chunk that ascends from
above every id before it, a comparison per id: see :class:`_DirectIds`;
other chunks' ids go in a set) and
two list appends for a plain ``str``, ``int``, ``float`` or ``None``
result (under ``item_id=``, also its call and a dict entry from the screen
to the worker, by ``id(item)``); item by item, for the id, a dict lookup
and insert, a dict entry while the call runs and the hook's call. Any other result is pickled
on the loop thread, so that one that cannot be stored stops the map at
once, naming its item (see "What is recorded" above).

How results are stored
----------------------
In chunks of up to 256 results, one SQLite row each: see
:mod:`corral._checkpoint_file`, which holds the file's layout and every
statement the checkpoint's thread runs.

Resume
------
At open, the thread reads every chunk's ids (not the values) and builds a
dict from each id's hash to its chunk, in C-speed passes: about 0.1 µs per
recorded result, so a million cost about a tenth of a second. An item whose
hash is not there is new and is called at once, with no database read. A
hash collision costs one needless lookup, never a wrong result. The dict
also takes the hash of every item this run starts one by one (that is how a
repeated id finds the first one's result), so such a map holds about 80
bytes per item in memory: 80 MB for a million items. Items called directly
(a screened chunk) cost 8 bytes each when their chunks ascend (nothing
for a range's), and a set entry otherwise (:class:`_DirectIds`).

An item whose hash is there is replayed. Looking each one up would cost a
wait per item, so the chunks are *read ahead* in the order they were
recorded, which is about the order a re-run asks for them: the opening reads
the first chunks, a lookup brings its item's whole chunk and the chunks after
it, and the items that follow find theirs in memory and return without
waiting. The read-ahead grows while its rows are used and shrinks when the
input comes in another order (then each item is looked up, in batches: one
``SELECT`` per batch of lookups, sent as soon as it fills, reading each
chunk it needs once).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import functools
import itertools
import operator
import os
import sys
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from ._checkpoint_file import (
    CHUNK_ROWS,
    ENCODED,
    FAILED,
    PLAIN,
    Chunk,
    Codec,
    Database,
    Found,
    Key,
    Resume,
    Row,
    Serializer,
    as_key,
    item_repr,
    pairs_of,
    rows_of,
)

# Still importable from here, where they were first defined.
from ._checkpoint_file import RecordedFailure as RecordedFailure
from ._checkpoint_file import read_checkpoint as read_checkpoint
from ._engine import Call, Engine, Halt, ResultStream

R = TypeVar("R")
OnClose = Callable[[bool], Awaitable[None]]

#: Rows recorded but not yet committed at which new calls wait for the commit
#: before they start (``gather`` has no consumer to pace it).
MAX_BACKLOG = 20_000

#: A write takes the rows recorded up to WRITE_DELAY seconds after the first
#: of them, or as soon as WRITE_BATCH are waiting (see "Cost" above).
WRITE_DELAY = 0.01
WRITE_BATCH = 4096

#: How many more results the workers of a checkpointed map may run ahead of
#: the consumer (beyond the engine's ``2 * limit``): while the consumer waits
#: for a commit (a few ms, more when the loop keeps the GIL busy) the workers
#: go on, and the next commit takes all they produced meanwhile. A commit
#: next to a busy loop takes 10-30 ms (the writing thread waits for the GIL a
#: few times), in which ``sleep(0)`` calls produce ~10k results: with a lag of
#: 8192 the workers stalled on a full window (measured 1.8x the plain map's
#: time on 200k items), with 32768 far less (1.4x). It bounds the results held
#: in memory for the consumer, as ``2 * limit`` does.
CONSUMER_LAG = 32_768

#: Lookups sent to the thread as soon as this many are waiting (else at the
#: end of the loop iteration).
LOOKUP_BATCH = 256

#: Read-ahead on resume (see "Resume" above): chunks per trip, at least and
#: at most, and read with the opening; the cache size (in rows) at which
#: another trip starts, and the most rows kept.
READ_AHEAD_MIN = 1
READ_AHEAD_MAX = 32
FIRST_READ = 8
REFILL_BELOW = READ_AHEAD_MAX * CHUNK_ROWS // 2
CACHE_MAX = 4 * READ_AHEAD_MAX * CHUNK_ROWS

_MISSING: Any = object()

#: The results recorded as they are (marshal stores them exactly): PLAIN rows.
_PLAIN_TYPES: frozenset[type] = frozenset({int, str, float, type(None)})
#: The items that are their own id as they are (as_key returns them unchanged).
_SELF_KEYED: frozenset[type] = frozenset({int, str})


# ---------------------------------------------------------------------------
# Options: checked once, when the map is created.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointSpec:
    """The checked ``checkpoint=`` options of one map."""

    path: str
    fingerprint: str
    serializer: Serializer
    resume: Resume
    item_id: Callable[[Any], Any] | None


def default_fingerprint(fn: object) -> str:
    """``module:qualname`` of ``fn`` (of the function a ``functools.partial`` wraps)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    module = getattr(fn, "__module__", None) or type(fn).__module__
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}:{qualname}"


def as_checkpoint(
    checkpoint: object,
    *,
    fn: object,
    item_id: object = None,
    fingerprint: object = None,
    resume: object = "strict",
    serializer: object = "pickle",
) -> CheckpointSpec | None:
    """Check the ``checkpoint=`` keywords of a map; ``None`` when it has no checkpoint.

    Raises:
        TypeError, ValueError: for a bad value, naming the keyword and the value.
    """
    if checkpoint is None:
        # Given: not the default. None is the default of item_id= and
        # fingerprint= only: resume=None and serializer=None are values (and
        # refused with a checkpoint), not "not given".
        given = {
            name: value
            for name, value, default in (
                ("item_id", item_id, None),
                ("fingerprint", fingerprint, None),
                ("resume", resume, "strict"),
                ("serializer", serializer, "pickle"),
            )
            if value is not default and not (type(value) is str and value == default)
        }
        for name, value in given.items():
            raise ValueError(
                f"{name}= only applies to a checkpointed map; got {name}={value!r} "
                "without checkpoint=. Pass checkpoint='run.sqlite' too, or drop it."
            )
        return None
    if not isinstance(checkpoint, str | os.PathLike):
        raise TypeError(
            "checkpoint must be the path of a SQLite file (a str or os.PathLike), or None; "
            f"got checkpoint={checkpoint!r}"
        )
    path = os.fspath(checkpoint)
    if not isinstance(path, str) or not path:
        raise TypeError(
            f"checkpoint must be a non-empty str path, or None; got checkpoint={checkpoint!r}"
        )
    if path == ":memory:" or path.startswith("file:"):
        # SQLite reads these as an in-memory database or a URI, not as the path
        # of a file: nothing would be recorded at the path given.
        raise ValueError(
            f"checkpoint={checkpoint!r} is read by SQLite as an in-memory database or a URI, "
            "not as a file at that path; pass the path of a file (for a file whose name "
            "starts with 'file:', its absolute path)"
        )
    if item_id is not None and not callable(item_id):
        raise TypeError(
            "item_id must be a function of one item returning its id (a str, int, bytes or "
            f"tuple of those), or None; got item_id={item_id!r}"
        )
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise TypeError(
            "fingerprint must be a str saying what produced the results (e.g. 'prompt-v3'), "
            f"or None for fn's module:qualname; got fingerprint={fingerprint!r}"
        )
    if resume not in ("strict", "ignore-fingerprint"):
        raise ValueError(f"resume must be 'strict' or 'ignore-fingerprint'; got resume={resume!r}")
    if serializer not in ("pickle", "json"):
        raise ValueError(f"serializer must be 'pickle' or 'json'; got serializer={serializer!r}")
    return CheckpointSpec(
        path=path,
        fingerprint=fingerprint if fingerprint is not None else default_fingerprint(fn),
        serializer=serializer,
        resume=resume,
        item_id=item_id,
    )


# ---------------------------------------------------------------------------
# The checkpoint, as the event loop sees it
# ---------------------------------------------------------------------------


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _close_opened(job: concurrent.futures.Future[tuple[Database, int, list[Chunk]]]) -> None:
    """On the checkpoint's thread, after the open: close the database it opened, if any."""
    if not job.cancelled() and job.exception() is None:
        job.result()[0].close()


class _Stored:
    """A row read ahead whose value is not the result itself (ENCODED or FAILED)."""

    __slots__ = ("kind", "value")

    def __init__(self, kind: int, value: Any) -> None:
        self.kind = kind
        self.value = value


class _Phase(enum.Enum):
    NEW = "new"  # nothing opened yet (opened by the first call)
    OPENING = "opening"  # the thread is opening the file and loading the ids
    OPEN = "open"  # recording and replaying
    CLOSED = "closed"  # flushed, connection closed, thread stopped (or never opened)


class Checkpoint:
    """One map's checkpoint file: batched writes and lookups on a thread of its own.

    Opened by the first call (:meth:`open`), closed when the map closes
    (:meth:`close`). The methods are for the event loop thread only.

    Rows are numbered in the order they are recorded: :attr:`appended` rows
    were recorded, of which the first :attr:`committed` are in the file.
    """

    def __init__(self, spec: CheckpointSpec) -> None:
        self.spec = spec
        self.path = spec.path
        self.codec = Codec(spec.serializer)
        self.is_open = False
        #: hash(id) of the recorded ids -> the seq of the chunk holding each,
        #: and of every id this run started item by item -> 0 (those started
        #: by a screened chunk are with_checkpoint's ``direct_ids``). Filled by
        #: the thread at open, then the loop's (the thread only reads it, in lookups).
        self.seen: dict[int, int] = {}
        #: Plain rows recorded and not yet sent to the thread, flat: id, value,
        #: id, value... (as sqlite3 binds them: no tuple per row to build and
        #: flatten). The recorder appends to it directly, and calls
        #: :meth:`first_plain` when it is empty.
        self.rows: list[Any] = []
        #: The other rows (pickled results, failures) not yet sent, flat: id,
        #: kind, value... (no tuple per row that the garbage collector would
        #: have to visit until it is written): :meth:`record`.
        self.others: list[Any] = []
        #: Told of the rows each write takes (or loses, with the write's
        #: error): the items waiting for a directly called one are answered.
        self.on_flush: Callable[[list[Any], list[Any], BaseException | None], None] | None = None
        self.committed = 0
        self.recorded_at_open = 0  # results the file held when this map opened it
        self._sent = 0  # rows sent to the thread
        self._phase = _Phase.NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._opening: asyncio.Future[tuple[Database, int, list[Chunk]]] | None = None
        self._open_job: concurrent.futures.Future[tuple[Database, int, list[Chunk]]] | None = None
        self._db: Database | None = None
        self._writes = 0  # write jobs sent to the thread and not finished
        self._timer: asyncio.TimerHandle | None = None  # the next write, when none is in flight
        self._flushing = False  # closing: write at once, no more batching
        self._commit_waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._error: BaseException | None = None  # a write failed: nothing more is recorded
        self._error_raised = False  # ... and someone was told
        self._lookups: list[tuple[Key, asyncio.Future[Found]]] = []
        #: Rows read ahead, by id: a plain result as it is, any other as a
        #: :class:`_Stored`. The call wrapper pops its item's row from here and
        #: calls :meth:`refill` when fewer than REFILL_BELOW are left.
        self.cache: dict[Key, Any] = {}
        self._ahead = 0  # the last chunk read ahead: a refill goes on from there
        self._read_ahead = 4  # chunks per read-ahead: adapts, see _next_read_ahead
        # Since the last adaptation: rows read ahead, rows the cache held at
        # its start and rows dropped unused (a row that leaves the cache
        # otherwise was asked for: counted that way, not per item).
        self._rows_read = 0
        self._cached_before = 0
        self._dropped = 0
        self._refilling = False

    @property
    def appended(self) -> int:
        return self._sent + len(self.rows) // 2 + len(self.others) // 3

    @property
    def unsent(self) -> int:
        return len(self.rows) // 2 + len(self.others) // 3

    # -- open and close ----------------------------------------------------

    async def open(self) -> None:
        """Open the file on the checkpoint's thread (once; concurrent callers share it).

        Raises:
            ValueError: the file belongs to another map (fingerprint or
                serializer) or is not a corral checkpoint.
            OSError: the file cannot be opened.
        """
        if self._opening is None:
            loop = self._loop = asyncio.get_running_loop()
            self._phase = _Phase.OPENING
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="corral-checkpoint"
            )
            spec = self.spec
            self._open_job = self._executor.submit(
                Database.open,
                spec.path,
                spec.fingerprint,
                spec.serializer,
                spec.resume,
                self.seen,
                FIRST_READ,
            )
            self._opening = asyncio.wrap_future(self._open_job, loop=loop)
            # Mark a failed open's error retrieved even if every waiter was
            # cancelled: the error is reported to the calls, not the loop.
            self._opening.add_done_callback(_retrieve)
        # Shielded: one waiter being cancelled must not cancel the open for all.
        await asyncio.shield(self._opening)
        self._opened()

    def _opened(self) -> None:
        """Take the open's result (raising its error); idempotent.

        Not a done-callback: a call can see the open done and go on before
        such a callback has run.
        """
        if self.is_open:
            return
        assert self._opening is not None
        self._db, self.recorded_at_open, first = self._opening.result()
        self._phase = _Phase.OPEN
        self.is_open = True
        self._cache(first)

    async def close(self) -> None:
        """Commit every recorded row, close the file and stop the thread; idempotent.

        Raises:
            Exception: a write failed and nobody was told yet (``gather``).
        """
        if self._phase is _Phase.CLOSED:
            return
        if self._opening is None:
            self._phase = _Phase.CLOSED
            return
        try:
            try:
                await asyncio.shield(self._opening)
                self._opened()
            except Exception:
                return  # the calls that awaited the open reported its error
            self._flushing = True
            if self._error is None and self.committed < self.appended:
                try:
                    await self._committed(self.appended)
                except Exception:
                    pass  # raised below unless someone was told already
            if self._error is not None and not self._error_raised:
                self._error_raised = True
                raise self._error
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        self._phase = _Phase.CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.is_open = False
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            # Queued behind every write (or the open, when it is not taken yet:
            # the close was cancelled while waiting for it): runs once they are
            # all done. Shielded: a cancel while it waits its turn must not take
            # it off the queue, or the connection and the file's lock would stay open.
            if self._db is not None:
                closed = executor.submit(self._db.close)
            else:
                assert self._open_job is not None
                closed = executor.submit(_close_opened, self._open_job)
            await asyncio.shield(asyncio.wrap_future(closed))
        except BaseException:
            executor.shutdown(wait=False)  # cancelled: do not block the loop on the close
            raise
        # The thread is idle now: joining it takes one thread switch, and the
        # map leaves no thread behind.
        executor.shutdown(wait=True)

    # -- recording ---------------------------------------------------------

    def first_plain(self, key: Key, value: Any) -> None:
        """Record a plain row when :attr:`rows` is empty, and see that a write takes it.

        Raises:
            Halt: an earlier write failed; the checkpoint records nothing more.
        """
        if self._error is not None:
            self._error_raised = True
            raise Halt(self._error, started=True)  # the call ran: its result is here
        self.rows += (key, value)
        if not self.others:
            self._schedule()

    def record(self, key: Key, kind: int, value: Any) -> None:
        """Record a row of another kind than plain, and see that a write takes it.

        Raises:
            Halt: an earlier write failed; the checkpoint records nothing more.
        """
        if self._error is not None:
            self._error_raised = True
            raise Halt(self._error, started=True)  # the call ran: its result is here
        others = self.others
        others += (key, kind, value)
        if len(others) == 3 and not self.rows:
            self._schedule()
        elif len(others) >= 3 * WRITE_BATCH and not self._writes:
            self._send_write()

    def full(self) -> bool:
        """The recorder holds WRITE_BATCH plain rows: write them now if the thread is free.

        Returns whether MAX_BACKLOG rows wait (new calls should wait for a commit).
        """
        if not self._writes:
            self._send_write()
        return self.unsent >= MAX_BACKLOG

    def _schedule(self) -> None:
        """The first row since the last write: have a write take it within WRITE_DELAY."""
        if not self._writes and self._timer is None and self._loop is not None:
            self._timer = self._loop.call_later(WRITE_DELAY, self._write)

    def _write(self) -> None:
        self._timer = None
        if not self._writes:
            self._send_write()

    def _send_write(self) -> None:
        """Send the rows recorded so far to the thread as one write."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        rows, others = self.rows, self.others
        if not (rows or others) or self._error is not None:
            return
        plain, other = rows.copy(), others.copy()
        rows.clear()
        others.clear()
        if self.on_flush is not None:
            self.on_flush(plain, other, None)
        self._sent += len(plain) // 2 + len(other) // 3
        self._writes += 1
        assert self._loop is not None
        assert self._db is not None
        job = self._loop.run_in_executor(self._executor, self._db.insert, plain, other)
        job.add_done_callback(functools.partial(self._written, self._sent))

    def _written(self, through: int, job: asyncio.Future[None]) -> None:
        self._writes -= 1
        error = job.exception() if not job.cancelled() else asyncio.CancelledError()
        waiters = self._commit_waiters
        if error is not None:
            if self._error is None:
                self._error = error
            if self.on_flush is not None:  # these rows never will be written
                self.on_flush(self.rows, self.others, error)
            # The next record sees the error (first_plain) instead of piling up.
            self.rows.clear()
            self.others.clear()
            while waiters:
                waiter = waiters.popleft()[1]
                if not waiter.done():
                    waiter.set_exception(error)
            return
        self.committed = max(self.committed, through)
        while waiters and waiters[0][0] <= self.committed:
            waiter = waiters.popleft()[1]
            if not waiter.done():
                waiter.set_result(None)
        if self._writes or not (self.rows or self.others):
            return
        if self._flushing or self.unsent >= WRITE_BATCH:
            # Group commit: what was recorded during this write goes in the next.
            self._send_write()
        else:
            self._schedule()

    async def wait_committed(self, through: int) -> None:
        """Wait until the first ``through`` rows recorded are committed.

        Raises:
            Exception: a write failed (the same exception for every waiter).
        """
        try:
            await self._committed(through)
        except Exception:
            self._error_raised = True
            raise

    async def catch_up(self) -> None:
        """Wait until every row recorded so far is committed.

        A failed write is not raised here: the next record (or the close)
        raises it, as it would without this wait.
        """
        with contextlib.suppress(Exception):
            await self._committed(self.appended)

    async def _committed(self, through: int) -> None:
        if self.committed >= through:
            return
        if self._error is not None:
            raise self._error
        assert self._loop is not None
        waiter = self._loop.create_future()
        self._commit_waiters.append((through, waiter))
        if through > self._sent:
            if self._flushing and not self._writes:
                self._send_write()
            else:
                # Not at once: the rows recorded meanwhile go in the same write,
                # and fewer, larger writes cost the loop less (see "Cost").
                self._schedule()
        await waiter

    # -- lookups -----------------------------------------------------------

    def lookup(self, key: Key) -> asyncio.Future[Found]:
        """A future for ``key``'s recorded (kind, value), or None if it is not recorded."""
        assert self._loop is not None
        waiter: asyncio.Future[Found] = self._loop.create_future()
        lookups = self._lookups
        lookups.append((key, waiter))
        if self._refilling:
            pass  # answered when the rows being read ahead arrive (see _select)
        elif len(lookups) == 1:
            self._loop.call_soon(self._select)
        elif len(lookups) >= LOOKUP_BATCH:
            # Send a full batch now: the thread reads it while the loop goes
            # on handing out the previous one.
            self._select()
        return waiter

    def _select(self) -> None:
        """Answer the lookups waiting: from memory if possible, else with one SELECT."""
        if not self._lookups or self._phase is not _Phase.OPEN:
            return
        cache = self.cache
        # A repeated id may ask for a row recorded but not yet sent to the
        # thread (rows sent are written before any later SELECT runs).
        pending: dict[Key, tuple[int, Any]] = {}
        pending.update((key, (PLAIN, value)) for key, value in pairs_of(self.rows))
        pending.update((key, (kind, value)) for key, kind, value in rows_of(self.others))
        lookups = []
        for key, waiter in self._lookups:
            if waiter.done():  # its call was cancelled
                continue
            found = pending.get(key)
            if found is not None:
                waiter.set_result(found)
                continue
            stored = cache.pop(key, _MISSING)  # read ahead since the call looked
            if stored is not _MISSING:
                waiter.set_result(
                    (stored.kind, stored.value) if type(stored) is _Stored else (PLAIN, stored)
                )
                continue
            lookups.append((key, waiter))
        if self._refilling:
            # Rows are being read ahead, likely the very ones asked for: wait
            # for them (see _refilled) rather than send a SELECT per straggler.
            self._lookups = lookups
            return
        self._lookups = []
        if not lookups:
            return
        assert self._loop is not None
        assert self._db is not None
        ahead = self._next_read_ahead()
        self._refilling = True
        job = self._loop.run_in_executor(
            self._executor, self._db.select, [key for key, _ in lookups], ahead
        )
        job.add_done_callback(functools.partial(self._selected, lookups))

    def _selected(
        self,
        lookups: list[tuple[Key, asyncio.Future[Found]]],
        job: asyncio.Future[tuple[list[Row], list[Chunk]]],
    ) -> None:
        self._refilling = False
        error = job.exception() if not job.cancelled() else asyncio.CancelledError()
        if error is not None:
            for _, waiter in lookups:
                if not waiter.done():
                    waiter.set_exception(error)
        else:
            rows, chunks = job.result()
            self._cache(chunks)
            cache = self.cache
            found = {}
            for key, kind, value in rows:
                found[key] = (kind, value)
                cache.pop(key, None)  # handed out now, not again from the cache
            for key, waiter in lookups:
                if not waiter.done():
                    waiter.set_result(found.get(key))
        self._select()  # the lookups that waited for this one's read-ahead

    def _next_read_ahead(self) -> int:
        """How many rows to read ahead next: more while they are used, fewer when not.

        Items that come in the order they were recorded in use every row read
        ahead; items in another order (a shuffled input) use few, and reading
        many would only cost the thread time and the cache memory.
        """
        read = self._rows_read
        used = self._cached_before + read - len(self.cache) - self._dropped
        if read:
            if used * 2 >= read:
                self._read_ahead = min(READ_AHEAD_MAX, 2 * self._read_ahead)
            elif used * 8 < read:
                self._read_ahead = max(READ_AHEAD_MIN, self._read_ahead // 2)
        self._rows_read = self._dropped = 0
        self._cached_before = len(self.cache)
        return self._read_ahead

    def refill(self) -> None:
        """Read more rows ahead into :attr:`cache`, unless a read is under way."""
        if self._refilling or self._phase is not _Phase.OPEN:
            return
        self._refilling = True
        assert self._loop is not None
        assert self._db is not None
        job = self._loop.run_in_executor(
            self._executor, self._db.read_ahead, self._ahead, self._next_read_ahead()
        )
        job.add_done_callback(self._refilled)

    def _refilled(self, job: asyncio.Future[list[Chunk]]) -> None:
        self._refilling = False
        # A failed read ahead costs nothing but the lookups it would have saved.
        if not job.cancelled() and job.exception() is None:
            self._cache(job.result())
        self._select()  # the lookups that waited for it

    def _cache(self, chunks: list[Chunk]) -> None:
        if not chunks:
            return
        cache = self.cache
        rows = sum(len(chunk[1]) for chunk in chunks)
        if len(cache) + rows > CACHE_MAX:
            self._dropped += len(cache)
            cache.clear()  # rows nobody asks for: the items come in another order
        self._rows_read += rows
        for _, keys, kinds, values in chunks:
            if kinds is None:
                cache.update(zip(keys, values, strict=True))
            else:
                cache.update(
                    zip(
                        keys,
                        [
                            value if kind == PLAIN else _Stored(kind, value)
                            for kind, value in zip(kinds, values, strict=True)
                        ],
                        strict=True,
                    )
                )
        self._ahead = chunks[-1][0]


# ---------------------------------------------------------------------------
# The call wrapper and the recorder
# ---------------------------------------------------------------------------

#: What items waiting on another item with their id get: (kind, result or
#: exception), with kind PLAIN, ENCODED, FAILED, _HALTED (the Halt's reason)
#: or _STORED (a :class:`_Stored` row, not loaded yet).
_Outcome = tuple[int, Any]
_HALTED = -1
_STORED = -2


class _Ascending:
    """Ids of chunks that were each strictly ascending and above every id before.

    The chunks are kept as they are and searched by bisection: no hash table
    entry per id (see :class:`_DirectIds`).
    """

    __slots__ = ("chunks", "firsts", "high")

    def __init__(self) -> None:
        self.chunks: list[Sequence[Any]] = []  # lists, or ranges sliced from a range
        self.firsts: list[Any] = []
        self.high: Any = None  # the last id taken, the highest

    def extend(self, chunk: Sequence[Any]) -> bool:
        """Take ``chunk`` if it ascends strictly from above every id before; else False."""
        high = self.high
        if high is not None and not chunk[0] > high:
            return False
        if type(chunk) is range:
            if chunk.step < 0 and len(chunk) > 1:
                return False
            chunks = self.chunks
            if (
                chunks
                and type(last := chunks[-1]) is range
                and last.step == chunk.step > 0
                and chunk[0] == last[-1] + last.step
            ):
                # The next slice of the same range: one range holds both.
                chunks[-1] = range(last.start, chunk[-1] + last.step, last.step)
                self.high = chunk[-1]
                return True
        # All in C: stops at the first pair out of order.
        elif not all(map(operator.lt, chunk, itertools.islice(chunk, 1, None))):
            return False
        self.chunks.append(chunk)
        self.firsts.append(chunk[0])
        self.high = chunk[-1]
        return True

    def overlaps(self, low: Any, high: Any) -> bool:
        """Whether an id taken could be between ``low`` and ``high`` (inclusive)."""
        return self.high is not None and low <= self.high and high >= self.firsts[0]

    def __contains__(self, key: Any) -> bool:
        if not self.overlaps(key, key):
            return False
        chunk = self.chunks[bisect_right(self.firsts, key) - 1]
        if type(chunk) is range:
            return key in chunk
        at = bisect_left(chunk, key)
        return at < len(chunk) and chunk[at] == key


class _DirectIds:
    """The ids of the items this run called directly: a repeat must find them.

    Every id of a screened chunk goes here (see with_checkpoint's ``screen``).
    A set of every id would do, but a set of 200k ids outgrows the CPU's
    caches, and measured on ``sleep(0)`` calls its inserts and checks cost
    the loop about 0.3 µs per item. Most inputs of new ids ascend (row
    numbers, ``range``, sorted keys), so a chunk that ascends strictly from
    above every id before is kept as it is (:class:`_Ascending`, one per
    type: an int and a str do not compare), at the cost of one pass of
    comparisons; a range input's chunks are ranges, which need no pass, and
    the slices of one range are kept as one. Any other chunk goes in the
    set; if its range meets the ascending ids', each of its ids is first
    looked for among them.
    """

    __slots__ = ("_ascending", "_set", "any")

    def __init__(self) -> None:
        self._set: set[Key] = set()
        self._ascending: dict[type, _Ascending] = {int: _Ascending(), str: _Ascending()}
        self.any = False  # whether any id was taken

    def take(self, chunk: Sequence[Key], kind: type) -> bool:
        """Take the ids of ``chunk`` (each of type ``kind``, int or str) if none was
        taken before and none repeats within it; else take nothing and return False."""
        taken = self._set
        if taken and not taken.isdisjoint(chunk):
            return False
        ascending = self._ascending[kind]
        if not ascending.extend(chunk):
            # (min and max are two passes of comparisons: only when there is
            # something to compare them with.)
            if (
                ascending.high is not None
                and ascending.overlaps(min(chunk), max(chunk))
                and any(map(ascending.__contains__, chunk))
            ):
                return False
            before = len(taken)
            taken.update(chunk)
            if len(taken) - before < len(chunk):
                # An id repeats within the chunk: none of its ids was there before.
                taken.difference_update(chunk)
                return False
        self.any = True
        return True

    def __contains__(self, key: Key) -> bool:
        if key in self._set:
            return True
        ascending = self._ascending.get(type(key))
        return ascending is not None and key in ascending


@dataclass(frozen=True)
class Hooks:
    """A checkpointed map's :class:`~corral._engine.Recorder`: plain functions, no self."""

    result: Callable[[Any, Any], None]
    failure: Callable[[Any, Exception, bool], None]
    halted: Callable[[Any, Halt, bool], None]
    # The direct path for chunks of new items (see with_checkpoint).
    screen: Callable[[Sequence[Any]], bool] | None
    prepare: Callable[[], Awaitable[None]]
    backlogged: Callable[[], bool]
    direct: Call
    rows: list[Any]
    plain: frozenset[type]
    first: Callable[[Any, Any], None]
    other: Callable[[Any, Any, Any], None]
    keyed: Callable[[int], Any] | None


def with_checkpoint(
    call: Call,
    checkpoint: Checkpoint,
    *,
    item_id: Callable[[Any], Any] | None,
) -> tuple[Call, Hooks]:
    """Wrap ``call`` so that recorded items replay; the hooks record new outcomes.

    Returns the call for the engine, and the :class:`Hooks` the engine runs
    with each outcome before delivering it (see "Cost" above: the wrapper is
    a plain function that hands a new item's call straight to the engine, and
    recording happens in the hook, so a new item costs no extra coroutine).

    Meant as the outermost wrapper: a recorded item takes no limiter slot,
    rate token, retry or timeout. Errors of the checkpoint itself (the file,
    an item with no id, an ``item_id`` that raises or returns no id, a result
    that cannot be stored, a recorded one that cannot be loaded) stop the map
    through :class:`~corral._engine.Halt`, even with ``return_exceptions=True``:
    they are no item's failure. Failures are recorded only when the engine delivers
    them (``return_exceptions=True``): only then does it call ``failure``.
    """
    cp = checkpoint
    codec = cp.codec
    dumps = codec.dumps
    rows = cp.rows
    append = rows.append
    seen = cp.seen
    cache = cp.cache
    first_plain = cp.first_plain
    record = cp.record
    # The ids the engine called directly (screened chunks), every one this run.
    direct_ids = _DirectIds()
    # The ids being computed now by the items the wrapper sent to `call`.
    inflight: dict[Key, None] = {}
    forget = inflight.pop
    # Later items with an id being computed now: they wait for its outcome.
    joiners: dict[Key, list[asyncio.Future[_Outcome]]] = {}
    # With item_id=, the id of each item being computed, by id(item): the
    # hooks find it there instead of calling item_id a second time. A
    # screened chunk's ids go here too, and the engine takes each (keyed).
    keys: dict[int, Key] = {}
    # With item_id=, the ids the screen computed for a chunk it refused, by
    # id(item): the wrapper takes them instead of calling item_id again.
    prepared: dict[int, Any] = {}
    # Ids computed after a hash collision (the replay path found no row), and
    # their outcome once known: another item with the id whose lookup ran
    # while this one computed finds it here (the row may not be written yet).
    collided: dict[Key, _Outcome | None] = {}
    opened = False
    backlog = False  # MAX_BACKLOG rows wait for the thread: new items wait for a commit
    full_at = 2 * WRITE_BATCH  # len(rows) at which to ask for a write now (cp.full)

    def item_id_raised(item: object, exc: Exception) -> TypeError:
        error = TypeError(
            "item_id must return a str, int, bytes or a tuple of those; it raised "
            f"{item_repr(exc)} for item {item_repr(item)}"
        )
        error.__cause__ = exc
        return error

    def decoded(item: Any, kind: int, value: Any) -> _Outcome:
        """A recorded row's outcome; one that cannot be loaded stops the map, naming ``item``."""
        try:
            return codec.decode(kind, value)
        except Exception as exc:
            raise Halt(codec.unreadable(cp.path, item, exc)) from None

    def key_or_halt(ident: object, item: object) -> Key:
        key = as_key(ident)
        if key is not None:
            return key
        if item_id is None:
            raise Halt(
                TypeError(
                    f"checkpoint= records each result under its item's id, and item "
                    f"{item_repr(item)} has none: the item itself is its id only when it is "
                    "a str, int, bytes or a tuple of those. Pass item_id=, a function of the "
                    "item returning one, e.g. item_id=lambda row: row['url']"
                )
            )
        raise Halt(
            TypeError(
                "item_id must return a str, int, bytes or a tuple of those; it returned "
                f"{item_repr(ident)} for item {item_repr(item)}"
            )
        )

    def checkpointed(item: Any) -> Awaitable[Any]:
        if not opened:
            return opening(item)
        if item_id is None:
            ident = item
        else:
            ident = prepared.pop(id(item), _MISSING) if prepared else _MISSING
            if ident is _MISSING:
                try:
                    ident = item_id(item)
                except Exception as exc:
                    # The item has no id: no failure of its own (nor fn's) to deliver.
                    raise Halt(item_id_raised(item, exc)) from None
        kind = type(ident)
        if kind is int or kind is str:
            key: Key = ident
        else:
            key = key_or_halt(ident, item)
        hashed = hash(key)
        if hashed in seen or (direct_ids.any and key in direct_ids):
            # Recorded (or started earlier in this run): replay it.
            return replay(key, item)
        seen[hashed] = 0
        if backlog:
            return backlogged(key, item)
        inflight[key] = None
        if item_id is not None:
            keys[id(item)] = key
        return call(item)

    async def opening(item: Any) -> Any:
        nonlocal opened
        try:
            await cp.open()
        except Exception as exc:
            raise Halt(exc) from None
        opened = True
        return await checkpointed(item)

    async def prepare() -> None:
        """Before a run of screened chunks: open the file, catch up with a backlog."""
        nonlocal opened
        if not opened:
            try:
                await cp.open()
            except Exception:
                return  # the wrapper's calls report it (the chunk is refused)
            opened = True
        if cp.unsent >= MAX_BACKLOG:
            # gather has no consumer to pace it: wait for the thread to catch up.
            await cp.catch_up()

    def behind() -> bool:
        """Whether the thread is MAX_BACKLOG rows behind (see prepare)."""
        return backlog or cp.unsent >= MAX_BACKLOG

    def screen(chunk: Sequence[Any]) -> bool:
        """Whether the engine may call every item of ``chunk`` directly: all new ids.

        The checks the wrapper makes item by item, made for the chunk in a
        few C-level passes: the ids (the items themselves, or what
        ``item_id`` returns for them, called once per item here) are all of
        one type (a str or an int), none recorded or started before, none
        repeated within the chunk. A passed chunk's ids join ``direct_ids``
        at once (and, under ``item_id=``, ``keys``, where the engine takes
        each item's); the engine calls ``call`` for its items and records
        their results in the worker (see Hooks). Any other chunk (or every
        chunk before the file is open) goes through the wrapper, item by
        item, which also reports what stops the map (the file failing to
        open, a failed write, an id that is not one) the usual way.
        """
        if not opened or backlog:
            return False
        ids: Sequence[Any]
        if item_id is None:
            ids = chunk
            kinds = {int} if type(chunk) is range else set(map(type, chunk))
        else:
            try:
                ids = list(map(item_id, chunk))
            except Exception:
                return False  # the wrapper calls it again, and reports the error
            kinds = set(map(type, ids))
        if (
            len(kinds) != 1
            or not _SELF_KEYED.issuperset(kinds)
            # Recorded in the file, or started by the wrapper: `seen` has its
            # hash (empty in a new file until then, so a new run does not hash).
            or (seen and not seen.keys().isdisjoint(map(hash, ids)))
            or not direct_ids.take(ids, kinds.pop())
        ):
            if item_id is not None:
                prepared.update(zip(map(id, chunk), ids, strict=True))
            return False
        if item_id is not None:
            keys.update(zip(map(id, chunk), ids, strict=True))
        if len(rows) >= 2 * WRITE_BATCH:
            cp.full()
        return True

    def first(key: Key, value: Any) -> None:
        """A directly called item's plain result when ``rows`` is empty."""
        try:
            first_plain(key, value)
        except Halt as halt:  # a write failed: the items waiting for this one learn it
            settle(key, (_HALTED, halt.reason))
            raise

    def other(key: Key, item: Any, value: Any) -> None:
        """A directly called item's result that is not plain: encoded now, on the loop."""
        try:
            try:
                encoded = dumps(value)
                if isinstance(value, BaseException):
                    codec.loads_back(encoded)
            except Exception as exc:
                raise Halt(codec.unrecordable(cp.path, item, exc), started=True) from None
            record(key, ENCODED, encoded)
        except Halt as halt:  # the items waiting for this one learn it
            settle(key, (_HALTED, halt.reason))
            raise

    def flushed(plain: list[Any], others: list[Any], error: BaseException | None) -> None:
        """Answer the items waiting for a directly called one whose row goes to the thread."""
        if not joiners:
            return
        for key, value in pairs_of(plain):
            if key in joiners:
                settle(key, (_HALTED, error) if error is not None else (PLAIN, value))
        for key, kind, stored in rows_of(others):
            if key in joiners:
                if error is not None:
                    settle(key, (_HALTED, error))
                else:  # loaded by each waiter (replay), which names its item if it cannot
                    settle(key, (_STORED, _Stored(kind, stored)))

    async def backlogged(key: Key, item: Any) -> Any:
        # gather has no consumer to pace it: wait for the thread to catch up.
        nonlocal backlog
        inflight[key] = None  # from now on, an item with this id joins this one
        if item_id is not None:
            keys[id(item)] = key
        try:
            await cp.wait_committed(cp.appended)
        except Exception as exc:
            raise Halt(exc) from None
        backlog = False
        return await call(item)

    async def join(key: Key) -> _Outcome:
        """The outcome of the item with this id that is being computed now."""
        return await waiting(key)

    def waiting(key: Key) -> asyncio.Future[_Outcome]:
        """A future for the outcome of the item with this id (see settle)."""
        waiter: asyncio.Future[_Outcome] = asyncio.get_running_loop().create_future()
        waiters = joiners.get(key)
        if waiters is None:
            joiners[key] = [waiter]
        else:
            waiters.append(waiter)
        return waiter

    def unwait(key: Key, waiter: asyncio.Future[_Outcome]) -> None:
        """Forget a waiter answered otherwise (a non-empty ``joiners`` costs every write a scan)."""
        waiters = joiners.get(key)
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                del joiners[key]

    async def replay(key: Key, item: Any) -> Any:
        outcome: _Outcome | None
        ahead = cache.pop(key, _MISSING)
        if ahead is not _MISSING:  # read ahead: no wait at all
            if len(cache) < REFILL_BELOW:
                cp.refill()
            if type(ahead) is not _Stored:
                return ahead
            outcome = decoded(item, ahead.kind, ahead.value)
        elif key in inflight:
            outcome = await join(key)
        else:
            # An id the engine called directly is in flight, or its row is
            # waiting to be sent, or sent: the lookup finds the last two (a
            # SELECT runs after the writes sent before it), and the first
            # answers the waiter when its row is sent (flushed). Waiting
            # before the lookup starts, it misses none of the three.
            waiter = waiting(key) if direct_ids.any and key in direct_ids else None
            try:
                found = await cp.lookup(key)
            except Exception as exc:
                raise Halt(exc) from None
            if found is not None:
                if waiter is not None:
                    unwait(key, waiter)
                outcome = decoded(item, *found)
            elif waiter is not None:
                outcome = await waiter
            elif key in inflight:  # started while this lookup ran
                outcome = await join(key)
            else:
                outcome = collided.get(key)  # or even finished
        if outcome is not None:
            if outcome[0] == _STORED:
                outcome = decoded(item, outcome[1].kind, outcome[1].value)
            kind = outcome[0]
            if kind == FAILED:
                raise outcome[1]
            if kind == _HALTED:
                raise Halt(outcome[1])
            return outcome[1]
        # Not recorded after all: a hash collision. Compute it.
        collided[key] = None
        inflight[key] = None
        if item_id is not None:
            keys[id(item)] = key
        return await call(item)

    def computed(item: Any, direct: bool) -> Key | None:
        """The id of ``item`` if it was called (by the wrapper, or directly by the
        engine), forgotten from ``inflight``; None if it was replayed.

        ``result`` repeats this inline: it runs for every item.
        """
        if direct:
            if item_id is None:
                return cast(Key, item)  # a screened chunk's item is its own id
            # Its id, unless the engine took it already: then the item's result
            # was being recorded, and `first` or `other` settled its waiters.
            return keys.pop(id(item), None)
        if item_id is None:
            kind = type(item)
            if kind is int or kind is str:
                key: Key | None = item
            else:
                key = as_key(item)
        else:
            key = keys.pop(id(item), None)
        if key is None:
            return None  # no id: nothing to record
        if inflight.pop(key, _MISSING) is _MISSING:
            return None  # replayed: recorded already
        return key

    def settle(key: Key, outcome: _Outcome) -> None:
        for waiter in joiners.pop(key, ()):
            if not waiter.done():
                waiter.set_result(outcome)

    def result(item: Any, value: Any) -> None:
        nonlocal backlog, full_at
        if not inflight:
            return  # nothing is being computed: a replayed item (all of a full resume)
        # computed(item), inline.
        key: Key | None
        if item_id is None:
            kind = type(item)
            key = item if kind is int or kind is str else as_key(item)
        else:
            key = keys.pop(id(item), None)
        if key is None or forget(key, _MISSING) is _MISSING:
            return  # replayed: recorded already
        kind = type(value)
        try:
            if kind is int or kind is str or kind is float or value is None:
                if rows:
                    append(key)
                    append(value)
                    if len(rows) >= full_at:  # flat: two entries a row
                        backlog = cp.full()
                        full_at = len(rows) + 2 * WRITE_BATCH
                else:
                    full_at = 2 * WRITE_BATCH
                    first_plain(key, value)
            else:
                try:
                    encoded = dumps(value)
                    if isinstance(value, BaseException):  # rare: its pickle may not load
                        codec.loads_back(encoded)
                except Exception as exc:
                    raise Halt(codec.unrecordable(cp.path, item, exc), started=True) from None
                record(key, ENCODED, encoded)
                if cp.unsent >= MAX_BACKLOG:
                    backlog = True
        except Halt as halt:  # not recordable, or a write failed: nothing more is recorded
            settle(key, (_HALTED, halt.reason))
            raise
        if joiners:
            settle(key, (PLAIN, value))
        if collided and key in collided:
            collided[key] = (PLAIN, value)

    def failure(item: Any, exc: Exception, direct: bool) -> None:
        key = computed(item, direct)
        if key is None:
            return
        try:
            record(key, FAILED, codec.dump_failure(exc))
        except Halt:
            pass  # a write failed: the consumer (or gather's close) is told that
        settle(key, (FAILED, exc))
        if key in collided:
            collided[key] = (FAILED, exc)

    def halted(item: Any, halt: Halt, direct: bool) -> None:
        key = computed(item, direct)
        if key is not None:
            # The item did not run (a budget, the file failing): neither do
            # the items waiting for it.
            settle(key, (_HALTED, halt.reason))

    cp.on_flush = flushed
    return checkpointed, Hooks(
        result,
        failure,
        halted,
        screen=screen,
        prepare=prepare,
        backlogged=behind,
        direct=call,
        rows=rows,
        plain=_PLAIN_TYPES,
        first=first,
        other=other,
        keyed=None if item_id is None else keys.pop,
    )


@contextlib.contextmanager
def resume_hint(checkpoint: Checkpoint | None) -> Iterator[None]:
    """Around ``corral.run``: on Ctrl-C, say on stderr how to resume, then re-raise.

    The interrupt itself ends the map like ``results.cancel()``: asyncio's
    runner cancels the map, which closes as on any cancellation (the calls in
    flight are cancelled, every result recorded so far is committed, the file
    is closed), and only then does ``KeyboardInterrupt`` reach this.
    """
    try:
        yield
    except KeyboardInterrupt:
        if checkpoint is None:
            raise
        recorded = checkpoint.recorded_at_open + checkpoint.committed
        print(
            f"corral: interrupted. {recorded:,} results are recorded in checkpoint="
            f"{checkpoint.path!r}; run the same call again to resume: the recorded items "
            "are returned without calling fn again.",
            file=sys.stderr,
        )
        # The CancelledError asyncio turned Ctrl-C into says nothing more.
        raise KeyboardInterrupt from None


# ---------------------------------------------------------------------------
# Handing out results only once recorded
# ---------------------------------------------------------------------------


class CheckpointedStream(ResultStream[R]):
    """The results of a checkpointed :func:`corral.map`: handed out once committed.

    Every result reaches the engine's ready queue after its row was recorded
    (the call wrapper records, then returns). So when the consumer takes a
    result, the rows recorded so far cover it and everything queued behind
    it: one wait for their commit lets all of those through.
    """

    def __init__(self, engine: Engine[Any, R], checkpoint: Checkpoint) -> None:
        super().__init__(engine)
        self._checkpoint = checkpoint
        self._committed_ready = 0  # results at the head of the queue known to be committed

    async def __anext__(self) -> R:
        if self._committed_ready and self._ready:
            self._committed_ready -= 1
            return self._engine.take()  # type: ignore[no-any-return]
        value = await super().__anext__()
        checkpoint = self._checkpoint
        queued = len(self._engine.ready)
        if checkpoint.committed < checkpoint.appended:
            await checkpoint.wait_committed(checkpoint.appended)
        self._committed_ready = queued
        return value


def closing(on_close: OnClose | None, checkpoint: Checkpoint) -> OnClose:
    """``on_close`` (if any), then the checkpoint's close: one close hook for the engine."""

    async def close(clean: bool) -> None:
        try:
            if on_close is not None:
                await on_close(clean)
        finally:
            await checkpoint.close()

    return close
