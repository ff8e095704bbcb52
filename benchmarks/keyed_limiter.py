"""What a per-key Limiter costs per look-up and per new key, and how many keys it holds.

    python benchmarks/keyed_limiter.py                       # this checkout only
    mkdir -p /tmp/keyed_base && git archive HEAD src | tar -x -C /tmp/keyed_base
    python benchmarks/keyed_limiter.py --base /tmp/keyed_base/src --rounds 5

Each round runs every measurement in a fresh process per implementation (the
checkout's ``src``, and ``--base`` if given), alternating which goes first;
the table shows the medians over the rounds (a shared 2-core machine swings
single runs by 10-20%), and for the slowest single call the least over the
rounds (a sweep's pause recurs every round, the machine's hiccups do not).
All on ``Limiter(4, key=host)``, items like ``"busy12.test/page"`` and
``host(url) = url.partition("/")[0]``, a new string per call as a real key
function gives:

``lookup``
    ``for_item(item)`` for a key it holds already, cycling over 100 keys, and
    over 20,000 keys that each hold a slot (busy): ns per call.

``new key, B busy``
    ``for_item(item)`` for ``--new`` keys never seen before, each left idle,
    while B other keys hold a slot (a crawler with B hosts in flight), after
    3 x IDLE_KEYS idle keys have filled the Limiter: us per new key, the mean
    over them all (so it includes the sweeps that forget idle keys), and the
    slowest single call in ms.

``held``
    After N distinct keys, each used once and left idle (and with 1,000 busy
    keys besides): the most keys the Limiter held at any time.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent / "src"
BUSY = (0, 1_000, 20_000)
HELD = (1_000, 10_000, 100_000)


def _host(url: str) -> str:
    # Like a crawler's key: a new string per call, equal to the key held, not
    # the same object (a dict then compares the strings, not just pointers).
    return url.partition("/")[0]


def _urls(host: str, n: int) -> list[str]:
    return [f"{host}{i}.test/page" for i in range(n)]


def _limiter_with_busy(busy: int) -> Any:
    import corral

    limiter = corral.Limiter(4, key=_host)
    for url in _urls("busy", busy):
        if not limiter.for_item(url).acquire_nowait():
            raise AssertionError("a fresh key has a free slot")
    return limiter


async def lookup_ns(keys: int, busy: bool, calls: int) -> float:
    """ns per for_item() of a key held already, in a shuffled order of the keys."""
    limiter = _limiter_with_busy(keys if busy else 0)
    urls = _urls("busy" if busy else "idle", keys)
    for url in urls:
        limiter.for_item(url)
    sequence = urls * max(1, calls // keys)
    random.Random(1).shuffle(sequence)
    for_item = limiter.for_item
    began = time.perf_counter()
    for url in sequence:
        for_item(url)
    return (time.perf_counter() - began) / len(sequence) * 1e9


async def call_ns(keys: int, calls: int) -> float:
    """ns per for_item(), acquire_nowait() and release() (a call's own slot), on busy keys."""
    limiter = _limiter_with_busy(keys)
    sequence = _urls("busy", keys) * max(1, calls // keys)
    random.Random(1).shuffle(sequence)
    for_item = limiter.for_item
    began = time.perf_counter()
    for url in sequence:
        sub = for_item(url)
        sub.acquire_nowait()
        sub.release()
    return (time.perf_counter() - began) / len(sequence) * 1e9


async def new_key_us(busy: int, new: int) -> tuple[float, float]:
    """(us per new key, the mean; the slowest single call, in ms)."""
    import corral._limits

    limiter = _limiter_with_busy(busy)
    for_item = limiter.for_item
    for url in _urls("warm", 3 * corral._limits.IDLE_KEYS):
        for_item(url)
    urls = _urls("new", new)
    began = time.perf_counter()
    for url in urls:
        for_item(url)
    mean = (time.perf_counter() - began) / new * 1e6
    # Again, timing each call (the mean above is without this clock's cost),
    # with the garbage collector off: its pauses would hide the sweeps.
    clock = time.perf_counter
    slowest = 0.0
    urls = _urls("again", new)
    gc.collect()
    gc.disable()
    try:
        for url in urls:
            before = clock()
            for_item(url)
            slowest = max(slowest, clock() - before)
    finally:
        gc.enable()
    return mean, slowest * 1e3


async def keys_held(distinct: int, busy: int) -> int:
    """The most keys held while ``distinct`` new keys are each used once."""
    limiter = _limiter_with_busy(busy)
    subs = limiter._subs
    most = 0
    for url in _urls("idle", distinct):
        async with limiter.for_item(url):
            pass
        most = max(most, len(subs))
    return most


async def measure(args: argparse.Namespace) -> dict[str, float]:
    results: dict[str, float] = {}
    results["lookup ns, 100 keys"] = await lookup_ns(100, False, args.calls)
    results["lookup ns, 20000 busy keys"] = await lookup_ns(20_000, True, args.calls)
    results["lookup+acquire+release ns, 100 busy"] = await call_ns(100, args.calls)
    results["lookup+acquire+release ns, 20000 busy"] = await call_ns(20_000, args.calls)
    for busy in BUSY:
        mean, slowest = await new_key_us(busy, args.new)
        results[f"new key us, {busy} busy"] = mean
        results[f"slowest new key ms, {busy} busy"] = slowest
    for distinct in HELD:
        results[f"held after {distinct} idle keys"] = await keys_held(distinct, 0)
        results[f"held after {distinct} idle keys, 1000 busy"] = await keys_held(distinct, 1_000)
    return results


def run_worker(src: str, args: argparse.Namespace) -> dict[str, float]:
    command = [
        sys.executable,
        __file__,
        "--worker",
        src,
        "--new",
        str(args.new),
        "--calls",
        str(args.calls),
    ]
    env = {**os.environ, "PYTHONPATH": src}
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=env, timeout=600)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", help="the src directory of the code to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new", type=int, default=25_000, help="new keys timed per case")
    parser.add_argument("--calls", type=int, default=300_000, help="look-ups timed per case")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.path.insert(0, args.worker)
        import corral

        if not Path(corral.__file__).is_relative_to(args.worker):
            raise SystemExit(f"imported {corral.__file__}, not the code in {args.worker}")
        print(json.dumps(asyncio.run(measure(args))))
        return
    impls = {"base": args.base, "this": str(HERE)} if args.base else {"this": str(HERE)}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in impls}
    for round_ in range(args.rounds):
        order = list(impls.items())
        if round_ % 2:
            order.reverse()
        for name, src in order:
            runs[name].append(run_worker(src, args))
    names = list(runs)
    print(f"medians of {args.rounds} rounds (slowest: the least); {args.new} new keys per case")
    print(f"{'':42}" + "".join(f"{name:>12}" for name in names))
    for metric in runs[names[0]][0]:
        # A sweep's pause comes back every round; a pause of the machine's
        # other work does not: the least of the rounds' slowest calls.
        summary = min if metric.startswith("slowest") else statistics.median
        cells = [summary(run[metric] for run in runs[name]) for name in names]
        print(f"{metric:42}" + "".join(f"{cell:12.3f}" for cell in cells))


if __name__ == "__main__":
    main()
