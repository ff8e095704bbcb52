"""The rate limits of a hosted LLM API, as plain arithmetic on an explicit clock.

Hosted LLM APIs do not cap how many calls run at once: they cap how much you
use per minute, in several dimensions at once, per API key. OpenAI counts
requests and tokens per minute; Anthropic counts requests, input tokens and
output tokens per minute. Each is a bucket that refills continuously::

    requests       [#########.....]  500 per minute, refilled at 8.3/s
    input_tokens   [###...........]  200,000 per minute
    output_tokens  [##############]   40,000 per minute

A call is admitted only if *every* bucket holds what it costs (1 request, its
prompt's tokens, its completion's tokens); then each bucket is charged. A call
that does not fit is refused with 429 and told exactly how long until it
would fit (``retry-after-ms``); a refused call costs nothing. A full bucket
lets a client that was idle use a whole minute's worth at once, as the
providers' token buckets do.

Providers also punish a *sharp ramp*: a key that goes from idle to full speed
gets 429s well below its published limits (Anthropic calls it an acceleration
limit). Here that is a ramp on requests per short window (``accel_window``,
a twelfth of the minute by default): an idle key may start ``accel_start``
times the published request rate; each window in which it used at least half
of its allowance multiplies the allowance by ``accel_growth`` (up to the full
bucket), and each idle window divides it again. A client that starts gently
never notices; ``asyncio.gather`` over 10,000 prompts does.

Everything here is deterministic and takes ``now`` as an argument, so the
tests can assert exact admissions and exact waits; :mod:`corral.lab.llm_server`
serves it over HTTP. The module imports nothing outside the standard library.

Tokens are estimated as one per four characters of text (OpenAI's rule of
thumb for English), plus a few per message (:func:`estimate_prompt_tokens`).
The completion's length is drawn from :class:`OutputLength`, seeded by the
prompt's text, so the same prompt always gets the same answer length, however
often and in whatever order it is sent: every strategy in the lab faces the
same work.
"""

from __future__ import annotations

import argparse
import math
import random
import re
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from corral.lab._options import DAY_MS, DAY_S, number_option, show_number

__all__ = [
    "DIMENSIONS",
    "Admission",
    "LLMStats",
    "Limits",
    "OutputLength",
    "RateModel",
    "add_serve_arguments",
    "estimate_prompt_tokens",
    "estimate_tokens",
    "format_reset",
]

#: The dimensions, in the order headers and reports list them. ``tokens`` is
#: OpenAI's combined count (input + output); the other two are Anthropic's split.
DIMENSIONS: tuple[str, ...] = ("requests", "tokens", "input_tokens", "output_tokens")

#: Floating-point slack when comparing a bucket's level with a charge, so that
#: a client waiting exactly the advertised time is admitted.
_EPSILON = 1e-9


# --------------------------------------------------------------------------
# Token estimates
# --------------------------------------------------------------------------


def estimate_tokens(text: str) -> int:
    """Tokens in ``text``: one per four characters, rounded up (``""`` is 0).

    Raises:
        TypeError: ``text`` is not a str.
    """
    if not isinstance(text, str):
        raise TypeError(f"estimate_tokens needs a str; got {text!r}")
    return -(-len(text) // 4)


#: Tokens every message costs beyond its text (role and separators), and the
#: tokens that prime the reply: OpenAI documents 3 and 3 for its chat format.
PER_MESSAGE_TOKENS = 3
REPLY_PRIMING_TOKENS = 3


def estimate_prompt_tokens(messages: Iterable[str], system: str | None = None) -> int:
    """The prompt's tokens, as the mock counts them: each message's text plus 3, plus 3.

    Args:
        messages: the text of each message (a multi-part message's parts joined).
        system: a system prompt given apart from the messages (Anthropic's
            ``system``); counted like one more message.
    """
    texts = list(messages)
    if system is not None:
        texts.append(system)
    return REPLY_PRIMING_TOKENS + sum(PER_MESSAGE_TOKENS + estimate_tokens(t) for t in texts)


# --------------------------------------------------------------------------
# Output length
# --------------------------------------------------------------------------

#: The longest completion, in tokens: beyond what any model writes, and a
#: body (4 bytes a token) the mock can still build and send.
MAX_OUTPUT_TOKENS = 1_000_000
#: The widest lognormal spread: at 4, one answer in ten is over 170 times the
#: median and one in ten under 1/170 of it; wider describes no real traffic.
MAX_SIGMA = 4.0

_OUTPUT_FORMS = (
    "an int like 200, 'LOW:HIGH' like '50:400', or 'lognormal:MEDIAN:SIGMA', "
    f"lengths from 1 to {MAX_OUTPUT_TOKENS:,} and SIGMA from 0 to {MAX_SIGMA:g}"
)
_LOGNORMAL = re.compile(r"lognormal:([0-9.eE+-]+):([0-9.eE+-]+)")


@dataclass(frozen=True)
class OutputLength:
    """How many tokens a completion has before ``max_tokens`` cuts it.

    ``fixed`` always ``low``; ``uniform`` an int from ``low`` to ``high``
    inclusive; ``lognormal`` ``median * exp(sigma * N(0, 1))`` rounded, at least
    1: most answers short, a long tail of long ones, as real chat traffic.
    Read from text or numbers with :meth:`parse`.
    """

    kind: str
    low: float
    high: float = 0.0

    @classmethod
    def parse(cls, value: object) -> OutputLength:
        """``200``, ``(50, 400)``, ``"200"``, ``"50:400"`` or ``"lognormal:120:0.6"``.

        Raises:
            ValueError: anything else, a length below 1 or above :data:`MAX_OUTPUT_TOKENS`,
                or a sigma above :data:`MAX_SIGMA`; the message naming it.
        """
        if isinstance(value, OutputLength):
            return value
        error = f"output_tokens must be {_OUTPUT_FORMS}; got output_tokens={value!r}"
        if isinstance(value, bool):
            raise ValueError(error)
        if isinstance(value, int):
            if not 1 <= value <= MAX_OUTPUT_TOKENS:
                raise ValueError(error)
            return cls("fixed", value)
        if isinstance(value, tuple) and len(value) == 2:
            low, high = value
            if (
                all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high))
                and 1 <= low <= high <= MAX_OUTPUT_TOKENS
            ):
                return cls("uniform", low, high)
            raise ValueError(error)
        if not isinstance(value, str):
            raise ValueError(error)
        text = value.strip()
        match = _LOGNORMAL.fullmatch(text)
        if match is not None:
            try:
                median, sigma = float(match[1]), float(match[2])
            except ValueError:
                raise ValueError(error) from None
            if not (1 <= median <= MAX_OUTPUT_TOKENS and 0 <= sigma <= MAX_SIGMA):
                raise ValueError(error)
            return cls("lognormal", median, sigma)
        low_text, sep, high_text = text.partition(":")
        try:
            if sep:
                return cls.parse((int(low_text), int(high_text)))
            return cls.parse(int(text))
        except ValueError:
            raise ValueError(error) from None

    def draw(self, rng: random.Random) -> int:
        """One completion length, at least 1."""
        if self.kind == "fixed":
            return int(self.low)
        if self.kind == "uniform":
            return rng.randint(int(self.low), int(self.high))
        # In logs, and clamped: the tail must not overflow exp() nor ask for
        # an answer longer than MAX_OUTPUT_TOKENS.
        log_length = math.log(self.low) + self.high * rng.gauss(0.0, 1.0)
        if log_length >= math.log(MAX_OUTPUT_TOKENS):
            return MAX_OUTPUT_TOKENS
        return max(1, round(math.exp(log_length)))

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"{self.low:g}"
        if self.kind == "uniform":
            return f"{self.low:g}:{self.high:g}"
        return f"lognormal:{self.low:g}:{self.high:g}"


# --------------------------------------------------------------------------
# Limits and buckets
# --------------------------------------------------------------------------


#: The largest limit per minute: far above any provider's tier, and small
#: enough that the buckets still count single tokens and headers stay short.
MAX_LIMIT = 1e12
#: The shortest limit minute, in real seconds: 600 times faster than a real
#: API. Below it, loopback round trips and the event loop's millisecond
#: clock are a large share of the minute, and the rates mean nothing.
MIN_MINUTE = 0.1
#: The longest limit minute, in real seconds: a day. The resets the server
#: advertises are that far ahead at most, and stay dates a client can parse.
MAX_MINUTE = DAY_S
#: The largest acceleration growth per window: 100 times per window is
#: already a jump to full speed, and the ramp divides by ``growth ** idle``
#: (up to 64 idle windows), which overflows a float from a growth of about 1e5.
MAX_ACCEL_GROWTH = 100.0
#: The shortest ramp window, in real seconds: the event loop's clock resolution.
MIN_ACCEL_WINDOW = 0.001


def _check_range(
    name: str,
    value: object,
    meaning: str,
    *,
    minimum: float,
    maximum: float,
    exclusive: bool = False,
) -> float:
    """``value`` as a float if finite and from ``minimum`` (excluded if ``exclusive``) to
    ``maximum``; else ValueError naming ``name`` and the value."""
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and (value > minimum if exclusive else value >= minimum)
        and value <= maximum
    )
    if not ok:
        low, high = show_number(minimum), show_number(maximum)
        bound = f"> {low} and <= {high}" if exclusive else f"between {low} and {high}"
        raise ValueError(f"{name} must be a number {bound} ({meaning}); got {name}={value!r}")
    return float(value)  # type: ignore[arg-type]


_LIMIT_UNITS = {
    "rpm": "requests",
    "tpm": "tokens",
    "input_tpm": "input tokens",
    "output_tpm": "output tokens",
}


def _check_limit(name: str, value: object) -> float | None:
    if value is None:
        return None
    # At least 1: a bucket holding less than one request or token refuses every call.
    meaning = f"{_LIMIT_UNITS[name]} per minute, or None for no limit"
    return _check_range(name, value, meaning, minimum=1, maximum=MAX_LIMIT)


@dataclass(frozen=True)
class Limits:
    """Per-key limits per ``minute`` seconds; ``None`` leaves a dimension unlimited.

    Args:
        rpm: requests per minute.
        tpm: tokens (input + output) per minute, OpenAI style.
        input_tpm: input (prompt) tokens per minute, Anthropic style.
        output_tpm: output (completion) tokens per minute, Anthropic style.
            Each limit is from 1 to :data:`MAX_LIMIT`.
        minute: how many real seconds the limits' minute lasts: 60 for a
            faithful API, less to run a long scenario quickly (every wait the
            server advertises is in real seconds); from :data:`MIN_MINUTE`
            (0.1) to :data:`MAX_MINUTE` (a day).
        accel_start: an idle key may start at this fraction of ``rpm`` (per
            ``accel_window``), > 0 and <= 1; ``None`` turns the acceleration
            limit off. It needs ``rpm``.
        accel_growth: the allowance's factor per busy (or idle) window, > 1
            and <= :data:`MAX_ACCEL_GROWTH` (100).
        accel_window: the ramp's window in real seconds, from
            :data:`MIN_ACCEL_WINDOW` (0.001) to a day; default ``minute / 12``.

    Raises:
        ValueError: a value out of range; the message names it.
    """

    rpm: float | None = None
    tpm: float | None = None
    input_tpm: float | None = None
    output_tpm: float | None = None
    minute: float = 60.0
    accel_start: float | None = 0.5
    accel_growth: float = 2.0
    accel_window: float | None = None

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "input_tpm", "output_tpm"):
            object.__setattr__(self, name, _check_limit(name, getattr(self, name)))
        minute = _check_range(
            "minute",
            self.minute,
            "real seconds per limit minute",
            minimum=MIN_MINUTE,
            maximum=MAX_MINUTE,
        )
        object.__setattr__(self, "minute", minute)
        if self.accel_start is not None:
            start = _check_range(
                "accel_start",
                self.accel_start,
                "the share of rpm an idle key may start at",
                minimum=0,
                maximum=1,
                exclusive=True,
            )
            object.__setattr__(self, "accel_start", start)
        growth = _check_range(
            "accel_growth",
            self.accel_growth,
            "the allowance's factor per busy window",
            minimum=1,
            maximum=MAX_ACCEL_GROWTH,
            exclusive=True,
        )
        object.__setattr__(self, "accel_growth", growth)
        if self.accel_window is not None:
            window = _check_range(
                "accel_window",
                self.accel_window,
                "seconds per ramp window",
                minimum=MIN_ACCEL_WINDOW,
                maximum=MAX_MINUTE,
            )
            object.__setattr__(self, "accel_window", window)

    def per_minute(self) -> dict[str, float]:
        """The limited dimensions and their limits, in :data:`DIMENSIONS` order."""
        values = {
            "requests": self.rpm,
            "tokens": self.tpm,
            "input_tokens": self.input_tpm,
            "output_tokens": self.output_tpm,
        }
        return {name: value for name, value in values.items() if value is not None}

    @property
    def window(self) -> float:
        """The acceleration ramp's window, in real seconds."""
        return self.accel_window if self.accel_window is not None else self.minute / 12

    @property
    def accelerates(self) -> bool:
        """Whether the acceleration limit applies (it needs ``accel_start`` and ``rpm``)."""
        return self.accel_start is not None and self.rpm is not None


class _Bucket:
    """A token bucket: ``capacity`` refilled at ``rate`` per second, starting full.

    O(1) state: the level at the last update and its time. Never a log entry
    per request or per token.
    """

    __slots__ = ("capacity", "level", "rate", "updated")

    def __init__(self, capacity: float, per_second: float, now: float) -> None:
        self.capacity = capacity
        self.rate = per_second
        self.level = capacity
        self.updated = now

    def refill(self, now: float) -> float:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now
        return self.level

    def wait(self, amount: float) -> float:
        """Seconds until the level reaches ``amount`` (after refill()); 0 if it has."""
        short = amount - self.level
        return short / self.rate if short > _EPSILON else 0.0

    def to_full(self) -> float:
        """Seconds until the bucket is full again."""
        return max(0.0, (self.capacity - self.level) / self.rate)


class _Ramp:
    """The acceleration limit of one key: admissions per window, with a growing allowance.

    Windows are aligned on the key's first request. Closing a window grows the
    allowance if at least half of it was used, and each window with no
    request shrinks it, never below the start.
    """

    __slots__ = ("allowance", "count", "growth", "start", "top", "window", "window_start")

    def __init__(self, limits: Limits, now: float) -> None:
        assert limits.rpm is not None
        assert limits.accel_start is not None
        self.window = limits.window
        # At least one request per window, or a small rpm would never admit any.
        self.start = max(1.0, limits.accel_start * limits.rpm * self.window / limits.minute)
        self.top = limits.rpm  # the full bucket: past the ramp, the bucket alone decides
        self.growth = limits.accel_growth
        self.allowance = self.start
        self.window_start = now
        self.count = 0

    def roll(self, now: float) -> None:
        elapsed = math.floor((now - self.window_start) / self.window)
        if elapsed <= 0:
            return
        if self.count >= self.allowance / 2:
            self.allowance = min(self.top, self.allowance * self.growth)
        elif self.count == 0:
            self.allowance = max(self.start, self.allowance / self.growth)
        # The windows after the closed one saw no request at all.
        idle = min(elapsed - 1, 64)
        self.allowance = max(self.start, self.allowance / self.growth**idle)
        self.window_start += elapsed * self.window
        self.count = 0

    def wait(self, now: float) -> float:
        """Seconds until one more request is allowed (after roll()); 0 if it is now."""
        if self.count + 1 <= self.allowance + _EPSILON:
            return 0.0
        return self.window_start + self.window - now

    @property
    def idle(self) -> bool:
        return self.count == 0 and self.allowance <= self.start


@dataclass(frozen=True)
class DimensionState:
    """One dimension's state as headers report it."""

    limit: float
    remaining: int
    reset_s: float  #: seconds until the bucket is full again


@dataclass(frozen=True)
class Admission:
    """The model's answer for one request.

    ``admitted``: whether it may run (every bucket was charged). Otherwise
    ``reason`` names what was short (a dimension, ``"acceleration"``, or
    ``"too_large"`` for a request bigger than a full bucket, which no wait
    cures) and ``wait_s`` is how long until it would fit, the exact time
    ``retry-after-ms`` reports. ``state`` is every limited dimension after
    the decision, for the rate-limit headers.
    """

    admitted: bool
    reason: str | None
    wait_s: float
    state: dict[str, DimensionState]
    shortfall: dict[str, float] = field(default_factory=dict)


class _KeyState:
    __slots__ = ("buckets", "ramp")

    def __init__(self, limits: Limits, now: float) -> None:
        per_minute = limits.per_minute()
        self.buckets = {
            name: _Bucket(limit, limit / limits.minute, now) for name, limit in per_minute.items()
        }
        self.ramp = _Ramp(limits, now) if limits.accelerates else None

    def settled(self, now: float) -> bool:
        """Whether forgetting this key changes nothing: buckets full, ramp idle."""
        if self.ramp is not None:
            self.ramp.roll(now)
            if not self.ramp.idle:
                return False
        return all(b.refill(now) >= b.capacity - _EPSILON for b in self.buckets.values())


#: Keys kept before idle ones are forgotten (a key whose buckets are full and
#: whose ramp is back at its start is the same as a key never seen).
_MAX_KEYS = 1024


class RateModel:
    """Per-key buckets and ramps; :meth:`admit` decides one request at a time.

    ::

        model = RateModel(Limits(rpm=60, output_tpm=6000, minute=60.0))
        decision = model.admit("key-1", {"requests": 1, "output_tokens": 150}, now=0.0)
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._keys: dict[str, _KeyState] = {}

    def reset(self) -> None:
        """Forget every key: buckets full, ramps at their start."""
        self._keys.clear()

    @property
    def keys(self) -> int:
        return len(self._keys)

    def _key(self, key: str, now: float) -> _KeyState:
        state = self._keys.get(key)
        if state is None:
            if len(self._keys) >= _MAX_KEYS:
                for old in [k for k, s in self._keys.items() if s.settled(now)]:
                    del self._keys[old]
            state = self._keys[key] = _KeyState(self.limits, now)
        return state

    def admit(self, key: str, charge: Mapping[str, float], now: float) -> Admission:
        """Admit the request costing ``charge`` (per dimension) for ``key`` at ``now``, or not.

        Dimensions without a limit are not charged; a dimension missing from
        ``charge`` costs 0.
        """
        state = self._key(key, now)
        buckets = state.buckets
        wait = 0.0
        reason: str | None = None
        shortfall: dict[str, float] = {}
        for name, bucket in buckets.items():
            amount = charge.get(name, 0.0)
            if amount > bucket.capacity + _EPSILON:
                return Admission(False, "too_large", math.inf, _state(buckets, now), {name: amount})
            bucket.refill(now)
            need = bucket.wait(amount)
            if need > 0:
                shortfall[name] = amount - bucket.level
                if need > wait:
                    wait, reason = need, name
        ramp = state.ramp
        if ramp is not None:
            ramp.roll(now)
            need = ramp.wait(now)
            if need > 0 and not shortfall:
                # Only when the buckets would have admitted it: the ramp refuses
                # what is under the published limits.
                wait, reason = need, "acceleration"
        if reason is not None:
            return Admission(False, reason, wait, _state(buckets, now), shortfall)
        for name, bucket in buckets.items():
            bucket.level -= charge.get(name, 0.0)
        if ramp is not None:
            ramp.count += 1
        return Admission(True, None, 0.0, _state(buckets, now))


def _state(buckets: Mapping[str, _Bucket], now: float) -> dict[str, DimensionState]:
    return {
        name: DimensionState(
            limit=bucket.capacity,
            remaining=max(0, math.floor(bucket.level + _EPSILON)),
            reset_s=bucket.to_full(),
        )
        for name, bucket in buckets.items()
    }


def format_reset(seconds: float) -> str:
    """A duration as OpenAI's ``x-ratelimit-reset-*`` headers write it: ``120ms``, ``6m0s``."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    secs = f"{rest:.3f}".rstrip("0").rstrip(".")
    text = f"{secs}s"
    if minutes or hours:
        text = f"{minutes}m{text}"
    if hours:
        text = f"{hours}h{text}"
    return text


# --------------------------------------------------------------------------
# What the server saw
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class LLMStats:
    """What the mock LLM API saw since its start or last reset.

    Counts: ``requests`` (calls to a model endpoint with a key and a valid
    body), ``ok`` (answered 200), ``rejected`` (429), ``rejected_by`` (429s per
    reason: a dimension or ``"acceleration"``), ``too_large`` (bigger than a
    full bucket), ``invalid`` (400/401/404/405: bad body, no key, unknown path).
    Tokens: ``input_tokens`` and ``output_tokens`` served, ``rejected_input_tokens``
    (prompt tokens sent on calls answered 429: the traffic retries waste).
    ``peak_in_flight``: the most calls being generated at once. Peak rates, per
    limit minute, over a sliding minute (resolution 1/60 of it): ``peak_rpm``,
    ``peak_input_tpm``, ``peak_output_tpm``, ``peak_tpm``. ``keys``: keys held.
    ``elapsed_s``: real seconds since the start or the last reset.
    """

    requests: int
    ok: int
    rejected: int
    rejected_by: dict[str, int]
    too_large: int
    invalid: int
    input_tokens: int
    output_tokens: int
    rejected_input_tokens: int
    in_flight: int
    peak_in_flight: int
    peak_rpm: float
    peak_input_tpm: float
    peak_output_tpm: float
    peak_tpm: float
    keys: int
    elapsed_s: float

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serialisable dict (what ``GET /_corral/stats`` returns)."""
        return asdict(self)


#: Bins per limit minute in the sliding window behind the peak rates.
_BINS = 60


class PeakMeter:
    """Sums of (requests, input, output) over a sliding minute, and their peaks.

    The minute is cut into :data:`_BINS` bins; the window is the current bin
    and the 59 before it. Memory: at most 60 bins, whatever the traffic.
    """

    def __init__(self, minute: float) -> None:
        self._width = minute / _BINS
        self._bins: deque[list[float]] = deque()  # [bin index, requests, input, output]
        self._sums = [0.0, 0.0, 0.0]
        self.peaks = [0.0, 0.0, 0.0, 0.0]  # requests, input, output, input + output

    def add(self, now: float, input_tokens: int, output_tokens: int) -> None:
        index = math.floor(now / self._width)
        bins, sums = self._bins, self._sums
        while bins and bins[0][0] <= index - _BINS:
            old = bins.popleft()
            for k in range(3):
                sums[k] -= old[k + 1]
        if not bins or bins[-1][0] != index:
            bins.append([index, 0.0, 0.0, 0.0])
        last = bins[-1]
        for k, amount in enumerate((1, input_tokens, output_tokens)):
            last[k + 1] += amount
            sums[k] += amount
        peaks = self.peaks
        peaks[0] = max(peaks[0], sums[0])
        peaks[1] = max(peaks[1], sums[1])
        peaks[2] = max(peaks[2], sums[2])
        peaks[3] = max(peaks[3], sums[1] + sums[2])


# --------------------------------------------------------------------------
# Command-line flags (declared here so that `corral serve --help` works
# without the lab extra, and cli.py stays small)
# --------------------------------------------------------------------------

#: `corral serve` options of the capacity model that --llm does not use: giving
#: one with --llm is an error, not silently ignored. They default to None (the
#: real defaults are filled in later), so one given at its default value is
#: caught too.
_CAPACITY_ONLY = (
    "capacity",
    "service_ms",
    "queue",
    "status",
    "retry_after",
    "stall_fraction",
    "stall_s",
    "fail_fraction",
    "schedule",
)
_LLM_ONLY = (
    "rpm",
    "tpm",
    "input_tpm",
    "output_tpm",
    "minute",
    "latency_ms",
    "ms_per_token",
    "output_tokens",
    "accel_start",
    "accel_growth",
    "accel_window",
    "no_accel",
)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--llm`` and its options to ``corral serve``'s parser."""
    group = parser.add_argument_group(
        "mock LLM API (--llm)",
        "An OpenAI-compatible POST /v1/chat/completions and an Anthropic-style POST "
        "/v1/messages, with per-key (Authorization or x-api-key) limits per minute on "
        "requests and tokens, 429 with retry-after-ms and retry-after, x-ratelimit-* and "
        "anthropic-ratelimit-* headers, and an acceleration limit for sharp ramps.",
    )
    add = group.add_argument
    add("--llm", action="store_true", help="serve the mock LLM API instead of the capacity model")
    limit = number_option(1, MAX_LIMIT)
    per_key = f"per minute per key, from 1 to {show_number(MAX_LIMIT)}"
    add("--rpm", type=limit, default=None, metavar="N", help=f"requests {per_key} (default: none)")
    add("--tpm", type=limit, default=None, metavar="N", help=f"tokens (input + output) {per_key}")
    add("--input-tpm", type=limit, default=None, metavar="N", help=f"input tokens {per_key}")
    add("--output-tpm", type=limit, default=None, metavar="N", help=f"output tokens {per_key}")
    add(
        "--minute",
        type=number_option(MIN_MINUTE, MAX_MINUTE),
        default=None,
        metavar="S",
        help=f"real seconds per limit minute, from {show_number(MIN_MINUTE)} to "
        f"{show_number(MAX_MINUTE)} (60)",
    )
    add(
        "--latency-ms",
        type=number_option(0, DAY_MS),
        default=None,
        metavar="MS",
        help=f"milliseconds before the first token, at most {show_number(DAY_MS)} (200)",
    )
    add(
        "--ms-per-token",
        type=number_option(0, DAY_MS),
        default=None,
        metavar="MS",
        help=f"milliseconds per output token, at most {show_number(DAY_MS)} (10)",
    )
    add(
        "--output-tokens",
        type=_output_length,
        default=None,
        metavar="DIST",
        help="completion length: N, LOW:HIGH or lognormal:MEDIAN:SIGMA (lognormal:120:0.6)",
    )
    add(
        "--accel-start",
        type=number_option(0, 1, exclusive=True),
        default=None,
        metavar="F",
        help="share of rpm an idle key starts at, > 0 and <= 1 (0.5)",
    )
    add(
        "--accel-growth",
        type=number_option(1, MAX_ACCEL_GROWTH, exclusive=True),
        default=None,
        metavar="F",
        help=f"allowance factor per busy window, > 1 and <= {show_number(MAX_ACCEL_GROWTH)} (2)",
    )
    add(
        "--accel-window",
        type=number_option(MIN_ACCEL_WINDOW, MAX_MINUTE),
        default=None,
        metavar="S",
        help=f"ramp window in seconds, from {show_number(MIN_ACCEL_WINDOW)} to "
        f"{show_number(MAX_MINUTE)} (minute / 12)",
    )
    add("--no-accel", action="store_true", default=None, help="no acceleration limit")


def misplaced_options(args: argparse.Namespace) -> list[str]:
    """The options given that do not belong with ``args.llm`` (as ``--flag`` names)."""
    given = _CAPACITY_ONLY if args.llm else _LLM_ONLY
    wrong = [name for name in given if getattr(args, name, None) is not None]
    return ["--" + name.replace("_", "-") for name in wrong]


def _output_length(text: str) -> OutputLength:
    try:
        return OutputLength.parse(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {_OUTPUT_FORMS}; got {text!r}") from None
