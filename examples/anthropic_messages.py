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
import os
import sys
from collections.abc import Iterable
from typing import Any

import anthropic

import corral

CHARS_PER_TOKEN = 4
TIMEOUT_S = 60.0


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


def _prompts(n: int) -> list[str]:
    return [f"In one sentence, what is the number {i} known for?" for i in range(n)]


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", help="the API's base URL (default: start the mock)")
    parser.add_argument("--model", default="claude-haiku-4-5")
    parser.add_argument("--prompts", type=int, default=200, help="how many prompts (200)")
    parser.add_argument("--rpm", type=float, default=500.0)
    parser.add_argument("--input-tpm", type=float, default=200_000.0)
    parser.add_argument("--output-tpm", type=float, default=40_000.0)
    parser.add_argument("--minute", type=float, default=6.0, help="the mock's minute, in seconds")
    return asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
