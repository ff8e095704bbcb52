"""Thousands of chat completions with the official ``openai`` SDK, paced by corral.

Run it as is and it starts corral's mock LLM API on loopback (no key, no
bill, nothing leaves the machine)::

    python examples/openai_chat.py --prompts 500

Point it at a real endpoint with its published limits (``OPENAI_API_KEY`` set)::

    python examples/openai_chat.py --base-url https://api.openai.com/v1 \\
        --model gpt-4o-mini --rpm 500 --input-tpm 200000 --output-tpm 40000

The recipe, in four decisions:

1. **One retry loop, corral's.** ``AsyncOpenAI(max_retries=0)``: the SDK
   otherwise retries every call twice on its own, so ``retries=5`` around it
   means up to 18 calls per prompt, none of them seen by corral's retry
   budget or its shared cooldown after a 429.
2. **One Limiter per API key**, shared by every map that uses the key: the
   provider's limits are per key, not per loop or per map.
3. **Weighted rates.** Requests, input tokens and output tokens per minute,
   as the provider publishes them. ``cost=`` reserves what a call will use
   before it starts (the prompt's tokens are known; the answer's are
   estimated), ``usage=`` settles it with the ``usage`` block of the answer.
4. **Follow the server.** ``limiter.sync_headers(headers)`` clamps the local
   budget to the ``x-ratelimit-remaining-*`` the server reports, and a 429's
   ``retry-after-ms`` pauses every call sharing the Limiter.
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

import openai

import corral

#: Tokens per character, the rule of thumb for English (tiktoken counts exactly).
CHARS_PER_TOKEN = 4
#: The SDK's default read timeout is ten minutes: a hung call should fail sooner.
TIMEOUT_S = 60.0
#: The mock's bounds, which also suit a real API: a limit of 1 to 1e12 per
#: minute, and a minute of 0.1 s (600 times faster than real) to a day.
LIMIT_RANGE = (1.0, 1e12)
MINUTE_RANGE = (0.1, 86_400.0)


def make_limiter(
    *,
    rpm: float,
    input_tpm: float | None = None,
    output_tpm: float | None = None,
    per: float = 60.0,
    limit: int | str = "auto",
) -> corral.Limiter:
    """The Limiter for one API key: its published limits, and a cap on calls in flight.

    ``limit="auto"`` starts with few calls in flight and grows while answers
    come back fine: a ramp, where a jump from idle to the full rate meets the
    providers' acceleration limits (429s below the published limits). ``per``
    is the length of the provider's minute in seconds (60; the tests run the
    mock on a shorter one).
    """
    dimensions = {"requests": rpm}
    if input_tpm is not None:
        dimensions["input_tokens"] = input_tpm
    if output_tpm is not None:
        dimensions["output_tokens"] = output_tpm
    # burst: a few calls may start back to back, so that answers shorter than
    # their reservation give their tokens back in full.
    return corral.Limiter(limit=limit, rate=corral.Rate(dimensions, per=per, burst=8))


def retryable(exc: BaseException) -> bool:
    """corral's transient failures (429, 5xx, timeouts), plus the SDK's connection errors."""
    return corral.transient(exc) or isinstance(exc, openai.APIConnectionError)


def make_client(base_url: str | None, api_key: str | None) -> openai.AsyncOpenAI:
    """An AsyncOpenAI that never retries on its own, on the aiohttp transport."""
    return openai.AsyncOpenAI(
        base_url=base_url,
        api_key=api_key,
        max_retries=0,
        timeout=TIMEOUT_S,
        http_client=openai.DefaultAioHttpClient(timeout=TIMEOUT_S),
    )


async def answer_all(
    client: openai.AsyncOpenAI,
    prompts: Iterable[str],
    *,
    limiter: corral.Limiter,
    model: str,
    max_tokens: int = 256,
    attempts: int = 6,
    backoff: float = 1.0,
) -> list[Any]:
    """Ask every prompt; the answers (or each prompt's final exception), in prompt order."""
    # Reserve the mean answer seen so far (half of max_tokens before the first
    # one); usage= corrects each reservation when its answer arrives.
    seen = {"answers": 0, "tokens": 0}

    def cost(prompt: str) -> dict[str, float]:
        expected = seen["tokens"] / seen["answers"] if seen["answers"] else max_tokens / 2
        return {"input_tokens": len(prompt) / CHARS_PER_TOKEN + 7, "output_tokens": expected}

    def usage(completion: Any) -> dict[str, float]:
        seen["answers"] += 1
        seen["tokens"] += completion.usage.completion_tokens
        return {
            "input_tokens": completion.usage.prompt_tokens,
            "output_tokens": completion.usage.completion_tokens,
        }

    async def ask(prompt: str) -> Any:
        raw = await client.chat.completions.with_raw_response.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
        )
        limiter.sync_headers(raw.headers)
        return raw.parse()

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
    if args.base_url is None:
        from corral.lab import serve_llm

        mock: Any = serve_llm(
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
        base_url = args.base_url or f"{url}/v1"
        api_key = os.environ.get("OPENAI_API_KEY", "mock-key") if args.base_url else "mock-key"
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
    tokens = sum(a.usage.completion_tokens for a in answers if not isinstance(a, BaseException))
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
            f"must be an http:// or https:// URL, like https://api.openai.com/v1; got {text!r}"
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
    add("--model", type=_name, default="gpt-4o-mini", help="the model to ask (%(default)s)")
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
