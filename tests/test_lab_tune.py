"""``corral tune``: sweep the limit against a URL or a function, recommend one, plot it."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

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
        (
            ["tune", f"{__name__}:capped_at_8", "--max-limit", "0"],
            "argument --max-limit: must be an int >= 1, got '0'",
        ),
        (
            ["tune", f"{__name__}:capped_at_8", "--max-limit", "1" * 5000],
            "argument --max-limit: must be an int >= 1, got '1111",
        ),
        (
            ["tune", f"{__name__}:capped_at_8", "--trial-seconds", "0"],
            "argument --trial-seconds: must be a number of seconds between 0.01 and 86400, got '0'",
        ),
        (
            ["tune", f"{__name__}:capped_at_8", "--trial-seconds", "1e400"],
            "argument --trial-seconds: must be a number of seconds between 0.01 and 86400, "
            "got '1e400'",
        ),
        (
            ["tune", f"{__name__}:capped_at_8", "--trial-seconds", "nan"],
            "argument --trial-seconds: must be a number of seconds between 0.01 and 86400, "
            "got 'nan'",
        ),
        (["tune", "http://[::1/"], "TARGET must be a valid URL, like http://127.0.0.1:8080/; got"),
        (["tune", "http://127.0.0.1:99999/"], "got 'http://127.0.0.1:99999/' (Port out of range"),
    ],
)
def test_bad_targets_and_items_are_refused_before_any_call(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A target or --items tune cannot use exits 2 with what would work."""
    assert main([*argv, "--out", str(tmp_path)]) == 2  # a wrong acceptance writes there
    assert message in capsys.readouterr().err


async def _fixed_250ms(item: int) -> int:
    await asyncio.sleep(0.25)
    return item


def _served_4_at_a_time() -> Callable[[int], Awaitable[int]]:
    """A target serving 4 calls at once, 250 ms each: 16/s at any limit from 4 up."""
    gate = asyncio.Semaphore(4)

    async def call(item: int) -> int:
        async with gate:
            await asyncio.sleep(0.25)
        return item

    return call


@pytest.mark.virtual_time
@pytest.mark.parametrize("seconds", [0.5, 1.1])
async def test_a_trial_measures_calls_that_end_together_without_bias(
    seconds: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calls ending at one instant are counted with the time they took: no overstatement.

    On a virtual clock every batch of calls ends at exactly the same instant,
    the hardest case for a rate taken between the first and last completion.
    """
    monkeypatch.setattr(tune, "_clock", lambda: asyncio.get_running_loop().time())
    for limit in (1, 2, 4, 8, 16):
        fixed = await tune.run_trial(_fixed_250ms, itertools.count(), limit, seconds)
        assert fixed.throughput == pytest.approx(limit / 0.25, rel=0.05), limit
        capped = await tune.run_trial(_served_4_at_a_time(), itertools.count(), limit, seconds)
        assert capped.throughput == pytest.approx(min(limit, 4) / 0.25, rel=0.05), limit


def test_an_out_that_is_not_a_directory_is_refused_before_any_call(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--out naming a file exits 2 at once, naming --out and the value; no trial runs."""
    taken = tmp_path / "notadir"
    taken.write_text("mine\n")
    assert main(["tune", f"{__name__}:_never_called", "--out", str(taken)]) == 2
    captured = capsys.readouterr()
    assert f"--out must be a directory to write into; got --out {str(taken)!r}" in captured.err
    assert "limit     1" not in captured.out
    assert taken.read_text() == "mine\n"


async def _never_called(item: int) -> int:
    raise AssertionError("tune ran with an unusable --out")


def test_an_out_that_breaks_during_the_sweep_still_prints_the_recommendation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writing tune.json fails: the result is still printed, then exit 1 naming --out."""

    def plot(args: Any, trials: list[Trial], limit: int) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tune, "_plot", plot)
    argv = ["tune", f"{__name__}:capped_at_8", "--json", "--trial-seconds", "0.05"]
    assert main([*argv, "--max-limit", "2", "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["recommended_limit"] in (1, 2)
    assert f"cannot write into --out {str(tmp_path)!r}: [Errno 28] No space left" in captured.err


async def _always_refused(item: int) -> int:
    raise ConnectionRefusedError(111, "Connect call failed")


@pytest.mark.parametrize("as_json", [True, False])
def test_when_every_call_fails_no_limit_is_recommended(
    as_json: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing succeeded: the first error, exit 1, and no limit offered as a result."""
    argv = ["tune", f"{__name__}:_always_refused", "--trial-seconds", "0.05"]
    assert main([*argv, "--out", str(tmp_path), *(["--json"] if as_json else [])]) == 1
    out = capsys.readouterr().out
    error = "ConnectionRefusedError: [Errno 111] Connect call failed"
    if as_json:
        summary = json.loads(out)
        assert summary["recommended_limit"] == 1  # always an int; the error says why
        assert summary["error"] == error
    else:
        assert "Recommended limit" not in out
        assert "No limit recommended. Every call failed (" in out
        assert f"the first error was {error}" in out
    saved = json.loads((tmp_path / "tune.json").read_text())
    assert saved["recommended_limit"] == 1
    assert saved["error"] == error
    assert not (tmp_path / "tune.png").exists()


def test_an_items_file_that_is_not_text_is_refused_before_any_call(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A binary --items file exits 2 naming --items and the file, not a UnicodeDecodeError."""
    binary = tmp_path / "items.bin"
    binary.write_bytes(b"\xff\xfe\x00 not text\n")
    argv = ["tune", f"{__name__}:_never_called", "--items", str(binary)]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"corral tune: error: --items {str(binary)!r}: cannot read it as UTF-8 text, "
    )
    assert "Traceback" not in err
