"""Retries: when to call again, and how long to wait first.

A failed call is either *transient* (the network dropped, the server is
overloaded, a rate limit was hit: the same call may well succeed a moment
later) or *final* (a bug, bad input, a 404: calling again only fails again,
slower). :class:`Retry` decides which, and how long to wait, in one pure,
synchronous method, :meth:`Retry.next_wait`; the engine sleeps and counts.
Everything here is plain arithmetic on its arguments: no event loop, no clock
except the wall clock an HTTP-date Retry-After is relative to, and a
``random.Random`` passed in, so every schedule can be tested exactly.

HTTP client errors are recognised by duck typing, never by importing aiohttp
or httpx: ``import corral`` must stay free of third-party modules, and a
client that is not installed cannot have raised anything.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC
from typing import TypeAlias

from ._numbers import check_arity, is_finite, is_integral, is_real, to_float
from ._retry_budget import ERROR, THROTTLE, RetryBudget, as_budget

#: The retry budget a :class:`Retry` has unless told otherwise.
DEFAULT_BUDGET = RetryBudget()

__all__ = ["Retry", "RetryAfter", "RetryOn", "as_retry", "retry_after_seconds", "transient"]

RetryOn: TypeAlias = (
    type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool] | None
)


class RetryAfter(Exception):
    """Raised by your function to say "call me again, but not before ``seconds``".

    Use it when you know better than exponential backoff how long to wait:
    a rate limit that resets in 12 s, a job that will be ready in a minute::

        async def ask(prompt):
            response = await client.post(...)
            if response.status_code == 429:
                raise corral.RetryAfter(float(response.headers["retry-after"]))
            return response.json()

    The default ``on`` of :class:`Retry` retries it, and the wait before the
    next call is at least ``seconds``, even beyond ``max_backoff``; a wait
    above ``Retry.max_retry_after`` makes the failure final instead. When the
    attempts run out, the ``RetryAfter`` itself is the item's failure.

    Args:
        seconds: the least wait before the next call, a finite number >= 0.

    Raises:
        TypeError: ``seconds`` is not a number.
        ValueError: ``seconds`` is negative, NaN or infinite.
    """

    def __init__(self, seconds: float) -> None:
        if not is_real(seconds):  # bool is an int, but RetryAfter(True) is a mistake
            raise TypeError(
                f"RetryAfter(seconds={seconds!r}): seconds must be a number of seconds "
                "(int or float), like RetryAfter(2.5)"
            )
        if not (is_finite(seconds) and seconds >= 0):
            raise ValueError(
                f"RetryAfter(seconds={seconds!r}): seconds must be a finite number >= 0 "
                "(the least wait before the next call)"
            )
        # args stays (seconds,) so the exception pickles (process workers send
        # failures back) and is rebuilt through this same validation.
        super().__init__(seconds)
        self.seconds = float(seconds)

    def __str__(self) -> str:
        return f"retry after {self.seconds:g} s"


# --- Which failures are transient ---------------------------------------------
#
# OSError covers the standard library's transient failures: ConnectionError
# (refused, reset, aborted, broken pipe), TimeoutError (which asyncio.TimeoutError
# is since 3.11), socket.gaierror. The HTTP clients' own transport errors are
# matched by class name anywhere in the MRO, so subclasses count and nothing is
# imported: aiohttp's ClientConnectionError (ServerDisconnectedError,
# ServerTimeoutError, ClientConnectorError, ... derive from it) and
# ClientPayloadError (a body cut short), httpx's TransportError (ConnectError,
# ReadTimeout, RemoteProtocolError, ...). Two TransportError subclasses are
# deterministic client-side mistakes that no retry fixes (an "ftp://" URL, a
# malformed request header), so they are excluded by name.

_TRANSIENT_NAMES = frozenset({"ClientConnectionError", "ClientPayloadError", "TransportError"})
_PERMANENT_NAMES = frozenset({"UnsupportedProtocol", "LocalProtocolError"})

# 408 Request Timeout, 429 Too Many Requests, 500 Internal Server Error,
# 502 Bad Gateway, 503 Service Unavailable, 504 Gateway Timeout, and 529, which
# Anthropic's API answers when it is overloaded (its SDK retries it too).
_TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504, 529})
# The statuses whose Retry-After means "come back later" (RFC 9110 section 10.2.3);
# on a 3xx it is a redirect hint and no reason to wait.
_RETRY_AFTER_STATUSES = frozenset({429, 503})
# The statuses of a server refusing for load: the retry budget's throttle allowance.
_THROTTLE_STATUSES = _RETRY_AFTER_STATUSES | {529}


def _attr(obj: object, name: str) -> object:
    # Duck typing over foreign objects: a missing attribute, or a property that
    # raises (httpx's RequestError.request does when unset), reads as None.
    try:
        return getattr(obj, name, None)
    except Exception:
        return None


def _status(exc: BaseException) -> int | None:
    """The HTTP status an exception carries: aiohttp's ``.status``, httpx's ``.response``."""
    for status in (_attr(exc, "status"), _attr(_attr(exc, "response"), "status_code")):
        if isinstance(status, int) and not isinstance(status, bool):
            return status
    return None


def transient(exc: BaseException) -> bool:
    """Whether a failure is worth another call: the default ``on`` of :class:`Retry`.

    True for ``OSError`` (``ConnectionError``, ``TimeoutError``, ...),
    :class:`RetryAfter`, the transport errors of aiohttp
    (``ClientConnectionError``, ``ClientPayloadError``) and httpx
    (``TransportError``, except ``UnsupportedProtocol`` and
    ``LocalProtocolError``), and any exception carrying an HTTP status of 408,
    429, 500, 502, 503, 504 or 529 (Anthropic's "overloaded"; aiohttp's
    ``ClientResponseError.status``, httpx's
    ``HTTPStatusError.response.status_code``). An HTTP status decides even on
    an ``OSError`` (urllib's ``HTTPError`` is one: its 404 is final). An
    ``ExceptionGroup`` is transient when every exception in it is. False for
    everything else, in particular programming errors (``TypeError``,
    ``ValueError``, ``KeyError``, ...) and other HTTP statuses (a 404 stays a
    404). Always False for a
    ``BaseException`` that is not an ``Exception`` (``KeyboardInterrupt``,
    ``SystemExit``, ``asyncio.CancelledError``, ``GeneratorExit``).

    Call it from your own predicate to extend the default rather than replace it::

        Retry(on=lambda exc: corral.transient(exc) or isinstance(exc, StaleRead))
    """
    if not isinstance(exc, Exception):
        return False
    if isinstance(exc, ExceptionGroup):
        # A TaskGroup inside the function fails with a group: it is worth
        # another call only if every failure in it is (one bug makes it final).
        return all(transient(leaf) for leaf in exc.exceptions)
    status = _status(exc)
    if status is not None and 100 <= status <= 599:
        # An HTTP status decides, even on an OSError: urllib's HTTPError is
        # one, and its 404 must stay a 404.
        return status in _TRANSIENT_STATUSES
    if isinstance(exc, OSError | RetryAfter):
        return True
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & _TRANSIENT_NAMES) and not names & _PERMANENT_NAMES


# --- Server-directed waits ----------------------------------------------------
#
# Retry-After (RFC 9110 section 10.2.3) is either delta-seconds or an HTTP-date.
# Many APIs (OpenAI, Azure) also send retry-after-ms, which is more precise, so
# it wins when present and valid. Servers send floats ("1.5") in practice
# although the RFC says integer; both are accepted. Anything unparsable is
# ignored rather than raised: a broken header must not turn a retryable 503
# into a crash.

_DELTA_SECONDS = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def _text(value: object) -> str | None:
    # A lower-level client hands over bytes; HTTP header bytes are Latin-1
    # (RFC 9110 section 5.5), which decodes any byte string.
    if isinstance(value, bytes | bytearray):
        return value.decode("latin-1")
    return value if isinstance(value, str) else None


def _header(headers: object, name: str) -> str | None:
    """The value of header ``name`` (lower case) in any mapping, matched case-insensitively.

    The first occurrence counts (aiohttp's multidict yields each repeat), and
    keys and values may be str or bytes.
    """
    try:
        for key, value in headers.items():  # type: ignore[attr-defined]
            key = _text(key)
            if key is not None and key.lower() == name:
                return _text(value)
    except Exception:
        # Not a mapping (None included), or one whose iteration fails.
        return None
    return None


def _seconds(text: str | None, *, scale: float = 1.0) -> float | None:
    if text is None or not _DELTA_SECONDS.fullmatch(text.strip()):
        return None
    # Digits past the float range read as inf: a wait longer than any cap,
    # which fails the item (Retry.next_wait), not one to ignore and retry at once.
    return float(text.strip()) * scale


def _http_date(text: str | None, now: float | None) -> float | None:
    if text is None:
        return None
    # Imported on first use: email.utils pulls in a dozen modules (calendar,
    # locale, the email package) that `import corral` should not pay for.
    import email.utils

    try:
        when = email.utils.parsedate_to_datetime(text.strip())
        # A "-0000" zone parses as a naive datetime; it still means UTC.
        at = when.timestamp() if when.tzinfo else when.replace(tzinfo=UTC).timestamp()
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    # The only wall-clock read in corral: an HTTP-date is an absolute time.
    return max(0.0, at - (time.time() if now is None else now))


def retry_after_seconds(exc: BaseException, *, now: float | None = None) -> float | None:
    """How long the server (or your function) asked to wait, in seconds, or None.

    For a :class:`RetryAfter`, its ``seconds``. For an HTTP error with status
    429 or 503, the response headers (aiohttp's ``exc.headers``, httpx's
    ``exc.response.headers``), matched case-insensitively: ``retry-after-ms``
    (milliseconds) first, then ``retry-after`` as delta-seconds (``"120"``,
    ``"1.5"``) or an HTTP-date (``"Wed, 21 Oct 2015 07:28:00 GMT"``, or the
    obsolete RFC 850 and asctime forms; a date in the past means 0). Header
    names and values may be str or bytes; of a repeated header (httpx joins
    repeats with ", ") the first valid value counts. For an ``ExceptionGroup``,
    the longest wait among its exceptions. None when there is no such header,
    or its value is garbage, negative, or a number too large for a float (a
    wait no cap allows: :meth:`Retry.next_wait` fails the item on it).

    Args:
        exc: the failure.
        now: the wall-clock time (``time.time()`` seconds) an HTTP-date is
            measured from; ``time.time()`` when None.
    """
    seconds = _server_wait(exc, now)
    return None if seconds == math.inf else seconds


def _server_wait(exc: BaseException, now: float | None) -> float | None:
    """:func:`retry_after_seconds`, but ``math.inf`` for a number too large for a float."""
    if isinstance(exc, RetryAfter):
        return exc.seconds
    if isinstance(exc, BaseExceptionGroup):
        # The longest wait any failure in the group asked for.
        waits = [_server_wait(leaf, now) for leaf in exc.exceptions]
        return max((wait for wait in waits if wait is not None), default=None)
    if _status(exc) not in _RETRY_AFTER_STATUSES:
        return None
    headers = _attr(exc, "headers")
    if headers is None:
        headers = _attr(_attr(exc, "response"), "headers")
    for value in _values(_header(headers, "retry-after-ms")):
        milliseconds = _seconds(value, scale=0.001)
        if milliseconds is not None:
            return milliseconds
    text = _header(headers, "retry-after")
    for value in _values(text):
        seconds = _seconds(value)
        if seconds is None:
            seconds = _http_date(value, now)
        if seconds is not None:
            return seconds
    return None


def _values(text: str | None) -> list[str]:
    """The candidate values of a header, the whole of it first.

    httpx (like HTTP itself) joins repeated headers with ", ", and an HTTP-date
    holds a comma too ("Wed, 21 Oct 2015 ..."): after the whole text, each
    comma-separated piece is a candidate, and so is each pair of adjacent
    pieces, so that a repeated date is read as one. The first valid one counts.
    """
    if text is None:
        return []
    if "," not in text:
        return [text]
    # The first eight pieces at most: a header of a thousand commas (from a
    # broken or hostile server) costs no more parsing than a few repeats.
    pieces = text.split(",", 8)[:8]
    candidates = [text]
    for i, piece in enumerate(pieces):
        candidates.append(piece)
        if i + 1 < len(pieces):
            candidates.append(f"{piece},{pieces[i + 1]}")
    return candidates


# --- The policy -----------------------------------------------------------------

# A float's exponent is below 1024 and the smallest positive float is 2**-1074,
# so backoff * 2**2200 exceeds every float whenever backoff > 0: past this
# exponent the cap always wins, and math.ldexp never sees a huge int.
_MAX_EXPONENT = 2200


@dataclass(frozen=True, slots=True)
class Retry:
    """When to call again after a failure, and how long to wait first.

    Networks drop connections and servers shed load; most such failures go
    away if you wait a little and call again. Calling again *at once* from
    every worker is how an overloaded server stays overloaded, so waits grow
    exponentially and are randomised::

        call 1 --fails--> wait in [0, 0.1] --> call 2 --fails--> wait in [0, 0.2]
               --> call 3 --fails--> the item fails with call 3's exception

    The wait before retry k (k = 1 for the first retry) is at most::

        min(max_backoff, backoff * 2**(k - 1))

    ``jitter=True`` draws it uniformly from [0, that] ("full jitter", which
    spreads retrying clients out best); ``jitter=False`` waits exactly that.
    There is no wait after the last attempt: the failure is raised at once.

    A server can direct the wait: a :class:`RetryAfter` raised by your
    function, or an HTTP 429/503 with a ``Retry-After`` (or ``retry-after-ms``)
    header from aiohttp or httpx. The wait is then the larger of the backoff
    and the server's, even beyond ``max_backoff``; a server wait above
    ``max_retry_after`` is not slept through: the failure is final instead.

    For example, five calls per URL, waits bounded by 0.5, 1, 2, 4 s::

        async with corral.map(fetch, urls, retries=corral.Retry(attempts=5, backoff=0.5)) as pages:
            ...

    Traps:

    - ``attempts`` counts *calls*, not retries: ``Retry(attempts=3)`` is one
      call and up to two retries, the same as ``map(..., retries=2)``.
    - Retrying is only safe for calls that may run twice: a POST that
      creates an order may have succeeded before its connection dropped.
    - ``on=Exception`` retries bugs too: a ``TypeError`` then costs every
      attempt and every wait before it surfaces. Prefer the default.
    - A custom ``on`` replaces the default. If your function raises
      :class:`RetryAfter`, include it, or extend :func:`transient`.
    - ``KeyboardInterrupt``, ``SystemExit`` and cancellation are never retried,
      whatever ``on`` says (even ``on=BaseException``).
    - The default retries every ``OSError``, and ``FileNotFoundError`` is one:
      a missing local file costs all attempts before it surfaces.

    Args:
        attempts: total calls per item, an int >= 1. The default, 3, rides
            out a blip and gives up on a dead server after at most 0.3 s of
            waiting (0.1 + 0.2).
        backoff: the first retry's wait bound in seconds (>= 0); each
            later retry doubles it. 0.1 s is a few network round trips.
        max_backoff: the cap on the backoff wait in seconds (>= backoff).
            30 s keeps a long series of retries from going quiet for minutes.
        jitter: randomise each wait in [0, bound]. On by default, so that
            clients failing together do not retry together.
        on: which failures to retry: an exception type, a tuple of types, or
            a predicate ``exc -> bool``. The default, None, means
            :func:`transient`: network errors, timeouts, ``RetryAfter`` and HTTP
            408/429/500/502/503/504/529 are retried; programming errors
            (``TypeError``, ``ValueError``, ...) and other statuses fail at once.
        max_retry_after: the longest server-directed wait, in seconds, that is
            honoured (``math.inf`` for no cap). A server asking for more than the
            default 120 s usually means a quota is spent; failing says so, where
            a worker asleep for an hour would not. It also caps the pause such
            a wait puts on the map's shared :class:`corral.Limiter`.
        budget: the retry budget: a :class:`corral.RetryBudget`, a ratio
            (``0.2`` is ``RetryBudget(ratio=0.2)``), or None for no budget. By
            default retries may not exceed 10 per 10 s plus 10% of the calls
            that succeeded in that window (429/503 retries and other retries
            counted apart); a retry beyond it fails the item with
            :class:`corral.RetryBudgetExhausted`. Shared by the maps using one
            :class:`corral.Limiter`, else per map.

    Raises:
        TypeError: a field has the wrong type (``bool`` is not an int here).
        ValueError: a field is out of range.

    .. versionadded:: 0.1
    """

    attempts: int = 3
    backoff: float = 0.1
    max_backoff: float = 30.0
    jitter: bool = True
    on: RetryOn = None
    max_retry_after: float = 120.0
    budget: RetryBudget | float | None = DEFAULT_BUDGET

    def __post_init__(self) -> None:
        # A ratio stands for RetryBudget(ratio=...): store the full form.
        object.__setattr__(self, "budget", as_budget(self.budget))
        if not is_integral(self.attempts):
            raise TypeError(
                f"Retry(attempts={self.attempts!r}): attempts must be an int >= 1 "
                "(the total number of calls)"
            )
        if self.attempts < 1:
            raise ValueError(
                f"Retry(attempts={self.attempts!r}): attempts must be an int >= 1 "
                "(the total number of calls)"
            )
        object.__setattr__(self, "attempts", int(self.attempts))  # a numpy int: a plain one
        self._check_seconds("backoff", self.backoff, "the first retry's wait")
        self._check_seconds("max_backoff", self.max_backoff, "the cap on the backoff wait")
        if self.max_backoff < self.backoff:
            raise ValueError(
                f"Retry(backoff={self.backoff!r}, max_backoff={self.max_backoff!r}): "
                f"max_backoff must be >= backoff; raise it, e.g. "
                f"Retry(backoff={self.backoff!r}, max_backoff={self.backoff!r})"
            )
        # Plain floats from here on (a Fraction or numpy number was taken).
        object.__setattr__(self, "backoff", float(self.backoff))
        object.__setattr__(self, "max_backoff", float(self.max_backoff))
        if not isinstance(self.jitter, bool):
            raise TypeError(f"Retry(jitter={self.jitter!r}): jitter must be True or False")
        self._check_on()
        limit = self.max_retry_after
        if not (is_real(limit) and limit >= 0):  # NaN fails too; inf is no cap
            raise (ValueError if is_real(limit) else TypeError)(
                f"Retry(max_retry_after={limit!r}): max_retry_after must be a number of "
                "seconds >= 0 (math.inf for no cap)"
            )
        # An int too large for a float is no cap, as math.inf is.
        object.__setattr__(self, "max_retry_after", to_float(limit))

    @staticmethod
    def _check_seconds(name: str, value: object, meaning: str) -> None:
        if not (is_real(value) and is_finite(value) and value >= 0):
            raise (ValueError if is_real(value) else TypeError)(
                f"Retry({name}={value!r}): {name} must be a finite number of seconds >= 0 "
                f"({meaning})"
            )

    def _check_on(self) -> None:
        on = self.on
        if isinstance(on, tuple):
            if on and all(isinstance(t, type) and issubclass(t, BaseException) for t in on):
                return
        elif isinstance(on, type):
            if issubclass(on, BaseException):
                return
        elif on is None:
            return
        elif callable(on):
            # Once here, not at the first failure: a predicate of the wrong arity
            # would fail then with a TypeError naming neither on= nor itself, and
            # an async one would retry everything (a coroutine is true).
            check_arity("on", on, 1, "the exception", plain=True)
            return
        raise TypeError(
            f"Retry(on={on!r}): on must be an exception type, a non-empty tuple of "
            "exception types, or a predicate exc -> bool (None: corral.transient)"
        )

    def retries(self, exc: BaseException) -> bool:
        """Whether ``on`` says to retry ``exc``; never for a non-``Exception``."""
        if not isinstance(exc, Exception):
            # Ctrl-C, sys.exit() and cancellation must stop the run, not be
            # slept through and called again.
            return False
        on = self.on
        if on is None:
            return transient(exc)
        if isinstance(on, type | tuple):
            return isinstance(exc, on)
        answer: object = on(exc)  # typed bool, but a lambda may answer anything
        if answer is True or answer is False:
            return answer
        if isinstance(answer, Awaitable):
            # `on=lambda exc: check(exc)` with an async `check`: a coroutine is
            # true, so every failure, bugs too, would be retried, and it would
            # never run. Say so instead (the predicate's checks at construction
            # cannot see through the lambda).
            if isinstance(answer, Coroutine):
                answer.close()  # no "never awaited" warning on top of this error
            raise TypeError(
                f"Retry(on={on!r}) returned a coroutine or other awaitable ({answer!r}) for "
                f"{exc!r}; on must answer True or False at once: it is never awaited"
            )
        return bool(answer)  # None, a match object, a numpy bool: their truth

    def backoff_bound(self, k: int) -> float:
        """The backoff wait bound before retry ``k`` (1 for the first retry), in seconds.

        ``min(max_backoff, backoff * 2**(k - 1))``, computed without overflow for any k.
        """
        try:
            raw = math.ldexp(self.backoff, min(k - 1, _MAX_EXPONENT))
        except OverflowError:
            return self.max_backoff
        return min(self.max_backoff, raw)

    def next_wait(
        self,
        exc: BaseException,
        calls_made: int,
        rng: random.Random,
        *,
        now: float | None = None,
    ) -> float | None:
        """The seconds to wait before the next call, or None when ``exc`` is final.

        The engine calls this after every failed call. None means: do not call
        again, the item fails with ``exc``. That is the case when ``on`` does
        not retry ``exc`` (or it is not an ``Exception`` at all), when
        ``calls_made`` has reached ``attempts``, and when the server asked for a
        wait above ``max_retry_after`` (or an endless one, whatever the cap).
        Otherwise the wait is the backoff for retry ``calls_made`` (jittered
        with ``rng`` if ``jitter``), raised to the server-directed wait if
        there is one. An exception raised by an ``on`` predicate propagates:
        a bug in it surfaces rather than passing for "do not retry".

        Args:
            exc: the failure of the latest call.
            calls_made: calls made so far for this item (1 after the first failure).
            rng: the random source for jitter; seed it to make waits reproducible.
            now: the wall-clock time an HTTP-date Retry-After is measured from
                (``time.time()`` when None).
        """
        if calls_made < 1:
            raise ValueError(
                f"calls_made must be >= 1 (next_wait runs after a failed call); "
                f"got calls_made={calls_made!r}"
            )
        if calls_made >= self.attempts or not self.retries(exc):
            return None
        bound = self.backoff_bound(calls_made)
        wait = rng.uniform(0.0, bound) if self.jitter else bound
        server = _server_wait(exc, now)
        if server is None:
            return wait
        if server > self.max_retry_after or server == math.inf:
            # Not even max_retry_after=inf sleeps forever.
            return None
        return max(wait, server)


def retry_kind(exc: BaseException) -> int:
    """Which allowance of the retry budget a retry after ``exc`` draws on.

    ``THROTTLE`` (0) for a throttle: a :class:`RetryAfter`, or an HTTP 429,
    503 or 529 (overloaded), or an ``ExceptionGroup`` holding one (a TaskGroup in the function
    failed with it, as :func:`retry_after_seconds` reads the group's waits);
    ``ERROR`` (1) for everything else.
    """
    if isinstance(exc, RetryAfter) or _status(exc) in _THROTTLE_STATUSES:
        return THROTTLE
    # A group in which the server refused part of the work: that is what slows a
    # rate="auto" and what the throttles' allowance is for.
    if isinstance(exc, BaseExceptionGroup) and any(
        retry_kind(leaf) == THROTTLE for leaf in exc.exceptions
    ):
        return THROTTLE
    return ERROR


def as_retry(retries: int | Retry | None) -> Retry | None:
    """Normalise ``map(retries=)``: None when no retry is wanted, else a :class:`Retry`.

    ``None`` and ``0`` mean no retry; an int N >= 1 means N retries, that is
    ``Retry(attempts=N + 1)`` with the default backoff; a :class:`Retry` is
    returned as it is.

    Raises:
        TypeError: ``retries`` is neither an int nor a Retry (``True`` included).
        ValueError: ``retries`` is a negative int.
    """
    if retries is None or isinstance(retries, Retry):
        return retries
    message = f"retries must be an int >= 0 or a corral.Retry; got retries={retries!r}"
    if not is_integral(retries):
        raise TypeError(message)
    if retries < 0:
        raise ValueError(message)
    if retries == 0:
        return None
    return Retry(attempts=int(retries) + 1)
