"""The recipes' command lines: a bad value is a usage error naming its option, exit 2.

``float`` and ``int`` alone accept ``0``, ``-1``, ``nan`` and ``inf``; those
then failed far from the command line, as a ValueError traceback from the mock
server or from ``corral.Rate``, or, for ``--prompts -1``, as a run that asked
nothing and exited 0. Each test runs the recipe's ``main`` with the run itself
replaced by a recorder: a value wrongly accepted fails the test, never starts
a server or reaches a network.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SRC = str(Path(__file__).resolve().parent.parent / "src")
RECIPES = ("openai_chat", "anthropic_messages")
HANG_GUARD = 60.0

#: Values that parse as floats and make no sense for any option here.
NEVER = ("0", "-1", "nan", "inf", "-inf", "1e300", "1e-300", "ten", "")

#: (option, values refused, values accepted): every option of both recipes.
#: The accepted ones include the bounds the messages name.
OPTIONS: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = [
    ("--minute", (*NEVER, "0.09", "86401"), ("0.1", "6", "86400")),
    *(
        (flag, (*NEVER, "0.5", "1e13"), ("1", "500", "1e12"))
        for flag in ("--rpm", "--input-tpm", "--output-tpm")
    ),
    ("--prompts", ("0", "-1", "1.5", "nan", "1e3", "1" * 5000, ""), ("1", "200")),
    (
        "--base-url",
        ("", "api.openai.com", "ftp://example.com", "http://", "http://[::1", "http://h:99999"),
        ("https://api.openai.com/v1", "http://127.0.0.1:8080", "http://[::1]:8080/"),
    ),
    ("--model", ("", "  "), ("m", "claude-haiku-4-5")),
]


def _recipe(name: str) -> ModuleType:
    """Import examples/NAME.py as a module (examples/ is not a package)."""
    pytest.importorskip("openai" if name == "openai_chat" else "anthropic")
    spec = importlib.util.spec_from_file_location(
        f"corral_example_args_{name}", EXAMPLES / f"{name}.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parsed(
    name: str, argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> argparse.Namespace | None:
    """The arguments the recipe's main would run with; ``None`` if it never got to run."""
    recipe = _recipe(name)
    seen: list[argparse.Namespace] = []

    async def recorded(args: argparse.Namespace) -> int:
        seen.append(args)
        return 0

    monkeypatch.setattr(recipe, "_main", recorded)
    recipe.main(argv)
    return seen[0] if seen else None


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize(
    ("flag", "value"), [(flag, value) for flag, bad, _ in OPTIONS for value in bad]
)
def test_a_bad_value_is_a_usage_error_naming_the_option(
    name: str,
    flag: str,
    value: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        _parsed(name, [f"{flag}={value}"], monkeypatch)  # =: "-1" would read as an option
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ")
    assert f"argument {flag}: " in err
    assert repr(value) in err


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize(
    ("flag", "value"), [(flag, value) for flag, _, good in OPTIONS for value in good]
)
def test_values_in_range_are_accepted(
    name: str, flag: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # --minute is the mock's: it goes without --base-url.
    args = _parsed(name, [f"{flag}={value}"], monkeypatch)
    assert args is not None
    attribute = getattr(args, flag.removeprefix("--").replace("-", "_"))
    assert attribute == type(attribute)(value)


@pytest.mark.parametrize("name", RECIPES)
def test_the_defaults_are_those_documented(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    args = _parsed(name, [], monkeypatch)
    assert args is not None
    assert (args.base_url, args.prompts, args.minute) == (None, 200, 6.0)
    assert (args.rpm, args.input_tpm, args.output_tpm) == (500.0, 200_000.0, 40_000.0)


@pytest.mark.parametrize("name", RECIPES)
def test_minute_with_a_real_api_is_refused_not_ignored(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real API's minute is 60 s: --minute with --base-url would be silently ignored."""
    argv = ["--base-url", "https://api.example.com", "--minute", "1"]
    with pytest.raises(SystemExit) as exit_:
        _parsed(name, argv, monkeypatch)
    assert exit_.value.code == 2
    assert "argument --minute: applies to the mock only" in capsys.readouterr().err


@pytest.mark.parametrize("name", RECIPES)
def test_the_script_itself_exits_2_without_a_traceback(name: str) -> None:
    """Run as users run it: `python examples/NAME.py --minute 0`."""
    pytest.importorskip("openai" if name == "openai_chat" else "anthropic")
    env = {**os.environ, "PYTHONPATH": SRC, "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), "--minute", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=HANG_GUARD,
        check=False,
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert "argument --minute: must be a number from 0.1 to 86400; got '0'" in done.stderr
    assert "Traceback" not in done.stderr
