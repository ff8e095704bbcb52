"""The ``corral`` command's contract at the edges the other CLI tests leave open.

- ``corral tune TARGET --json``: stdout holds the one JSON object and nothing
  else, even when the TARGET's module or function prints;
- ``--out ""`` (``--out "$DIR"`` with ``DIR`` unset) is a usage error, not the
  current directory;
- ``--only`` names the part it does not know, not only the whole list.

Every run here is in-process, a fraction of a second, on loopback or none.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.cli import main
from corral.lab import bench

NOISY = "corral_contract_noisy_target"


@pytest.fixture
def noisy_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``module:function`` of a workload that prints at import and on every call."""
    source = tmp_path / "src"
    source.mkdir()
    (source / f"{NOISY}.py").write_text(
        textwrap.dedent(
            """\
            import asyncio

            print("importing the target")


            async def work(item):
                print("called with", item)
                await asyncio.sleep(0)
                return item
            """
        )
    )
    monkeypatch.syspath_prepend(str(source))
    try:
        yield f"{NOISY}:work"
    finally:
        sys.modules.pop(NOISY, None)


def test_tune_json_prints_one_json_object_even_when_the_target_prints(
    noisy_target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`corral tune ... --json | jq`: the workload's own prints go to stderr, not into the JSON."""
    argv = ["tune", noisy_target, "--json", "--trial-seconds", "0.01", "--max-limit", "2"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert captured.out.endswith("}\n")
    assert captured.out.count("\n") == 1  # one line: one object
    summary = json.loads(captured.out)
    limit = summary["recommended_limit"]
    assert type(limit) is int
    assert limit in (1, 2)
    # Nothing was lost: what the target printed is on stderr, with the progress.
    assert "importing the target" in captured.err
    assert "called with 0" in captured.err
    assert "limit     1:" in captured.err


def test_tune_without_json_still_prints_the_target_and_the_result_on_stdout(
    noisy_target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only --json moves the target's prints: a plain run shows everything where it was."""
    argv = ["tune", noisy_target, "--trial-seconds", "0.01", "--max-limit", "1"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "importing the target" in out
    assert "Recommended limit: 1." in out


@pytest.mark.parametrize(
    "target", ["corral_contract_no_such_module:fn", "http://[::1/", "not a target"]
)
def test_tune_json_with_a_bad_target_prints_nothing_on_stdout(
    target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A refused TARGET: exit 2 and the reason on stderr; no half answer on stdout."""
    assert main(["tune", target, "--json", "--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("corral tune: error: TARGET ")


def _no_run(main: Any) -> Any:
    main.close()
    raise AssertionError("the command ran with an --out it should have refused")


@pytest.mark.parametrize("value", ["", "  "])
@pytest.mark.parametrize("command", [["bench", "--only", "blocking"], ["tune", "m:f"]])
def test_an_empty_out_is_a_usage_error_not_the_current_directory(
    command: list[str],
    value: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--out "$DIR"` with DIR unset: refused, naming --out, before anything runs or is written."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "run_main", _no_run)
    assert main([*command, f"--out={value}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: corral {command[0]}")
    assert f"argument --out: must name a directory, like ./results; got {value!r}" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["bench", "--only", "blocking"], ["tune", "m:f"]])
def test_an_out_below_a_file_is_refused_before_the_run(
    command: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--out that cannot be created (a file is in the way) exits 2 naming --out and why."""
    monkeypatch.setattr(bench, "run_main", _no_run)
    blocker = tmp_path / "file"
    blocker.write_text("mine\n")
    out = blocker / "results"
    if command[0] == "tune":
        # tune checks its TARGET first: give it one that imports.
        command = ["tune", f"{__name__}:_never_called"]
    assert main([*command, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out must be a directory to write into; got --out {str(out)!r}" in err
    assert blocker.read_text() == "mine\n"


async def _never_called(item: int) -> int:
    raise AssertionError("tune ran with an unusable --out")


@pytest.mark.parametrize(
    ("only", "named"),
    [
        ("http,netwrk", "('netwrk' unknown)"),
        ("htpp,blocking,cpus", "('htpp', 'cpus' unknown)"),
        ("network", "('network' unknown)"),
    ],
)
def test_only_names_the_unknown_parts(
    only: str, named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """In a list of parts, the message says which one is wrong, not only the whole text."""
    assert main(["bench", "--only", only]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: corral bench")
    assert f"argument --only: must be parts from {','.join(bench.PARTS)}, joined by commas" in err
    assert f"got {only!r} {named}" in err


def test_only_with_no_part_says_so_without_an_unknown_list(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["bench", "--only", " , "]) == 2
    err = capsys.readouterr().err
    assert "got ' , '\n" in err
    assert "unknown" not in err
