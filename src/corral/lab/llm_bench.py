"""``corral bench --only llm``: the same prompts to a rate-limited LLM API, eight ways.

The question people actually ask is "how do I run 50,000 LLM calls without
drowning in 429s?". This part answers it with numbers: one mock API
(:mod:`corral.lab.llm_server`) with limits the clients are not told (requests,
input tokens and output tokens per minute, per key, and an acceleration limit),
the same prompts, the official ``openai`` SDK, and these strategies:

``tenacity``
    ``asyncio.Semaphore`` + ``asyncio.gather`` + tenacity's
    ``wait_random_exponential(min=1, max=60)`` and ``stop_after_attempt(6)``
    around each call, as the OpenAI cookbook's rate-limit guide shows.
``cookbook``
    The OpenAI cookbook's parallel processor's approach: it is told the
    published request and token limits, tracks its own capacity (prompt
    tokens + ``max_tokens`` per call against the token budget), polls every
    millisecond, retries up to 5 attempts, and after any 429 pauses every
    new start for 15 s.
``sdk``
    Semaphore + gather, relying on the SDK's own retries (``max_retries=2``).
``corral_fixed``
    ``corral.map`` on a shared ``corral.Limiter(limit=32)`` with
    ``corral.Retry(attempts=6)`` (Retry-After honoured, shared cooldown).
``corral_auto``
    The same with ``limit="auto"``: nothing about the limits is known.
``corral_rate_auto``
    ``corral.Limiter(limit="auto", rate="auto")``: the start rate adapts too
    (run only where the library has it).
``corral_weighted``
    A ``corral.Limiter`` with a weighted ``corral.Rate`` of the published
    limits and ``cost=``/``usage=`` reconcile (the expected answer is the mean
    seen so far); run only where the library has them (the record says why
    not otherwise).
``corral_weighted_headers``
    The same, also calling ``Limiter.sync_headers`` with every answer's
    ``x-ratelimit-*`` headers.

The mock runs ``minute`` real seconds per limit minute (every advertised wait
scales with it), so each fixed wait a strategy has (tenacity's 1 to 60 s, the
cookbook's 15 s pause) is scaled by ``minute / 60`` too: every strategy lives
on the mock's clock. The SDK's own backoff is left as shipped; it follows
the server's ``retry-after-ms`` whenever there is one, and here there always is.

Counted at the server (exact, whoever retries): attempts, 429s, the prompt
tokens sent on attempts answered 429 ("wasted"). Counted at the client: items
answered and failed, wall time, and the output tokens per minute after warm-up
(from the end of the first two limit minutes, when the idle bucket's burst and
the ramp are over, to the 95th percentile of completions) as a share of the
output-token limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from corral.lab.llm_model import estimate_prompt_tokens
from corral.lab.runner import Result, Spec

__all__ = [
    "LLM_SERVER",
    "LLM_STRATEGIES",
    "STRATEGY_RUNNERS",
    "make_prompts",
    "markdown_lines",
    "measure_llm",
    "part_llm",
    "summary_rows",
]

#: The mock API of the llm part. The clients are told none of it, except the
#: strategies that take the published limits as a user would from a
#: dashboard (the cookbook processor and corral's weighted rates).
LLM_SERVER: dict[str, Any] = {
    "rpm": 500.0,
    "input_tpm": 100_000.0,
    "output_tpm": 20_000.0,
    # 2 real seconds per limit minute: 30x faster than a real API, and slow
    # enough (about 100 answers a second) that the SDK's CPU time per call does
    # not decide the race on a small machine.
    "minute": 2.0,
    # A real answer: 0.5 s to the first token, then 10 ms per token; scaled likewise.
    "latency_ms": 500 / 30,
    "ms_per_token": 10 / 30,
    "jitter": 0.2,
    "output_tokens": "lognormal:80:0.6",
    "accel_start": 0.5,
    "accel_growth": 2.0,
    "seed": 0,
}

#: Tokens a call may generate at most.
MAX_TOKENS = 256
#: Concurrency of the fixed strategies (the semaphores and corral's fixed limit).
CONCURRENCY = 32
MODEL = "corral-mock-1"
#: Requests the weighted rate lets start back to back: a little slack, so that
#: answers shorter than their reservation give their tokens back in full.
WEIGHTED_BURST = 8
#: Limit minutes of warm-up left out of the steady-state throughput.
WARMUP_MINUTES = 2.0

#: (label, strategy), in the order of the table and the plot.
LLM_STRATEGIES: list[tuple[str, str]] = [
    ("semaphore + gather + tenacity", "tenacity"),
    ("cookbook processor (15 s pause after a 429)", "cookbook"),
    ("semaphore + gather, SDK max_retries=2", "sdk"),
    (f"corral limit={CONCURRENCY}, retries", "corral_fixed"),
    ("corral limit='auto', retries", "corral_auto"),
    ("corral rate='auto' + limit='auto', retries", "corral_rate_auto"),
    ("corral weighted rates (cost=, usage=)", "corral_weighted"),
    ("corral weighted rates + sync_headers", "corral_weighted_headers"),
]


# --------------------------------------------------------------------------------------
# The prompts
# --------------------------------------------------------------------------------------

_WORDS = [
    *("ledger", "invoice", "shipment", "customer", "refund", "warranty", "battery"),
    *("screen", "courier", "parcel", "account", "password", "delivery", "billing"),
    *("subscription", "contract", "discount", "voucher"),
]


def make_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` support tickets to summarise, of varied length (about 150 tokens on average)."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        words = max(8, round(58 * math.exp(0.5 * rng.gauss(0.0, 1.0))))
        body = " ".join(rng.choice(_WORDS) for _ in range(words))
        prompts.append(f"Summarise ticket {i} in two sentences: {body}")
    return prompts


# --------------------------------------------------------------------------------------
# One run's bookkeeping
# --------------------------------------------------------------------------------------


@dataclass
class _Run:
    """What every strategy gets: the client maker, the prompts, the clock, the tally."""

    url: str
    key: str
    prompts: list[str]
    published: dict[str, float]
    minute: float
    tally: Any  # workloads.Tally: progress to the parent
    done: list[tuple[float, int]] = field(default_factory=list)  # (time, completion tokens)
    failures: dict[str, int] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        """Real seconds per second of the limits' clock."""
        return self.minute / 60.0

    def client(self, max_retries: int = 0) -> Any:
        import openai

        return openai.AsyncOpenAI(
            base_url=f"{self.url}/v1",
            api_key=self.key,
            max_retries=max_retries,
            http_client=openai.DefaultAioHttpClient(timeout=60.0),
        )

    def ok(self, completion_tokens: int) -> None:
        self.done.append((time.perf_counter(), completion_tokens))
        self.tally.ok(0.0)

    def fail(self, exc: BaseException) -> None:
        kind = _failure_kind(exc)
        self.failures[kind] = self.failures.get(kind, 0) + 1
        self.tally.fail(kind)


def _failure_kind(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return str(status)
    return type(exc).__name__


async def _ask(client: Any, prompt: str) -> Any:
    return await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS
    )


async def _warm_up(client: Any) -> None:
    """One refused call: the SDK's lazy imports and a connection, without touching a bucket."""
    import openai

    with contextlib.suppress(openai.BadRequestError):
        await client.chat.completions.create(model=MODEL, messages=[])


# --------------------------------------------------------------------------------------
# The strategies
# --------------------------------------------------------------------------------------


async def _semaphore_gather(run: _Run, call: Callable[[str], Awaitable[Any]]) -> None:
    semaphore = asyncio.Semaphore(CONCURRENCY)

    async def one(prompt: str) -> None:
        async with semaphore:
            try:
                completion = await call(prompt)
            except Exception as exc:
                run.fail(exc)
                return
        run.ok(completion.usage.completion_tokens)

    await asyncio.gather(*(one(p) for p in run.prompts))


async def run_tenacity(run: _Run) -> None:
    import openai
    from tenacity import (
        AsyncRetrying,
        retry_if_exception_type,
        stop_after_attempt,
        wait_random_exponential,
    )

    scale = run.scale
    async with run.client() as client:
        await _warm_up(client)

        async def call(prompt: str) -> Any:
            # The slot is held through the backoff, as `async with sem: await
            # decorated()` does in the cookbook's example.
            async for attempt in AsyncRetrying(
                wait=wait_random_exponential(multiplier=scale, min=scale, max=60 * scale),
                stop=stop_after_attempt(6),
                retry=retry_if_exception_type(openai.RateLimitError),
                reraise=True,
            ):
                with attempt:
                    return await _ask(client, prompt)
            raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

        await _semaphore_gather(run, call)


async def run_sdk(run: _Run) -> None:
    async with run.client(max_retries=2) as client:
        await _warm_up(client)
        await _semaphore_gather(run, lambda prompt: _ask(client, prompt))


async def run_cookbook(run: _Run) -> None:
    """The cookbook processor's scheduling: own capacity counters, 1 ms polling, 15 s pause."""
    import openai

    rpm = run.published["rpm"]
    tpm = run.published["input_tpm"]  # its one token budget; it counts prompt + max_tokens
    pause = 15.0 * run.scale
    clock = time.perf_counter
    request_capacity, token_capacity = rpm, tpm
    last_update = clock()
    last_rate_limit = -math.inf
    retry_queue: deque[tuple[str, int]] = deque()
    pending = iter(run.prompts)
    exhausted = False
    in_progress = 0
    tasks: set[asyncio.Task[None]] = set()

    async with run.client() as client:
        await _warm_up(client)

        async def call(prompt: str, attempts_left: int) -> None:
            nonlocal in_progress, last_rate_limit
            try:
                completion = await _ask(client, prompt)
            except Exception as exc:
                if isinstance(exc, openai.RateLimitError):
                    last_rate_limit = clock()
                if attempts_left > 1:
                    retry_queue.append((prompt, attempts_left - 1))
                else:
                    run.fail(exc)
            else:
                run.ok(completion.usage.completion_tokens)
            finally:
                in_progress -= 1

        job: tuple[str, int] | None = None
        try:
            while True:
                if job is None:
                    if retry_queue:
                        job = retry_queue.popleft()
                    elif not exhausted:
                        prompt = next(pending, None)
                        if prompt is None:
                            exhausted = True
                        else:
                            job = (prompt, 5)
                now = clock()
                elapsed = (now - last_update) / run.minute  # in limit minutes
                request_capacity = min(rpm, request_capacity + rpm * elapsed)
                token_capacity = min(tpm, token_capacity + tpm * elapsed)
                last_update = now
                if job is not None:
                    need = estimate_prompt_tokens([job[0]]) + MAX_TOKENS
                    if request_capacity >= 1 and token_capacity >= need:
                        request_capacity -= 1
                        token_capacity -= need
                        in_progress += 1
                        task = asyncio.ensure_future(call(*job))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                        job = None
                if job is None and exhausted and not retry_queue and in_progress == 0:
                    break
                await asyncio.sleep(0.001)
                since = clock() - last_rate_limit
                if since < pause:
                    await asyncio.sleep(pause - since)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _corral_retry(run: _Run) -> Any:
    import corral

    return corral.Retry(attempts=6, backoff=run.scale, max_backoff=60 * run.scale)


async def _corral_map(run: _Run, limit: Any, **extra: Any) -> None:
    import corral

    call: Callable[[str], Awaitable[Any]] = extra.pop("call")
    stream: Any = corral.map(
        call,
        run.prompts,
        limit=limit,
        retries=_corral_retry(run),
        return_exceptions=True,
        ordered=False,
        **extra,
    )
    async with stream as results:
        async for outcome in results:
            if isinstance(outcome, BaseException):
                run.fail(outcome)
            else:
                run.ok(outcome.usage.completion_tokens)


async def run_corral_fixed(run: _Run) -> None:
    import corral

    async with run.client() as client:
        await _warm_up(client)
        limiter = corral.Limiter(limit=CONCURRENCY)
        await _corral_map(run, limiter, call=lambda prompt: _ask(client, prompt))


async def run_corral_auto(run: _Run) -> None:
    async with run.client() as client:
        await _warm_up(client)
        await _corral_map(run, "auto", call=lambda prompt: _ask(client, prompt))


async def run_corral_rate_auto(run: _Run) -> None:
    import corral

    async with run.client() as client:
        await _warm_up(client)
        limiter: Any = corral.Limiter(limit="auto", rate="auto")
        await _corral_map(run, limiter, call=lambda prompt: _ask(client, prompt))


def rate_auto_unavailable() -> str | None:
    """``None`` if this corral adapts the start rate (``rate="auto"``), else why not."""
    import corral

    try:
        corral.Limiter(rate="auto")
    except (TypeError, ValueError) as exc:
        return f"this corral has no rate='auto': {exc}"
    return None


def weighted_unavailable() -> str | None:
    """``None`` if this corral has weighted rates (cost=, usage=, sync_headers), else why not."""
    import corral

    if not hasattr(corral.Limiter, "sync_headers"):
        return "this corral has no Limiter.sync_headers (weighted rates)"
    try:
        corral.Rate({"requests": 1.0, "output_tokens": 1.0}, per=60.0)
        # Building a map checks its keywords at once, and starts nothing.
        corral.map(_echo, (), cost=_no_usage, usage=_no_usage)
    except (TypeError, ValueError) as exc:
        return f"this corral has no weighted rates: {exc}"
    return None


async def _echo(value: Any) -> Any:
    return value


def _no_usage(value: Any) -> None:
    return None


async def run_corral_weighted(run: _Run, *, follow_headers: bool = False) -> None:
    import corral

    published = run.published
    rate: Any = corral.Rate(
        {
            "requests": published["rpm"],
            "input_tokens": published["input_tpm"],
            "output_tokens": published["output_tpm"],
        },
        per=run.minute,
        burst=WEIGHTED_BURST,
    )
    limiter: Any = corral.Limiter(limit=CONCURRENCY, rate=rate)
    async with run.client() as client:
        await _warm_up(client)

        async def call(prompt: str) -> Any:
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS
            )
            if follow_headers:
                limiter.sync_headers(raw.headers)
            return raw.parse()

        # The prompt's tokens are known before the call; the answer's are not.
        # Reserve the mean answer seen so far (half of max_tokens before the
        # first), and let usage= settle the difference.
        seen = [0, 0]  # answers, their tokens

        def cost(prompt: str) -> dict[str, float]:
            expected = seen[1] / seen[0] if seen[0] else MAX_TOKENS / 2
            return {"input_tokens": estimate_prompt_tokens([prompt]), "output_tokens": expected}

        def usage(completion: Any) -> dict[str, float]:
            tokens = completion.usage.completion_tokens
            seen[0] += 1
            seen[1] += tokens
            return {"input_tokens": completion.usage.prompt_tokens, "output_tokens": tokens}

        await _corral_map(run, limiter, call=call, cost=cost, usage=usage)


STRATEGY_RUNNERS: dict[str, Callable[[_Run], Awaitable[None]]] = {
    "tenacity": run_tenacity,
    "cookbook": run_cookbook,
    "sdk": run_sdk,
    "corral_fixed": run_corral_fixed,
    "corral_auto": run_corral_auto,
    "corral_rate_auto": run_corral_rate_auto,
    "corral_weighted": run_corral_weighted,
    "corral_weighted_headers": lambda run: run_corral_weighted(run, follow_headers=True),
}


def _unavailable(strategy: str) -> str | None:
    import importlib.util

    for module, extra in (("openai", "llm"), ("tenacity", "lab")):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install 'corral[{extra}]')"
    if strategy.startswith("corral_weighted"):
        return weighted_unavailable()
    if strategy == "corral_rate_auto":
        return rate_auto_unavailable()
    return None


# --------------------------------------------------------------------------------------
# The measure (in a child process)
# --------------------------------------------------------------------------------------


def steady_share(
    done: list[tuple[float, int]], start: float, minute: float, output_tpm: float
) -> float | None:
    """Output tokens per minute after warm-up, as a share of ``output_tpm``; None if too short.

    The window runs from ``WARMUP_MINUTES`` limit minutes after ``start`` to the
    95th percentile of completion times.
    """
    if len(done) < 20:
        return None
    times = sorted(t for t, _ in done)
    begin = start + WARMUP_MINUTES * minute
    end = times[math.ceil(0.95 * len(times)) - 1]
    if end - begin < minute:
        return None
    tokens = sum(n for t, n in done if begin < t <= end)
    return tokens / (end - begin) * minute / output_tpm


async def measure_llm(spec: Spec) -> Result:
    """One strategy over ``n`` prompts against the mock at ``url``; counts at the client."""
    from corral.lab.workloads import Tally, _reporting

    strategy: str = spec["strategy"]
    why = _unavailable(strategy)
    if why is not None:
        return {"status": f"unavailable: {why}"}
    server: dict[str, Any] = spec["server"]
    n: int = spec["n"]
    tally = Tally(n)
    run = _Run(
        url=spec["url"],
        key=spec.get("key", "corral-lab"),
        prompts=make_prompts(n, spec.get("prompt_seed", 0)),
        published={k: float(server[k]) for k in ("rpm", "input_tpm", "output_tpm")},
        minute=float(server["minute"]),
        tally=tally,
    )
    # The SDK takes a second or more to import: not part of any strategy's time.
    import openai  # noqa: F401
    import tenacity  # noqa: F401

    import corral  # noqa: F401

    start = time.perf_counter()
    cpu = time.process_time()
    async with _reporting(tally):
        await STRATEGY_RUNNERS[strategy](run)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu
    ok = len(run.done)
    if ok + sum(run.failures.values()) != n:
        return {"status": f"error: {ok} answered + {sum(run.failures.values())} failed != {n}"}
    return {
        "status": "ok",
        "wall_s": wall,
        "ok": ok,
        "failed": n - ok,
        "failures": dict(sorted(run.failures.items(), key=lambda kv: -kv[1])),
        "items_per_s": ok / wall if wall > 0 else 0.0,
        # The client's CPU time per prompt (SDK, strategy, retries): 1 ms is 1/1000 core-s.
        "client_cpu_ms_per_item": cpu / n * 1e3,
        "output_tokens": sum(tokens for _, tokens in run.done),
        "steady_output_share": steady_share(
            run.done, start, run.minute, run.published["output_tpm"]
        ),
    }


# --------------------------------------------------------------------------------------
# The part (in the bench's process, which runs the server)
# --------------------------------------------------------------------------------------


async def part_llm(bench: Any) -> None:
    """Every strategy on the same prompts, each in a fresh process against a reset mock."""
    from corral.lab.llm_server import LLMServer

    n: int = bench.profile.llm_n
    async with LLMServer(**LLM_SERVER) as server:

        def before(spec: Spec) -> None:
            server.reset()

        def after(spec: Spec, result: Result) -> dict[str, Any]:
            stats = server.stats()
            return {
                "attempts": stats.requests,
                "answered": stats.ok,
                "rejected_429": stats.rejected,
                "rejected_by": stats.rejected_by,
                "wasted_input_tokens": stats.rejected_input_tokens,
                "server_output_tokens": stats.output_tokens,
                "peak_output_tpm": stats.peak_output_tpm,
                "peak_in_flight": stats.peak_in_flight,
            }

        specs: list[Spec] = [
            {
                "label": label,
                "measure": "llm",
                "strategy": strategy,
                "n": n,
                "url": server.url,
                "server": LLM_SERVER,
                "concurrency": CONCURRENCY,
                "max_tokens": MAX_TOKENS,
            }
            for label, strategy in LLM_STRATEGIES
        ]
        await bench.run("llm", "strategies", specs, fresh=True, before=before, after=after)


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------

COLUMNS = [
    "strategy",
    "items/s",
    "failed items",
    "429s",
    "attempts per item",
    "input tokens wasted on 429s",
    "output tokens/min after warm-up (share of limit)",
    "wall time",
]


def _rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in results["records"] if r["part"] == "llm"]


def summary_rows(results: dict[str, Any]) -> list[list[str]]:
    """The llm part's table, one row per strategy (a status instead of numbers if not ok)."""
    rows = []
    for r in _rows(results):
        if r["status"] != "ok":
            rows.append([r["label"], r["status"][:70], "", "", "", "", "", ""])
            continue
        share = r.get("steady_output_share")
        rows.append(
            [
                r["label"],
                f"{r['items_per_s']:,.1f}",
                f"{r['failed']:,}",
                f"{r['rejected_429']:,}",
                f"{r['attempts'] / r['n']:.2f}",
                f"{r['wasted_input_tokens']:,}",
                "-" if share is None else f"{share:.0%}",
                f"{r['wall_s']:.1f} s",
            ]
        )
    return rows


def markdown_lines(results: dict[str, Any]) -> list[str]:
    """report.md's section on the llm part; empty when the part did not run."""
    rows = _rows(results)
    if not rows:
        return []
    server = rows[0]["server"]
    minute = server["minute"]
    lines = [
        "## Rate-limited LLM API: the same prompts, eight ways",
        "",
        f"{rows[0]['n']:,} prompts to the mock LLM API (`corral serve --llm`) through the "
        f"official `openai` SDK. Hidden limits per key: {server['rpm']:,.0f} requests, "
        f"{server['input_tpm']:,.0f} input tokens and {server['output_tpm']:,.0f} output "
        f"tokens per minute, with an acceleration limit; one limit minute lasts {minute:g} s "
        "here, and every fixed wait of a strategy is scaled alike. Attempts, 429s and wasted "
        "tokens are counted at the server; output tokens per minute after the first "
        f"{WARMUP_MINUTES:g} limit minutes, as a share of the output-token limit, at the "
        "client (above 100%: the strategy drew on the burst its key's bucket saved up while "
        "it was backing off).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in summary_rows(results)]
    lines += ["", "![llm.png](llm.png)", ""]
    return lines


def draw(results: dict[str, Any], path: Any) -> None:
    """llm.png: items/s, failed items, 429s, attempts per item, wasted tokens, wall time."""
    from corral.lab import plots

    rows = [r for r in _rows(results) if r["status"] == "ok"]
    if not rows:
        raise KeyError("llm")
    server = rows[0]["server"]
    plots.bar_panels(
        path,
        f"{rows[0]['n']:,} prompts to an LLM API with hidden limits "
        f"({server['rpm']:,.0f} req, {server['input_tpm']:,.0f} in, "
        f"{server['output_tpm']:,.0f} out tokens/min)",
        [
            plots.Panel("answered items/s", {r["label"]: r["items_per_s"] for r in rows}),
            plots.Panel(
                "failed items", {r["label"]: float(r["failed"]) for r in rows}, color=plots.BAD
            ),
            plots.Panel(
                "429s", {r["label"]: float(r["rejected_429"]) for r in rows}, color=plots.BAD
            ),
            plots.Panel(
                "attempts per item",
                {r["label"]: r["attempts"] / r["n"] for r in rows},
                color="#f28e2b",
            ),
            plots.Panel(
                "input tokens wasted on 429s",
                {r["label"]: float(r["wasted_input_tokens"]) for r in rows},
                color=plots.BAD,
            ),
            plots.Panel(
                "wall time", {r["label"]: r["wall_s"] for r in rows}, unit="s", color="#9e9e9e"
            ),
        ],
        note=(
            "attempts, 429s and wasted tokens counted at the server; "
            f"one limit minute = {server['minute']:g} s"
        ),
    )
