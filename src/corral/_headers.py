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
input/output ones to ``input_tokens`` and ``output_tokens`` (and so do
``x-ratelimit-*-input-tokens`` / ``-output-tokens``, which OpenAI-compatible
servers with split token limits send, ``corral serve --llm`` among them).
Both styles also send each budget's size (``x-ratelimit-limit-*``,
``anthropic-ratelimit-*-limit``). Everything else is ignored, as is any value
that does not parse: a broken header must never break a call that succeeded.

**What "reset" means.** Both providers refill their buckets continuously
(a token bucket, not a fixed window): the reset is when the bucket will be
*full* again, not when the next unit comes back. With the budget's size
``limit``, ``remaining`` units left and ``reset`` seconds to full, the bucket
refills at ``(limit - remaining) / reset`` units per second, so a start that
needs ``need`` units, more than remain, can go after
``(need - remaining) * reset / (limit - remaining)`` seconds: see
:func:`refill_wait` and :func:`server_pace`. Without ``limit`` the pace is
unknown and only the full reset is certain.
"""

from __future__ import annotations

import math
import re
import time
from datetime import UTC, datetime
from typing import Any, NamedTuple

__all__ = [
    "MAX_RESET",
    "RateHeader",
    "parse_duration",
    "parse_reset",
    "read_rate_headers",
    "read_rate_limits",
    "refill_wait",
    "server_pace",
]

_STEMS = (
    ("requests", "requests"),
    ("tokens", "tokens"),
    ("input_tokens", "input-tokens"),
    ("output_tokens", "output-tokens"),
)
# header name (lower case) -> (dimension, "remaining" | "reset" | "limit")
_KNOWN: dict[str, tuple[str, str]] = {}
for _dimension, _stem in _STEMS:
    for _field in ("remaining", "reset", "limit"):
        _KNOWN[f"x-ratelimit-{_field}-{_stem}"] = (_dimension, _field)
        _KNOWN[f"anthropic-ratelimit-{_stem}-{_field}"] = (_dimension, _field)
del _dimension, _stem, _field

#: The furthest reset believed, in seconds: a day, the longest window providers
#: report (requests per day). A reset further away is garbage (or a clock far
#: off) and reads as unreadable: it must not pause calls for years.
MAX_RESET = 86_400.0

# Microseconds as Go writes them: "us", the micro sign (U+00B5) and the Greek mu (U+03BC).
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(h|ms|m|s|us|\u00b5s|\u03bcs|ns)")
_UNITS = {
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ns": 1e-9,
}
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")


def parse_duration(text: str) -> float | None:
    """Seconds in a Go-style duration (``"6m0s"``, ``"20ms"``, ``"1h2m3.5s"``) or a bare
    number of seconds (``"1.5"``); None when it is neither."""
    text = text.strip()
    if _NUMBER.fullmatch(text):
        seconds = float(text)
        return seconds if math.isfinite(seconds) else None  # 400 digits are inf, not a wait
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
    unreadable or further than :data:`MAX_RESET`. ``now`` is the wall-clock time
    (``time.time()`` when None)."""
    seconds = parse_duration(text)
    if seconds is None:
        try:
            # RFC 3339 allows a lower-case "t" and "z", which fromisoformat refuses.
            when = datetime.fromisoformat(text.strip().upper())
        except ValueError:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = max(0.0, when.timestamp() - (time.time() if now is None else now))
    return seconds if seconds <= MAX_RESET else None


def _latin1(text: object) -> str | None:
    # A lower-level client's headers are bytes; HTTP header bytes are Latin-1
    # (RFC 9110 section 5.5), as Retry-After's are read (see corral._retry).
    return text.decode("latin-1") if isinstance(text, bytes | bytearray) else None


class RateHeader(NamedTuple):
    """One budget a response's headers report."""

    dimension: str
    #: Units left now.
    remaining: float
    #: Seconds until the budget is full again; None when not sent or unreadable.
    reset: float | None
    #: The budget's size (units per window); None when not sent or unreadable.
    limit: float | None


def read_rate_limits(headers: Any, *, now: float | None = None) -> list[RateHeader]:
    """The budgets a response's headers report, with their sizes when sent.

    ``headers`` is any mapping with ``items()`` (dict, aiohttp ``CIMultiDict``,
    httpx ``Headers``), matched case-insensitively; names and values may be
    str or bytes. A dimension appears only
    when its *remaining* header parses (a finite number >= 0); its reset and
    limit are None when missing or unreadable (a reset must be at most
    :data:`MAX_RESET` away, a limit finite and > 0). Anything that
    is not a mapping gives an empty list. ``now`` is the wall-clock time for
    RFC 3339 resets (``time.time()`` when None).
    """
    found: dict[str, list[float | None]] = {}
    try:
        pairs = list(headers.items())
    except Exception:
        return []
    for key, value in pairs:
        if not isinstance(key, str):
            key = _latin1(key)
            if key is None:
                continue
        known = _KNOWN.get(key.lower())
        if known is None:
            continue
        if not isinstance(value, str):
            value = _latin1(value)
            if value is None:
                continue
        dimension, field = known
        slot = found.setdefault(dimension, [None, None, None])
        if field == "reset":
            slot[1] = parse_reset(value, now=now)
            continue
        text = value.strip()
        if not _NUMBER.fullmatch(text):
            continue
        number = float(text)
        if not math.isfinite(number):  # 400 digits: garbage, not a budget
            continue
        if field == "remaining":
            slot[0] = number
        elif number > 0:
            slot[2] = number
    return [
        RateHeader(dimension, remaining, reset, limit)
        for dimension, (remaining, reset, limit) in found.items()
        if remaining is not None
    ]


def read_rate_headers(
    headers: Any, *, now: float | None = None
) -> list[tuple[str, float, float | None]]:
    """The budgets a response's headers report: ``(dimension, remaining, reset seconds)``.

    :func:`read_rate_limits` without the budgets' sizes.
    """
    return [(h.dimension, h.remaining, h.reset) for h in read_rate_limits(headers, now=now)]


def server_pace(remaining: float, reset: float | None, limit: float | None) -> float | None:
    """Seconds per unit at which a server's bucket refills: ``reset / (limit - remaining)``.

    None when the headers do not tell: no reset, no limit, or a bucket already full.
    """
    if reset is None or limit is None or limit <= remaining:
        return None
    return reset / (limit - remaining)


def refill_wait(
    remaining: float,
    need: float,
    reset: float | None,
    limit: float | None,
    interval: float,
) -> float:
    """Seconds until a server's bucket holds ``need`` units, when ``remaining < need``.

    The bucket refills continuously and ``reset`` is when it is full: with
    ``limit`` known, it refills at ``(limit - remaining) / reset`` units per
    second, so ``need`` units are there after ``(need - remaining)`` units'
    worth of that, and never later than ``reset``. Without ``limit`` the pace
    is unknown: ``reset`` (the only time the server vouches for). Without
    ``reset``, ``interval`` (the local rate's seconds per unit) per missing unit.
    """
    missing = need - remaining
    if missing <= 0:
        return 0.0
    if reset is None:
        return missing * interval
    pace = server_pace(remaining, reset, limit)
    if pace is None:
        return reset
    wait = missing * pace
    return wait if wait < reset else reset
