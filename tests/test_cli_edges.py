"""The ``corral`` command at its edges: bad values, Ctrl-C, a closed pipe, a full disk,
no matplotlib. Each ends in a one-line message and an exit status, never a traceback."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import corral.lab.demo as demo
from corral.cli import main
from corral.lab import runner

HANG_GUARD = 30.0
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC, str(Path(__file__).parent)])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


# --------------------------------------------------------------------------
# Bad values
# --------------------------------------------------------------------------


PORT = "argument --port: must be an int from 0 to 65535, got "


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--port", "70000"], PORT + "'70000'"),
        (["serve", "--port", "-1"], PORT + "'-1'"),
        (["serve", "--port", "1" * 5000], PORT + "'111"),
        (["serve", "--port", "http"], PORT + "'http'"),
        (["serve", "--capacity", "1" * 5000], "argument --capacity: must be an int >= 1, got '111"),
        (
            ["serve", "--llm", "--no-accel", "--accel-start", "0.2"],
            "corral serve: error: --accel-start has no effect with --no-accel",
        ),
    ],
)
def test_bad_values_are_usage_errors_naming_the_option(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad value exits 2 with argparse's usage line and the option's name and value."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(("usage: corral serve", "corral serve: error: "))
    assert message in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------
# Ctrl-C and a closed pipe
# --------------------------------------------------------------------------


def test_ctrl_c_outside_a_commands_own_handling_is_a_word_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C while serve starts up (importing aiohttp takes a while) exits 130, quietly."""
    import corral.lab.server

    class Interrupted:
        def __init__(self, **kwargs: Any) -> None:
            raise KeyboardInterrupt

    monkeypatch.setattr(corral.lab.server, "TargetServer", Interrupted)
    assert main(["serve", "--port", "0"]) == 130
    assert capsys.readouterr().err == "corral serve: interrupted\n"


@pytest.mark.slow
def test_serve_whose_reader_left_stops_without_a_traceback() -> None:
    """`corral serve | head -1`: the summary meets a closed pipe; exit 1, nothing on stderr."""
    process = subprocess.Popen(
        [sys.executable, "-m", "corral.cli", "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_child_env(),
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith(b"corral serve: listening on http://")
        process.stdout.close()  # the reader leaves, as head does
        process.send_signal(signal.SIGINT)
        assert process.stderr is not None
        err = process.stderr.read().decode()
        process.wait(timeout=HANG_GUARD)
    finally:
        if process.returncode is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
    assert (process.returncode, err) == (1, "")


# --------------------------------------------------------------------------
# Without matplotlib
# --------------------------------------------------------------------------


async def _quick(item: int) -> int:
    return item


@pytest.fixture
def no_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    """`import matplotlib` (and its figure module) fails, as without the lab extra."""
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "corral.lab.plots", raising=False)


@pytest.mark.usefixtures("no_matplotlib")
def test_tune_without_matplotlib_recommends_and_skips_the_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """matplotlib is optional: tune still prints and saves its result, without tune.png."""
    argv = ["tune", f"{__name__}:_quick", "--max-limit", "2", "--trial-seconds", "0.02"]
    assert main([*argv, "--json", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["recommended_limit"] in (1, 2)
    assert summary["plot"] is None
    assert json.loads((tmp_path / "tune.json").read_text()) == summary
    assert not (tmp_path / "tune.png").exists()
    assert "Traceback" not in captured.err


@pytest.mark.usefixtures("no_matplotlib")
def test_demo_and_bench_plots_without_matplotlib_are_skipped(tmp_path: Path) -> None:
    """The demo's plot is None and the bench draws no plot: no ImportError escapes."""
    from corral.lab import report

    ok = {
        "status": "ok",
        "ok_per_s": 100.0,
        "failed": 0,
        "p99_ms": 5.0,
    }
    results = [dict(ok) for _ in demo.WAYS]
    assert demo.plot(results, 10, dict(demo.DEMO_SERVER), tmp_path / "demo.png") is None
    meta = {"cpus": 2, "python": "3", "profile": {"name": "quick"}, "parts": []}
    assert report.draw_plots({"meta": meta, "records": []}, tmp_path) == []
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------
# Outputs: whole or not at all
# --------------------------------------------------------------------------

#: Files larger than this cannot be written (RLIMIT_FSIZE): a disk that fills up.
FILE_LIMIT = 2048


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))


def _run_with_a_full_disk(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a child that cannot write a file past FILE_LIMIT bytes."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=_child_env(),
        preexec_fn=_limit_file_size,  # Python ignores SIGXFSZ: writes fail with EFBIG
        capture_output=True,
        text=True,
        timeout=120,
    )


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_a_write_that_fails_halfway_leaves_the_previous_file(tmp_path: Path) -> None:
    """write_text_whole on a full disk raises, and the old file is still there, whole."""
    target = tmp_path / "results.json"
    target.write_text("previous\n")
    code = f"""
        from pathlib import Path
        from corral.lab.runner import write_text_whole
        try:
            write_text_whole(Path({str(target)!r}), "x" * {FILE_LIMIT * 4})
        except OSError as exc:
            print(type(exc).__name__)
    """
    result = _run_with_a_full_disk(code, tmp_path)
    assert result.stdout.strip() in ("OSError", "FileTooLargeError"), result
    assert target.read_text() == "previous\n"
    assert _leftovers(tmp_path) == []
    runner.write_text_whole(target, "new\n")  # and on a healthy disk, it replaces
    assert target.read_text() == "new\n"


@pytest.mark.slow
def test_tune_on_a_full_disk_keeps_the_previous_plot_and_says_so(tmp_path: Path) -> None:
    """tune.png larger than the disk allows: exit 1 naming --out; the old PNG stays whole."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "tune.png").write_bytes(b"previous plot")
    (tmp_path / "quick_target.py").write_text(
        "async def fn(item):\n    return item\n", encoding="utf-8"
    )
    code = f"""
        import sys
        from corral.cli import main
        sys.exit(main(["tune", "quick_target:fn", "--max-limit", "2",
                       "--trial-seconds", "0.02", "--out", {str(out)!r}]))
    """
    result = _run_with_a_full_disk(code, tmp_path)
    assert result.returncode == 1, result
    assert f"corral tune: error: cannot write into --out {str(out)!r}" in result.stderr
    assert "Traceback" not in result.stderr
    assert "Recommended limit: " in result.stdout
    assert (out / "tune.png").read_bytes() == b"previous plot"
    assert _leftovers(out) == []


# --------------------------------------------------------------------------
# corral demo's directory
# --------------------------------------------------------------------------


def test_demo_refuses_an_unusable_directory_before_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """./corral-demo is a file: exit 1 at once, saying where it saves; nothing runs."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corral-demo").write_text("mine\n")

    def run_main(main: Any) -> Any:
        main.close()
        raise AssertionError("the demo ran with nowhere to save")

    monkeypatch.setattr(demo, "run_main", run_main)
    assert main(["demo"]) == 1
    assert capsys.readouterr().err == (
        "corral demo: error: cannot save into 'corral-demo' (it exists and is not a "
        "directory); run it from a directory you can write to\n"
    )
    assert (tmp_path / "corral-demo").read_text() == "mine\n"


def test_demo_whose_directory_breaks_during_the_run_prints_the_table_and_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """./corral-demo replaced by a file mid-run: the table still shows, then exit 1."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "corral-demo"
    result = {
        "status": "ok",
        "wall_s": 1.0,
        "ok": 10,
        "failed": 0,
        "failures": {},
        "ok_per_s": 10.0,
        "p50_ms": 1.0,
        "p99_ms": 2.0,
        "retried": 0,
        "peak_mb": 1.0,
    }

    def run_main(main: Any) -> Any:
        main.close()
        out.rmdir()  # made before the run
        out.write_text("replaced during the run\n")
        return dict(demo.DEMO_SERVER), [dict(result) for _ in demo.WAYS]

    monkeypatch.setattr(demo, "run_main", run_main)
    assert main(["demo"]) == 1
    captured = capsys.readouterr()
    assert "six ways" in captured.out
    assert captured.err.startswith("corral demo: error: cannot save into 'corral-demo': ")
    assert out.read_text() == "replaced during the run\n"
