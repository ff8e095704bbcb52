"""The mock LLM API: its limits model (exact, on explicit times), its HTTP shapes, its CLI.

The model (:mod:`corral.lab.llm_model`) takes ``now`` as an argument, so its
admissions and advertised waits are asserted exactly. The HTTP tests are real
requests over loopback with limits far from the test's own pace (a 60 s
minute, latencies of a few ms), so their counts are exact too; time bounds
are lower bounds only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import signal
import sys
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import pytest

import corral
from _loops import run
from corral.cli import main
from corral.lab import llm_bench
from corral.lab.llm_model import (
    Limits,
    OutputLength,
    PeakMeter,
    RateModel,
    estimate_prompt_tokens,
    estimate_tokens,
    format_reset,
)
from corral.lab.llm_server import LLMServer

HANG_GUARD = 30.0

# --------------------------------------------------------------------------
# The limits model, exactly
# --------------------------------------------------------------------------


def test_a_bucket_admits_its_limit_then_refuses_with_the_exact_wait() -> None:
    """6 rpm: six calls at once, the seventh waits exactly 10 s, and is admitted then."""
    model = RateModel(Limits(rpm=6, minute=60.0, accel_start=None))
    admitted = [model.admit("k", {"requests": 1}, now=0.0).admitted for _ in range(7)]
    assert admitted == [True] * 6 + [False]
    refused = model.admit("k", {"requests": 1}, now=4.0)
    assert (refused.admitted, refused.reason) == (False, "requests")
    assert refused.wait_s == pytest.approx(6.0)
    assert refused.state["requests"].remaining == 0
    assert model.admit("k", {"requests": 1}, now=10.0).admitted
    assert not model.admit("k", {"requests": 1}, now=10.0).admitted


def test_every_dimension_must_fit_and_the_longest_wait_is_reported() -> None:
    """A call needs room in every bucket; the refusal names the one that waits longest."""
    limits = Limits(rpm=100, input_tpm=600, output_tpm=60, minute=60.0, accel_start=None)
    model = RateModel(limits)
    first = model.admit("k", {"requests": 1, "input_tokens": 500, "output_tokens": 50}, now=0.0)
    assert first.admitted
    assert first.state["input_tokens"].remaining == 100
    assert first.state["output_tokens"].remaining == 10
    # Input short by 100 (10/s: 10 s), output short by 20 (1/s: 20 s): output decides.
    second = model.admit("k", {"requests": 1, "input_tokens": 200, "output_tokens": 30}, now=0.0)
    assert (second.admitted, second.reason) == (False, "output_tokens")
    assert second.wait_s == pytest.approx(20.0)
    assert second.shortfall == pytest.approx({"input_tokens": 100, "output_tokens": 20})
    # A refused call costs nothing: 20 s later it fits exactly.
    assert model.admit(
        "k", {"requests": 1, "input_tokens": 200, "output_tokens": 30}, 20.0
    ).admitted


def test_a_call_bigger_than_a_full_bucket_is_too_large() -> None:
    """No wait makes it fit: the reason says so and the wait is infinite."""
    model = RateModel(Limits(output_tpm=100, accel_start=None))
    decision = model.admit("k", {"output_tokens": 101}, now=0.0)
    assert (decision.admitted, decision.reason) == (False, "too_large")
    assert decision.wait_s == float("inf")


def test_keys_have_buckets_of_their_own_and_reset_refills_them() -> None:
    """One key's spending leaves another's budget whole."""
    model = RateModel(Limits(rpm=1, accel_start=None))
    assert model.admit("a", {"requests": 1}, now=0.0).admitted
    assert not model.admit("a", {"requests": 1}, now=0.0).admitted
    assert model.admit("b", {"requests": 1}, now=0.0).admitted
    assert model.keys == 2
    model.reset()
    assert model.keys == 0
    assert model.admit("a", {"requests": 1}, now=0.0).admitted


def test_the_acceleration_limit_refuses_a_sharp_ramp_then_grows_and_decays() -> None:
    """120 rpm is 10 per 5 s window; an idle key starts at 5, doubling per busy window."""
    limits = Limits(rpm=120, minute=60.0, accel_start=0.5, accel_growth=2.0, accel_window=5.0)
    model = RateModel(limits)

    def burst(now: float, n: int) -> list[str | None]:
        return [model.admit("k", {"requests": 1}, now).reason for _ in range(n)]

    assert burst(0.0, 7) == [None] * 5 + ["acceleration"] * 2
    refused = model.admit("k", {"requests": 1}, now=1.5)
    assert refused.wait_s == pytest.approx(3.5)  # the window's end
    assert refused.state["requests"].remaining == 118  # well below the published limit
    assert burst(5.0, 11) == [None] * 10 + ["acceleration"]
    assert burst(10.0, 21) == [None] * 20 + ["acceleration"]
    # A busy window then two idle ones: 20 -> 40 at the close, then halved twice.
    assert burst(25.0, 11) == [None] * 10 + ["acceleration"]


def test_the_acceleration_limit_never_binds_a_gentle_ramp() -> None:
    """Half the published rate for 20 s, then all of it: never refused."""
    model = RateModel(Limits(rpm=120, minute=60.0, accel_start=0.5, accel_window=5.0))
    times = [float(i) for i in range(20)] + [20 + i * 0.5 for i in range(400)]
    assert {model.admit("k", {"requests": 1}, now=t).reason for t in times} == {None}


def test_the_acceleration_limit_admits_one_per_window_at_the_least() -> None:
    """At 1 rpm the ramp's start is a twelfth of a request: it still admits one."""
    model = RateModel(Limits(rpm=1, minute=60.0))
    assert model.admit("k", {"requests": 1}, now=0.0).admitted


def test_limits_reject_bad_values_naming_them() -> None:
    with pytest.raises(
        ValueError,
        match=r"^rpm must be a number between 1 and 1000000000000 \(requests per minute, "
        r"or None for no limit\); got rpm=0$",
    ):
        Limits(rpm=0)
    with pytest.raises(ValueError, match=r"^minute must be a number between 0.1 and .*minute=nan$"):
        Limits(minute=float("nan"))
    with pytest.raises(ValueError, match=r"^accel_growth must be a number > 1 and <= 100 .*=1$"):
        Limits(accel_growth=1)
    with pytest.raises(ValueError, match=r"^output_tpm must be .*output_tpm=True$"):
        Limits(output_tpm=True)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0ms"),
        (0.1204, "121ms"),
        (1.0, "1s"),
        (1.5, "1.5s"),
        (360.0, "6m0s"),
        (3725, "1h2m5s"),
    ],
)
def test_reset_durations_are_written_as_openai_writes_them(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text


def test_tokens_are_estimated_from_characters() -> None:
    assert [estimate_tokens(t) for t in ("", "a", "abcd", "abcde")] == [0, 1, 1, 2]
    assert estimate_prompt_tokens(["abcd", "abcdefgh"]) == 3 + (3 + 1) + (3 + 2)
    assert estimate_prompt_tokens(["abcd"], system="ab") == 3 + (3 + 1) + (3 + 1)


def test_output_lengths_parse_and_draw() -> None:
    rng = random.Random(1)
    assert OutputLength.parse(50).draw(rng) == 50
    assert OutputLength.parse("7") == OutputLength("fixed", 7)
    uniform = OutputLength.parse("5:9")
    assert {uniform.draw(rng) for _ in range(200)} == {5, 6, 7, 8, 9}
    lognormal = OutputLength.parse("lognormal:100:0.5")
    draws = sorted(lognormal.draw(rng) for _ in range(2001))
    assert 85 <= draws[1000] <= 115  # the median
    assert min(draws) >= 1
    for bad in (0, "9:5", "lots", (1, 2, 3), True, "lognormal:0:1"):
        with pytest.raises(ValueError, match=r"^output_tokens must be an int like 200, "):
            OutputLength.parse(bad)


@pytest.mark.parametrize(
    "bad",
    [10**20, 1_000_001, (1, 10**7), "lognormal:120:1000", "lognormal:120:4.5", "lognormal:2e6:1"],
)
def test_output_lengths_beyond_the_bounds_are_refused(bad: object) -> None:
    """A length the mock cannot build or a sigma that overflows fails at once, named."""
    with pytest.raises(ValueError, match=r"^output_tokens must be .* lengths from 1 to 1,000,000"):
        OutputLength.parse(bad)


def test_output_lengths_at_the_bounds_draw_within_them() -> None:
    """The widest spread and the longest length still draw lengths from 1 to the maximum."""
    rng = random.Random(2)
    assert OutputLength.parse(1_000_000).draw(rng) == 1_000_000
    widest = OutputLength.parse("lognormal:1000000:4")
    assert all(1 <= widest.draw(rng) <= 1_000_000 for _ in range(200))
    # Built directly, past parse's checks: draw() still neither overflows nor exceeds the bound.
    wild = OutputLength("lognormal", 120, 1000.0)
    draws = {wild.draw(rng) for _ in range(200)}
    assert min(draws) >= 1
    assert max(draws) == 1_000_000


def test_a_minute_longer_than_a_day_is_refused() -> None:
    """Resets a minute of 1e12 s ahead are no date a client can read: refused, named."""
    with pytest.raises(
        ValueError, match=r"^minute must be a number between 0.1 and 86400 .*=1000000000000.0$"
    ):
        Limits(minute=1e12)
    assert Limits(minute=86_400).minute == 86_400


@pytest.mark.parametrize(
    ("field", "bad", "rule"),
    [
        *(
            (name, value, "between 1 and 1000000000000")
            for name in ("rpm", "tpm", "input_tpm", "output_tpm")
            for value in (0.5, 1e-300, 1e13, 1e300, math.inf)
        ),
        *(("minute", value, "between 0.1 and 86400") for value in (1e-300, 0.09, 86_401)),
        *(("accel_start", value, "> 0 and <= 1") for value in (0, 1.5, 1e300)),
        *(("accel_growth", value, "> 1 and <= 100") for value in (1, 0.5, 101, 1e300)),
        *(("accel_window", value, "between 0.001 and 86400") for value in (1e-300, 86_401, 1e300)),
    ],
)
def test_limits_out_of_their_bounds_are_refused(field: str, bad: float, rule: str) -> None:
    """1e-300 s minutes, 1e300 rpm, a growth that overflows the ramp: refused, named."""
    with pytest.raises(ValueError, match=rf"^{field} must be a number {re.escape(rule)} .*"):
        Limits(**{"rpm": 60.0, field: bad})


def test_limits_at_their_bounds_are_accepted_and_the_ramp_stays_finite() -> None:
    """The extremes allowed still admit, and 64 idle windows at growth 100 do not overflow."""
    low = Limits(rpm=1, tpm=1, input_tpm=1, output_tpm=1, minute=0.1, accel_window=0.001)
    high = Limits(rpm=1e12, minute=86_400, accel_start=1, accel_growth=100, accel_window=1.0)
    assert RateModel(low).admit("k", {"requests": 1, "tokens": 1}, now=0.0).admitted
    model = RateModel(high)
    assert model.admit("k", {"requests": 1}, now=0.0).admitted
    assert model.admit("k", {"requests": 1}, now=1e6).admitted  # a million idle windows later


def test_the_peak_meter_sums_a_sliding_minute() -> None:
    meter = PeakMeter(minute=60.0)
    for second in range(120):  # one call a second for two minutes
        meter.add(float(second), 10, 2)
    assert meter.peaks == [60.0, 600.0, 120.0, 720.0]


# --------------------------------------------------------------------------
# Over HTTP
# --------------------------------------------------------------------------

CHAT = {"model": "m", "messages": [{"role": "user", "content": "abcd" * 10}], "max_tokens": 500}


async def _post(
    session: aiohttp.ClientSession, url: str, body: Any, key: str | None = "key-1"
) -> tuple[int, Mapping[str, str], dict[str, Any]]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with session.post(url, data=json.dumps(body), headers=headers) as response:
        return response.status, response.headers.copy(), await response.json()


@pytest.mark.slow
async def test_chat_completions_answer_with_usage_headers_and_429s() -> None:
    """OpenAI's shape, x-ratelimit-* on every answer, 429 with both retry-after headers."""
    async with (
        asyncio.timeout(HANG_GUARD),
        LLMServer(
            rpm=3,
            output_tpm=1_000,
            output_tokens=25,
            latency_ms=1,
            ms_per_token=0.01,
            accel_start=None,
        ) as server,
        aiohttp.ClientSession() as session,
    ):
        url = f"{server.url}/v1/chat/completions"
        status, headers, body = await _post(session, url, CHAT)
        assert status == 200
        assert body["object"] == "chat.completion"
        assert body["usage"] == {"prompt_tokens": 16, "completion_tokens": 25, "total_tokens": 41}
        assert body["choices"][0]["message"]["content"] == "lab " * 25
        assert body["choices"][0]["finish_reason"] == "stop"
        assert headers["x-ratelimit-limit-requests"] == "3"
        assert headers["x-ratelimit-remaining-requests"] == "2"
        assert headers["x-ratelimit-limit-output-tokens"] == "1000"
        assert headers["x-ratelimit-remaining-output-tokens"] == "975"
        assert re.fullmatch(r"\d+(\.\d+)?s|\d+ms", headers["x-ratelimit-reset-requests"])
        capped = await _post(session, url, {**CHAT, "max_tokens": 10})
        assert capped[2]["usage"]["completion_tokens"] == 10
        assert capped[2]["choices"][0]["finish_reason"] == "length"
        await _post(session, url, CHAT)
        status, headers, body = await _post(session, url, CHAT)
        assert status == 429
        assert body["error"]["code"] == "rate_limit_exceeded"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        wait_ms = int(headers["retry-after-ms"])
        assert 19_000 < wait_ms <= 20_000  # one request at 3 per minute: 20 s
        assert headers["retry-after"] == "20"
        other_key = await _post(session, url, CHAT, key="key-2")
        assert other_key[0] == 200
        stats = server.stats()
    assert (stats.requests, stats.ok, stats.rejected) == (5, 4, 1)
    assert stats.rejected_by == {"requests": 1}
    assert (stats.input_tokens, stats.output_tokens) == (64, 85)
    assert stats.rejected_input_tokens == 16
    assert stats.peak_rpm == 4.0
    assert stats.keys == 2


@pytest.mark.slow
async def test_messages_answer_in_anthropic_shape_sharing_the_keys_buckets() -> None:
    """/v1/messages: Anthropic's usage and headers; both endpoints draw on one budget per key."""
    async with (
        asyncio.timeout(HANG_GUARD),
        LLMServer(
            rpm=2,
            input_tpm=1000,
            output_tpm=500,
            output_tokens=30,
            latency_ms=1,
            ms_per_token=0.01,
            accel_start=None,
            minute=3600.0,
        ) as server,
        aiohttp.ClientSession() as session,
    ):
        await _post(session, f"{server.url}/v1/chat/completions", CHAT)
        body = {"model": "m", "max_tokens": 100, "system": "abcd", "messages": CHAT["messages"]}
        async with session.post(
            f"{server.url}/v1/messages", json=body, headers={"x-api-key": "key-1"}
        ) as response:
            status, headers, answer = response.status, response.headers, await response.json()
        assert status == 200
        assert answer["type"] == "message"
        assert answer["content"] == [{"type": "text", "text": "lab " * 30}]
        assert answer["usage"]["input_tokens"] == 16 + 4
        assert answer["usage"]["output_tokens"] == 30
        assert headers["anthropic-ratelimit-requests-remaining"] == "0"
        assert headers["anthropic-ratelimit-input-tokens-remaining"] == str(1000 - 16 - 20)
        assert headers["anthropic-ratelimit-output-tokens-remaining"] == str(500 - 60)
        assert re.fullmatch(
            r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", headers["anthropic-ratelimit-requests-reset"]
        )
        async with session.post(
            f"{server.url}/v1/messages", json=body, headers={"x-api-key": "key-1"}
        ) as response:
            assert response.status == 429
            assert (await response.json())["error"]["type"] == "rate_limit_error"
            assert int(response.headers["retry-after-ms"]) > 0
    assert server.stats().rejected_by == {"requests": 1}


@pytest.mark.slow
async def test_bad_calls_are_refused_and_counted_apart() -> None:
    """No key 401, bad bodies 400, wrong method 405, unknown path 404: none touch a bucket."""
    async with (
        asyncio.timeout(HANG_GUARD),
        LLMServer(rpm=1, output_tpm=10, latency_ms=0, accel_start=None) as server,
        aiohttp.ClientSession() as session,
    ):
        chat = f"{server.url}/v1/chat/completions"
        assert (await _post(session, chat, CHAT, key=None))[0] == 401
        assert (await _post(session, chat, {"model": "m", "messages": []}))[0] == 400
        assert (await _post(session, chat, {**CHAT, "max_tokens": 0}))[0] == 400
        assert (await _post(session, chat, {**CHAT, "stream": True}))[0] == 400
        no_max_tokens = {"model": "m", "messages": CHAT["messages"]}
        status, _, body = await _post(session, f"{server.url}/v1/messages", no_max_tokens)
        assert (status, body["error"]["type"]) == (400, "invalid_request_error")
        status, _, body = await _post(session, chat, {**CHAT, "max_tokens": 11})
        assert status == 400  # 11 output tokens never fit a 10-token bucket
        assert "Request too large" in body["error"]["message"]
        async with session.get(chat) as response:
            assert (response.status, response.headers["Allow"]) == (405, "POST")
        async with session.post(f"{server.url}/v2/nothing") as response:
            assert response.status == 404
        async with session.get(f"{server.url}/_corral/stats") as response:
            stats = await response.json()
    assert (stats["requests"], stats["invalid"], stats["too_large"]) == (1, 7, 1)
    assert stats["ok"] == 0


@pytest.mark.slow
async def test_large_limits_are_written_in_full_where_corral_reads_them() -> None:
    """A 2M tpm is "2000000" in both header styles, never "2e+06", and corral reads it."""
    from corral._headers import read_rate_limits

    async with (
        asyncio.timeout(HANG_GUARD),
        LLMServer(
            rpm=30_000, tpm=2_000_000, output_tpm=1e12, latency_ms=0, ms_per_token=0
        ) as server,
        aiohttp.ClientSession() as session,
    ):
        _, openai, _ = await _post(session, f"{server.url}/v1/chat/completions", CHAT)
        body = {"model": "m", "max_tokens": 5, "messages": CHAT["messages"]}
        async with session.post(
            f"{server.url}/v1/messages", json=body, headers={"x-api-key": "key-2"}
        ) as response:
            anthropic = response.headers.copy()
    assert openai["x-ratelimit-limit-requests"] == "30000"
    assert openai["x-ratelimit-limit-tokens"] == "2000000"
    assert openai["x-ratelimit-limit-output-tokens"] == "1000000000000"
    assert anthropic["anthropic-ratelimit-tokens-limit"] == "2000000"
    read = {h.dimension: h.limit for h in read_rate_limits(openai, now=0.0)}
    assert read == {"requests": 30_000, "tokens": 2_000_000, "output_tokens": 1e12}


#: Each known path of the mock, the one method it takes, and the others tried.
_KNOWN_PATHS = [
    ("/v1/chat/completions", "POST", ("GET", "PUT", "DELETE")),
    ("/v1/messages", "POST", ("GET", "PATCH")),
    ("/_corral/stats", "GET", ("POST", "PUT", "DELETE")),
    ("/_corral/reset", "POST", ("GET", "PUT", "DELETE")),
]


@pytest.mark.slow
async def test_a_wrong_method_on_a_known_path_is_405_with_allow() -> None:
    """Every known path asked the wrong way: 405 and Allow, not 404; nothing is reset."""
    async with (
        asyncio.timeout(HANG_GUARD),
        LLMServer(rpm=1, latency_ms=0, ms_per_token=0, accel_start=None) as server,
        aiohttp.ClientSession() as session,
    ):
        assert (await _post(session, f"{server.url}/v1/chat/completions", CHAT))[0] == 200
        replies = {}
        for path, _, wrong in _KNOWN_PATHS:
            for method in wrong:
                async with session.request(method, server.url + path) as response:
                    replies[method, path] = (response.status, response.headers.get("Allow"))
        async with session.post(f"{server.url}/_corral/nothing") as response:
            unknown = response.status, await response.json()
        stats = server.stats()
    assert replies == {
        (method, path): (405, allowed) for path, allowed, wrong in _KNOWN_PATHS for method in wrong
    }
    assert unknown == (
        404,
        {
            "ok": False,
            "error": "no admin path '/_corral/nothing'; try GET /_corral/stats or "
            "POST /_corral/reset",
        },
    )
    assert stats.ok == 1  # GET /_corral/reset reset nothing
    assert stats.invalid == 5  # the model endpoints' 405s count as invalid calls; admin's do not


@pytest.mark.slow
async def test_latency_grows_with_output_tokens_and_lengths_follow_the_prompt() -> None:
    """ms_per_token per completion token; the same prompt always gets the same length."""
    async with (
        asyncio.timeout(HANG_GUARD),
        LLMServer(latency_ms=0, ms_per_token=1.0, output_tokens="5:300", seed=3) as server,
        aiohttp.ClientSession() as session,
    ):
        url = f"{server.url}/v1/chat/completions"
        lengths = {}
        for text in ("first", "second", "third", "first"):
            body = {"model": "m", "messages": [{"role": "user", "content": text}]}
            start = time.perf_counter()
            _, _, answer = await _post(session, url, body)
            took = time.perf_counter() - start
            tokens = answer["usage"]["completion_tokens"]
            assert took >= tokens / 1000  # a lower bound: a loaded machine is only slower
            assert lengths.setdefault(text, tokens) == tokens
        assert len(set(lengths.values())) > 1


@pytest.mark.slow
async def test_stopping_answers_calls_being_generated() -> None:
    """stop() ends a 30 s generation at once with 503, leaving nothing behind."""
    async with asyncio.timeout(HANG_GUARD), aiohttp.ClientSession() as session:
        server = LLMServer(latency_ms=30_000)
        await server.start()
        call = asyncio.ensure_future(_post(session, f"{server.url}/v1/chat/completions", CHAT))
        for _ in range(2000):
            if server.stats().in_flight:
                break
            await asyncio.sleep(0.005)
        await server.stop()
        status, _, _ = await call
    assert status == 503
    assert server.stats().in_flight == 0


@pytest.mark.slow
def test_the_sdks_read_the_mock_and_corral_reads_their_429s() -> None:
    """openai and anthropic parse answers and 429s; corral retries those and reads the wait."""
    import anthropic
    import openai

    from corral._retry import retry_after_seconds

    async def scenario() -> None:
        async with (
            asyncio.timeout(HANG_GUARD),
            LLMServer(
                rpm=1, latency_ms=1, ms_per_token=0.01, output_tokens=12, accel_start=None
            ) as server,
        ):
            async with openai.AsyncOpenAI(
                base_url=f"{server.url}/v1", api_key="k", max_retries=0
            ) as client:
                completion = await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "hi"}]
                )
                assert completion.usage is not None
                assert completion.usage.completion_tokens == 12
                with pytest.raises(openai.RateLimitError) as caught:
                    await client.chat.completions.create(
                        model="m", messages=[{"role": "user", "content": "hi"}]
                    )
            assert corral.transient(caught.value)
            wait = retry_after_seconds(caught.value)
            assert wait is not None
            assert 59.0 < wait <= 60.0
            async with anthropic.AsyncAnthropic(
                base_url=server.url, api_key="k2", max_retries=0
            ) as claude:
                message = await claude.messages.create(
                    model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
                )
                assert (message.usage.output_tokens, message.stop_reason) == (5, "max_tokens")
                with pytest.raises(anthropic.RateLimitError) as refused:
                    await claude.messages.create(
                        model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
                    )
            assert corral.transient(refused.value)

    run(scenario)


# --------------------------------------------------------------------------
# corral serve --llm
# --------------------------------------------------------------------------

URL_LINE = re.compile(r"^corral serve: listening on (http://127\.0\.0\.1:\d+)$")


@pytest.mark.slow
def test_serve_llm_serves_and_reports_what_it_saw() -> None:
    """A real `corral serve --llm` process serves the mock and summarises on SIGINT."""

    async def scenario() -> tuple[int, str, str]:
        async with asyncio.timeout(HANG_GUARD):
            process = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "corral.cli", "serve", "--llm", "--port", "0"),
                *("--rpm", "1", "--latency-ms", "1", "--ms-per-token", "0", "--output-tokens", "9"),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                assert process.stdout is not None
                line = (await process.stdout.readline()).decode().rstrip("\n")
                match = URL_LINE.match(line)
                assert match is not None, f"unexpected first line {line!r}"
                async with aiohttp.ClientSession() as session:
                    url = f"{match.group(1)}/v1/chat/completions"
                    assert (await _post(session, url, CHAT))[0] == 200
                    assert (await _post(session, url, CHAT))[0] == 429
                process.send_signal(signal.SIGINT)
                rest, err = await process.communicate()
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            assert process.returncode is not None
            return process.returncode, rest.decode(), err.decode()

    returncode, rest, err = run(scenario)
    assert (returncode, err) == (0, "")
    summary = rest.strip()
    assert summary.startswith("corral serve --llm: stopped after ")
    assert ": 2 requests, 1 answered, 1 rejected (429: 1 over requests), 0 too large" in summary
    assert summary.endswith("; 1 key.")
    assert "tokens served 16 in, 9 out (16 input tokens sent on rejected calls)" in summary


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--rpm", "5"], "corral serve: error: --rpm applies to --llm only"),
        (
            ["serve", "--llm", "--capacity", "3", "--queue", "1"],
            "corral serve: error: --capacity, --queue apply to the capacity model, not --llm",
        ),
        (
            ["serve", "--llm", "--host", "0.0.0.0"],
            "corral serve: error: argument --host: must be a loopback",
        ),
        # Given at their default values, they are still given: refused all the same.
        (
            ["serve", "--llm", "--port", "0", "--capacity", "64"],
            "corral serve: error: --capacity applies to the capacity model, not --llm",
        ),
        (
            ["serve", "--llm", "--port", "0", "--status", "429", "--fail-fraction", "0"],
            "corral serve: error: --status, --fail-fraction apply to the capacity model, not --llm",
        ),
    ],
)
def test_serve_llm_refuses_options_that_do_not_apply(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    # The last line: argparse's own refusals (--host) come after its usage message.
    assert capsys.readouterr().err.splitlines()[-1].startswith(message)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--rpm", "0", "argument --rpm: must be a number between 1 and 1000000000000, got '0'"),
        ("--output-tokens", "few", "argument --output-tokens: must be an int like 200"),
        (
            "--latency-ms",
            "-1",
            "argument --latency-ms: must be a number between 0 and 86400000, got '-1'",
        ),
        ("--output-tokens", "lognormal:120:1000", "argument --output-tokens: must be an int like"),
        ("--output-tokens", "100000000000000000000", "argument --output-tokens: must be an int"),
        (
            "--minute",
            "1e12",
            "argument --minute: must be a number between 0.1 and 86400, got '1e12'",
        ),
    ],
)
def test_serve_llm_flags_reject_bad_values(
    flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--llm", flag, value]) == 2
    assert message in capsys.readouterr().err


def test_serve_llm_flags_reach_the_server() -> None:
    from corral.lab.llm_server import server_from_args

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    from corral.cli import _add_serve

    _add_serve(sub)
    args = parser.parse_args(
        ["serve", "--llm", "--rpm", "10", "--output-tpm", "99", "--minute", "6", "--no-accel"]
    )
    server = server_from_args(args)
    assert server.limits == Limits(rpm=10, output_tpm=99, minute=6.0, accel_start=None)


# --------------------------------------------------------------------------
# The lab scenario's pieces
# --------------------------------------------------------------------------


def test_steady_share_measures_after_warm_up_only() -> None:
    """Tokens after WARMUP_MINUTES, up to the 95th percentile of completions, per limit."""
    # 100 tokens every 0.1 s for 10 s on a 1 s minute: 1,000 tokens per minute.
    done = [(i * 0.1, 100) for i in range(1, 101)]
    share = llm_bench.steady_share(done, start=0.0, minute=1.0, output_tpm=1_000)
    assert share == pytest.approx(1.0)
    assert llm_bench.steady_share(done[:10], start=0.0, minute=1.0, output_tpm=1_000) is None


def test_prompts_are_the_same_for_every_strategy() -> None:
    assert llm_bench.make_prompts(50) == llm_bench.make_prompts(50)
    sizes = [estimate_prompt_tokens([p]) for p in llm_bench.make_prompts(500)]
    assert 100 < sum(sizes) / len(sizes) < 200


@pytest.mark.slow
def test_every_strategy_answers_every_prompt_against_the_mock() -> None:
    """Each strategy of `corral bench --only llm`, small, counted at the server."""
    from corral.lab import workloads

    settings = {
        **llm_bench.LLM_SERVER,
        "rpm": 6_000.0,
        "input_tpm": 10**7,
        "output_tpm": 10**7,
        "minute": 60.0,
        "accel_start": None,
    }

    # rate="auto" starts at one call a second and grows from there: fewer prompts.
    sizes = {strategy: 20 for _, strategy in llm_bench.LLM_STRATEGIES} | {"corral_rate_auto": 6}

    async def scenario() -> dict[str, tuple[str, int, int]]:
        outcomes = {}
        async with asyncio.timeout(HANG_GUARD * 2), LLMServer(**settings) as server:
            for strategy, n in sizes.items():
                server.reset()
                spec = {"strategy": strategy, "n": n, "url": server.url, "server": settings}
                result = await workloads.MEASURES["llm"](spec)
                outcomes[strategy] = (result["status"], result.get("ok", 0), server.stats().ok)
        return outcomes

    outcomes = run(scenario)
    assert outcomes == {strategy: ("ok", n, n) for strategy, n in sizes.items()}
