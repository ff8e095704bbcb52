"""Providers' rate-limit headers: parsing, and Limiter.sync_headers on virtual time."""

from __future__ import annotations

import calendar
import math
from typing import Any

import httpx
import multidict
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import corral
from _limiting import now, starts
from corral import Rate
from corral._headers import (
    MAX_RESET,
    RateHeader,
    parse_duration,
    parse_reset,
    read_rate_headers,
    read_rate_limits,
    refill_wait,
)
from corral._limits import MAX_COOLDOWN, RAMP_MAX

NOW = calendar.timegm((2026, 12, 3, 7, 48, 0))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1h2m3.5s", 3723.5),
        ("0.5s", 0.5),
        ("250us", 0.00025),
        ("1.5", 1.5),
        ("7", 7.0),
    ],
)
def test_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "s", "1x", "-1s", "1s2", "m1", "soon", "1e400s", "9" * 400, "9" * 400 + "s"]
)
def test_bad_durations_are_none(text: str) -> None:
    assert parse_duration(text) is None


def test_resets_parse_as_durations_or_rfc3339_times() -> None:
    assert parse_reset("6m0s", now=NOW) == 360.0
    assert parse_reset("2026-12-03T07:48:12Z", now=NOW) == pytest.approx(12.0)
    assert parse_reset("2026-12-03T08:48:00+01:00", now=NOW) == pytest.approx(0.0)
    assert parse_reset("2026-12-03T07:47:00Z", now=NOW) == 0.0  # past: now
    assert parse_reset("2026-12-03T07:48:30", now=NOW) == pytest.approx(30.0)  # naive: UTC
    assert parse_reset("tomorrow", now=NOW) is None


OPENAI = {
    "X-RateLimit-Limit-Requests": "500",
    "x-ratelimit-remaining-requests": "499",
    "x-ratelimit-remaining-tokens": "149984",
    "x-ratelimit-reset-requests": "120ms",
    "x-ratelimit-reset-tokens": "6m0s",
    "content-type": "application/json",
}
ANTHROPIC = {
    "anthropic-ratelimit-requests-remaining": "49",
    "anthropic-ratelimit-requests-reset": "2026-12-03T07:48:12Z",
    "anthropic-ratelimit-input-tokens-remaining": "39000",
    "anthropic-ratelimit-input-tokens-reset": "2026-12-03T07:48:01Z",
    "Anthropic-RateLimit-Output-Tokens-Remaining": "7000",
    "anthropic-ratelimit-output-tokens-reset": "2026-12-03T07:48:02Z",
    "anthropic-ratelimit-tokens-remaining": "46000",
    "request-id": "req_1",
}


@pytest.mark.parametrize(
    "wrap", [dict, multidict.CIMultiDict, httpx.Headers], ids=["dict", "CIMultiDict", "httpx"]
)
def test_openai_and_anthropic_headers_are_read_from_any_mapping(wrap: Any) -> None:
    assert sorted(read_rate_headers(wrap(OPENAI), now=NOW)) == [
        ("requests", 499.0, pytest.approx(0.12)),
        ("tokens", 149984.0, 360.0),
    ]
    assert sorted(read_rate_headers(wrap(ANTHROPIC), now=NOW)) == [
        ("input_tokens", 39000.0, pytest.approx(1.0)),
        ("output_tokens", 7000.0, pytest.approx(2.0)),
        ("requests", 49.0, pytest.approx(12.0)),
        ("tokens", 46000.0, None),
    ]


def test_garbage_and_non_mappings_are_ignored() -> None:
    assert read_rate_headers(None) == []
    assert read_rate_headers(42) == []
    assert read_rate_headers({"x-ratelimit-remaining-requests": "lots"}) == []
    assert read_rate_headers({"x-ratelimit-remaining-requests": "-3"}) == []
    assert read_rate_headers(
        {"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "soon"}
    ) == [("requests", 3.0, None)]


@pytest.mark.virtual_time
async def test_sync_headers_clamps_requests_to_what_remains() -> None:
    """Burst 10 locally, but the server says 3 remain: 3 start now, then the rate's pace."""
    limiter = corral.Limiter(rate=Rate(60, per=60, burst=10))  # one per second, burst 10
    limiter.sync_headers(
        {"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "9s"}
    )
    assert await starts(limiter, 5) == pytest.approx([0.0, 0.0, 0.0, 1.0, 2.0])


@pytest.mark.parametrize("limit", [None, 4])
@pytest.mark.virtual_time
async def test_a_reset_too_large_to_be_a_number_is_ignored(limit: int | None) -> None:
    """It reads as an unreadable reset: it neither fails the call nor blocks later ones."""
    schedules = []
    for reset in ("soon", "9" * 400):
        limiter = corral.Limiter(limit=limit, rate=Rate(10))
        limiter.sync_headers(
            {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": reset}
        )
        assert not limiter.cooling_down
        began = now()
        schedules.append([t - began for t in await starts(limiter, 2)])
    assert schedules[1] == pytest.approx(schedules[0])
    assert schedules[1] == pytest.approx([0.1, 0.2])


@pytest.mark.virtual_time
async def test_nothing_remaining_waits_for_the_reset() -> None:
    limiter = corral.Limiter(rate=Rate({"requests": 600, "output_tokens": 60_000}, per=60))
    limiter.sync_headers(
        {
            "anthropic-ratelimit-output-tokens-remaining": "0",
            "anthropic-ratelimit-output-tokens-reset": "7s",  # a duration is read too
            "x-ratelimit-remaining-widgets": "0",  # unknown: ignored
        }
    )
    assert await starts(limiter, 2, {"output_tokens": 10}) == pytest.approx([7.0, 7.1])


@pytest.mark.virtual_time
async def test_tokens_remaining_clamp_the_token_budget() -> None:
    """1,000 tokens/s locally with 500 of lead; the server says 100 left: 100 tokens' worth."""
    limiter = corral.Limiter(
        rate=Rate({"requests": 100, "tokens": 1_000}, per=1, burst=51)  # tolerance 0.5 s
    )
    limiter.sync_headers({"x-ratelimit-remaining-tokens": "100"})
    # 100 tokens may go ahead of the schedule: two starts of 60 (pay after), then the pace.
    assert await starts(limiter, 3, {"tokens": 60}) == pytest.approx([0.0, 0.0, 0.02])


@pytest.mark.virtual_time
async def test_a_limit_only_limiter_cools_down_when_no_request_remains() -> None:
    limiter = corral.Limiter(limit=4)
    limiter.sync_headers(
        {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s"}
    )
    assert limiter.cooling_down
    await limiter.acquire()
    assert now() >= 2.0
    limiter.release()
    limiter.sync_headers({"x-ratelimit-remaining-tokens": "0"})  # no token rate: ignored


def test_sync_headers_on_a_keyed_limiter_names_the_fix() -> None:
    limiter = corral.Limiter(limit=2, key=str)
    with pytest.raises(TypeError, match=r"call sync_headers\(\) on limiter\.for_item\(item\)"):
        limiter.sync_headers({})


class Throttled(Exception):
    """Like aiohttp's ClientResponseError: a status and the response's headers."""

    def __init__(self, headers: dict[str, str]) -> None:
        super().__init__("429")
        self.status = 429
        self.headers = headers


@pytest.mark.virtual_time
async def test_a_429s_headers_clamp_the_shared_limiter_in_a_map() -> None:
    """A weighted map reads a failure's rate-limit headers by itself."""
    limiter = corral.Limiter(limit=1, rate=Rate({"requests": 6_000, "tokens": 600_000}, per=60))
    starts: list[float] = []

    async def ask(n: int) -> int:
        starts.append(now())
        if n == 0:
            raise Throttled({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "4s"})
        return n

    results = await corral.gather(
        ask, range(3), limit=limiter, cost=lambda n: {"tokens": 1}, return_exceptions=True
    )
    assert isinstance(results[0], Throttled)
    assert starts[1] == pytest.approx(4.0)


# -- garbage from a server: never an error, never a negative or absurd wait -------------


def test_a_reset_further_than_a_day_is_unreadable() -> None:
    """No provider's budget refills over more than a day: such a reset is garbage."""
    assert parse_reset("23h59m", now=NOW) == 86_340.0
    assert parse_reset("24h", now=NOW) == MAX_RESET == 86_400.0
    assert parse_reset("24h0m1s", now=NOW) is None
    assert parse_reset("99999999999999999999h", now=NOW) is None
    assert parse_reset("9" * 300 + "h", now=NOW) is None
    assert parse_reset("2026-12-04T07:48:00Z", now=NOW) == pytest.approx(86_400.0)
    assert parse_reset("9999-12-31T23:59:59Z", now=NOW) is None
    assert read_rate_limits(
        {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "876000h"}
    ) == [RateHeader("requests", 0.0, None, None)]


def test_a_remaining_too_large_to_be_a_number_is_ignored() -> None:
    assert read_rate_limits({"x-ratelimit-remaining-requests": "9" * 400}) == []
    assert read_rate_limits({"x-ratelimit-limit-requests": "9" * 400}) == []


@pytest.mark.virtual_time
async def test_a_limit_only_limiter_cools_down_no_longer_than_a_retry_after_would() -> None:
    """A day-long reset with nothing left: a cooldown of MAX_COOLDOWN, like a Retry-After."""
    limiter = corral.Limiter(limit=4)
    limiter.sync_headers(
        {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "23h"}
    )
    assert limiter.cooling_down
    assert limiter._cool_span == MAX_COOLDOWN == 120.0
    await limiter.acquire()
    assert MAX_COOLDOWN <= now() <= MAX_COOLDOWN + RAMP_MAX * 1.5
    limiter.release()


_HEADER_TEXT = st.one_of(
    st.text(),
    st.text(alphabet="0123456789.:-+TZhmsuµn e"),
    st.from_regex(r"[0-9]{1,400}(\.[0-9]{0,5})?(h|m|s|ms)?", fullmatch=True),
)


@settings(max_examples=500, deadline=None)
@given(remaining=_HEADER_TEXT, reset=_HEADER_TEXT, size=_HEADER_TEXT)
def test_any_header_text_reads_as_nothing_or_a_sane_budget(
    remaining: str, reset: str, size: str
) -> None:
    headers = {
        "x-ratelimit-remaining-tokens": remaining,
        "x-ratelimit-reset-tokens": reset,
        "x-ratelimit-limit-tokens": size,
        "anthropic-ratelimit-requests-remaining": remaining,
        "anthropic-ratelimit-requests-reset": reset,
    }
    for header in read_rate_limits(headers, now=NOW):
        assert 0 <= header.remaining < math.inf
        assert header.reset is None or 0 <= header.reset <= MAX_RESET
        assert header.limit is None or 0 < header.limit < math.inf
        wait = refill_wait(header.remaining, header.remaining + 1, header.reset, header.limit, 0.1)
        assert 0 <= wait <= max(MAX_RESET, 0.1)


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"Retry-After": "5"}, 5.0),
        ({"retry-after": " 1.5 "}, 1.5),
        ({"Retry-After": "0"}, 0.0),
        ({"Retry-After": "Thu, 03 Dec 2026 07:48:30 GMT"}, 30.0),
        ({"Retry-After": "Thu, 03 Dec 2026 07:00:00 GMT"}, 0.0),  # past: no wait
        (  # far: what users of the wait cap (Retry.max_retry_after, MAX_COOLDOWN)
            {"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"},
            calendar.timegm((9999, 12, 31, 23, 59, 59)) - NOW,
        ),
        ({"retry-after-ms": "250", "Retry-After": "9"}, 0.25),
        ({"retry-after-ms": "soon", "Retry-After": "9"}, 9.0),
        ({"Retry-After": "-5"}, None),
        ({"Retry-After": "5s"}, None),
        ({"Retry-After": "nan"}, None),
        ({"Retry-After": "inf"}, None),
        ({"Retry-After": "1e3"}, None),
        ({"Retry-After": "9" * 400}, None),
        ({"Retry-After": "Thu, 99 Dec 2026 07:48:30 GMT"}, None),
        ({"Retry-After": ""}, None),
        ({}, None),
    ],
)
def test_retry_after_reads_seconds_or_a_date_and_nothing_else(
    headers: dict[str, str], seconds: float | None
) -> None:
    wait = corral._retry.retry_after_seconds(Throttled(headers), now=NOW)
    assert wait == (None if seconds is None else pytest.approx(seconds))


@pytest.mark.parametrize(
    "value",
    ["-5", "nan", "inf", "9" * 400, "Fri, 31 Dec 9999 23:59:59 GMT", "garbage", "0"],
)
async def test_a_retry_after_from_a_server_never_fails_a_limiter_nor_pauses_it_for_long(
    value: str,
) -> None:
    """Whatever the header says, record_error neither raises nor pauses beyond MAX_COOLDOWN."""
    for limiter in (corral.Limiter(2), corral.Limiter("auto"), corral.Limiter(2, rate="auto")):
        limiter.record_error(0.01, Throttled({"Retry-After": value}))
        assert 0 <= limiter._cool_span <= MAX_COOLDOWN
        assert limiter.in_flight == 0
