"""The ``corral`` command: the lab from a shell.

    corral demo                                   # the main job, six ways, side by side
    corral bench --quick                          # the seeds' claims, measured here
    corral tune http://127.0.0.1:8080/ --json     # the limit a workload should run at
    corral serve --port 8080 --capacity 64 --service-ms 10

Each subcommand is two functions: ``_add_NAME(subparsers)`` declares its
arguments and sets ``handler=_run_NAME``; ``_run_NAME(args) -> int`` does the
work and returns the exit status. Heavy imports (aiohttp, uvloop) happen
inside the handlers, so ``corral --help`` and ``import corral.cli`` stay fast
and work without the lab extra.

Exit status: 0 done, 1 failed (e.g. the port is taken), 2 usage error or a
missing extra.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.lab._options import (
    DAY_MS,
    DAY_S,
    directory_option,
    host_option,
    int_option,
    number_option,
    show_number,
)

if TYPE_CHECKING:
    from corral.lab.llm_server import LLMServer
    from corral.lab.server import ServerStats, TargetServer

__all__ = ["main"]

LAB_EXTRA_MESSAGE = "corral {command} needs the lab extra: pip install 'corral[lab]'"

#: The largest ``corral bench --scale``.
MAX_SCALE = 100.0


def main(argv: list[str] | None = None) -> int:
    """Run ``corral`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = _parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            # argparse blames the top-level parser, whose usage lists only the
            # commands; the command's own usage shows the options meant.
            args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exit_:
        # argparse exits on --help (0) and on usage errors (2, message
        # already on stderr); hand the status back instead of raising.
        return exit_.code if isinstance(exit_.code, int) else 2
    handler: Callable[[argparse.Namespace], int] = args.handler
    command = f"corral {args.command}"
    try:
        return handler(args)
    except KeyboardInterrupt:
        # Ctrl-C outside a command's own handling (while aiohttp imports, while
        # a report is written): a word, not a traceback. 130 is the shell's
        # status for a SIGINT.
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `corral serve | head -1`: the reader left; stop writing, quietly.
        # stdout's buffer would fail again at exit, so point it at nothing.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corral",
        description="corral's lab: serve a modelled API, benchmark, tune, demo.",
    )
    subparsers = parser.add_subparsers(
        title="commands", metavar="COMMAND", dest="command", required=True
    )
    _add_demo(subparsers)
    _add_bench(subparsers)
    _add_tune(subparsers)
    _add_serve(subparsers)
    for command in subparsers.choices.values():
        command.set_defaults(parser=command)  # for errors found after parsing (see main)
    return parser


def _schedule(text: str) -> list[tuple[float, int]]:
    steps: list[tuple[float, int]] = []
    for part in text.split(","):
        at, sep, capacity = part.partition(":")
        try:
            step = (float(at), int(capacity))
        except ValueError:
            sep = ""
        # T at most a day, like every wait the lab takes: 1e300 is a typo, not a plan.
        if not sep or not (0 <= step[0] <= DAY_S) or step[1] < 1:
            raise argparse.ArgumentTypeError(
                f"must be T:CAPACITY pairs joined by commas, like 5:32,10:64; got {text!r} "
                f"(T from 0 to {show_number(DAY_S)} seconds, CAPACITY an int >= 1)"
            )
        steps.append(step)
    return steps


def _missing_lab_extra(command: str) -> bool:
    """True (and says how to fix it) when the lab extra's HTTP stack is not installed."""
    if importlib.util.find_spec("aiohttp") is not None:
        return False
    print(LAB_EXTRA_MESSAGE.format(command=command), file=sys.stderr)
    return True


def _run_async(main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` on uvloop when installed (the command owns its process), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


# --------------------------------------------------------------------------
# corral demo
# --------------------------------------------------------------------------


def _add_demo(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the same 10,000 requests done six ways, side by side (about a minute)",
        description=(
            "Start a local API with a capacity (64 requests at a time, 256 waiting, 429 with "
            "Retry-After beyond) and send it the same 10,000 GET requests six ways: plain "
            "asyncio.gather, gather in batches, a queue of workers, and corral with a fixed "
            "and an adaptive limit. Prints a side-by-side table (time, throughput, failed "
            "requests, p99 latency, peak memory) and saves a plot and the numbers to "
            "./corral-demo/. Loopback only."
        ),
    )
    parser.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    if _missing_lab_extra("demo"):
        return 2
    from corral.lab.demo import demo_command

    return demo_command()


# --------------------------------------------------------------------------
# corral bench
# --------------------------------------------------------------------------


def _add_bench(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from corral.lab.bench import PARTS

    parser = subparsers.add_parser(
        "bench",
        help="re-run the seeds' experiments; a verdict per claim, with plots",
        description=(
            "Measure, on this machine, the claims of the blog posts corral comes from "
            "(batching, queues of workers, 'as many tasks as cores', process pools, ...) "
            "across strategies, workloads (tiny tasks, sleeps, real HTTP against a local "
            "API, CPU work) and event loops. Writes results.json, PNG plots and report.md "
            "(confirmed / refuted / depends for each claim, with the numbers that decide "
            "it) into DIR. The full run takes up to 15 minutes; --quick about one."
        ),
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="smaller sizes, one repeat: about a minute")
    add(
        "--only",
        type=_parts(tuple(PARTS)),
        default=None,
        metavar="PARTS",
        help=f"comma-separated parts to run (default: all): {','.join(PARTS)}",
    )
    add(
        "--out",
        type=directory_option,
        default=Path("corral-bench"),
        metavar="DIR",
        help="output directory (./corral-bench/)",
    )
    add(
        "--scale",
        # Bounded: sizes are ints (scale 1e308 overflows them), and x100
        # already turns the full run into a day.
        type=number_option(0, MAX_SCALE, exclusive=True),
        default=1.0,
        metavar="F",
        help=f"multiply every size and trial time by F, > 0 and at most {MAX_SCALE:g} "
        "(e.g. 0.05 for a smoke run)",
    )
    parser.set_defaults(handler=_run_bench)


def _parts(known: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in known]
        if not names or unknown:
            # In a list of several, say which name is wrong: 'htpp' is easy to miss.
            which = f" ({', '.join(map(repr, unknown))} unknown)" if unknown else ""
            raise argparse.ArgumentTypeError(
                f"must be parts from {','.join(known)}, joined by commas; got {text!r}{which}"
            )
        return names

    return parse


def _run_bench(args: argparse.Namespace) -> int:
    if _missing_lab_extra("bench"):
        return 2
    from corral.lab.bench import bench_command

    return bench_command(args.out, quick=args.quick, only=args.only, scale=args.scale)


# --------------------------------------------------------------------------
# corral tune
# --------------------------------------------------------------------------


def _add_tune(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from corral.lab.tune import add_arguments

    parser = subparsers.add_parser(
        "tune",
        help="find the concurrency limit a workload (a URL or module:function) should use",
        description=(
            "Sweep the concurrency limit (1, 2, 4, ...) against TARGET with short trials, "
            "measuring successful calls per second, p50/p99 latency and errors; stop when "
            "errors appear or throughput falls or stops growing; recommend the smallest "
            "limit reaching 95% of the peak throughput without errors (or the knee of the "
            "curve, past which more calls only queue, if that comes first), print and save "
            "the result and draw the curve. "
            "A URL TARGET is fetched with GET and never anything else."
        ),
    )
    add_arguments(parser)
    parser.set_defaults(handler=_run_tune)


def _run_tune(args: argparse.Namespace) -> int:
    from corral.lab.tune import tune_command

    if args.target.startswith(("http://", "https://")) and _missing_lab_extra("tune"):
        return 2
    return tune_command(args)


# --------------------------------------------------------------------------
# corral serve
# --------------------------------------------------------------------------


#: The capacity model's defaults for the options that --llm refuses.
_CAPACITY_DEFAULTS: dict[str, Any] = {
    "capacity": 64,
    "service_ms": 10.0,
    "queue": 256,
    "status": 429,
    "retry_after": 1.0,
    "stall_fraction": 0.0,
    "stall_s": 30.0,
    "fail_fraction": 0.0,
}


def _add_serve(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a modelled API (capacity, queue, 429/503) on loopback",
        description=(
            "Serve an HTTP API that behaves like a real one under load: CAPACITY requests "
            "in service at once for SERVICE_MS each, up to QUEUE more waiting in line, and "
            "any beyond refused with STATUS and Retry-After. Every path is served; "
            "GET /_corral/stats reports the counters. Stops on Ctrl-C or SIGTERM and "
            "prints a summary."
        ),
    )
    add = parser.add_argument
    add(
        "--host",
        type=host_option,
        default="127.0.0.1",
        help="a loopback address (default: %(default)s)",
    )
    add(
        "--port",
        type=int_option(0, 65535),
        default=8080,
        help="0 picks a free port (default: 8080)",
    )
    # The capacity model's own options default to None, filled in from
    # _CAPACITY_DEFAULTS later: --llm must refuse them even at their default value.
    add("--capacity", type=int_option(1), help="requests in service at once (64)")
    add(
        "--service-ms",
        type=number_option(0, DAY_MS),
        help=f"milliseconds each request takes, at most {show_number(DAY_MS)} (10)",
    )
    add("--queue", type=int_option(0), help="requests that may wait for a slot (256)")
    add("--status", type=int, choices=(429, 503), help="status when the queue is full (429)")
    add(
        "--retry-after",
        type=number_option(0, DAY_S),
        help=f"seconds the refusal asks to wait, at most {show_number(DAY_S)} (1)",
    )
    add(
        "--jitter",
        type=number_option(0, 1),
        default=0.0,
        help="service time varies by +/- this fraction",
    )
    add("--stall-fraction", type=number_option(0, 1), help="share of requests that hang (0)")
    add(
        "--stall-s",
        type=number_option(0, DAY_S),
        help=f"seconds a stalled request hangs, at most {show_number(DAY_S)} (30)",
    )
    add("--fail-fraction", type=number_option(0, 1), help="share of requests answered 500 (0)")
    add(
        "--schedule",
        type=_schedule,
        default=None,
        metavar="T:N,...",
        help="set the capacity to N at T seconds after the start (T at most "
        f"{show_number(DAY_S)}), e.g. 5:32,10:64",
    )
    add("--seed", type=int, default=0, help="seeds jitter, stalls and failures")
    from corral.lab.llm_model import add_serve_arguments

    add_serve_arguments(parser)
    parser.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from corral.lab.llm_model import misplaced_options

    misplaced = misplaced_options(args)
    if misplaced:
        verb = "applies" if len(misplaced) == 1 else "apply"
        where = "to the capacity model, not --llm" if args.llm else "to --llm only"
        print(f"corral serve: error: {', '.join(misplaced)} {verb} {where}", file=sys.stderr)
        return 2
    if args.llm:
        ramp = [f"--accel-{name}" for name in ("start", "growth", "window")]
        given = [flag for flag in ramp if getattr(args, flag[2:].replace("-", "_")) is not None]
        if args.no_accel and given:
            print(
                f"corral serve: error: {', '.join(given)} "
                f"{'has' if len(given) == 1 else 'have'} no effect with --no-accel",
                file=sys.stderr,
            )
            return 2
        return _run_serve_llm(args)
    for name, default in _CAPACITY_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    try:
        from corral.lab.server import TargetServer
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.startswith("corral"):
            raise
        print(LAB_EXTRA_MESSAGE.format(command="serve"), file=sys.stderr)
        return 2
    try:
        server = TargetServer(
            capacity=args.capacity,
            service_ms=args.service_ms,
            queue=args.queue,
            status=args.status,
            retry_after=args.retry_after,
            jitter=args.jitter,
            stall_fraction=args.stall_fraction,
            stall_s=args.stall_s,
            fail_fraction=args.fail_fraction,
            schedule=args.schedule,
            host=args.host,
            port=args.port,
            seed=args.seed,
        )
    except ValueError as exc:
        print(f"corral serve: error: {exc}", file=sys.stderr)
        return 2
    return _run_async(_serve_until_signalled(server, lambda: _summary(server.stats(), args.status)))


async def _serve_until_signalled(
    server: TargetServer | LLMServer, report: Callable[[], str]
) -> int:
    try:
        url = await server.start()
    except OSError as exc:
        print(f"corral serve: cannot listen: {exc}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        print(f"corral serve: listening on {url}", flush=True)
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await server.stop()
    print(report(), flush=True)
    return 0


def _run_serve_llm(args: argparse.Namespace) -> int:
    try:
        from corral.lab import llm_server
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.startswith("corral"):
            raise
        print(LAB_EXTRA_MESSAGE.format(command="serve --llm"), file=sys.stderr)
        return 2
    try:
        server = llm_server.server_from_args(args)
    except ValueError as exc:
        print(f"corral serve: error: {exc}", file=sys.stderr)
        return 2
    return _run_async(_serve_until_signalled(server, lambda: llm_server.summary(server)))


def _summary(stats: ServerStats, status: int) -> str:
    rate = stats.served / stats.elapsed_s if stats.elapsed_s > 0 else 0.0
    if stats.latency_p50_ms is None:
        latency = "no request served, so no latency"
    else:
        latency = (
            f"latency p50 {stats.latency_p50_ms:.1f} ms, p90 {stats.latency_p90_ms:.1f} ms, "
            f"p99 {stats.latency_p99_ms:.1f} ms"
        )
    return (
        f"corral serve: stopped after {stats.elapsed_s:.1f} s: {stats.served} served "
        f"({rate:.0f}/s), {stats.rejected} rejected ({status}), {stats.failed} failed, "
        f"{stats.stalled} stalled; peak concurrency {stats.peak_concurrency} "
        f"(peak in service {stats.peak_in_service}, capacity {stats.capacity}); {latency}."
    )


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
