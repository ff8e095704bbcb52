"""The checkpoint file: its layout, its ids and encodings, and the SQLite work.

How results are stored
----------------------
Rows are stored in *chunks*: one SQLite row holds up to ``CHUNK_ROWS`` (256)
results as two ``marshal``-ed lists, their ids and their values (plus a byte
per row giving its kind when any is not plain: pickled or JSON results and
failures are stored as their bytes or text). A write is one multi-row
``INSERT`` of such chunks, so SQLite sees a few rows per write instead of
thousands: measured, storing 200k results costs its thread 0.07 µs per
result, against 0.7-1.4 µs as one indexed row each, and the loop thread,
which shares the GIL with it, feels the difference.

It is one statement because Python's sqlite3 module releases the GIL inside
each ``sqlite3_step`` and takes it back afterwards: while the event loop
thread keeps the GIL busy, taking it back can take a full switch interval
(5 ms), so a write steps once (in autocommit mode that step is also the
transaction; a write of more than 64 chunks is one transaction of a few).

``marshal`` (format 2, read by every Python since 2.5) stores the ids and the
plain values exactly as they are, at C speed; it does not run code when it
reads, but, like the pickled results themselves, the file is to be trusted
as much as the program that wrote it. A chunk that cannot be read stops the
map with an error naming the file and the chunk. :func:`read_checkpoint`
lists a file's rows.

Every method of :class:`Database` runs on the checkpoint's own thread; the
event loop's side (batching, lookups, the call wrapper and the recorder) is
:mod:`corral._checkpoint`.
"""

from __future__ import annotations

import contextlib
import itertools
import marshal
import os
import pickle
import reprlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import sqlite3

# sqlite3 and json are imported when a checkpoint is used: `import corral`
# does not pay for them (about 5 ms) in programs that never checkpoint.

Key = int | str | bytes
Serializer = Literal["pickle", "json"]
Resume = Literal["strict", "ignore-fingerprint"]
#: One recorded item: (id, kind, value); kind is one of the three below.
Row = tuple[Key, int, Any]
#: A stored chunk as read back: (seq, ids, kinds, values); kinds is None when
#: every row is PLAIN, else one byte a row. Seqs grow in recording order.
Chunk = tuple[int, list[Key], bytes | None, list[Any]]
#: What a lookup finds: (kind, value), or None when the id is not recorded.
Found = tuple[int, Any] | None
#: A map's lock on its file (see _lock): the lock file's descriptor and absolute path.
Lock = tuple[int, str]

PLAIN = 0  # value is the result itself: an int, str, float or None
ENCODED = 1  # value is the pickled (or JSON) result
FAILED = 2  # value is the pickled (or JSON) final failure

#: The file layout; a file written by another layout is refused, not misread.
FORMAT = 2

#: Rows per stored chunk (one SQLite row): large enough that SQLite's own cost
#: per result is tiny, small enough that looking up one id out of order
#: decodes little (see "How results are stored" above).
CHUNK_ROWS = 256
#: ... and at most this many bytes of values (unless one result is larger):
#: SQLite refuses a value over 1 GB, and a lookup decodes a whole chunk.
CHUNK_BYTES = 4 << 20
#: In the id index, a hash that several recorded chunks have (see Database).
SHARED_HASH = -1
#: marshal's format 2: every Python since 2.5 reads it, so a file outlives an
#: upgrade. Later formats also write back-references, which cost a hash-table
#: entry per object that is referenced elsewhere (an id that is also the
#: result, or is held by the input): 3x the time of format 2 for such ints.
MARSHAL_VERSION = 2
#: The name of the lock file beside the checkpoint while a map uses it: see _lock.
LOCK_SUFFIX = "-lock"
#: How long a statement waits for another connection's lock before failing.
BUSY_TIMEOUT_MS = 10_000
#: SQLite's primary error codes that say the file or the disk cannot be used
#: now (locked, busy, unwritable, full, failing), not that it is no checkpoint.
_DISK_ERRORS = frozenset({"BUSY", "LOCKED", "IOERR", "CANTOPEN", "READONLY", "FULL", "PERM"})


_describe = reprlib.Repr()
_describe.maxstring = 60
_describe.maxother = 60
_describe.maxlevel = 3


def item_repr(item: object) -> str:
    """``repr(item)`` cut short (about 60 characters a part) for an error message."""
    return _describe.repr(item)


# ---------------------------------------------------------------------------
# Ids: the item (or item_id's value) as a key SQLite stores and compares.
# ---------------------------------------------------------------------------


def _canonical(ident: object) -> str | None:
    """The id as text that differs for any two ids Python considers different."""
    if isinstance(ident, str):
        return str.__repr__(ident)
    if isinstance(ident, int):  # bool and IntEnum too: they equal their int
        return int.__repr__(ident)
    if isinstance(ident, bytes):
        return bytes.__repr__(ident)
    if isinstance(ident, tuple):
        parts = []
        for part in ident:
            text = _canonical(part)
            if text is None:
                return None
            parts.append(text)
        return f"({parts[0]},)" if len(parts) == 1 else f"({', '.join(parts)})"
    return None


def as_key(ident: object) -> Key | None:
    """The stored key for an id, or ``None`` if ``ident`` is not a valid id.

    A ``str`` or an ``int`` is its own key (a subclass, such as ``bool``,
    an ``IntEnum`` or a ``str`` Enum, becomes the plain value it equals:
    ``Color.RED`` is the id ``"red"``, as in a tuple); anything else valid
    (bytes, tuples) is the bytes of its canonical text. A str never equals
    an int or bytes, so ``1``, ``"1"``, ``b"1"`` and ``(1,)`` are four
    different ids.
    """
    # str.__str__ and int.__int__, not str() and int(): a subclass's own
    # __str__ or __int__ (an Enum's "Color.RED") is not the value it equals.
    if isinstance(ident, str):
        return str.__str__(ident)
    if isinstance(ident, int):
        return int.__int__(ident)
    text = _canonical(ident)
    return None if text is None else text.encode()


# ---------------------------------------------------------------------------
# Storing results and failures
# ---------------------------------------------------------------------------


class RecordedFailure(Exception):
    """A recorded failure that could not be stored as the exception itself.

    With ``serializer="json"`` every recorded failure replays as one of these;
    with ``"pickle"``, a failure whose exception does not survive pickling
    (it holds a lock, or its ``__init__`` takes other arguments than its
    ``args``). ``str()`` gives ``"ValueError: the message"``.

    Attributes:
        type_name: the original exception's type, ``module.QualName``
            (just ``QualName`` for built-in exceptions).
        message: ``str()`` of the original exception.
    """

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(type_name, message)
        self.type_name = type_name
        self.message = message

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}" if self.message else self.type_name


def _type_name(exc: BaseException) -> str:
    kind = type(exc)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def _why(path: str | os.PathLike[str], exc: BaseException) -> str:
    """Why SQLite could not open ``path``: its own words ("unable to open database
    file") do not say, when the path names a directory or no directory holds it."""
    if os.path.isdir(path):
        return f"it is a directory ({exc})"
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        missing = "is not a directory" if os.path.exists(directory) else "does not exist"
        return f"its directory {directory!r} {missing} ({exc})"
    if not os.path.exists(path):
        return f"it does not exist ({exc})"
    return str(exc)


def _message(exc: BaseException) -> str:
    """``str(exc)``, or what tracebacks print when that raises (a failure is still recorded)."""
    try:
        return str(exc)
    except Exception:
        return "<exception str() failed>"


class _Unloadable(Exception):
    """An exception returned as a result that pickle stores but cannot load back."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


_JSON_LEAVES: frozenset[type] = frozenset({str, int, float, bool, type(None)})
_STR: frozenset[type] = frozenset({str})
#: What json.loads gives back for a subclass of each type json.dumps takes.
_JSON_BASES: dict[type, str] = {
    dict: "a dict",
    list: "a list",
    str: "a str",
    int: "an int",
    float: "a float",
}


def _check_json(value: Any) -> None:
    """Raise TypeError if JSON would give back something other than ``value``.

    For a value ``json.dumps`` took, which it does for more than it gives
    back: it writes a tuple as a list, a dict key that is not a str as a
    str, and a subclass of a JSON type (an ``IntEnum``, a ``str`` Enum, an
    ``OrderedDict``, numpy's ``float64``) as that type. Only lists, dicts
    with str keys, str, int, float, bool and None, of exactly those types,
    come back equal and of the same type. NaN and infinities come back as
    themselves (written ``NaN`` and ``Infinity``, which Python's json reads).
    """
    kind = type(value)
    if kind is list:
        if not _JSON_LEAVES.issuperset(map(type, value)):  # else one pass in C
            for each in value:
                _check_json(each)
    elif kind is dict:
        if not _STR.issuperset(map(type, value)):
            key = next(key for key in value if type(key) is not str)
            raise TypeError(
                f"dict key {item_repr(key)} of type {type(key).__name__} would come back as a str"
            )
        if not _JSON_LEAVES.issuperset(map(type, value.values())):
            for each in value.values():
                _check_json(each)
    elif kind not in _JSON_LEAVES:
        # json.dumps took it: a subclass of a JSON type, or a tuple (a list).
        base = next((name for t, name in _JSON_BASES.items() if isinstance(value, t)), None)
        raise TypeError(f"Object of type {kind.__name__} would come back as {base or 'a list'}")


class Codec:
    """Turns results and failures into stored values and back."""

    def __init__(self, serializer: Serializer) -> None:
        self.serializer = serializer
        #: A result as stored. Raises for a result that would not come back
        #: as it is (but see loads_back): unrecordable() says why.
        self.dumps: Callable[[Any], bytes | str]
        self.loads: Callable[[Any], Any]
        if serializer == "pickle":
            self.dumps = pickle.dumps  # the default protocol: no keyword to pass per call
            self.loads = pickle.loads
        else:
            import json

            encode = json.dumps

            def dump_json(value: Any) -> str:
                text = encode(value)  # first: it refuses sets, cycles, other types
                _check_json(value)
                return text

            self.dumps = dump_json
            self.loads = json.loads

    def loads_back(self, encoded: bytes | str) -> None:
        """Check that an exception returned as a result loads back from ``dumps``'s value.

        An exception pickles as its type and ``args``, so one whose ``__init__``
        takes other arguments stores but does not load: found now, not on
        resume. The recorder calls this for exceptions only; loading back
        every result would double its cost.

        Raises:
            _Unloadable: it does not load (for unrecordable()).
        """
        try:
            self.loads(encoded)
        except Exception as exc:
            raise _Unloadable(exc) from exc

    def dump_failure(self, exc: BaseException) -> bytes | str:
        if self.serializer == "json":
            return self.dumps({"type": _type_name(exc), "message": _message(exc)})
        try:
            payload = pickle.dumps(exc)
            pickle.loads(payload)  # failures are rare: check it replays, not only that it stores
        except Exception:
            payload = pickle.dumps(RecordedFailure(_type_name(exc), _message(exc)))
        return payload

    def decode(self, kind: int, value: Any) -> tuple[int, Any]:
        """A stored row's (kind, result or exception).

        Raises:
            Exception: the value cannot be loaded (see :meth:`unreadable`).
        """
        if kind == PLAIN:
            return PLAIN, value
        if kind == ENCODED:
            return ENCODED, self.loads(value)
        if self.serializer == "json":
            record = self.loads(value)
            return FAILED, RecordedFailure(record["type"], record["message"])
        return FAILED, pickle.loads(value)

    def unrecordable(self, path: str, item: object, exc: Exception) -> TypeError:
        """The error that stops the map when ``dumps`` raised ``exc`` for item's result."""
        cause = exc
        if isinstance(exc, _Unloadable):
            what = "pickle stores it but cannot load it back"
            cause = exc.error
        elif self.serializer == "pickle":
            what = "it cannot be pickled"
        else:
            what = "it is not JSON-serialisable"
        if self.serializer == "pickle":
            fix = (
                "Return plain data from fn (str, numbers, lists, dicts, dataclasses), "
                "or drop checkpoint=."
            )
        else:
            fix = (
                "Return JSON data from fn (str, numbers, bool, None, lists, dicts with str "
                "keys), or use serializer='pickle'."
            )
        error = TypeError(
            f"checkpoint={path!r} cannot record the result of item {item_repr(item)}: "
            f"{what} ({type(cause).__name__}: {cause}). {fix}"
        )
        error.__cause__ = cause
        return error

    def unreadable(self, path: str, item: object, exc: Exception) -> ValueError:
        """The error that stops the map when a recorded value of item's cannot be loaded."""
        error = ValueError(
            f"checkpoint={path!r} cannot load the result recorded for item "
            f"{item_repr(item)} ({type(exc).__name__}: {exc}). Restore the code that "
            "defined its type if it changed since, or pass the path of a new file."
        )
        error.__cause__ = exc
        return error


# ---------------------------------------------------------------------------
# The database, used only from the checkpoint's thread
# ---------------------------------------------------------------------------


def _encode_chunks(
    keys: list[Key], kinds: bytes | None, values: list[Any], into: list[tuple[Any, ...]]
) -> None:
    """Add the stored columns of these rows to ``into``: ids, kinds (NULL when every row
    is plain), values; split in halves while the values take more than CHUNK_BYTES."""
    encoded = marshal.dumps(values, MARSHAL_VERSION)
    if len(encoded) > CHUNK_BYTES and len(values) > 1:
        half = len(values) // 2
        _encode_chunks(keys[:half], kinds and kinds[:half], values[:half], into)
        _encode_chunks(keys[half:], kinds and kinds[half:], values[half:], into)
        return
    into.append((marshal.dumps(keys, MARSHAL_VERSION), kinds, encoded))


def is_disk_error(exc: BaseException) -> bool:
    """Whether a sqlite3 error says the file or its disk cannot be used (see _DISK_ERRORS)."""
    name = getattr(exc, "sqlite_errorname", None)
    return isinstance(name, str) and name.removeprefix("SQLITE_").split("_")[0] in _DISK_ERRORS


def disk_failed(path: str, doing: str, exc: BaseException) -> OSError:
    """The error that stops the map when the thread's work on the file failed."""
    error = OSError(
        f"checkpoint={path!r} cannot {doing}: {exc} ({type(exc).__name__}); no result that "
        "was not recorded was handed out, and running the same map again resumes from "
        "the recorded ones"
    )
    error.__cause__ = exc
    return error


def _damaged(path: str, seq: int, exc: Exception) -> ValueError:
    error = ValueError(
        f"checkpoint={path!r} is damaged: chunk {seq} cannot be read ({exc}); "
        "pass the path of a new file"
    )
    error.__cause__ = exc
    return error


def _decode_chunk(path: str, row: tuple[int, bytes, bytes | None, bytes]) -> Chunk:
    seq, ids, kinds, values = row
    try:
        keys, decoded = marshal.loads(ids), marshal.loads(values)
        # A damaged blob may still load, as something else: rows that do not
        # line up would be misread (or fail a lookup later, far from here).
        if (
            type(keys) is not list
            or type(decoded) is not list
            or len(decoded) != len(keys)
            or (kinds is not None and len(kinds) != len(keys))
        ):
            raise ValueError("its ids, kinds and values do not match")
    except (ValueError, EOFError, TypeError) as exc:
        raise _damaged(path, seq, exc) from exc
    return seq, keys, kinds, decoded


def chunks_of(plain: list[Any], others: list[Any]) -> list[tuple[Any, ...]]:
    """The recorded rows as stored chunks of at most CHUNK_ROWS rows each.

    Both lists are flat: ``plain`` holds id, value, id, value..., ``others``
    id, kind, value, id, kind, value...
    """
    chunks: list[tuple[Any, ...]] = []
    keys, values = plain[0::2], plain[1::2]
    for start in range(0, len(keys), CHUNK_ROWS):
        end = start + CHUNK_ROWS
        _encode_chunks(keys[start:end], None, values[start:end], chunks)
    for start in range(0, len(others), 3 * CHUNK_ROWS):
        part = others[start : start + 3 * CHUNK_ROWS]
        _encode_chunks(part[0::3], bytes(part[1::3]), part[2::3], chunks)
    return chunks


def pairs_of(plain: list[Any]) -> Iterator[tuple[Key, Any]]:
    """The (id, value) rows of a flat list of plain rows (id, value, id, value...)."""
    flat = iter(plain)
    return zip(flat, flat, strict=True)


def rows_of(others: list[Any]) -> Iterator[Row]:
    """The (id, kind, value) rows of a flat list of them."""
    flat = iter(others)
    return zip(flat, flat, flat, strict=True)


class Database:
    """The SQLite connection and the statements corral runs on it.

    Every method runs on the checkpoint's own thread: the connection is
    created there and never leaves it.
    """

    def __init__(
        self,
        connection: sqlite3.Connection,
        path: str,
        index: dict[int, int],
        shared: dict[int, list[int]],
        last: int,
        identity: os.stat_result,
        lock: Lock | None = None,
    ) -> None:
        import sqlite3

        self._db = connection
        self._identity = identity  # os.stat() of the file when it was opened
        self._where = os.path.abspath(path)  # ... and where (a later chdir does not move it)
        self._lock = lock  # held while this map uses the file (see _lock)
        self._path = path  # for the message of a damaged chunk
        #: hash(id) -> the seq of the chunk holding it, for the ids recorded
        #: when the file was opened; 0 for an id this run started (see Checkpoint.seen).
        self._index = index
        #: For a hash in ``index`` as SHARED_HASH: every chunk holding an id
        #: with that hash (two ids with one hash, or an id recorded twice).
        self._shared = shared
        # sqlite3 binds at most this many parameters per statement (999 before 3.32).
        variables = 32766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999
        self._chunks_per_statement = min(64, variables // 3)
        self._insert_sql: dict[int, str] = {}
        #: The chunks this run wrote, by id, built on the first lookup that
        #: needs it (an id repeated in the input, a hash collision) and kept
        #: up to date from then on: a run without such lookups never pays.
        self._run_keys: dict[Key, int] | None = None
        self._run_indexed = last  # the last seq in _run_keys (or recorded at open)

    @classmethod
    def open(
        cls,
        path: str,
        fingerprint: str,
        serializer: str,
        resume: str,
        index: dict[int, int],
        first: int,
    ) -> tuple[Database, int, list[Chunk]]:
        """Open (or create) the file, check it was made by this map; fill the index.

        ``index`` (hash of each recorded id -> its chunk's seq) belongs to the
        event loop thread, which does not touch it until this returns.
        Returns the database, the number of rows recorded and the first
        ``first`` chunks (a resume most often asks for the first rows first).
        """
        import sqlite3

        try:
            db = sqlite3.connect(path, isolation_level=None, cached_statements=256)
        except sqlite3.Error as exc:
            raise OSError(f"checkpoint={path!r} cannot be opened: {_why(path, exc)}") from exc
        try:
            lock = _lock(path)
        except BaseException:
            db.close()
            raise
        try:
            cls._prepare(db, path, fingerprint, serializer, resume)
            rows, last, shared = cls._load(db, path, index)
            identity = os.stat(path)  # the file as opened: see _check_in_place
        except sqlite3.DatabaseError as exc:
            db.close()
            _unlock(lock)
            if is_disk_error(exc):
                raise OSError(f"checkpoint={path!r} cannot be opened: {exc}") from exc
            raise ValueError(
                f"checkpoint={path!r} is not a corral checkpoint ({exc}); "
                "pass the path of a new file, or of one an earlier run wrote"
            ) from exc
        except BaseException:
            db.close()
            _unlock(lock)
            raise
        database = cls(db, path, index, shared, last, identity, lock)
        try:
            ahead = database.read_ahead(0, first) if rows else []
        except BaseException:
            database.close()  # a damaged chunk: the error says so, the file is not left open
            raise
        return database, rows, ahead

    @staticmethod
    def _load(
        db: sqlite3.Connection, path: str, index: dict[int, int]
    ) -> tuple[int, int, dict[int, list[int]]]:
        """Index the recorded ids; the number of rows, the last chunk's seq, the shared hashes."""
        rows = last = 0
        shared: dict[int, list[int]] = {}
        for seq, ids in db.execute("SELECT seq, ids FROM corral_chunks ORDER BY seq"):
            try:
                keys = marshal.loads(ids)
            except (ValueError, EOFError, TypeError) as exc:
                raise _damaged(path, seq, exc) from exc
            rows += len(keys)
            last = seq
            hashes = list(map(hash, keys))
            if index.keys().isdisjoint(hashes):  # one C-speed check a chunk: nearly always
                index.update(zip(hashes, itertools.repeat(seq)))
                continue
            # A hash an earlier chunk has too: keep every chunk that has it.
            for hashed in hashes:
                earlier = index.setdefault(hashed, seq)
                if earlier == SHARED_HASH:
                    shared[hashed].append(seq)
                elif earlier != seq:
                    shared[hashed] = [earlier, seq]
                    index[hashed] = SHARED_HASH
        return rows, last, shared

    @staticmethod
    def _prepare(
        db: sqlite3.Connection, path: str, fingerprint: str, serializer: str, resume: str
    ) -> None:
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("BEGIN IMMEDIATE")
        try:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_schema")}
            if "corral_checkpoint" not in tables:
                if tables:
                    raise ValueError(
                        f"checkpoint={path!r} is a SQLite database with other tables "
                        f"({', '.join(sorted(tables))}), not a corral checkpoint; "
                        "pass the path of a new file"
                    )
                db.execute("CREATE TABLE corral_checkpoint (name TEXT PRIMARY KEY, value)")
                # One row per chunk of up to CHUNK_ROWS results, in recording
                # order (seq): see "How results are stored" above.
                db.execute(
                    "CREATE TABLE corral_chunks "
                    "(seq INTEGER PRIMARY KEY, ids BLOB NOT NULL, kinds BLOB, vals BLOB NOT NULL)"
                )
                db.executemany(
                    "INSERT INTO corral_checkpoint VALUES (?, ?)",
                    [("format", FORMAT), ("fingerprint", fingerprint), ("serializer", serializer)],
                )
            meta = dict(db.execute("SELECT name, value FROM corral_checkpoint").fetchall())
            if meta.get("format") == FORMAT and (
                db.execute("SELECT 1 FROM corral_chunks LIMIT 1").fetchone() is None
            ):
                # Nothing recorded, nothing for the fingerprint or serializer to
                # guard: the file is this map's as if new (a first run that
                # failed at once, then a fixed fn, must not be refused).
                meta.update(fingerprint=fingerprint, serializer=serializer)
                db.executemany(
                    "UPDATE corral_checkpoint SET value = ? WHERE name = ?",
                    [(fingerprint, "fingerprint"), (serializer, "serializer")],
                )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        _check_meta(meta, path, fingerprint, serializer, resume)

    def insert(self, plain: list[Any], others: list[Any]) -> None:
        """Store the rows and commit: both lists flat, as :func:`chunks_of` takes them.

        Raises:
            OSError: SQLite refused the write (a full disk, a lock held too
                long, the file gone read-only), naming the file.
        """
        import sqlite3

        try:
            self._insert_all(chunks_of(plain, others))
        except sqlite3.Error as exc:
            raise disk_failed(self._path, "record results", exc) from exc
        self._check_in_place()

    def _check_in_place(self) -> None:
        """Raise OSError if the file was deleted or replaced since it was opened.

        SQLite goes on writing to a deleted file (its open descriptor keeps it
        alive) and reports nothing: every result recorded after would be lost
        with it. One ``stat`` a write, on this thread.
        """
        try:
            now: os.stat_result | None = os.stat(self._where)
        except OSError:
            now = None
        if now is None or not os.path.samestat(now, self._identity):
            raise OSError(
                f"checkpoint={self._path!r} cannot record results: the file was deleted or "
                "replaced while the map ran; no result that was not recorded was handed "
                "out. Run the map again with a file that stays in place"
            )

    def _insert_all(self, chunks: list[tuple[Any, ...]]) -> None:
        db = self._db
        step = self._chunks_per_statement
        statements = [chunks[start : start + step] for start in range(0, len(chunks), step)]
        if len(statements) == 1:
            # Autocommit: the one statement is the whole transaction, one step.
            self._insert(statements[0])
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in statements:
                self._insert(statement)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _insert(self, chunks: list[tuple[Any, ...]]) -> None:
        sql = self._insert_sql.get(len(chunks))
        if sql is None:
            values = ", ".join(["(?, ?, ?)"] * len(chunks))
            sql = f"INSERT INTO corral_chunks (ids, kinds, vals) VALUES {values}"
            self._insert_sql[len(chunks)] = sql
        self._db.execute(sql, list(itertools.chain.from_iterable(chunks)))

    def select(self, keys: list[Key], ahead: int) -> tuple[list[Row], list[Chunk]]:
        """The recorded rows among ``keys``; the chunks read for them and ``ahead`` more.

        A chunk is read whole, so its other rows come back too (to be cached:
        the items near one that was looked up tend to come soon), followed
        by up to ``ahead`` chunks recorded after the last one read.

        Raises:
            OSError: SQLite refused the read, naming the file.
            ValueError: a chunk is damaged, naming the file and the chunk.
        """
        import sqlite3

        try:
            return self._select(keys, ahead)
        except sqlite3.Error as exc:
            raise disk_failed(self._path, "read the recorded results", exc) from exc

    def _select(self, keys: list[Key], ahead: int) -> tuple[list[Row], list[Chunk]]:
        index, shared = self._index, self._shared
        wanted: dict[int, list[Key]] = {}
        for key in keys:
            hashed = hash(key)
            seq = index.get(hashed)
            if seq == SHARED_HASH:
                for each in shared[hashed]:
                    wanted.setdefault(each, []).append(key)
            elif seq:
                wanted.setdefault(seq, []).append(key)
            # else: started by this run (or not recorded at all): see below
        rows: dict[Key, Row] = {}
        read = self._chunks(sorted(wanted))
        for seq, ids, kinds, values in read:  # by seq: a row recorded again wins
            position = {key: at for at, key in enumerate(ids)}
            for key in wanted[seq]:
                at = position.get(key)
                if at is not None:
                    rows[key] = (key, PLAIN if kinds is None else kinds[at], values[at])
        found = list(rows.values())
        unplaced = [key for key in keys if key not in rows]
        if unplaced:
            # An id this run started (repeated in the input), or another id
            # with the same hash: look in the chunks this run wrote.
            run_keys = self._index_run()
            by_seq: dict[int, list[Key]] = {}
            for key in unplaced:
                seq = run_keys.get(key)
                if seq is not None:
                    by_seq.setdefault(seq, []).append(key)
            for seq, ids, kinds, values in self._chunks(sorted(by_seq)):
                position = {key: at for at, key in enumerate(ids)}
                for key in by_seq[seq]:
                    at = position[key]
                    found.append((key, PLAIN if kinds is None else kinds[at], values[at]))
        if ahead and read:
            read += self.read_ahead(read[-1][0], ahead)
        return found, read

    def _chunks(self, seqs: list[int]) -> list[Chunk]:
        chunks: list[Chunk] = []
        step = self._chunks_per_statement
        for start in range(0, len(seqs), step):
            part = seqs[start : start + step]
            marks = ", ".join(["?"] * len(part))
            sql = (
                f"SELECT seq, ids, kinds, vals FROM corral_chunks WHERE seq IN ({marks}) "
                "ORDER BY seq"
            )
            chunks.extend(_decode_chunk(self._path, row) for row in self._db.execute(sql, part))
        return chunks

    def _index_run(self) -> dict[Key, int]:
        """The ids of the chunks written since the file was opened -> their seq."""
        run_keys = self._run_keys
        if run_keys is None:
            run_keys = self._run_keys = {}
        rows = self._db.execute(
            "SELECT seq, ids FROM corral_chunks WHERE seq > ? ORDER BY seq", (self._run_indexed,)
        )
        for seq, ids in rows:
            run_keys.update(zip(marshal.loads(ids), itertools.repeat(seq)))
            self._run_indexed = seq
        return run_keys

    def read_ahead(self, after: int, count: int) -> list[Chunk]:
        """Up to ``count`` chunks in recording order, from seq ``after`` (excluded)."""
        rows = self._db.execute(
            "SELECT seq, ids, kinds, vals FROM corral_chunks WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, count),
        )
        return [_decode_chunk(self._path, row) for row in rows]

    def close(self) -> None:
        # The last connection to close folds the write-ahead log into the file
        # and deletes it: what is left is one self-contained .sqlite file.
        try:
            self._db.close()
        finally:
            lock, self._lock = self._lock, None
            _unlock(lock)


def _lock(path: str) -> Lock | None:
    """Take the file's lock for this map, or refuse: another map is using the file.

    Two maps recording into one file at once would each call ``fn`` for
    every item the other has not recorded yet, and record it again. The
    lock is an ``flock`` on a file beside it (``<path>-lock``), not on the
    database itself: closing any other descriptor of the database in this
    process would drop SQLite's own locks on it. It does not keep anyone
    from reading the file (:func:`read_checkpoint`). The map removes the
    lock file when it closes; after a crash the file is left, unlocked
    (the kernel dropped the lock with the process), and the next map takes it.

    Returns the lock (None where there is no ``flock``: Windows, where
    nothing stops a second map).

    Raises:
        OSError: another map holds the lock, or the lock file cannot be made.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    # Absolute (a later chdir does not move it) and with symlinks resolved: the
    # file by another name is the same file, and SQLite resolves them too.
    lock_path = os.path.realpath(path) + LOCK_SUFFIX
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OSError(f"checkpoint={path!r} cannot be opened: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The map that held it removes the file before it lets go: a lock
            # taken on a removed file guards nothing, so take the new one.
            if os.path.samestat(os.fstat(fd), os.stat(lock_path)):
                return fd, lock_path
        except FileNotFoundError:
            pass  # removed since it was opened: open it again
        except BlockingIOError as exc:
            os.close(fd)
            raise OSError(
                f"checkpoint={path!r} cannot be opened: another map is using it (in this "
                "process or another); wait for it to finish, or pass the path of another file"
            ) from exc
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _unlock(lock: Lock | None) -> None:
    """Remove the lock file, then let go of the lock (see _lock)."""
    if lock is None:
        return
    fd, lock_path = lock
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
    finally:
        os.close(fd)


def read_checkpoint(path: str | os.PathLike[str]) -> Iterator[Row]:
    """Every row a checkpoint file holds, in recording order: (id, kind, stored value).

    ``kind`` is PLAIN (the value is the result itself), ENCODED (the
    serializer's bytes or text for the result) or FAILED (for the final
    failure). For looking into a file; a map reads it by itself.

    Raises:
        OSError: the file cannot be opened (it is missing: it is not created).
        ValueError: it is not a corral checkpoint, or a chunk is damaged.
    """
    import pathlib
    import sqlite3

    path = os.fspath(path)
    # mode=rw: a mistyped path is an error, not a new empty database. Not
    # mode=ro: a read-only connection cannot remove the write-ahead log
    # files it opens, and the file is to stay one self-contained file.
    uri = pathlib.Path(os.path.abspath(path)).as_uri() + "?mode=rw"
    try:
        db = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as exc:
        raise OSError(f"checkpoint={path!r} cannot be opened: {_why(path, exc)}") from exc
    try:
        try:
            rows = db.execute("SELECT seq, ids, kinds, vals FROM corral_chunks ORDER BY seq")
        except sqlite3.DatabaseError as exc:
            if is_disk_error(exc):
                raise OSError(f"checkpoint={path!r} cannot be opened: {exc}") from exc
            raise ValueError(f"checkpoint={path!r} is not a corral checkpoint ({exc})") from exc
        for row in rows:
            _, ids, kinds, values = _decode_chunk(path, row)
            if kinds is None:
                yield from zip(ids, itertools.repeat(PLAIN), values, strict=False)
            else:
                yield from zip(ids, kinds, values, strict=True)
    finally:
        db.close()


def _check_meta(
    meta: dict[str, Any], path: str, fingerprint: str, serializer: str, resume: str
) -> None:
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"checkpoint={path!r} was written in format {meta.get('format')!r}, and this "
            f"corral reads format {FORMAT}; resume it with the corral that wrote it, "
            "or pass the path of a new file"
        )
    if meta.get("serializer") != serializer:
        raise ValueError(
            f"checkpoint={path!r} was recorded with serializer={meta.get('serializer')!r}; "
            f"pass serializer={meta.get('serializer')!r} to resume it, or the path of a new file"
        )
    recorded = meta.get("fingerprint")
    if recorded != fingerprint and resume != "ignore-fingerprint":
        raise ValueError(
            f"checkpoint={path!r} was recorded with fingerprint {recorded!r}, but this map's "
            f"fingerprint is {fingerprint!r}. Pass fingerprint={recorded!r} if fn still "
            "gives the same results, resume='ignore-fingerprint' to reuse the recorded "
            "results anyway, or the path of a new file to start over."
        )
