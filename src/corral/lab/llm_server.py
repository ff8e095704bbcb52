"""A mock hosted LLM API on loopback: OpenAI's and Anthropic's shapes, limits and headers.

The commonest way to drown in 429s is fifty thousand LLM calls. This server
lets the recipes, the tests and the lab do that without a key, a bill or a
byte leaving the machine::

    import corral.lab

    async with corral.lab.serve_llm(rpm=500, input_tpm=200_000, output_tpm=40_000) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="test", max_retries=0)
        ...

Endpoints (any other path is 404; a wrong method on one of these is 405 with
an ``Allow`` header):

- ``POST /v1/chat/completions``: OpenAI's chat body (``model``, ``messages``,
  ``max_tokens`` or ``max_completion_tokens``) answered with a
  ``chat.completion`` whose ``usage`` holds ``prompt_tokens``,
  ``completion_tokens`` and ``total_tokens``, and ``x-ratelimit-limit-*``,
  ``x-ratelimit-remaining-*`` and ``x-ratelimit-reset-*`` headers (``requests``
  and ``tokens`` as OpenAI names them, ``input-tokens`` and ``output-tokens``
  for the split limits);
- ``POST /v1/messages``: Anthropic's body (``model``, ``max_tokens``,
  ``messages``, ``system``) answered with a ``message`` whose ``usage`` holds
  ``input_tokens`` and ``output_tokens``, and ``anthropic-ratelimit-*-limit``,
  ``-remaining`` and ``-reset`` (an RFC 3339 time) headers;
- ``GET /_corral/stats`` (:class:`~corral.lab.llm_model.LLMStats` as JSON) and
  ``POST /_corral/reset`` (zero the counters, refill every bucket).

Both model endpoints share one set of buckets per API key (``Authorization:
Bearer KEY`` or ``x-api-key: KEY``; a call with neither is 401). The limits
are :class:`~corral.lab.llm_model.Limits`; a call over them is answered 429
at once with ``retry-after-ms`` (exact, in milliseconds), ``retry-after``
(whole seconds, rounded up) and the rate-limit headers, and costs nothing. An
admitted call takes ``latency_ms + ms_per_token * completion_tokens``
milliseconds (times ``1 +/- jitter``), as generation does.

This is a lab instrument: it listens on loopback only, does no real
inference and returns filler text as long as the completion it reports.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from corral.lab._loopback import (
    LoopbackServer,
    check_number,
    check_seed,
    json_response,
    serving,
)
from corral.lab._options import DAY_MS, show_number
from corral.lab.llm_model import (
    Admission,
    DimensionState,
    Limits,
    LLMStats,
    OutputLength,
    PeakMeter,
    RateModel,
    estimate_prompt_tokens,
    format_reset,
)

__all__ = ["LLMServer", "serve_llm"]

_DEFAULT_OUTPUT = "lognormal:120:0.6"

#: The model endpoints (POST only) and the shape each answers in.
_ENDPOINTS = {"/v1/chat/completions": "openai", "/v1/messages": "anthropic"}
_ADMIN_PREFIX = "/_corral"
#: The admin paths and the one method each takes.
_ADMIN_METHODS = {"/_corral/stats": "GET", "/_corral/reset": "POST"}
_ADMIN_HELP = "GET /_corral/stats or POST /_corral/reset"

#: Header stems per dimension: OpenAI's x-ratelimit-{limit,remaining,reset}-STEM
#: and Anthropic's anthropic-ratelimit-STEM-{limit,remaining,reset}.
_STEMS = {
    "requests": "requests",
    "tokens": "tokens",
    "input_tokens": "input-tokens",
    "output_tokens": "output-tokens",
}


class _BadRequest(Exception):
    """A request the API refuses with 4xx; ``kind`` is the provider's error type."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


class LLMServer(LoopbackServer):
    """The mock LLM API as an object: start it, read what it saw, reset it.

    ::

        async with LLMServer(rpm=60, output_tpm=6_000, minute=6.0) as server:
            ...   # POST f"{server.url}/v1/chat/completions"
            print(server.stats().rejected_by)

    Args:
        rpm: requests per minute per key (``None``: unlimited).
        tpm: tokens (input + output) per minute per key, as OpenAI counts.
        input_tpm: input tokens per minute per key, as Anthropic counts.
        output_tpm: output tokens per minute per key.
        minute: real seconds in the limits' minute (default 60). A smaller
            minute runs an hour of traffic in a minute: the limits, the
            refill, the acceleration ramp and every advertised wait scale.
        latency_ms: milliseconds before the first token, at most a day.
        ms_per_token: milliseconds per completion token, at most a day.
        jitter: both latencies vary uniformly by +/- this fraction (0 to 1).
        output_tokens: the completion length before ``max_tokens``: an int,
            ``(low, high)``, ``"low:high"`` or ``"lognormal:median:sigma"``.
            Drawn from a generator seeded with ``seed`` and the prompt's
            text: the same prompt always gets the same length.
        accel_start, accel_growth, accel_window: the acceleration limit (see
            :class:`~corral.lab.llm_model.Limits`); ``accel_start=None`` turns it off.
        host: a loopback address; anything else raises ``ValueError``.
        port: 0 picks a free port; read it back from :attr:`url`.
        seed: seeds output lengths and latency jitter.

    Raises:
        ValueError: an argument is out of range; the message names it.
    """

    def __init__(
        self,
        *,
        rpm: float | None = None,
        tpm: float | None = None,
        input_tpm: float | None = None,
        output_tpm: float | None = None,
        minute: float = 60.0,
        latency_ms: float = 200.0,
        ms_per_token: float = 10.0,
        jitter: float = 0.0,
        output_tokens: int | tuple[int, int] | str | OutputLength = _DEFAULT_OUTPUT,
        accel_start: float | None = 0.5,
        accel_growth: float = 2.0,
        accel_window: float | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 0,
    ) -> None:
        self.limits = Limits(
            rpm=rpm,
            tpm=tpm,
            input_tpm=input_tpm,
            output_tpm=output_tpm,
            minute=minute,
            accel_start=accel_start,
            accel_growth=accel_growth,
            accel_window=accel_window,
        )
        # At most a day each: a longer wait is a typo, and would hold its
        # request until stop().
        self._latency_s = (
            check_number("latency_ms", latency_ms, "milliseconds to first token", maximum=DAY_MS)
            / 1e3
        )
        self._token_s = (
            check_number("ms_per_token", ms_per_token, "milliseconds per token", maximum=DAY_MS)
            / 1e3
        )
        self._jitter = check_number("jitter", jitter, "fraction of the latency", maximum=1)
        self.output = OutputLength.parse(output_tokens)
        super().__init__(host=host, port=port)
        self._seed = check_seed(seed)
        self._model = RateModel(self.limits)
        self._ids = itertools.count(1)
        self._in_flight = 0
        self._zero_counters()

    def _zero_counters(self) -> None:
        self._requests = self._ok = self._rejected = self._too_large = self._invalid = 0
        self._rejected_by: dict[str, int] = {}
        self._input_tokens = self._output_tokens = self._rejected_input = 0
        self._peak_in_flight = self._in_flight
        self._peaks = PeakMeter(self.limits.minute)
        self._counting_since = self._loop.time() if self._loop is not None else 0.0

    # -- lifecycle -------------------------------------------------------

    def _starting(self) -> None:
        assert self._loop is not None
        self._counting_since = self._loop.time()

    @property
    def url(self) -> str:
        """The base URL, like ``http://127.0.0.1:54321`` (no ``/v1``, no trailing slash)."""
        return super().url

    def reset(self) -> None:
        """Zero the counters and forget every key (buckets full, ramps at their start)."""
        self._model.reset()
        self._zero_counters()

    def stats(self) -> LLMStats:
        """A frozen snapshot of what the server saw (see :class:`LLMStats`)."""
        if self._stopped_at is not None:
            now = self._stopped_at
        else:
            now = self._loop.time() if self._loop is not None else 0.0
        peaks = self._peaks.peaks
        return LLMStats(
            requests=self._requests,
            ok=self._ok,
            rejected=self._rejected,
            rejected_by=dict(sorted(self._rejected_by.items())),
            too_large=self._too_large,
            invalid=self._invalid,
            input_tokens=self._input_tokens,
            output_tokens=self._output_tokens,
            rejected_input_tokens=self._rejected_input,
            in_flight=self._in_flight,
            peak_in_flight=self._peak_in_flight,
            peak_rpm=peaks[0],
            peak_input_tpm=peaks[1],
            peak_output_tpm=peaks[2],
            peak_tpm=peaks[3],
            keys=self._model.keys,
            elapsed_s=round(max(0.0, now - self._counting_since), 6),
        )

    # -- requests --------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path.rstrip("/")
        if path == _ADMIN_PREFIX or path.startswith(_ADMIN_PREFIX + "/"):
            return self._admin(request, path)
        flavour = _ENDPOINTS.get(path)
        if flavour is None:
            self._invalid += 1
            return _error("openai", 404, "not_found_error", f"no endpoint {request.path!r}")
        if request.method != "POST":
            self._invalid += 1
            response = _error(flavour, 405, "invalid_request_error", f"{path} takes POST only")
            response.headers["Allow"] = "POST"
            return response
        try:
            key = _api_key(request.headers)
            body = await _json_body(request)
            if flavour == "openai":
                model, texts, system, max_tokens = _read_openai(body)
            else:
                model, texts, system, max_tokens = _read_anthropic(body)
        except _BadRequest as bad:
            self._invalid += 1
            return _error(flavour, bad.status, bad.kind, bad.message)
        return await self._complete(flavour, key, model, texts, system, max_tokens)

    async def _complete(
        self,
        flavour: str,
        key: str,
        model: str,
        texts: list[str],
        system: str | None,
        max_tokens: int | None,
    ) -> web.StreamResponse:
        assert self._loop is not None
        if self._stopping_now():
            return _error(flavour, 503, "api_error", "server stopping")
        self._requests += 1
        prompt = estimate_prompt_tokens(texts, system)
        # The answer's length and timing depend only on the prompt and the seed.
        rng = random.Random(f"{self._seed}\x00{system or ''}\x00" + "\x00".join(texts))
        natural = self.output.draw(rng)
        completion = natural if max_tokens is None else min(natural, max_tokens)
        stop = "stop" if completion == natural else "length"
        now = self._loop.time()
        decision = self._model.admit(
            key,
            {
                "requests": 1,
                "tokens": prompt + completion,
                "input_tokens": prompt,
                "output_tokens": completion,
            },
            now,
        )
        headers = self._limit_headers(flavour, decision.state)
        if not decision.admitted:
            return self._refuse(flavour, decision, headers, prompt, completion)
        self._input_tokens += prompt
        self._output_tokens += completion
        self._peaks.add(now - self._counting_since, prompt, completion)
        self._in_flight += 1
        self._peak_in_flight = max(self._peak_in_flight, self._in_flight)
        try:
            seconds = self._latency_s + self._token_s * completion
            if self._jitter:
                seconds *= 1.0 + self._jitter * (2.0 * rng.random() - 1.0)
            if seconds > 0:
                await self._sleep(seconds)
        finally:
            self._in_flight -= 1
        if self._stopping_now():
            return _error(flavour, 503, "api_error", "server stopping")
        self._ok += 1
        number = next(self._ids)
        # Filler of exactly `completion` tokens by the mock's own count (4 chars each).
        text = "lab " * completion
        if flavour == "openai":
            payload: dict[str, Any] = {
                "id": f"chatcmpl-corral{number}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": stop,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                },
                "system_fingerprint": "corral-mock",
            }
        else:
            payload = {
                "id": f"msg_corral{number}",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn" if stop == "stop" else "max_tokens",
                "stop_sequence": None,
                "usage": {
                    "input_tokens": prompt,
                    "output_tokens": completion,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 0,
                },
            }
        return web.Response(
            body=json.dumps(payload).encode(), content_type="application/json", headers=headers
        )

    def _refuse(
        self,
        flavour: str,
        decision: Admission,
        headers: dict[str, str],
        prompt: int,
        completion: int,
    ) -> web.Response:
        reason = decision.reason or "requests"
        if reason == "too_large":
            # No wait makes it fit: a final error, as the providers answer.
            self._too_large += 1
            [(name, amount)] = decision.shortfall.items()
            limit = decision.state[name].limit
            message = (
                f"Request too large: it needs {amount:g} {name.replace('_', ' ')} but the limit "
                f"is {show_number(limit)} per minute"
            )
            return _error(flavour, 400, "invalid_request_error", message, headers)
        self._rejected += 1
        self._rejected_by[reason] = self._rejected_by.get(reason, 0) + 1
        self._rejected_input += prompt
        wait_ms = max(1, math.ceil(decision.wait_s * 1e3))
        headers["retry-after-ms"] = str(wait_ms)
        headers["retry-after"] = str(max(1, math.ceil(wait_ms / 1e3)))
        if reason == "acceleration":
            what = "a sharp increase in usage (acceleration limit)"
        else:
            state = decision.state[reason]
            what = (
                f"{reason.replace('_', ' ')} per min: Limit {show_number(state.limit)}, Remaining "
                f"{state.remaining}"
            )
        message = f"Rate limit reached for {what}. Please try again in {wait_ms}ms."
        kind = "rate_limit_error" if flavour == "anthropic" else reason
        return _error(flavour, 429, kind, message, headers)

    def _limit_headers(self, flavour: str, state: Mapping[str, DimensionState]) -> dict[str, str]:
        # Limits are written out in full, as the providers do: "2e+06" (what
        # :g makes of a 2M tpm) is no number a header reader takes.
        headers: dict[str, str] = {}
        if flavour == "openai":
            for name, dim in state.items():
                stem = _STEMS[name]
                headers[f"x-ratelimit-limit-{stem}"] = show_number(dim.limit)
                headers[f"x-ratelimit-remaining-{stem}"] = str(dim.remaining)
                headers[f"x-ratelimit-reset-{stem}"] = format_reset(dim.reset_s)
            return headers
        wall = time.time()
        for name, dim in state.items():
            stem = _STEMS[name]
            headers[f"anthropic-ratelimit-{stem}-limit"] = show_number(dim.limit)
            headers[f"anthropic-ratelimit-{stem}-remaining"] = str(dim.remaining)
            headers[f"anthropic-ratelimit-{stem}-reset"] = _rfc3339(wall + dim.reset_s)
        if "tokens" not in state:
            # Anthropic's tokens-* headers report the most restrictive token limit in force.
            split = [state[n] for n in ("input_tokens", "output_tokens") if n in state]
            if split:
                dim = min(split, key=lambda d: d.remaining / d.limit)
                headers["anthropic-ratelimit-tokens-limit"] = show_number(dim.limit)
                headers["anthropic-ratelimit-tokens-remaining"] = str(dim.remaining)
                headers["anthropic-ratelimit-tokens-reset"] = _rfc3339(wall + dim.reset_s)
        return headers

    def _admin(self, request: web.BaseRequest, path: str) -> web.Response:
        allowed = _ADMIN_METHODS.get(path)
        if allowed is None:
            error = f"no admin path {path!r}; try {_ADMIN_HELP}"
            return json_response(404, {"ok": False, "error": error})
        if request.method != allowed:
            # A known path asked the wrong way: 405 naming the method, as the
            # model endpoints and the capacity server answer, not "no such path".
            response = json_response(405, {"ok": False, "error": f"{path} takes {allowed} only"})
            response.headers["Allow"] = allowed
            return response
        if path == "/_corral/stats":
            return json_response(200, self.stats().as_dict())
        self.reset()  # POST /_corral/reset, the other admin path
        return json_response(200, {"ok": True})


# --------------------------------------------------------------------------
# Reading requests
# --------------------------------------------------------------------------


def _api_key(headers: Mapping[str, str]) -> str:
    authorization = headers.get("Authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    key = headers.get("x-api-key", "").strip()
    if key:
        return key
    raise _BadRequest(
        401,
        "authentication_error",
        "no API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY' (any key will do)",
    )


async def _json_body(request: web.BaseRequest) -> dict[str, Any]:
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise _BadRequest(400, "invalid_request_error", "the body is not JSON") from None
    if not isinstance(body, dict):
        raise _BadRequest(400, "invalid_request_error", "the body must be a JSON object")
    if body.get("stream"):
        raise _BadRequest(400, "invalid_request_error", "stream=true is not supported by the mock")
    return body


def _text(content: object, where: str) -> str:
    """A message's text: a string, or the text parts of a list of content blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, dict) and isinstance(block.get("text"), str):
                parts.append(block["text"])
            else:
                raise _BadRequest(
                    400, "invalid_request_error", f"{where}: only text content blocks are supported"
                )
        return "\n".join(parts)
    raise _BadRequest(400, "invalid_request_error", f"{where} must be a string or a list of blocks")


def _model_name(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _BadRequest(400, "invalid_request_error", "model: a non-empty string is required")
    return model


def _messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest(400, "invalid_request_error", "messages: a non-empty list is required")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _BadRequest(
                400, "invalid_request_error", f"messages[{index}] must be an object with a role"
            )
    return messages


def _max_tokens(value: object, name: str, *, required: bool) -> int | None:
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _BadRequest(
            400, "invalid_request_error", f"{name}: an integer >= 1 is required; got {value!r}"
        )
    return value


def _read_openai(body: Mapping[str, Any]) -> tuple[str, list[str], str | None, int | None]:
    model = _model_name(body)
    texts = [
        _text(m.get("content", ""), f"messages[{i}].content") for i, m in enumerate(_messages(body))
    ]
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    return model, texts, None, _max_tokens(body.get(name), name, required=False)


def _read_anthropic(body: Mapping[str, Any]) -> tuple[str, list[str], str | None, int | None]:
    model = _model_name(body)
    max_tokens = _max_tokens(body.get("max_tokens"), "max_tokens", required=True)
    texts = [
        _text(m.get("content", ""), f"messages[{i}].content") for i, m in enumerate(_messages(body))
    ]
    system = body.get("system")
    system_text = None if system is None else _text(system, "system")
    return model, texts, system_text, max_tokens


# --------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------


def _rfc3339(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _error(
    flavour: str,
    status: int,
    kind: str,
    message: str,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    if flavour == "anthropic":
        payload: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        code = "rate_limit_exceeded" if status == 429 else None
        payload = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.Response(
        status=status,
        body=json.dumps(payload).encode(),
        content_type="application/json",
        headers=headers,
    )


# --------------------------------------------------------------------------
# The short form
# --------------------------------------------------------------------------


def serve_llm(
    *,
    rpm: float | None = None,
    tpm: float | None = None,
    input_tpm: float | None = None,
    output_tpm: float | None = None,
    minute: float = 60.0,
    latency_ms: float = 200.0,
    ms_per_token: float = 10.0,
    jitter: float = 0.0,
    output_tokens: int | tuple[int, int] | str | OutputLength = _DEFAULT_OUTPUT,
    accel_start: float | None = 0.5,
    accel_growth: float = 2.0,
    accel_window: float | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    seed: int = 0,
) -> AbstractAsyncContextManager[str]:
    """Run the mock LLM API for the body of an ``async with``; yields its base URL.

    ::

        async with corral.lab.serve_llm(rpm=500, output_tpm=40_000) as url:
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="test", max_retries=0)

    The arguments are :class:`LLMServer`'s, checked here, at the call.
    """
    server = LLMServer(
        rpm=rpm,
        tpm=tpm,
        input_tpm=input_tpm,
        output_tpm=output_tpm,
        minute=minute,
        latency_ms=latency_ms,
        ms_per_token=ms_per_token,
        jitter=jitter,
        output_tokens=output_tokens,
        accel_start=accel_start,
        accel_growth=accel_growth,
        accel_window=accel_window,
        host=host,
        port=port,
        seed=seed,
    )
    return serving(server)


# --------------------------------------------------------------------------
# corral serve --llm
# --------------------------------------------------------------------------


def server_from_args(args: Any) -> LLMServer:
    """An LLMServer from ``corral serve --llm``'s parsed arguments (ValueError if bad)."""
    accel_start = (
        None if args.no_accel else (args.accel_start if args.accel_start is not None else 0.5)
    )
    return LLMServer(
        rpm=args.rpm,
        tpm=args.tpm,
        input_tpm=args.input_tpm,
        output_tpm=args.output_tpm,
        minute=args.minute if args.minute is not None else 60.0,
        latency_ms=args.latency_ms if args.latency_ms is not None else 200.0,
        ms_per_token=args.ms_per_token if args.ms_per_token is not None else 10.0,
        jitter=args.jitter,
        output_tokens=args.output_tokens if args.output_tokens is not None else _DEFAULT_OUTPUT,
        accel_start=accel_start,
        accel_growth=args.accel_growth if args.accel_growth is not None else 2.0,
        accel_window=args.accel_window,
        host=args.host,
        port=args.port,
        seed=args.seed,
    )


def summary(server: LLMServer) -> str:
    """One paragraph: what the server saw, for ``corral serve --llm`` on exit."""
    stats = server.stats()
    limits = server.limits
    minute = limits.minute
    by = ", ".join(f"{count} over {reason}" for reason, count in stats.rejected_by.items())
    published = ", ".join(f"{value:g} {name}" for name, value in limits.per_minute().items())
    return (
        f"corral serve --llm: stopped after {stats.elapsed_s:.1f} s: "
        f"{_n(stats.requests, 'request')}, "
        f"{stats.ok} answered, {stats.rejected} rejected (429{': ' + by if by else ''}), "
        f"{stats.too_large} too large, {stats.invalid} invalid; tokens served "
        f"{stats.input_tokens:,} in, {stats.output_tokens:,} out "
        f"({stats.rejected_input_tokens:,} input tokens sent on rejected calls); peak per "
        f"{minute:g}-s minute: {_n(round(stats.peak_rpm), 'request')}, "
        f"{stats.peak_input_tpm:,.0f} "
        f"input and {stats.peak_output_tpm:,.0f} output tokens (limits: "
        f"{published or 'none'}); peak in flight {stats.peak_in_flight}; {_n(stats.keys, 'key')}."
    )


def _n(count: int, noun: str) -> str:
    """``count`` and ``noun``, plural unless the count is one: "1 key", "1,200 requests"."""
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"
