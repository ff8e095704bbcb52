"""``corral demo``: the same job six ways against a local API, a table and a plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import corral.lab.demo as demo
import corral.lab.workloads as workloads
from corral.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# A small API the demo overwhelms at once: 4 in service, 64 waiting, so it
# holds 68 requests and needs 1 s to serve 400: sent together, most are
# refused, however slowly a loaded machine opens the connections. corral's
# limit of 64 always fits. A short Retry-After keeps the retries quick.
SMALL_API = {"capacity": 4, "service_ms": 10.0, "queue": 64, "retry_after": 0.1}


@pytest.fixture
def small_demo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setattr(demo, "DEMO_ITEMS", 400)
    monkeypatch.setattr(demo, "DEMO_SERVER", SMALL_API)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "corral-demo"


@pytest.mark.slow
def test_demo_runs_every_way_prints_the_table_and_saves_plot_and_numbers(
    small_demo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`corral demo` runs all six ways end to end, counts refusals and writes its files."""
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "The same 400 requests, six ways" in out
    for way in demo.WAYS:
        assert way.label in out
    record = json.loads((small_demo / "results.json").read_text())
    ways = {w["label"]: w for w in record["ways"]}
    assert list(ways) == [w.label for w in demo.WAYS]
    plain = ways["plain gather"]
    # 400 at once against an API holding 72: refusals, counted by reason, never retried.
    assert plain["status"] == "ok"
    assert plain["failed"] > 0
    assert plain["failures"].get("429") == plain["failed"]
    assert plain["ok"] + plain["failed"] == 400
    assert plain["retried"] == 0
    fixed = ways["corral limit=64"]
    assert (fixed["status"], fixed["failed"], fixed["ok"]) == ("ok", 0, 400)
    assert ways["queue + 10 workers"]["failed"] == 0
    assert f"plain gather lost {plain['failed']:,} of 400 requests" in out
    assert (small_demo / "demo.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "Saved corral-demo/demo.png" in out


@pytest.mark.slow
def test_demo_skips_auto_with_a_note_when_this_build_lacks_it(
    small_demo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without limit='auto' the demo still runs, and says the auto row is not available."""
    monkeypatch.setattr(demo, "DEMO_ITEMS", 100)

    async def no_auto() -> str:
        return "limit='auto' (adaptive concurrency) is not available in corral 0.1"

    monkeypatch.setattr(workloads, "auto_unavailable", no_auto)
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "(auto: not available in this version)" in out
    record = json.loads((small_demo / "results.json").read_text())
    auto = record["ways"][-1]
    assert auto["label"] == "corral auto"
    assert auto["status"].startswith("unavailable: limit='auto'")
    assert "not available in this version" in out.split("corral auto")[-1]


def test_demo_takes_no_argument(capsys: pytest.CaptureFixture[str]) -> None:
    """`corral demo` accepts no argument: anything else is a usage error."""
    assert main(["demo", "--items", "5"]) == 2
    assert "unrecognized arguments: --items 5" in capsys.readouterr().err


def _result(**fields: Any) -> dict[str, Any]:
    base = {
        "status": "ok",
        "wall_s": 1.0,
        "ok": 1000,
        "failed": 0,
        "failures": {},
        "ok_per_s": 1000.0,
        "p50_ms": 10.0,
        "p99_ms": 20.0,
        "retried": 0,
        "peak_mb": 1.0,
    }
    return {**base, **fields}


def test_findings_are_computed_from_the_run_not_written_in_advance() -> None:
    """The sentences under the table follow this run's numbers, whichever way they go."""
    server = {"capacity": 64, "queue": 256}
    refused = [
        _result(ok=100, failed=900, failures={"429": 900}, ok_per_s=50.0),
        _result(failed=0, ok_per_s=900.0),
        _result(ok_per_s=300.0),
        _result(ok_per_s=2000.0),
        _result(retried=40, wall_s=3.0, p99_ms=1500.0),
        {"status": "unavailable: no auto"},
    ]
    lines = demo.findings(refused, 1000, server)
    assert lines[0].startswith("plain gather lost 900 of 1,000 requests (90%)")
    assert "batched gather lost nothing, at 900/s against 2,000/s for corral limit=64" in lines[1]
    assert "300/s, 6.7x slower than corral limit=64" in lines[2]
    assert "40 refused requests were retried" in lines[4]
    assert lines[-1] == "Fastest with nothing lost: corral limit=64 (2,000/s)."

    lucky = [_result(), _result(), _result(), _result(), _result(), _result()]
    lines = demo.findings(lucky, 1000, server)
    assert lines[0] == "plain gather sent all 1,000 at once and none failed on this run."
    assert any("corral limit=1000 was never refused this time" in line for line in lines)
