"""The retry policy: which failures are retried, the backoff schedule, server-directed waits."""

from __future__ import annotations

import asyncio
import math
import pickle
import random
import socket
from datetime import UTC, datetime
from email.utils import format_datetime
from fractions import Fraction
from typing import Any

import aiohttp
import httpx
import multidict
import pytest
import yarl
from hypothesis import given
from hypothesis import strategies as st

from corral._retry import Retry, RetryAfter, as_retry, retry_after_seconds, transient

# A fixed wall-clock instant for HTTP-date tests: 2015-10-21 07:28:00 UTC.
NOW = datetime(2015, 10, 21, 7, 28, tzinfo=UTC).timestamp()


def aiohttp_error(status: int, headers: Any = None) -> aiohttp.ClientResponseError:
    """A real aiohttp ClientResponseError, as raise_for_status() builds it."""
    url = yarl.URL("http://127.0.0.1/")
    info = aiohttp.RequestInfo(
        url=url, method="GET", headers=multidict.CIMultiDictProxy(multidict.CIMultiDict())
    )
    return aiohttp.ClientResponseError(
        request_info=info, history=(), status=status, headers=headers
    )


def httpx_error(status: int, headers: dict[str, str] | None = None) -> httpx.HTTPStatusError:
    """A real httpx HTTPStatusError, as raise_for_status() builds it."""
    request = httpx.Request("GET", "http://127.0.0.1/")
    response = httpx.Response(status, headers=headers, request=request)
    return httpx.HTTPStatusError(f"status {status}", request=request, response=response)


def schedule(policy: Retry, exc: BaseException, rng: random.Random | None = None) -> list[float]:
    """The waits next_wait gives after each failed call until it says stop."""
    rng = rng or random.Random(0)
    waits: list[float] = []
    calls = 1
    while (wait := policy.next_wait(exc, calls, rng)) is not None:
        waits.append(wait)
        calls += 1
    return waits


# --- RetryAfter -----------------------------------------------------------------


def test_retry_after_keeps_seconds_as_float() -> None:
    """RetryAfter(2) stores 2.0 seconds and says so in its message."""
    exc = RetryAfter(2)
    assert exc.seconds == 2.0
    assert isinstance(exc.seconds, float)
    assert str(exc) == "retry after 2 s"
    assert str(RetryAfter(0.25)) == "retry after 0.25 s"


def test_retry_after_survives_pickling() -> None:
    """A RetryAfter crosses a process boundary intact (worker processes send failures back)."""
    exc = pickle.loads(pickle.dumps(RetryAfter(1.5)))
    assert isinstance(exc, RetryAfter)
    assert exc.seconds == 1.5


@pytest.mark.parametrize("seconds", [-1, -0.001, math.nan, math.inf])
def test_retry_after_rejects_bad_values(seconds: float) -> None:
    """A negative, NaN or infinite wait is refused with a message naming it."""
    with pytest.raises(
        ValueError,
        match=rf"^RetryAfter\(seconds={seconds!r}\): seconds must be a finite number >= 0 "
        r"\(the least wait before the next call\)$",
    ):
        RetryAfter(seconds)


@pytest.mark.parametrize("seconds", ["5", True, None])
def test_retry_after_rejects_non_numbers(seconds: Any) -> None:
    """A string, a bool or None is not a number of seconds."""
    with pytest.raises(
        TypeError,
        match=rf"^RetryAfter\(seconds={seconds!r}\): seconds must be a number of seconds "
        r"\(int or float\), like RetryAfter\(2\.5\)$",
    ):
        RetryAfter(seconds)


# --- Retry validation -------------------------------------------------------------


def test_retry_defaults() -> None:
    """The defaults are 3 calls, 0.1 s doubling to 30 s, full jitter, transient failures, 120 s."""
    policy = Retry()
    assert (policy.attempts, policy.backoff, policy.max_backoff) == (3, 0.1, 30.0)
    assert policy.jitter is True
    assert policy.on is None
    assert policy.max_retry_after == 120.0


def test_retry_is_frozen_and_picklable() -> None:
    """A Retry cannot be changed after creation and pickles to an equal value."""
    policy = Retry(attempts=5, jitter=False, on=ValueError)
    with pytest.raises(AttributeError):
        policy.attempts = 9  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(policy)) == policy


ATTEMPTS_MESSAGE = r"attempts must be an int >= 1 \(the total number of calls\)$"


@pytest.mark.parametrize("attempts", [0, -3])
def test_retry_rejects_attempts_below_one(attempts: int) -> None:
    """attempts counts calls, so fewer than one is refused."""
    with pytest.raises(ValueError, match=rf"^Retry\(attempts={attempts}\): {ATTEMPTS_MESSAGE}"):
        Retry(attempts=attempts)


@pytest.mark.parametrize(
    ("attempts", "shown"), [(True, "True"), (2.0, r"2\.0"), ("3", "'3'"), (None, "None")]
)
def test_retry_rejects_attempts_that_are_not_ints(attempts: Any, shown: str) -> None:
    """attempts must be an int; a bool, a float or a string is refused."""
    with pytest.raises(TypeError, match=rf"^Retry\(attempts={shown}\): {ATTEMPTS_MESSAGE}"):
        Retry(attempts=attempts)


@pytest.mark.parametrize(
    ("field", "meaning"),
    [("backoff", "the first retry's wait"), ("max_backoff", "the cap on the backoff wait")],
)
@pytest.mark.parametrize(
    ("value", "shown"), [(-0.5, r"-0\.5"), (math.nan, "nan"), (math.inf, "inf")]
)
def test_retry_rejects_bad_backoff_values(
    field: str, meaning: str, value: float, shown: str
) -> None:
    """backoff and max_backoff must be finite and >= 0."""
    with pytest.raises(
        ValueError,
        match=rf"^Retry\({field}={shown}\): {field} must be a finite number of seconds >= 0 "
        rf"\({meaning}\)$",
    ):
        Retry(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["backoff", "max_backoff"])
@pytest.mark.parametrize(("value", "shown"), [("1", "'1'"), (False, "False"), (None, "None")])
def test_retry_rejects_backoff_that_is_not_a_number(field: str, value: Any, shown: str) -> None:
    """backoff and max_backoff must be numbers; a bool is not one."""
    with pytest.raises(TypeError, match=rf"^Retry\({field}={shown}\): {field} must be a finite"):
        Retry(**{field: value})


def test_retry_rejects_max_backoff_below_backoff() -> None:
    """A cap below the first wait is a mistake; the message shows the fix."""
    with pytest.raises(
        ValueError,
        match=r"^Retry\(backoff=60, max_backoff=30\.0\): max_backoff must be >= backoff; "
        r"raise it, e\.g\. Retry\(backoff=60, max_backoff=60\)$",
    ):
        Retry(backoff=60)


def test_retry_accepts_int_seconds_and_zero_backoff() -> None:
    """Ints are fine for seconds, and backoff=0 (retry at once) is allowed."""
    assert Retry(backoff=1, max_backoff=2).max_backoff == 2
    assert Retry(backoff=0, max_backoff=0).backoff == 0


@pytest.mark.parametrize("jitter", [1, "yes", None])
def test_retry_rejects_jitter_that_is_not_a_bool(jitter: Any) -> None:
    """jitter is True or False, not a truthy value."""
    with pytest.raises(
        TypeError, match=rf"^Retry\(jitter={jitter!r}\): jitter must be True or False$"
    ):
        Retry(jitter=jitter)


@pytest.mark.parametrize(
    ("on", "shown"),
    [
        (int, "<class 'int'>"),
        ((), r"\(\)"),
        ((ValueError, int), r"\(<class 'ValueError'>, <class 'int'>\)"),
        ((ValueError, "KeyError"), r"\(<class 'ValueError'>, 'KeyError'\)"),
        ("ValueError", "'ValueError'"),
        (42, "42"),
    ],
)
def test_retry_rejects_on_that_is_not_types_or_a_predicate(on: Any, shown: str) -> None:
    """on must be an exception type, a non-empty tuple of them, or a callable."""
    with pytest.raises(
        TypeError,
        match=rf"^Retry\(on={shown}\): on must be an exception type, a non-empty tuple of "
        r"exception types, or a predicate exc -> bool \(None: corral\.transient\)$",
    ):
        Retry(on=on)


@pytest.mark.parametrize(
    ("value", "error", "shown"),
    [(-1, ValueError, "-1"), (math.nan, ValueError, "nan"), ("60", TypeError, "'60'")],
)
def test_retry_rejects_bad_max_retry_after(value: Any, error: type[Exception], shown: str) -> None:
    """max_retry_after must be a number >= 0."""
    with pytest.raises(
        error,
        match=rf"^Retry\(max_retry_after={shown}\): max_retry_after must be a number of "
        r"seconds >= 0 \(math\.inf for no cap\)$",
    ):
        Retry(max_retry_after=value)


def test_next_wait_rejects_calls_made_below_one() -> None:
    """next_wait runs after a failed call, so calls_made starts at 1."""
    with pytest.raises(
        ValueError,
        match=r"^calls_made must be >= 1 \(next_wait runs after a failed call\); "
        r"got calls_made=0$",
    ):
        Retry().next_wait(ConnectionError(), 0, random.Random(0))


# --- The backoff schedule -----------------------------------------------------------


def test_schedule_doubles_up_to_the_cap_without_jitter() -> None:
    """With jitter off the waits are exactly backoff * 2**(k-1), capped at max_backoff."""
    policy = Retry(attempts=8, backoff=0.5, max_backoff=5.0, jitter=False)
    assert schedule(policy, ConnectionError()) == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_default_schedule_without_jitter() -> None:
    """The default policy waits 0.1 s then 0.2 s, then gives up after the third call."""
    assert schedule(Retry(jitter=False), TimeoutError()) == [0.1, 0.2]


def test_zero_backoff_retries_at_once() -> None:
    """backoff=0 means every retry follows at once."""
    policy = Retry(attempts=4, backoff=0, max_backoff=0)
    assert schedule(policy, ConnectionError()) == [0.0, 0.0, 0.0]


def test_full_jitter_is_uniform_below_the_bound_and_uses_the_given_rng() -> None:
    """Each jittered wait is rng.uniform(0, bound): in range, and reproducible from the seed."""
    policy = Retry(attempts=12, backoff=0.5, max_backoff=8.0)
    waits = schedule(policy, ConnectionError(), random.Random(1234))
    reference = random.Random(1234)
    bounds = [min(8.0, 0.5 * 2 ** (k - 1)) for k in range(1, 12)]
    assert waits == [reference.uniform(0.0, bound) for bound in bounds]
    assert all(0.0 <= wait <= bound for wait, bound in zip(waits, bounds, strict=True))
    # Jitter really spreads the waits: not every one sits at its bound.
    assert any(wait < bound / 2 for wait, bound in zip(waits, bounds, strict=True))


def test_same_seed_gives_the_same_schedule() -> None:
    """Two runs seeded alike wait alike; another seed waits differently."""
    policy = Retry(attempts=20)
    first = schedule(policy, ConnectionError(), random.Random(7))
    again = schedule(policy, ConnectionError(), random.Random(7))
    other = schedule(policy, ConnectionError(), random.Random(8))
    assert first == again
    assert first != other


@pytest.mark.parametrize("k", [1_025, 2_201, 10_000, 10**18])
def test_huge_retry_numbers_do_not_overflow(k: int) -> None:
    """Retry k = 10_000 (or 10**18) waits max_backoff instead of overflowing."""
    policy = Retry(attempts=k + 1, backoff=0.1, max_backoff=30.0, jitter=False)
    assert policy.backoff_bound(k) == 30.0
    assert policy.next_wait(ConnectionError(), k, random.Random(0)) == 30.0


def test_tiny_backoff_still_reaches_a_huge_cap() -> None:
    """Even the smallest positive backoff doubles up to a cap near the largest float."""
    policy = Retry(backoff=5e-324, max_backoff=1e308)
    assert policy.backoff_bound(1) == 5e-324
    assert policy.backoff_bound(1000) == math.ldexp(5e-324, 999)
    assert policy.backoff_bound(3000) == 1e308


def test_no_retry_after_the_last_attempt() -> None:
    """Once calls_made reaches attempts, the failure is final, whatever it is."""
    policy = Retry(attempts=3, jitter=False)
    rng = random.Random(0)
    assert policy.next_wait(ConnectionError(), 2, rng) == 0.2
    assert policy.next_wait(ConnectionError(), 3, rng) is None
    assert policy.next_wait(RetryAfter(1), 3, rng) is None
    assert Retry(attempts=1).next_wait(ConnectionError(), 1, rng) is None


# --- Which failures are retried -------------------------------------------------------


class StatusError(Exception):
    """A third-party HTTP error that exposes its status like aiohttp does."""

    def __init__(self, status: object) -> None:
        super().__init__(status)
        self.status = status


class Response:
    """Just enough of an HTTP response for duck typing."""

    def __init__(self, status_code: object, headers: object = None) -> None:
        self.status_code = status_code
        self.headers = headers


class ResponseError(Exception):
    """A third-party HTTP error that carries a response like httpx does."""

    def __init__(self, response: object) -> None:
        super().__init__(response)
        self.response = response


class ExplodingError(Exception):
    """An error whose attributes raise when read, as httpx's unset .request does."""

    @property
    def status(self) -> int:
        raise RuntimeError("no status")

    @property
    def response(self) -> Response:
        raise RuntimeError("no response")


TRANSIENT = [
    OSError("disk or network"),
    ConnectionError(),
    ConnectionResetError(),
    ConnectionRefusedError(),
    BrokenPipeError(),
    TimeoutError(),
    TimeoutError(),
    socket.gaierror(-3, "temporary failure in name resolution"),
    RetryAfter(1),
    aiohttp.ClientConnectionError(),
    aiohttp.ServerDisconnectedError(),
    aiohttp.ServerTimeoutError("read timed out"),
    aiohttp.ClientOSError(104, "reset"),
    aiohttp.ClientPayloadError("response payload is not completed"),
    httpx.ConnectTimeout("connect timed out"),
    httpx.ReadTimeout("read timed out"),
    httpx.ConnectError("refused"),
    httpx.RemoteProtocolError("server disconnected without sending a response"),
    httpx.ProxyError("proxy refused"),
    StatusError(503),
    ResponseError(Response(502)),
    *(aiohttp_error(status) for status in (408, 429, 500, 502, 503, 504, 529)),
    *(httpx_error(status) for status in (408, 429, 500, 502, 503, 504, 529)),
]

NOT_TRANSIENT = [
    Exception("plain"),
    TypeError(),
    ValueError(),
    KeyError("k"),
    IndexError(),
    AttributeError(),
    RuntimeError(),
    ZeroDivisionError(),
    NotImplementedError(),
    aiohttp.InvalidURL("not a url"),
    httpx.UnsupportedProtocol("Request URL has an unsupported protocol 'ftp://'."),
    httpx.LocalProtocolError("illegal header"),
    httpx.DecodingError("bad gzip"),
    httpx.InvalidURL("bad"),
    StatusError("503"),
    StatusError(True),
    StatusError(None),
    ResponseError(None),
    ResponseError(Response(503.0)),
    ExplodingError(),
    *(aiohttp_error(status) for status in (400, 401, 403, 404, 409, 422, 501, 505)),
    *(httpx_error(status) for status in (400, 401, 403, 404, 409, 422, 501, 505)),
]

NEVER_RETRIED = [KeyboardInterrupt(), SystemExit(1), asyncio.CancelledError(), GeneratorExit()]


@pytest.mark.parametrize("exc", TRANSIENT, ids=repr)
def test_transient_failures_are_retried_by_default(exc: BaseException) -> None:
    """Network errors, timeouts, RetryAfter and 408/429/5xx-overload statuses are transient."""
    assert transient(exc) is True
    assert Retry(jitter=False).next_wait(exc, 1, random.Random(0)) is not None


@pytest.mark.parametrize("exc", NOT_TRANSIENT, ids=repr)
def test_other_failures_fail_at_once_by_default(exc: BaseException) -> None:
    """Programming errors, other statuses and malformed duck types are final."""
    assert transient(exc) is False
    assert Retry().next_wait(exc, 1, random.Random(0)) is None


@pytest.mark.parametrize("exc", NEVER_RETRIED, ids=repr)
@pytest.mark.parametrize(
    "on",
    [None, BaseException, (KeyboardInterrupt, SystemExit), lambda exc: True],
    ids=["default", "BaseException", "tuple", "predicate"],
)
def test_interrupts_and_cancellation_are_never_retried(exc: BaseException, on: Any) -> None:
    """Interrupts, exits, cancellation and GeneratorExit are final, whatever on says."""
    assert transient(exc) is False
    policy = Retry(attempts=5, on=on)
    assert policy.retries(exc) is False
    assert policy.next_wait(exc, 1, random.Random(0)) is None


def test_on_as_a_type_retries_it_and_its_subclasses_only() -> None:
    """on=ValueError retries ValueError and subclasses, and replaces the default."""
    policy = Retry(on=ValueError, jitter=False)
    rng = random.Random(0)
    assert policy.next_wait(ValueError(), 1, rng) == 0.1
    assert policy.next_wait(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), 1, rng) == 0.1
    assert policy.next_wait(ConnectionError(), 1, rng) is None
    assert policy.next_wait(RetryAfter(1), 1, rng) is None


def test_on_as_a_tuple_retries_any_of_its_types() -> None:
    """on=(KeyError, ConnectionError) retries either, nothing else."""
    policy = Retry(on=(KeyError, ConnectionError))
    assert policy.retries(KeyError("k"))
    assert policy.retries(ConnectionResetError())
    assert not policy.retries(TimeoutError())


def test_on_as_a_predicate_decides_per_exception() -> None:
    """A predicate sees the exception; its truthiness decides."""
    seen: list[BaseException] = []

    def flaky(exc: BaseException) -> bool:
        seen.append(exc)
        return "flaky" in str(exc)

    policy = Retry(on=flaky)
    failure = RuntimeError("flaky backend")
    assert policy.retries(failure) is True
    assert policy.retries(RuntimeError("bug")) is False
    assert seen[0] is failure
    assert Retry(on=lambda exc: 1).retries(ValueError()) is True  # type: ignore[arg-type,return-value]


def test_a_predicate_can_extend_the_default() -> None:
    """transient() composes: retry the defaults plus one domain error."""

    class StaleRead(Exception):
        pass

    policy = Retry(on=lambda exc: transient(exc) or isinstance(exc, StaleRead))
    assert policy.retries(StaleRead())
    assert policy.retries(httpx_error(503))
    assert not policy.retries(ValueError())


# --- Server-directed waits ----------------------------------------------------------


def test_retry_after_seconds_of_a_retry_after() -> None:
    """RetryAfter carries its own wait."""
    assert retry_after_seconds(RetryAfter(2.5)) == 2.5


@pytest.mark.parametrize("make", [aiohttp_error, httpx_error], ids=["aiohttp", "httpx"])
@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"RETRY-AFTER": " 12 "}, 12.0),
        ({"Retry-After": ".5"}, 0.5),
        ({"Retry-After": "0"}, 0.0),
        ({"Retry-After-Ms": "1500", "Retry-After": "7"}, 1.5),
        ({"retry-after-ms": "250.5"}, 0.2505),
        ({"retry-after-ms": "soon", "Retry-After": "7"}, 7.0),
        ({"retry-after-ms": "-5", "Retry-After": "7"}, 7.0),
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:30 GMT"}, 30.0),
        ({"Retry-After": "Wed, 21 Oct 2015 07:30:00 -0000"}, 120.0),
        ({"Retry-After": "Wed, 21 Oct 2015 09:28:00 +0200"}, 0.0),
        ({"Retry-After": "Wed, 21 Oct 2015 07:00:00 GMT"}, 0.0),
        ({"Retry-After": "Wed, 21 Oct 2015"}, None),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": ""}, None),
        ({"Retry-After": "-5"}, None),
        ({"Retry-After": "1e3"}, None),
        ({"Retry-After": "1_000"}, None),
        ({"Retry-After": "nan"}, None),
        ({"Retry-After": "inf"}, None),
        ({"Retry-After": "9" * 400}, None),
        ({"X-RateLimit-Reset": "7"}, None),
        ({}, None),
    ],
)
def test_retry_after_header_parsing(make: Any, headers: dict[str, str], expected: float) -> None:
    """retry-after-ms wins, then Retry-After as seconds or an HTTP-date; garbage is ignored."""
    for status in (429, 503):
        wait = retry_after_seconds(make(status, headers), now=NOW)
        assert wait == (None if expected is None else pytest.approx(expected))


def test_retry_after_date_defaults_to_the_wall_clock() -> None:
    """Without now, an HTTP-date is measured from time.time()."""
    soon = format_datetime(datetime.now(UTC).replace(microsecond=0), usegmt=True)
    later = datetime.fromtimestamp(datetime.now(UTC).timestamp() + 3600, UTC)
    assert retry_after_seconds(aiohttp_error(429, {"Retry-After": soon})) == 0.0
    wait = retry_after_seconds(httpx_error(503, {"Retry-After": format_datetime(later)}))
    assert wait is not None
    assert 3500 < wait <= 3600


def test_retry_after_reads_aiohttp_multidict_headers() -> None:
    """aiohttp hands over a CIMultiDictProxy; it is read like any mapping."""
    headers = multidict.CIMultiDictProxy(multidict.CIMultiDict({"Retry-After": "3"}))
    assert retry_after_seconds(aiohttp_error(429, headers)) == 3.0


@pytest.mark.parametrize(
    "exc",
    [
        aiohttp_error(429, None),
        aiohttp_error(500, {"Retry-After": "7"}),
        aiohttp_error(301, {"Retry-After": "7"}),
        httpx_error(502, {"Retry-After": "7"}),
        StatusError(429),
        ResponseError(Response(429, headers=None)),
        ResponseError(Response(503, headers=42)),
        ResponseError(Response("503", headers={"Retry-After": "7"})),
        ExplodingError(),
        ConnectionError(),
        ValueError(),
    ],
    ids=repr,
)
def test_no_server_wait_without_a_usable_retry_after(exc: BaseException) -> None:
    """Only 429/503 with a readable Retry-After, or a RetryAfter, direct the wait."""
    assert retry_after_seconds(exc, now=NOW) is None


def test_retry_after_survives_headers_that_fail_to_iterate() -> None:
    """A headers object whose items() raises is ignored rather than crashing the run."""

    class BrokenHeaders:
        def items(self) -> Any:
            raise RuntimeError("closed")

    assert retry_after_seconds(ResponseError(Response(429, BrokenHeaders()))) is None


def test_server_wait_is_honoured_beyond_max_backoff() -> None:
    """A server asking for 60 s gets 60 s even though backoff is capped at 1 s."""
    policy = Retry(attempts=5, backoff=0.1, max_backoff=1.0, jitter=False)
    rng = random.Random(0)
    assert policy.next_wait(RetryAfter(60), 1, rng) == 60.0
    assert policy.next_wait(httpx_error(429, {"Retry-After": "60"}), 2, rng) == 60.0
    late = aiohttp_error(503, {"Retry-After": "Wed, 21 Oct 2015 07:29:00 GMT"})
    assert policy.next_wait(late, 3, rng, now=NOW) == 60.0


def test_backoff_wins_over_a_shorter_server_wait() -> None:
    """The wait is the larger of the backoff and the server's."""
    policy = Retry(attempts=5, backoff=0.1, max_backoff=1.0, jitter=False)
    assert policy.next_wait(RetryAfter(0.01), 3, random.Random(0)) == 0.4
    jittered = Retry(attempts=5, backoff=10.0, max_backoff=10.0)
    wait = jittered.next_wait(RetryAfter(2), 1, random.Random(3))
    assert wait == max(2.0, random.Random(3).uniform(0.0, 10.0))


def test_server_wait_above_the_cap_is_final() -> None:
    """A server wait above max_retry_after is not slept through: the failure is final."""
    rng = random.Random(0)
    assert Retry().next_wait(RetryAfter(120), 1, rng) == 120.0
    assert Retry().next_wait(RetryAfter(120.001), 1, rng) is None
    assert Retry().next_wait(aiohttp_error(429, {"Retry-After": "3600"}), 1, rng) is None
    assert Retry(max_retry_after=10).next_wait(RetryAfter(11), 1, rng) is None
    assert Retry(max_retry_after=math.inf).next_wait(RetryAfter(86_400), 1, rng) == 86_400.0


def test_an_unparsable_retry_after_falls_back_to_backoff() -> None:
    """A 503 with a garbage Retry-After is still retried on the normal schedule."""
    exc = httpx_error(503, {"Retry-After": "later, please"})
    assert Retry(jitter=False).next_wait(exc, 2, random.Random(0)) == 0.2


# --- as_retry -------------------------------------------------------------------------


def test_as_retry_counts_retries_not_calls() -> None:
    """retries=N means N retries: Retry(attempts=N + 1) with the default backoff."""
    assert as_retry(1) == Retry(attempts=2)
    assert as_retry(5) == Retry(attempts=6)


@pytest.mark.parametrize("retries", [None, 0])
def test_as_retry_none_and_zero_mean_no_retry(retries: int | None) -> None:
    """retries=0 and retries=None both switch retrying off."""
    assert as_retry(retries) is None


def test_as_retry_passes_a_retry_through() -> None:
    """A Retry is used as it is."""
    policy = Retry(attempts=7, on=KeyError)
    assert as_retry(policy) is policy


@pytest.mark.parametrize(
    ("retries", "error", "shown"),
    [
        (-1, ValueError, "-1"),
        (True, TypeError, "True"),
        (1.5, TypeError, r"1\.5"),
        ("3", TypeError, "'3'"),
        (ValueError, TypeError, "<class 'ValueError'>"),
    ],
)
def test_as_retry_rejects_everything_else(retries: Any, error: type[Exception], shown: str) -> None:
    """Negative ints, bools, floats and strings are refused, naming retries= and the value."""
    with pytest.raises(
        error, match=rf"^retries must be an int >= 0 or a corral\.Retry; got retries={shown}$"
    ):
        as_retry(retries)


# --- Properties ------------------------------------------------------------------------

seconds = st.floats(min_value=0.0, max_value=1e308, allow_nan=False, allow_infinity=False)


@given(
    bounds=st.tuples(seconds, seconds).map(sorted),
    k=st.integers(min_value=1, max_value=10**12),
    jitter=st.booleans(),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_wait_is_finite_and_within_the_cap(
    bounds: list[float], k: int, jitter: bool, seed: int
) -> None:
    """For any backoff, cap and retry number the wait is finite and in [0, max_backoff]."""
    backoff, max_backoff = bounds
    policy = Retry(attempts=k + 1, backoff=backoff, max_backoff=max_backoff, jitter=jitter)
    wait = policy.next_wait(ConnectionError(), k, random.Random(seed))
    assert wait is not None
    assert math.isfinite(wait)
    assert 0.0 <= wait <= max_backoff


@given(
    bounds=st.tuples(seconds, seconds).map(sorted),
    k=st.integers(min_value=1, max_value=3000),
)
def test_unjittered_wait_matches_exact_arithmetic(bounds: list[float], k: int) -> None:
    """Without jitter the wait equals min(max_backoff, backoff * 2**(k-1)) computed exactly."""
    backoff, max_backoff = bounds
    policy = Retry(attempts=k + 1, backoff=backoff, max_backoff=max_backoff, jitter=False)
    exact = Fraction(backoff) * 2 ** (k - 1)
    expected = max_backoff if exact >= Fraction(max_backoff) else float(exact)
    assert policy.next_wait(ConnectionError(), k, random.Random(0)) == expected
