"""``corral tune``: sweep the limit against a URL or a function, recommend one, plot it."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.cli import main
from corral.lab import tune
from corral.lab.tune import Trial

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
URL_LINE = re.compile(r"^corral serve: listening on (http://127\.0\.0\.1:\d+)$")


@pytest.fixture
def served_capacity_16() -> Iterator[str]:
    """A `corral serve` process: 16 requests in service at once, 20 ms each, 64 waiting."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "corral.cli",
            "serve",
            "--port",
            "0",
            "--capacity",
            "16",
            "--service-ms",
            "20",
            "--queue",
            "64",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().rstrip("\n")
        match = URL_LINE.match(line)
        assert match is not None, f"unexpected first line {line!r}"
        yield match.group(1)
    finally:
        process.terminate()
        process.communicate(timeout=30)


@pytest.mark.slow
def test_tune_recommends_the_capacity_of_a_served_target(
    served_capacity_16: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Against an API serving 16 at once, the recommendation is 16 within a factor of 2."""
    argv = ["tune", served_capacity_16, "--json", "--trial-seconds", "0.3", "--out", str(tmp_path)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)  # one JSON object, and nothing else, on stdout
    assert 8 <= summary["recommended_limit"] <= 32
    assert summary["reason"].startswith(f"Limit {summary['recommended_limit']} ")
    assert summary["stopped"]  # errors, a fall or a plateau ended the sweep
    limits = [t["limit"] for t in summary["trials"]]
    assert limits[:5] == [1, 2, 4, 8, 16]
    assert max(limits) <= 256  # stopped early: the plateau past 16 is enough
    assert "limit    16:" in captured.err  # progress goes to stderr with --json
    assert (tmp_path / "tune.png").read_bytes().startswith(PNG_SIGNATURE)
    assert (
        json.loads((tmp_path / "tune.json").read_text())["recommended_limit"]
        == (summary["recommended_limit"])
    )


# A stand-in workload with a capacity of 8: past 8 calls in flight, each call
# takes proportionally longer, so throughput stops growing at 8.
_in_flight = 0


async def capped_at_8(item: int) -> int:
    global _in_flight
    _in_flight += 1
    try:
        # Up to 8 at once, 10 ms each; past 8 every call slows down more than in
        # proportion, so throughput peaks at 8 and falls beyond: a clear knee
        # that timer noise on a loaded machine cannot move to 32.
        await asyncio.sleep(0.01 * max(1.0, _in_flight / 8) ** 2)
    finally:
        _in_flight -= 1
    return item


@pytest.mark.slow
def test_tune_sweeps_an_async_function_over_items(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """module:function with --items range:N: the knee of the function's curve is found."""
    argv = [
        "tune",
        f"{__name__}:capped_at_8",
        "--items",
        "range:50",
        "--json",
        "--trial-seconds",
        "0.2",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert 4 <= summary["recommended_limit"] <= 16
    # Past 8 the function only slows down: the sweep ends on a plateau or a fall.
    assert summary["stopped"].startswith(("throughput stopped growing", "throughput fell"))


@pytest.mark.slow
def test_tune_prints_a_table_and_a_reason_without_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --json the trials, the recommendation, its reason and the plot path are printed."""
    argv = [
        "tune",
        f"{__name__}:capped_at_8",
        "--trial-seconds",
        "0.1",
        "--max-limit",
        "4",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  limit     1: +[\d,]+ ok/s", out, re.M)
    assert "Recommended limit: 4. Limit 4 gave the highest throughput" in out
    assert "raise --max-limit above 4 to look further" in out
    assert f"Plot: {tmp_path / 'tune.png'}" in out


def _trial(
    limit: int, throughput: float, errors: int = 0, p99: float = 20.0, p50: float = 10.0
) -> Trial:
    return Trial(limit, 100, errors, 1.0, throughput, p50, p99)


def test_recommendation_is_the_smallest_limit_near_the_peak_without_errors() -> None:
    """95% of the best error-free throughput, at the smallest limit reaching it."""
    trials = [
        _trial(1, 100),
        _trial(2, 200),
        _trial(4, 390),
        _trial(8, 400, p99=45.0),
        _trial(16, 405, p99=90.0),
    ]
    limit, reason = tune.recommend(trials)
    assert limit == 4
    assert reason == (
        "Limit 4 reaches 96% of the peak throughput (390/s of 405/s at limit 16) with no "
        "errors; going higher only raises p99 latency (20 ms, 90 ms at limit 16)."
    )


def test_the_knee_wins_when_more_calls_only_queue() -> None:
    """Past saturation a doubling buys a few percent for twice the latency: stop before it."""
    trials = [
        _trial(4, 180, p50=22.0),
        _trial(8, 360, p50=22.0),
        _trial(16, 710, p50=23.0),
        _trial(32, 760, p50=42.0),
        _trial(64, 790, p50=84.0),
    ]
    limit, reason = tune.recommend(trials)
    assert limit == 16
    assert reason == (
        "Limit 16 is the knee: it reaches 90% of the peak throughput (710/s of 790/s at "
        "limit 64) with no errors, and doubling it to 32 gained 7% throughput for 83% more "
        "latency (p50 23 ms, then 42 ms)."
    )


def test_trials_with_errors_are_never_recommended() -> None:
    """A faster limit that produced errors loses to a slower clean one, and the reason says so."""
    trials = [_trial(1, 100), _trial(2, 190), _trial(4, 400, errors=3)]
    limit, reason = tune.recommend(trials)
    assert limit == 2
    assert reason.endswith("while limit 4 already failed 2.9% of calls.")


def test_when_every_trial_fails_the_fewest_errors_win_with_a_warning() -> None:
    """No clean trial: the limit with the lowest error rate, and advice to fix the target."""
    limit, reason = tune.recommend([_trial(1, 10, errors=50), _trial(2, 20, errors=5)])
    assert limit == 2
    assert reason.startswith("Every trial had errors, limit 2 the fewest")


@pytest.mark.parametrize(
    ("throughputs", "errors", "expected"),
    [
        ([100, 200], 0, None),
        ([100, 200, 400, 410, 415], 0, "throughput stopped growing: limits 8 and 16"),
        ([100, 200, 150], 0, "throughput fell to 150/s at limit 4, 75% of the best"),
        ([100, 200], 1, "errors appeared at limit 2 (1.0% of calls)"),
    ],
)
def test_the_sweep_stops_at_errors_a_fall_or_a_plateau(
    throughputs: list[float], errors: int, expected: str | None
) -> None:
    """stop_reason names the first reason to stop, or None to keep doubling."""
    trials = [_trial(2**k, tp) for k, tp in enumerate(throughputs)]
    trials[-1] = _trial(trials[-1].limit, throughputs[-1], errors=errors)
    reason = tune.stop_reason(trials)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None
        assert reason.startswith(expected)


def test_items_come_from_a_file_a_range_or_an_attribute(tmp_path: Path) -> None:
    """--items reads a file's non-empty lines, range:N, or an iterable named module:attr."""
    lines = tmp_path / "urls.txt"
    lines.write_text("a\n\nb\n")
    assert tune.load_items(str(lines)) == ["a", "b"]
    assert tune.load_items("range:3") == range(3)
    assert list(tune.load_items(f"{__name__}:ITEMS")) == [1, 2, 3]


ITEMS = (1, 2, 3)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tune", "not a target"], "TARGET must be a URL (http://... or https://...) or"),
        (["tune", "json:dumps"], "TARGET 'json:dumps' must be an async function of one item"),
        (["tune", "no_such_module_x:fn"], "cannot import 'no_such_module_x'"),
        (["tune", "http://127.0.0.1:9/", "--items", "range:3"], "--items is for module:function"),
        (["tune", f"{__name__}:capped_at_8", "--items", "range:0"], "needs an int N >= 1"),
        (["tune", f"{__name__}:capped_at_8", "--items", "nofile.txt"], "--items must be a file"),
        (["tune", f"{__name__}:capped_at_8", "--max-limit", "0"], "--max-limit must be >= 1"),
    ],
)
def test_bad_targets_and_items_are_refused_before_any_call(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A target or --items tune cannot use exits 2 with what would work."""
    assert main(argv) == 2
    assert message in capsys.readouterr().err
