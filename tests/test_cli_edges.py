"""The ``corral`` command at its edges: bad values, Ctrl-C, a closed pipe, a full disk,
no matplotlib. Each ends in a one-line message and an exit status, never a traceback."""

from __future__ import annotations

import argparse
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

import corral.lab
import corral.lab.demo as demo
from corral.cli import _parser, main
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


#: Values that parse as floats and make no sense for any option here.
NEVER = ("-1", "nan", "inf", "-inf", "1e300")
#: ... and those that make no sense where the least is more than zero.
ABSURD = (*NEVER, "0", "1e-300")

#: Every numeric option: (argv before it, the option, values refused, values accepted).
#: The accepted ones include the bounds themselves.
NUMERIC_OPTIONS: list[tuple[list[str], str, tuple[str, ...], tuple[str, ...]]] = [
    (["bench"], "--scale", (*NEVER, "0", "100.5"), ("1e-300", "100")),
    (["tune", "m:f"], "--max-limit", (*ABSURD, "2.5"), ("1", "4096")),
    (["tune", "m:f"], "--trial-seconds", (*ABSURD, "0.009", "86401"), ("0.01", "86400")),
    (["serve"], "--port", (*NEVER, "1e-300", "65536"), ("0", "65535")),
    (["serve"], "--capacity", ABSURD, ("1",)),
    (["serve"], "--service-ms", (*NEVER, "86400001"), ("0", "1e-300", "86400000")),
    (["serve"], "--queue", (*NEVER, "1e-300"), ("0",)),
    (["serve"], "--retry-after", (*NEVER, "86401"), ("0", "86400")),
    (["serve"], "--jitter", (*NEVER, "1.01"), ("0", "1")),
    (["serve"], "--stall-fraction", (*NEVER, "1.01"), ("0", "1")),
    (["serve"], "--stall-s", (*NEVER, "86401"), ("0", "86400")),
    (["serve"], "--fail-fraction", (*NEVER, "1.01"), ("0", "1")),
    (
        ["serve"],
        "--schedule",
        ("-1:4", "nan:4", "inf:4", "1e300:4", "86401:4", "1:0", "1:1e300"),
        ("0:1", "86400:2"),
    ),
    (["serve"], "--seed", ("nan", "inf", "1e300", "1e-300"), ("0", "-1")),
    *(
        (["serve", "--llm"], flag, (*ABSURD, "0.5", "1e13"), ("1", "1e12"))
        for flag in ("--rpm", "--tpm", "--input-tpm", "--output-tpm")
    ),
    (["serve", "--llm"], "--minute", (*ABSURD, "0.09", "86401"), ("0.1", "86400")),
    (["serve", "--llm"], "--latency-ms", (*NEVER, "86400001"), ("0", "86400000")),
    (["serve", "--llm"], "--ms-per-token", (*NEVER, "86400001"), ("0", "86400000")),
    (["serve", "--llm"], "--accel-start", (*NEVER, "0", "1.01"), ("1e-300", "1")),
    (["serve", "--llm"], "--accel-growth", (*ABSURD, "1", "100.5"), ("1.01", "100")),
    (["serve", "--llm"], "--accel-window", (*ABSURD, "0.0009", "86401"), ("0.001", "86400")),
]


def _parse(argv: list[str]) -> argparse.Namespace:
    # The parser alone: an option wrongly accepted must fail the test, not start a server.
    return _parser().parse_args(argv)


@pytest.mark.parametrize(
    ("before", "flag", "value"),
    [(before, flag, value) for before, flag, bad, _ in NUMERIC_OPTIONS for value in bad],
)
def test_numeric_options_refuse_values_out_of_their_bounds(
    before: list[str], flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """0, negatives, nan, inf, 1e300, 1e-300: each refused where it makes no sense, named."""
    with pytest.raises(SystemExit) as exit_:
        _parse([*before, f"{flag}={value}"])  # =: "-1" would read as an option
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: " in err
    assert repr(value) in err


@pytest.mark.parametrize(
    ("before", "flag", "value"),
    [(before, flag, value) for before, flag, _, good in NUMERIC_OPTIONS for value in good],
)
def test_numeric_options_accept_their_bounds(before: list[str], flag: str, value: str) -> None:
    """The bounds named in the messages are themselves accepted."""
    _parse([*before, f"{flag}={value}"])


def test_every_numeric_option_is_checked_for_bounds() -> None:
    """A new numeric option cannot slip in without a row in NUMERIC_OPTIONS."""
    numeric = ("int_option.", "number_option.", "_schedule")
    seen = set()
    [subparsers] = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for command, parser in subparsers.choices.items():
        for action in parser._actions:
            kind = getattr(action.type, "__qualname__", "")
            # A fixed set of choices (--status 429|503) has no range to get wrong.
            if action.choices is None and (action.type in (int, float) or kind.startswith(numeric)):
                seen.add((command, action.option_strings[-1]))
    assert seen == {(before[0], flag) for before, flag, _, _ in NUMERIC_OPTIONS}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["serve", "--llm", "--minute", "1e-300"],
            "argument --minute: must be a number between 0.1 and 86400, got '1e-300'",
        ),
        (
            ["tune", "m:f", "--trial-seconds", "1e300"],
            "argument --trial-seconds: must be a number of seconds between 0.01 and 86400, "
            "got '1e300'",
        ),
        (
            ["serve", "--service-ms", "1e300"],
            "argument --service-ms: must be a number between 0 and 86400000, got '1e300'",
        ),
        (
            ["serve", "--llm", "--accel-growth", "1"],
            "argument --accel-growth: must be a number > 1 and <= 100, got '1'",
        ),
        (
            ["serve", "--schedule", "1e300:4"],
            "argument --schedule: must be T:CAPACITY pairs joined by commas, like 5:32,10:64; "
            "got '1e300:4' (T from 0 to 86400 seconds, CAPACITY an int >= 1)",
        ),
    ],
)
def test_bound_messages_name_the_rule_and_the_value(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        _parse(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


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
    # `from corral.lab import plots` finds an imported module as the package's
    # attribute too, whatever sys.modules says: an earlier test may have imported it.
    monkeypatch.delattr(corral.lab, "plots", raising=False)


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


def _killed_halfway(target: Path) -> Path:
    """A child writing ``target`` is SIGKILLed mid-write; the temporary file it left."""
    code = f"""
        import sys
        from pathlib import Path
        from corral.lab.runner import replacing
        with replacing(Path({str(target)!r})) as part:
            part.write_text("half of it")
            print(part, flush=True)
            sys.stdin.read()  # until killed
    """
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=_child_env(),
        text=True,
    )
    try:
        assert process.stdout is not None
        part = Path(process.stdout.readline().strip())
        process.kill()
        process.wait(timeout=HANG_GUARD)
    finally:
        if process.returncode is None:
            process.kill()
            process.wait()
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()
    assert process.returncode == -signal.SIGKILL
    assert part.name == f".{target.name}.{process.pid}.part"
    return part


def _age(path: Path, seconds: float) -> None:
    """Make ``path`` look last written ``seconds`` ago."""
    then = path.stat().st_mtime - seconds
    os.utime(path, (then, then))


def test_a_write_killed_with_sigkill_is_cleaned_up_by_the_next_write(tmp_path: Path) -> None:
    """SIGKILL mid-write leaves .NAME.PID.part; the next write of NAME removes it once stale."""
    target = tmp_path / "results.json"
    target.write_text("previous\n")
    part = _killed_halfway(target)
    assert part.read_text() == "half of it"
    assert target.read_text() == "previous\n"  # the killed write never replaced it

    runner.write_text_whole(target, "new\n")
    assert part.exists()  # just written: a writer elsewhere may still own it
    _age(part, runner.STALE_PART_S + 1)
    runner.write_text_whole(target, "newer\n")
    assert not part.exists()
    assert target.read_text() == "newer\n"
    assert _leftovers(tmp_path) == []


def test_only_stale_parts_of_dead_writers_of_the_same_file_are_removed(tmp_path: Path) -> None:
    """A live pid's part, another file's part and look-alikes stay; the dead one's goes."""
    target = tmp_path / "tune.json"
    dead = _killed_halfway(target)
    alive = tmp_path / f".tune.json.{os.getppid()}.part"
    other = tmp_path / dead.name.replace("tune.json", "report.md")
    alike = [
        tmp_path / name for name in (".tune.json.part", ".tune.json.x1.part", ".tune.json.0.part")
    ]
    for path in (alive, other, *alike):
        path.write_text("someone's")
    for path in (dead, alive, other, *alike):
        _age(path, runner.STALE_PART_S + 1)
    # Fresh by the clock given: kept.
    assert runner.remove_stale_parts(target, now=dead.stat().st_mtime + 1) == []
    assert runner.remove_stale_parts(target) == [dead]
    assert sorted(_leftovers(tmp_path)) == sorted(p.name for p in (alive, other, *alike))


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
        from corral.cli import _parser, main
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


def test_a_directory_that_refuses_files_is_found_before_the_run() -> None:
    """/proc passes os.access for root (and lists as a directory), but holds no new file."""
    from corral.lab.runner import unwritable

    assert unwritable(Path("/proc")) is not None
