"""sync_headers with nothing left: starts resume at the server's refill pace, not after its reset.

OpenAI's ``x-ratelimit-reset-*`` and Anthropic's ``anthropic-ratelimit-*-reset``
say when the bucket is *full* again; both refill continuously, so with the
bucket's size (``-limit-``) the next unit is back after ``reset / (limit -
remaining)`` seconds, long before the reset.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest

import corral
from _limiting import now, starts
from corral import Rate
from corral._headers import RateHeader, read_rate_limits, refill_wait


def _rfc3339_in(seconds: float) -> str:
    """An Anthropic-style reset: the wall-clock time ``seconds`` from now."""
    return datetime.fromtimestamp(time.time() + seconds, UTC).isoformat()


# -- what the headers say ------------------------------------------------------------


def test_refill_wait_is_the_missing_units_at_the_servers_pace() -> None:
    # 500 per minute, none left, full in 60 s: one more request in 0.12 s.
    assert refill_wait(0, 1, reset=60.0, limit=500, interval=0.5) == pytest.approx(0.12)
    # 20 of 6,000 tokens left, full in 59.8 s (0.01 s a token): 100 tokens in 0.8 s.
    assert refill_wait(20, 100, reset=59.8, limit=6_000, interval=1.0) == pytest.approx(0.8)
    # Never later than the reset: by then the bucket is full.
    assert refill_wait(0, 900, reset=6.0, limit=600, interval=1.0) == 6.0
    # Enough left: no wait.
    assert refill_wait(5, 5, reset=60.0, limit=500, interval=1.0) == 0.0
    # Without the bucket's size its pace is unknown: the reset, the one sure time.
    assert refill_wait(0, 1, reset=7.0, limit=None, interval=0.1) == 7.0
    # A "limit" no larger than what remains tells nothing about the pace either.
    assert refill_wait(0.5, 1, reset=7.0, limit=0.5, interval=0.1) == 7.0
    # Without a reset, the local rate's own pace.
    assert refill_wait(0, 3, reset=None, limit=500, interval=0.1) == pytest.approx(0.3)


def test_the_budgets_sizes_are_read_in_both_styles() -> None:
    openai = {
        "x-ratelimit-limit-requests": "500",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "120ms",
        "X-RateLimit-Limit-Output-Tokens": "20000",  # split token limits (corral serve --llm)
        "x-ratelimit-remaining-output-tokens": "150",
        "x-ratelimit-reset-output-tokens": "59.55s",
        "x-ratelimit-limit-tokens": "0",  # not a size: ignored
        "x-ratelimit-remaining-tokens": "10",
    }
    assert sorted(read_rate_limits(openai)) == [
        RateHeader("output_tokens", 150.0, pytest.approx(59.55), 20_000.0),
        RateHeader("requests", 0.0, pytest.approx(0.12), 500.0),
        RateHeader("tokens", 10.0, None, None),
    ]
    anthropic = {
        "anthropic-ratelimit-output-tokens-limit": "8000",
        "anthropic-ratelimit-output-tokens-remaining": "0",
        "anthropic-ratelimit-output-tokens-reset": _rfc3339_in(30.0),
        "anthropic-ratelimit-requests-limit": "lots",  # unreadable: no size
        "anthropic-ratelimit-requests-remaining": "49",
    }
    [output, requests] = sorted(read_rate_limits(anthropic))
    assert output.dimension == "output_tokens"
    assert (output.remaining, output.limit) == (0.0, 8_000.0)
    assert output.reset == pytest.approx(30.0, abs=0.5)
    assert requests == RateHeader("requests", 49.0, None, None)


# -- the clamp, on virtual time ---------------------------------------------------------


@pytest.mark.virtual_time
async def test_no_request_left_waits_for_one_request_not_for_the_full_reset() -> None:
    """OpenAI: 0 of 500 left, full in 60 s: the bucket gives one back every 0.12 s."""
    limiter = corral.Limiter(rate=Rate(500, per=60, burst=5))
    limiter.sync_headers(
        {
            "x-ratelimit-limit-requests": "500",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "1m0s",
        }
    )
    # Then the rate's own pace (0.12 s), without the burst it had in hand.
    assert await starts(limiter, 3) == pytest.approx([0.12, 0.24, 0.36])


@pytest.mark.virtual_time
async def test_never_faster_than_the_server_refills() -> None:
    """The server's bucket (60 a minute) refills slower than the local rate (600 a minute)."""
    limiter = corral.Limiter(rate=Rate(600, per=60))
    limiter.sync_headers(
        {
            "x-ratelimit-limit-requests": "60",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "60s",
        }
    )
    # One a second, the server's pace, not one every 0.1 s...
    assert await starts(limiter, 3) == pytest.approx([1.0, 2.0, 3.0])
    # ...until the server's bucket is half full again: then the rate's own pace.
    limiter.sync_headers(
        {
            "x-ratelimit-limit-requests": "60",
            "x-ratelimit-remaining-requests": "30",
            "x-ratelimit-reset-requests": "30s",
        }
    )
    assert await starts(limiter, 3) == pytest.approx([4.0, 4.1, 4.2])


@pytest.mark.virtual_time
async def test_a_token_rate_above_the_servers_follows_its_pace_while_it_is_short() -> None:
    """Told 12,000 output tokens a minute, the server allows 6,000: after it says none are
    left, starts of 100 tokens go one a second (its pace), not two (the rate's)."""
    limiter = corral.Limiter(rate=Rate({"requests": 600, "output_tokens": 12_000}, per=60))
    cost = {"output_tokens": 100.0}
    await limiter.acquire(cost)
    limiter.release()
    headers = {
        "anthropic-ratelimit-output-tokens-limit": "6000",
        "anthropic-ratelimit-output-tokens-remaining": "0",
        "anthropic-ratelimit-output-tokens-reset": _rfc3339_in(60.0),
    }
    limiter.sync_headers(headers)
    assert await starts(limiter, 3, cost) == pytest.approx([1.0, 2.0, 3.0], abs=1e-3)
    # Room again (more than a start needs, but under half the bucket): still its pace.
    headers["anthropic-ratelimit-output-tokens-remaining"] = "500"
    limiter.sync_headers(headers)
    assert await starts(limiter, 1, cost) == pytest.approx([4.0], abs=1e-3)
    # Half full: the rate's own pace (0.5 s per 100 tokens) again.
    headers["anthropic-ratelimit-output-tokens-remaining"] = "3000"
    limiter.sync_headers(headers)
    assert await starts(limiter, 2, cost) == pytest.approx([5.0, 5.5], abs=1e-3)


@pytest.mark.virtual_time
async def test_no_tokens_left_waits_for_what_a_start_takes_at_the_refill_pace() -> None:
    """Anthropic: output tokens 0 of 6,000, full at an RFC 3339 time 60 s away.

    The latest start reserved 100 output tokens: the next waits for 100 tokens
    to come back (1 s at 100 a second), not for the whole minute.
    """
    limiter = corral.Limiter(rate=Rate({"requests": 600, "output_tokens": 6_000}, per=60, burst=10))
    cost = {"output_tokens": 100.0}
    await limiter.acquire(cost)  # t=0; the local burst would allow the next at 0.1
    limiter.release()
    limiter.sync_headers(
        {
            "anthropic-ratelimit-output-tokens-limit": "6000",
            "anthropic-ratelimit-output-tokens-remaining": "0",
            "anthropic-ratelimit-output-tokens-reset": _rfc3339_in(60.0),
        }
    )
    started = await starts(limiter, 3, cost)
    assert started == pytest.approx([1.0, 2.0, 3.0], abs=1e-3)


@pytest.mark.virtual_time
async def test_tokens_left_must_cover_what_the_next_start_takes() -> None:
    """150 tokens left, starts of 100: one goes now, the next when 50 more are back."""
    limiter = corral.Limiter(
        rate=Rate({"requests": 100, "tokens": 1_000}, per=1, burst=51)  # 500 tokens of lead
    )
    cost = {"tokens": 100.0}
    await limiter.acquire(cost)  # t=0: the latest start took 100
    limiter.release()
    limiter.sync_headers(
        {
            "x-ratelimit-limit-tokens": "1000",
            "x-ratelimit-remaining-tokens": "150",
            "x-ratelimit-reset-tokens": "850ms",
        }
    )
    # 150 covers one start of 100 (50 left); the next needs 50 more (0.05 s), then the pace.
    assert await starts(limiter, 3, cost) == pytest.approx([0.0, 0.05, 0.15])


@pytest.mark.virtual_time
async def test_a_limit_only_limiter_cools_down_until_one_request_is_back() -> None:
    limiter = corral.Limiter(limit=4)
    limiter.sync_headers(
        {
            "x-ratelimit-limit-requests": "500",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "60s",
        }
    )
    assert limiter.cooling_down
    await limiter.acquire()
    # 0.12 s, then the cooldown's short jittered ramp: nowhere near the 60 s reset.
    assert 0.12 <= now() < 0.5
    limiter.release()


def test_a_clamp_carries_over_to_the_next_event_loop() -> None:
    """Clamped on one loop, used on the next: the wait carries over, and only the wait."""
    limiter = corral.Limiter(rate=Rate({"requests": 500, "tokens": 100_000}, per=60))
    headers = {
        "x-ratelimit-limit-requests": "500",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "60s",
    }

    async def clamp() -> None:
        limiter.sync_headers(headers)

    async def start() -> float:
        began = time.perf_counter()
        await limiter.acquire({"tokens": 10})
        limiter.release()
        return time.perf_counter() - began

    asyncio.run(clamp())
    # 0.12 s for the next request (as if no time passed between the loops), not 60 s:
    # bounds far from both, so a loaded machine cannot make it flake.
    assert asyncio.run(asyncio.wait_for(start(), 30.0)) < 10.0
