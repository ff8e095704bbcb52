"""Edge cases of failure classification and Retry-After parsing."""

from __future__ import annotations

import io
import math
import pickle
import random
import urllib.error
from datetime import UTC
from email.utils import format_datetime
from typing import Any

import httpx
import multidict
import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral import RetryBudget
from corral._retry import Retry, retry_after_seconds, transient
from test_retry import Response, ResponseError  # the duck-typed HTTP error shapes


def httpx_error(status: int, headers: Any = None) -> httpx.HTTPStatusError:
    """A real httpx HTTPStatusError, as raise_for_status() builds it."""
    request = httpx.Request("GET", "http://127.0.0.1/")
    response = httpx.Response(status, headers=headers, request=request)
    return httpx.HTTPStatusError(f"status {status}", request=request, response=response)


def urllib_error(status: int) -> urllib.error.HTTPError:
    """urllib's HTTPError: an OSError that carries an HTTP status."""
    return urllib.error.HTTPError("http://127.0.0.1/", status, "status", {}, io.BytesIO())  # type: ignore[arg-type]


@pytest.mark.parametrize("status", [400, 403, 404, 422, 501])
def test_an_oserror_carrying_a_final_status_is_not_retried(status: int) -> None:
    """urllib's HTTPError is an OSError, but its status decides: a 404 stays a 404."""
    assert transient(urllib_error(status)) is False
    assert Retry().next_wait(urllib_error(status), 1, random.Random(0)) is None


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_an_oserror_carrying_a_transient_status_is_retried(status: int) -> None:
    """urllib's HTTPError with an overload status is retried like any other."""
    assert transient(urllib_error(status)) is True


def test_an_oserror_with_a_non_http_status_is_still_an_oserror() -> None:
    """A status outside 100-599 is no HTTP status: the OSError rule applies."""

    class LinkDown(OSError):
        status = 0

    assert transient(LinkDown()) is True


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["7", "8"], 7.0),
        (["soon", "8"], 8.0),
        (["Wed, 21 Oct 2015 07:28:30 GMT", "Wed, 21 Oct 2015 07:29:00 GMT"], 30.0),
        (["junk", "Wed, 21 Oct 2015 07:29:00 GMT"], 60.0),
    ],
)
def test_repeated_retry_after_headers_use_the_first_valid_value(
    values: list[str], expected: float
) -> None:
    """httpx joins repeated headers with ", "; the first valid value is honoured."""
    from datetime import UTC, datetime

    now = datetime(2015, 10, 21, 7, 28, tzinfo=UTC).timestamp()
    exc = httpx_error(429, [("Retry-After", value) for value in values])
    assert retry_after_seconds(exc, now=now) == pytest.approx(expected)


@pytest.mark.parametrize(
    "headers",
    [{b"Retry-After": b"7"}, {b"retry-after": "7"}, {"Retry-After": b"7"}],
    ids=repr,
)
def test_retry_after_as_bytes_is_read(headers: dict[Any, Any]) -> None:
    """Headers of a lower-level client arrive as bytes; they are read as Latin-1 text."""
    assert retry_after_seconds(ResponseError(Response(503, headers))) == 7.0


def test_undecodable_bytes_are_ignored() -> None:
    """A bytes value that is no number (or not even text) is ignored, not raised."""
    headers = {b"Retry-After": b"\xff\xfe"}
    assert retry_after_seconds(ResponseError(Response(503, headers))) is None


@pytest.mark.parametrize("value", ["9" * 400, "9" * 400 + ".5", "1" + "0" * 309])
def test_a_retry_after_too_long_for_a_float_fails_the_item(value: str) -> None:
    """A wait beyond any float is beyond every cap: the failure is final, not retried at once."""
    exc = httpx_error(429, {"Retry-After": value})
    assert retry_after_seconds(exc) is None  # no usable number: no limiter cooldown either
    assert Retry().next_wait(exc, 1, random.Random(0)) is None
    # Not even an endless cap sleeps forever.
    assert Retry(max_retry_after=math.inf).next_wait(exc, 1, random.Random(0)) is None


def test_retry_after_ms_too_long_for_a_float_fails_the_item() -> None:
    """retry-after-ms past the float range means an endless wait, too."""
    exc = httpx_error(503, {"retry-after-ms": "9" * 400, "Retry-After": "1"})
    assert Retry().next_wait(exc, 1, random.Random(0)) is None


def test_a_group_of_transient_failures_is_transient() -> None:
    """A TaskGroup inside the function fails with an ExceptionGroup: its leaves decide."""
    group = ExceptionGroup("fan-out", [ConnectionResetError(), httpx_error(503)])
    nested = ExceptionGroup("outer", [group, TimeoutError()])
    assert transient(group) is True
    assert transient(nested) is True
    assert Retry(jitter=False).next_wait(nested, 1, random.Random(0)) == 0.1


def test_a_group_with_one_final_failure_is_final() -> None:
    """One bug or 404 among the leaves makes the whole group final."""
    assert transient(ExceptionGroup("g", [ConnectionError(), ValueError()])) is False
    assert transient(ExceptionGroup("g", [ExceptionGroup("h", [httpx_error(404)])])) is False


def test_a_group_honours_the_longest_server_wait() -> None:
    """The largest Retry-After among the leaves is the group's, and its cap applies."""
    group = ExceptionGroup(
        "g",
        [
            httpx_error(429, {"Retry-After": "3"}),
            ExceptionGroup("h", [httpx_error(503, {"Retry-After": "9"})]),
            ConnectionError(),
        ],
    )
    assert retry_after_seconds(group) == 9.0
    assert retry_after_seconds(ExceptionGroup("g", [ConnectionError()])) is None
    assert Retry(jitter=False).next_wait(group, 1, random.Random(0)) == 9.0
    assert Retry(max_retry_after=5).next_wait(group, 1, random.Random(0)) is None


@pytest.mark.parametrize(
    "date",
    [
        "Wed, 21 Oct 2015 07:28:30 GMT",  # IMF-fixdate
        "Wednesday, 21-Oct-15 07:28:30 GMT",  # obsolete RFC 850
        "Wed Oct 21 07:28:30 2015",  # obsolete asctime
        "  Wed,   21 Oct 2015 07:28:30 GMT  ",
    ],
)
def test_every_http_date_form_is_read(date: str) -> None:
    """RFC 9110 asks recipients to accept all three HTTP-date forms."""
    from datetime import UTC, datetime

    now = datetime(2015, 10, 21, 7, 28, tzinfo=UTC).timestamp()
    assert retry_after_seconds(httpx_error(503, {"Retry-After": date}), now=now) == 30.0


header_text = st.one_of(
    st.text(max_size=60),
    st.binary(max_size=60),
    st.from_regex(r"\s*[0-9]{0,400}(\.[0-9]{0,5})?\s*", fullmatch=True),
    st.datetimes(timezones=st.just(UTC)).map(lambda d: format_datetime(d, usegmt=True)),
)


@given(
    name=st.sampled_from(["Retry-After", "retry-after-ms", b"Retry-After", "Retry-After-Ms"]),
    values=st.lists(header_text, min_size=1, max_size=3),
    status=st.sampled_from([429, 503]),
)
def test_parsing_never_raises_nor_gives_a_negative_or_nan_wait(
    name: str | bytes, values: list[str | bytes], status: int
) -> None:
    """Whatever the server sends, the wait is None, a number >= 0, or inf (fails the item)."""
    headers = multidict.CIMultiDict()
    for value in values:
        headers.add(name if isinstance(name, str) else name.decode(), value)  # type: ignore[arg-type]
    for exc in (
        ResponseError(Response(status, headers)),
        ResponseError(Response(status, dict(headers))),
    ):
        wait = retry_after_seconds(exc, now=0.0)
        assert wait is None or wait >= 0.0  # NaN fails >= 0
        policy_wait = Retry(max_retry_after=math.inf).next_wait(exc, 1, random.Random(0))
        assert policy_wait is None or 0.0 <= policy_wait < math.inf


def test_a_raising_predicate_surfaces_its_own_error() -> None:
    """A bug in on= is not mistaken for "do not retry": its exception propagates."""

    def broken(exc: BaseException) -> bool:
        raise LookupError("bug in the predicate")

    with pytest.raises(LookupError, match="bug in the predicate"):
        Retry(on=broken).next_wait(ConnectionError(), 1, random.Random(0))


@pytest.mark.parametrize(
    "policy",
    [
        Retry(),
        Retry(attempts=5, backoff=1, max_backoff=4, jitter=False, on=(KeyError, OSError)),
        Retry(on=transient, budget=0.2, max_retry_after=math.inf),
        Retry(budget=None, max_retry_after=10**400),
    ],
    ids=repr,
)
def test_a_retry_pickles_to_an_equal_hashable_value(policy: Retry) -> None:
    """Retry crosses process boundaries (processes=N) and stays equal, hashable and shown alike."""
    copy = pickle.loads(pickle.dumps(policy))
    assert copy == policy
    assert hash(copy) == hash(policy)
    assert repr(copy) == repr(policy)


def test_equal_settings_make_equal_retries() -> None:
    """Ints and floats, a ratio and its RetryBudget, are the same policy."""
    assert Retry(backoff=1, max_backoff=2, max_retry_after=60) == Retry(
        backoff=1.0, max_backoff=2.0, max_retry_after=60.0
    )
    assert Retry(budget=0.2) == Retry(budget=RetryBudget(ratio=0.2))
    assert len({Retry(), Retry(), Retry(attempts=4)}) == 2


def test_a_header_of_many_commas_is_read_in_bounded_work() -> None:
    """Only the first few repeats are looked at; the first valid one still counts."""
    exc = httpx_error(429, {"Retry-After": "x," * 100_000 + "5"})
    assert retry_after_seconds(exc) is None
    assert retry_after_seconds(httpx_error(429, {"Retry-After": "x, 4," + "y," * 100_000})) == 4.0


def test_anthropic_s_overloaded_529_is_a_throttle_retried_by_default() -> None:
    """The SDK's own error for a 529 ("overloaded"), which its retries would cover
    and ``max_retries=0`` hands to corral: retried, a throttle, and a drop for auto."""
    anthropic = pytest.importorskip("anthropic")
    import httpx

    from corral._limits import outcome_of
    from corral._retry import retry_kind, transient
    from corral._retry_budget import THROTTLE

    request = httpx.Request("POST", "http://127.0.0.1/v1/messages")
    overloaded = anthropic.InternalServerError(
        "overloaded", response=httpx.Response(529, request=request), body=None
    )
    assert transient(overloaded)
    assert retry_kind(overloaded) == THROTTLE
    assert outcome_of(overloaded) == "drop"
    final = anthropic.NotFoundError(
        "no such model", response=httpx.Response(404, request=request), body=None
    )
    assert not transient(final)
