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
import os
import sys
from collections.abc import Iterable
from typing import Any

import openai

import corral

#: Tokens per character, the rule of thumb for English (tiktoken counts exactly).
CHARS_PER_TOKEN = 4
#: The SDK's default read timeout is ten minutes: a hung call should fail sooner.
TIMEOUT_S = 60.0


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


def _prompts(n: int) -> list[str]:
    return [f"In one sentence, what is the number {i} known for?" for i in range(n)]


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", help="the API's base URL (default: start the mock)")
    parser.add_argument("--model", default="gpt-4o-mini")
    parser.add_argument("--prompts", type=int, default=200, help="how many prompts (200)")
    parser.add_argument("--rpm", type=float, default=500.0)
    parser.add_argument("--input-tpm", type=float, default=200_000.0)
    parser.add_argument("--output-tpm", type=float, default=40_000.0)
    parser.add_argument("--minute", type=float, default=6.0, help="the mock's minute, in seconds")
    return asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
