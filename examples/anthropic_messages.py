"""Thousands of messages with the official ``anthropic`` SDK, paced by corral.

Run it as is and it starts corral's mock LLM API on loopback (no key, no
bill, nothing leaves the machine)::

    python examples/anthropic_messages.py --prompts 500

Point it at the real API with your tier's limits (``ANTHROPIC_API_KEY`` set)::

    python examples/anthropic_messages.py --base-url https://api.anthropic.com \\
        --model claude-haiku-4-5 --rpm 50 --input-tpm 50000 --output-tpm 10000

Anthropic limits requests, input tokens and output tokens per minute
separately, and reports each in ``anthropic-ratelimit-*`` headers. The recipe
is the same as ``openai_chat.py``'s:

1. ``AsyncAnthropic(max_retries=0)``: one retry loop, corral's, so that every
   attempt counts against the retry budget and a 429 pauses every call
   sharing the Limiter (the SDK would retry each call twice, unseen);
2. one ``corral.Limiter`` per API key, with the three limits as a weighted
   ``corral.Rate`` and ``limit="auto"`` (a ramp, not a jump, from idle);
3. ``cost=`` reserves the prompt's tokens and the expected answer before a
   call starts; ``usage=`` settles it from the answer's ``usage``;
4. ``limiter.sync_headers(headers)`` follows what the server says remains.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

import anthropic

import corral

CHARS_PER_TOKEN = 4
TIMEOUT_S = 60.0
#: The mock's bounds, which also suit a real API: a limit of 1 to 1e12 per
#: minute, and a minute of 0.1 s (600 times faster than real) to a day.
LIMIT_RANGE = (1.0, 1e12)
MINUTE_RANGE = (0.1, 86_400.0)


def make_limiter(
    *,
    rpm: float,
    input_tpm: float,
    output_tpm: float,
    per: float = 60.0,
    limit: int | str = "auto",
) -> corral.Limiter:
    """The Limiter for one API key: its three published limits per ``per`` seconds."""
    rate = corral.Rate(
        {"requests": rpm, "input_tokens": input_tpm, "output_tokens": output_tpm},
        per=per,
        burst=8,
    )
    return corral.Limiter(limit=limit, rate=rate)


def retryable(exc: BaseException) -> bool:
    """corral's transient failures (429, 529 overloaded, 5xx, timeouts), plus connection errors."""
    status = getattr(exc, "status_code", None)
    return (
        corral.transient(exc)
        or status == 529  # Anthropic's "overloaded"
        or isinstance(exc, anthropic.APIConnectionError)
    )


def make_client(base_url: str | None, api_key: str | None) -> anthropic.AsyncAnthropic:
    """An AsyncAnthropic that never retries on its own, on the aiohttp transport."""
    return anthropic.AsyncAnthropic(
        base_url=base_url,
        api_key=api_key,
        max_retries=0,
        timeout=TIMEOUT_S,
        http_client=anthropic.DefaultAioHttpClient(timeout=TIMEOUT_S),
    )


async def answer_all(
    client: anthropic.AsyncAnthropic,
    prompts: Iterable[str],
    *,
    limiter: corral.Limiter,
    model: str,
    max_tokens: int = 256,
    attempts: int = 6,
    backoff: float = 1.0,
) -> list[Any]:
    """Ask every prompt; the messages (or each prompt's final exception), in prompt order."""
    seen = {"answers": 0, "tokens": 0}

    def cost(prompt: str) -> dict[str, float]:
        expected = seen["tokens"] / seen["answers"] if seen["answers"] else max_tokens / 2
        return {"input_tokens": len(prompt) / CHARS_PER_TOKEN + 7, "output_tokens": expected}

    def usage(message: Any) -> dict[str, float]:
        seen["answers"] += 1
        seen["tokens"] += message.usage.output_tokens
        return {
            "input_tokens": message.usage.input_tokens,
            "output_tokens": message.usage.output_tokens,
        }

    async def ask(prompt: str) -> Any:
        raw = await client.messages.with_raw_response.create(
            model=model,
            max_tokens=max_tokens,
            messages=[{"role": "user", "content": prompt}],
        )
        limiter.sync_headers(raw.headers)
        return await raw.parse()

    retry = corral.Retry(attempts=attempts, backoff=backoff, max_backoff=60.0, on=retryable)
    answers = []
    async with corral.map(
        ask,
        prompts,
        limit=limiter,
        cost=cost,
        usage=usage,
        retries=retry,
        return_exceptions=True,
    ) as results:
        async for answer in results:
            answers.append(answer)
    return answers


def _prompts(n: int) -> Iterator[str]:
    # Lazy, as corral.map reads its items: --prompts 10000000 holds no list of prompts.
    return (f"In one sentence, what is the number {i} known for?" for i in range(n))


async def _main(args: argparse.Namespace) -> int:
    mock: Any
    if args.base_url is None:
        from corral.lab import serve_llm

        mock = serve_llm(
            rpm=args.rpm,
            input_tpm=args.input_tpm,
            output_tpm=args.output_tpm,
            minute=args.minute,
            latency_ms=20,
            ms_per_token=0.5,
        )
        print(f"no --base-url: serving corral's mock LLM API ({args.minute:g} s per minute)")
    else:
        mock = contextlib.nullcontext()  # a real endpoint: nothing to start
    async with mock as url:
        base_url = args.base_url or url
        api_key = os.environ.get("ANTHROPIC_API_KEY", "mock-key") if args.base_url else "mock-key"
        limiter = make_limiter(
            rpm=args.rpm,
            input_tpm=args.input_tpm,
            output_tpm=args.output_tpm,
            per=60.0 if args.base_url else args.minute,
        )
        async with make_client(base_url, api_key) as client:
            answers = await answer_all(
                client, _prompts(args.prompts), limiter=limiter, model=args.model
            )
    failed = [a for a in answers if isinstance(a, BaseException)]
    tokens = sum(a.usage.output_tokens for a in answers if not isinstance(a, BaseException))
    print(f"{len(answers) - len(failed)} answered, {len(failed)} failed, {tokens:,} output tokens")
    for failure in failed[:5]:
        print(f"  {type(failure).__name__}: {failure}", file=sys.stderr)
    return 1 if failed else 0


def _number(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a finite number from ``low`` to ``high``.

    ``float`` alone takes ``0``, ``-1``, ``nan`` and ``inf``, which then fail
    far from the command line; argparse turns this refusal into a usage error
    naming the option and the value.
    """

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not low <= value <= high:  # False for nan; inf is above any finite high
            raise argparse.ArgumentTypeError(
                f"must be a number from {low:g} to {high:g}; got {text!r}"
            )
        return value

    return parse


def _count(text: str) -> int:
    """An argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1; got {text!r}")
    return value


def _url(text: str) -> str:
    """An argparse type: an http:// or https:// URL with a host.

    An empty or schemeless URL would otherwise reach the SDK, which quietly
    falls back to its default endpoint or fails on every call.
    """
    try:
        parts = urlsplit(text)
        _ = parts.port  # parsed lazily: an out-of-range port raises only here
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        valid = False
    if not valid:
        raise argparse.ArgumentTypeError(
            f"must be an http:// or https:// URL, like https://api.anthropic.com; got {text!r}"
        )
    return text


def _name(text: str) -> str:
    """An argparse type: a non-empty name."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must not be empty; got {text!r}")
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--base-url", type=_url, help="the API's base URL (default: start the mock)")
    add("--model", type=_name, default="claude-haiku-4-5", help="the model to ask (%(default)s)")
    add("--prompts", type=_count, default=200, help="how many prompts, an int >= 1 (200)")
    limit = _number(*LIMIT_RANGE)
    per_minute = f"per minute, from {LIMIT_RANGE[0]:g} to {LIMIT_RANGE[1]:g}"
    add("--rpm", type=limit, default=500.0, help=f"requests {per_minute} (500)")
    add("--input-tpm", type=limit, default=200_000.0, help=f"input tokens {per_minute} (200000)")
    add("--output-tpm", type=limit, default=40_000.0, help=f"output tokens {per_minute} (40000)")
    add(
        "--minute",
        type=_number(*MINUTE_RANGE),
        default=None,
        help=f"the mock's minute, in seconds, from {MINUTE_RANGE[0]:g} to "
        f"{MINUTE_RANGE[1]:g} (6); a real API's is 60",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked: a bad value is a usage error (exit 2) naming its option."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.minute is None:
        args.minute = 6.0
    elif args.base_url is not None:
        # The real API's minute is 60 s whatever is asked here: say so, not ignore it.
        parser.error("argument --minute: applies to the mock only; a real API's minute is 60 s")
    return args


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(_main(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
