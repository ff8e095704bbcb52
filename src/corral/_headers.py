"""Providers' rate-limit headers: what remains of each budget, and when it resets.

Hosted APIs tell every response how much of the caller's budget is left.
OpenAI-style (also Azure OpenAI, Groq, Together, vLLM and others)::

    x-ratelimit-remaining-requests: 499      x-ratelimit-reset-requests: 120ms
    x-ratelimit-remaining-tokens: 149984     x-ratelimit-reset-tokens: 6m0s

The reset is a Go-style duration ("1s", "6m0s", "20ms", "1h2m3.5s") until the
budget is full again. Anthropic-style::

    anthropic-ratelimit-requests-remaining: 49
    anthropic-ratelimit-requests-reset: 2026-12-03T07:48:12Z
    anthropic-ratelimit-input-tokens-remaining / -reset
    anthropic-ratelimit-output-tokens-remaining / -reset
    anthropic-ratelimit-tokens-remaining / -reset

The reset is an RFC 3339 time. Dimensions: ``requests``; OpenAI's
``tokens`` and Anthropic's ``tokens`` map to ``tokens``; Anthropic's
input/output ones to ``input_tokens`` and ``output_tokens``. Everything else
is ignored, as is any value that does not parse: a broken header must never
break a call that succeeded.
"""

from __future__ import annotations

import math
import re
import time
from datetime import UTC, datetime
from typing import Any

__all__ = ["parse_duration", "parse_reset", "read_rate_headers"]

# header name (lower case) -> (dimension, "remaining" | "reset")
_KNOWN: dict[str, tuple[str, str]] = {}
for _dimension, _openai in (("requests", "requests"), ("tokens", "tokens")):
    _KNOWN[f"x-ratelimit-remaining-{_openai}"] = (_dimension, "remaining")
    _KNOWN[f"x-ratelimit-reset-{_openai}"] = (_dimension, "reset")
for _dimension, _anthropic in (
    ("requests", "requests"),
    ("tokens", "tokens"),
    ("input_tokens", "input-tokens"),
    ("output_tokens", "output-tokens"),
):
    _KNOWN[f"anthropic-ratelimit-{_anthropic}-remaining"] = (_dimension, "remaining")
    _KNOWN[f"anthropic-ratelimit-{_anthropic}-reset"] = (_dimension, "reset")
del _dimension, _openai, _anthropic

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(h|ms|m|s|us|µs|ns)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")


def parse_duration(text: str) -> float | None:
    """Seconds in a Go-style duration (``"6m0s"``, ``"20ms"``, ``"1h2m3.5s"``) or a bare
    number of seconds (``"1.5"``); None when it is neither."""
    text = text.strip()
    if _NUMBER.fullmatch(text):
        return float(text)
    total, position = 0.0, 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            return None
        total += float(match[1]) * _UNITS[match[2]]
        position = match.end()
    if position == 0 or position != len(text) or not math.isfinite(total):
        return None
    return total


def parse_reset(text: str, *, now: float | None = None) -> float | None:
    """Seconds until a reset given as a duration or an RFC 3339 time (0 if past); None if
    unreadable. ``now`` is the wall-clock time (``time.time()`` when None)."""
    seconds = parse_duration(text)
    if seconds is not None:
        return seconds
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def read_rate_headers(
    headers: Any, *, now: float | None = None
) -> list[tuple[str, float, float | None]]:
    """The budgets a response's headers report: ``(dimension, remaining, reset seconds)``.

    ``headers`` is any mapping with ``items()`` (dict, aiohttp ``CIMultiDict``,
    httpx ``Headers``), matched case-insensitively. A dimension appears only
    when its *remaining* header parses (a number >= 0); its reset is None when
    missing or unreadable. Anything that is not a mapping gives an empty list.
    """
    found: dict[str, list[float | None]] = {}
    try:
        pairs = list(headers.items())
    except Exception:
        return []
    for key, value in pairs:
        if not isinstance(key, str) or not isinstance(value, str):
            continue
        known = _KNOWN.get(key.lower())
        if known is None:
            continue
        dimension, field = known
        slot = found.setdefault(dimension, [None, None])
        if field == "remaining":
            text = value.strip()
            if _NUMBER.fullmatch(text):
                slot[0] = float(text)
        else:
            slot[1] = parse_reset(value, now=now)
    return [
        (dimension, remaining, reset)
        for dimension, (remaining, reset) in found.items()
        if remaining is not None
    ]
