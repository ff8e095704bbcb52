"""The recipes in examples/, run as written against the mock LLM API over real HTTP.

Each recipe is imported from its file and pointed at :func:`corral.lab.serve_llm`
on loopback with a dummy key. The mock's minute is short (a few seconds), so a
few hundred tokens per minute make the recipes pace themselves; the checks are
exact where the server counts: every prompt answered once, in order, and every
attempt the server saw accounted for.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import corral.lab
from _loops import run
from corral.lab.llm_model import estimate_prompt_tokens

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HANG_GUARD = 60.0

pytestmark = pytest.mark.slow


def _recipe(name: str) -> ModuleType:
    """Import examples/NAME.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"corral_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


PROMPTS = [f"Say something about {i}: " + "word " * (i % 17) for i in range(80)]

#: Limits per (short) minute: the output tokens bind, at about 25 answers a minute.
LIMITS: dict[str, Any] = {"rpm": 600.0, "input_tpm": 50_000.0, "output_tpm": 1_000.0}
MINUTE = 0.5


def _serve() -> Any:
    return corral.lab.LLMServer(
        **LIMITS, minute=MINUTE, latency_ms=2, ms_per_token=0.02, output_tokens="10:70", seed=1
    )


def _check(server: Any, prompt_tokens: list[int]) -> None:
    stats = server.stats()
    assert stats.ok == len(PROMPTS)  # each prompt answered exactly once
    assert stats.requests == stats.ok + stats.rejected  # no attempt unaccounted for
    assert stats.invalid == stats.too_large == 0
    assert prompt_tokens == [estimate_prompt_tokens([p]) for p in PROMPTS]  # in prompt order
    # Paced at the published limits: no 429 at all, and no minute above the
    # output-token limit by more than a burst (unpaced, the idle bucket's
    # burst plus a minute's refill would make it twice the limit).
    assert stats.rejected == 0
    assert stats.peak_output_tpm <= 1.25 * LIMITS["output_tpm"]


def test_the_openai_recipe_answers_every_prompt_at_the_published_pace() -> None:
    """examples/openai_chat.py: AsyncOpenAI(max_retries=0) + corral.map + a weighted Limiter."""
    recipe = _recipe("openai_chat")

    async def scenario() -> tuple[Any, list[Any]]:
        async with asyncio.timeout(HANG_GUARD), _serve() as server:
            limiter = recipe.make_limiter(**LIMITS, per=MINUTE)
            async with recipe.make_client(f"{server.url}/v1", "dummy-key") as client:
                answers = await recipe.answer_all(
                    client, PROMPTS, limiter=limiter, model="m", backoff=0.05
                )
            return server, answers

    server, answers = run(scenario)
    failures = [a for a in answers if isinstance(a, BaseException)]
    assert failures == []
    _check(server, [a.usage.prompt_tokens for a in answers])


def test_the_anthropic_recipe_answers_every_prompt_at_the_published_pace() -> None:
    """examples/anthropic_messages.py: AsyncAnthropic(max_retries=0), the same recipe."""
    recipe = _recipe("anthropic_messages")

    async def scenario() -> tuple[Any, list[Any]]:
        async with asyncio.timeout(HANG_GUARD), _serve() as server:
            limiter = recipe.make_limiter(**LIMITS, per=MINUTE)
            async with recipe.make_client(server.url, "dummy-key") as client:
                answers = await recipe.answer_all(
                    client, PROMPTS, limiter=limiter, model="m", backoff=0.05
                )
            return server, answers

    server, answers = run(scenario)
    failures = [a for a in answers if isinstance(a, BaseException)]
    assert failures == []
    _check(server, [a.usage.input_tokens for a in answers])


@pytest.mark.parametrize("name", ["openai_chat", "anthropic_messages"])
def test_a_recipe_runs_offline_from_the_command_line(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --base-url a recipe starts the mock itself: no key, no traffic off loopback."""
    recipe = _recipe(name)
    assert recipe.main(["--prompts", "30", "--minute", "1"]) == 0
    out = capsys.readouterr().out
    assert "serving corral's mock LLM API" in out
    assert "30 answered, 0 failed" in out


def test_the_recipes_retry_connection_errors_and_429s_only() -> None:
    """retryable(): corral's transient failures plus the SDKs' connection errors, not a 400."""
    import anthropic
    import httpx2
    import openai

    request = httpx2.Request("POST", "http://127.0.0.1/v1/chat/completions")
    for sdk, recipe in (
        (openai, _recipe("openai_chat")),
        (anthropic, _recipe("anthropic_messages")),
    ):
        assert recipe.retryable(sdk.APIConnectionError(request=request))
        assert recipe.retryable(
            sdk.RateLimitError(
                "slow down", response=httpx2.Response(429, request=request), body=None
            )
        )
        assert not recipe.retryable(
            sdk.BadRequestError("bad", response=httpx2.Response(400, request=request), body=None)
        )
