"""What a weighted rate's bookkeeping costs per call.

    python benchmarks/weighted_rate.py                   # 100k items, 7 rounds
    python benchmarks/weighted_rate.py --n 200000 --rounds 9

Two measurements, both in one process, interleaved round by round and
reported as medians (a shared 2-core machine swings single runs by 10-20%):

``gate``
    The limiter's bookkeeping alone, per call: ``acquire(cost)`` on a Limiter
    whose rate is ``Rate({"requests", "input_tokens", "output_tokens"},
    per=60)`` with allowances high enough never to wait, then reading the
    usage of an OpenAI-shaped response with :func:`corral.token_usage`,
    ``settle(cost, usage)`` and ``release()``; compared with the same loop
    on a Limiter with a plain requests-only rate (``acquire()`` and
    ``release()`` only). The difference is what the weights add.

``map``
    End to end: ``corral.gather`` over ``--n`` items of an ``async def``
    returning an OpenAI-shaped response at once (no I/O: corral's own cost is
    all there is), with ``limit=`` a Limiter that has (a) no rate, (b) a plain
    rate, (c) the weighted rate with ``cost=`` and the default usage reader.
    Per item: wall time / n; the weighted bookkeeping is (c) - (a).

Target (issue 9): the limiter bookkeeping with a weighted rate <= 5 us per call.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from types import SimpleNamespace
from typing import Any

import corral
from corral import Rate

WEIGHTED = Rate({"requests": 1e12, "input_tokens": 1e15, "output_tokens": 1e15}, per=60)
PLAIN = Rate(1e12, per=60)
RESPONSE = SimpleNamespace(usage=SimpleNamespace(prompt_tokens=1200, completion_tokens=350))
COST = {"input_tokens": 1200.0, "output_tokens": 500.0}


def cost(item: Any) -> dict[str, float]:
    return COST


async def answer(item: Any) -> SimpleNamespace:
    return RESPONSE


async def gate_weighted(n: int) -> float:
    limiter = corral.Limiter(limit=1000, rate=WEIGHTED)
    acquire, settle, release, usage = (
        limiter.acquire,
        limiter.settle,
        limiter.release,
        corral.token_usage,
    )
    began = time.perf_counter()
    for _ in range(n):
        c = cost(None)
        await acquire(c)
        settle(c, usage(RESPONSE))
        release()
    return (time.perf_counter() - began) / n


async def gate_plain(n: int) -> float:
    limiter = corral.Limiter(limit=1000, rate=PLAIN)
    acquire, release = limiter.acquire, limiter.release
    began = time.perf_counter()
    for _ in range(n):
        await acquire()
        release()
    return (time.perf_counter() - began) / n


async def map_case(n: int, case: str) -> float:
    kwargs: dict[str, Any] = {}
    if case == "no rate":
        limiter = corral.Limiter(limit=1000)
    elif case == "plain rate":
        limiter = corral.Limiter(limit=1000, rate=PLAIN)
    else:
        limiter = corral.Limiter(limit=1000, rate=WEIGHTED)
        kwargs["cost"] = cost
    began = time.perf_counter()
    await corral.gather(answer, range(n), limit=limiter, **kwargs)
    return (time.perf_counter() - began) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="calls per run")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    args = parser.parse_args()
    cases = {
        "gate: plain rate": lambda: gate_plain(args.n),
        "gate: weighted": lambda: gate_weighted(args.n),
        "map: no rate": lambda: map_case(args.n, "no rate"),
        "map: plain rate": lambda: map_case(args.n, "plain rate"),
        "map: weighted + cost + usage": lambda: map_case(args.n, "weighted"),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    asyncio.run(map_case(1000, "weighted"))  # warm-up
    for _ in range(args.rounds):
        for name, case in cases.items():
            times[name].append(asyncio.run(case()))
    print(f"n={args.n:,}, {args.rounds} rounds, us per call: median and best run")
    for name, ts in times.items():
        print(f"  {name:30s} {statistics.median(ts) * 1e6:7.2f}   best {min(ts) * 1e6:7.2f}")
    for label, pick in (("median", statistics.median), ("best", min)):
        gate = pick(times["gate: weighted"]) * 1e6
        added = gate - pick(times["gate: plain rate"]) * 1e6
        end_to_end = (
            pick(times["map: weighted + cost + usage"]) - pick(times["map: no rate"])
        ) * 1e6
        verdict = "met" if gate <= 5 and end_to_end <= 5 else "MISSED"
        print(
            f"{label:6s}: weighted limiter bookkeeping {gate:.2f} us per call "
            f"(+{added:.2f} over a plain rate); weighted map minus no-rate map "
            f"{end_to_end:.2f} us per item; target <= 5 us: {verdict}"
        )


if __name__ == "__main__":
    main()
