"""``corral bench``: the seeds' experiments, results.json, plots and a verdict per claim."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from corral.cli import main
from corral.lab import bench, report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
VERDICT = re.compile(r"^\*\*Verdict: (confirmed|refuted|depends|not measured)\.\*\* ", re.M)


def _verdicts(markdown: str) -> dict[int, str]:
    """Claim number -> verdict, read from report.md's sections."""
    found: dict[int, str] = {}
    for section in re.split(r"^## (?=\d+\. )", markdown, flags=re.M)[1:]:
        number = int(section.split(".", 1)[0])
        match = VERDICT.search(section)
        assert match is not None, f"claim {number} has no verdict line"
        found[number] = match.group(1)
    return found


@pytest.mark.slow
def test_quick_bench_writes_results_plots_and_a_verdict_for_every_claim(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every seed part runs end to end; report.md decides all 11 claims, each with its plots.

    The llm part (no seed claim) has its own end-to-end test in test_llm_server.
    """
    out = tmp_path / "bench"
    parts = [part for part in bench.PARTS if part != "llm"]
    argv = ["bench", "--quick", "--scale", "0.02", "--only", ",".join(parts), "--out", str(out)]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert {r["part"] for r in results["records"]} == set(parts)
    assert [r for r in results["records"] if r["status"].startswith("error")] == []
    markdown = (out / "report.md").read_text()
    verdicts = _verdicts(markdown)
    assert sorted(verdicts) == list(range(1, 12))
    assert set(verdicts.values()) <= {"confirmed", "refuted", "depends"}
    for claim in report.CLAIMS:
        for plot in claim.plots:
            assert (out / plot).read_bytes().startswith(PNG_SIGNATURE), plot
            assert f"![{plot}]({plot})" in markdown
    printed = capsys.readouterr().out
    assert "The seeds' claims, measured here" in printed
    assert f"Wrote {out / 'report.md'}" in printed


@pytest.mark.slow
def test_only_runs_the_named_parts_and_says_how_to_measure_the_rest(tmp_path: Path) -> None:
    """--only blocking measures claim 11 alone; the others say which part to run."""
    out = tmp_path / "bench"
    assert (
        main(["bench", "--quick", "--scale", "0.02", "--only", "blocking", "--out", str(out)]) == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert {r["part"] for r in results["records"]} == {"blocking"}
    markdown = (out / "report.md").read_text()
    verdicts = _verdicts(markdown)
    assert verdicts[11] in {"confirmed", "refuted", "depends"}
    assert {v for n, v in verdicts.items() if n != 11} == {"not measured"}
    assert "Not measured in this run: run part http (--only http)." in markdown
    assert (out / "blocking.png").exists()
    assert not (out / "memory.png").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--only", "network"], "argument --only: must be parts from overhead,"),
        (["bench", "--only", ","], "argument --only: must be parts from overhead,"),
        (["bench", "--scale", "-1"], "argument --scale: must be a number > 0 and <= 100, got '-1'"),
        (["bench", "--scale", "0"], "argument --scale: must be a number > 0 and <= 100, got '0'"),
        # Sizes are ints: a scale this large overflowed them with a traceback.
        (["bench", "--scale", "1e308"], "argument --scale: must be a number > 0 and <= 100"),
        (["bench", "--scale", "inf"], "argument --scale: must be a number > 0 and <= 100"),
        (["bench", "--scale", "nan"], "argument --scale: must be a number > 0 and <= 100"),
        (["bench", "--scale", "tiny"], "argument --scale: must be a number > 0 and <= 100"),
    ],
)
def test_bad_arguments_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown part or a negative scale exits 2 and names the argument."""
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def _sweep_results(at_cores: float, best: float) -> dict[str, Any]:
    trials = [
        {
            "limit": limit,
            "ok": 100,
            "errors": 0,
            "throughput": tp,
            "p50_ms": 10.0,
            "p99_ms": 20.0,
            "error_rate": 0.0,
        }
        for limit, tp in ((1, at_cores / 2), (2, at_cores), (64, best), (128, best * 0.98))
    ]
    record = {
        "part": "http",
        "case": "sweep",
        "status": "ok",
        "label": "sweep",
        "measure": "sweep",
        "trials": trials,
    }
    return {
        "meta": {"cpus": 2, "parts": ["http"], "http_server": {"capacity": 64, "queue": 256}},
        "records": [record],
    }


@pytest.mark.parametrize(
    ("at_cores", "verdict"), [(100.0, "refuted"), (1300.0, "depends"), (1900.0, "confirmed")]
)
def test_claim_2_verdict_follows_the_measured_throughput(at_cores: float, verdict: str) -> None:
    """'Start with the CPU count' is judged by this run's sweep, whichever way it goes."""
    result = report.judge_start_with_cores(_sweep_results(at_cores, 2000.0))
    assert result.verdict == verdict
    assert f"limit 2 (this machine's CPUs) gave {at_cores:,.0f}/s" in result.why
    assert result.headline == f"limit 2: {at_cores / 2000:.0%} of the best (limit 64)"


def _seed001_results(walls: dict[tuple[str, int], float]) -> dict[str, Any]:
    records = [
        {
            "part": "seed001",
            "case": "sleeps",
            "status": "ok",
            "label": f"{strategy} {n}",
            "strategy": strategy,
            "n": n,
            "wall_s": wall,
        }
        for (strategy, n), wall in walls.items()
    ]
    return {"meta": {"parts": ["seed001"]}, "records": records}


@pytest.mark.parametrize(
    ("batched_large", "verdict"), [(4.0, "confirmed"), (5.0, "depends"), (6.0, "refuted")]
)
def test_claim_5_verdict_compares_batches_with_gather_at_both_sizes(
    batched_large: float, verdict: str
) -> None:
    """Seed 001's crossover is confirmed only if batching wins at 100,000 by over 10%."""
    results = _seed001_results(
        {
            ("gather_all", 10_000): 0.5,
            ("gather_five_batches", 10_000): 1.7,
            ("gather_all", 100_000): 5.0,
            ("gather_five_batches", 100_000): batched_large,
        }
    )
    assert report.judge_batching_seed001(results).verdict == verdict


def test_a_claim_without_its_part_is_not_measured_and_says_which_part_to_run() -> None:
    """judge_all never guesses: a missing part gives 'not measured' and the --only to use."""
    verdicts = report.judge_all({"meta": {"parts": ["blocking"]}, "records": []})
    assert len(verdicts) == len(report.CLAIMS) == 11
    assert {v.verdict for v in verdicts} == {"not measured"}
    assert (
        verdicts[3].why
        == "Not measured in this run: run part overhead, http (--only overhead,http)."
    )
    assert verdicts[10].why.startswith("Not measured in this run: missing part blocking")


def test_scaled_profiles_keep_every_size_usable() -> None:
    """--scale shrinks sizes and trials but keeps each measurement meaningful."""
    tiny = bench.QUICK.scaled(0.001)
    assert tiny.tiny_n >= 200
    assert min(tiny.seed001_sizes) >= 50
    assert tiny.trial_s >= 0.05
    assert tiny.sweep_max >= 8
    assert tiny.blocking_s
    # Claim 6 needs more calls at once than the capacity part's target holds.
    server = bench.CAPACITY_SERVER
    assert tiny.capacity_n > server["capacity"] + server["queue"]
    assert bench.QUICK.scaled(0.05).capacity_n > server["capacity"] + server["queue"]
    assert bench.QUICK.scaled(1.0) is bench.QUICK


def test_an_out_that_is_not_a_directory_is_refused_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--out naming a file exits 2 at once, naming --out and the value; nothing runs."""
    taken = tmp_path / "notadir"
    taken.write_text("mine\n")

    def run_main(main: Any) -> Any:
        main.close()
        raise AssertionError("the bench ran with an unusable --out")

    monkeypatch.setattr(bench, "run_main", run_main)
    assert main(["bench", "--only", "blocking", "--out", str(taken)]) == 2
    assert f"--out must be a directory to write into; got --out {str(taken)!r}" in (
        capsys.readouterr().err
    )
    assert taken.read_text() == "mine\n"


def test_results_that_cannot_be_written_fail_with_a_message_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--out gone bad during the run: the summary is still printed, then exit 1 naming --out."""
    out = tmp_path / "bench"

    def run_main(main: Any) -> Any:
        main.close()
        if out.is_dir():  # made before the run
            out.rmdir()
        out.write_text("replaced during the run\n")
        return {"meta": {"parts": ["blocking"], "seconds": 1.0}, "records": []}

    monkeypatch.setattr(bench, "run_main", run_main)
    assert main(["bench", "--only", "blocking", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "The seeds' claims, measured here" in captured.out
    assert f"cannot write the results into --out {str(out)!r}" in captured.err


def _capacity_results(n: int, failed_at_once: int) -> dict[str, Any]:
    def record(strategy: str, limit: int | None = None, failed: int = 0) -> dict[str, Any]:
        return {
            "part": "capacity",
            "case": "hard cap",
            "status": "ok",
            "label": strategy,
            "strategy": strategy,
            "limit": limit,
            "n": n,
            "failed": failed,
            "ok_per_s": 1000.0,
        }

    records = [
        record("gather_all", failed=failed_at_once),
        record("gather_five_batches"),
        record("gather_batched", 100),
        record("corral", 90),
    ]
    server = {"capacity": 100, "queue": 0, "status": 503}
    return {"meta": {"parts": ["capacity"], "capacity_server": server}, "records": records}


@pytest.mark.parametrize(
    ("n", "failed", "verdict"),
    [(50, 0, "not measured"), (100, 0, "not measured"), (1000, 0, "refuted")],
)
def test_claim_6_is_not_refuted_by_a_run_too_small_to_overload_the_target(
    n: int, failed: int, verdict: str
) -> None:
    """No failures from n calls at once mean something only when n exceeds what the target holds."""
    judged = report.judge_timeouts_batching(_capacity_results(n, failed))
    assert judged.verdict == verdict
    if verdict == "not measured":
        assert judged.why.startswith(f"Not measured in this run: {n:,} calls at once cannot")
