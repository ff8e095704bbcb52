"""``corral serve``: the target server as a command, run as users run it."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import sys

import aiohttp
import pytest

from _loops import run
from corral.cli import main

HANG_GUARD = 30.0
URL_LINE = re.compile(r"^corral serve: listening on (http://127\.0\.0\.1:\d+)$")


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_serve_prints_its_url_serves_and_summarises_on_a_signal(
    stop_signal: signal.Signals,
) -> None:
    """A real `corral serve` process prints its URL, serves, and exits 0 with a summary."""

    async def scenario() -> tuple[int, str, str]:
        async with asyncio.timeout(HANG_GUARD):
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "corral.cli",
                "serve",
                "--port",
                "0",
                "--capacity",
                "4",
                "--service-ms",
                "1",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                assert process.stdout is not None
                line = (await process.stdout.readline()).decode().rstrip("\n")
                match = URL_LINE.match(line)
                assert match is not None, f"unexpected first line {line!r}"
                url = match.group(1)
                async with aiohttp.ClientSession() as session:
                    for path in ("/hello", "/item/7"):
                        async with session.get(url + path) as response:
                            assert response.status == 200
                            assert (await response.json())["path"] == path
                process.send_signal(stop_signal)
                rest, err = await process.communicate()
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            assert process.returncode is not None
            return process.returncode, rest.decode(), err.decode()

    returncode, rest, err = run(scenario)
    assert (returncode, err) == (0, "")
    summary = rest.strip()
    assert summary.startswith("corral serve: stopped after ")
    assert ": 2 served (" in summary
    assert "0 rejected (429), 0 failed, 0 stalled; peak concurrency 1" in summary
    assert "capacity 4); latency p50 " in summary
    assert "\n" not in summary  # one paragraph


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--capacity", "0"], "argument --capacity: must be an int >= 1, got '0'"),
        (
            ["serve", "--service-ms", "-5"],
            "argument --service-ms: must be a number between 0 and 86400000, got '-5'",
        ),
        (
            ["serve", "--jitter", "2"],
            "argument --jitter: must be a number between 0 and 1, got '2'",
        ),
        (["serve", "--status", "500"], "argument --status: invalid choice: 500"),
        (
            ["serve", "--retry-after", "1e308"],
            "argument --retry-after: must be a number between 0 and 86400, got '1e308'",
        ),
        (
            ["serve", "--schedule", "soon"],
            "argument --schedule: must be T:CAPACITY pairs joined by commas, like 5:32,10:64; "
            "got 'soon'",
        ),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_arguments_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad argument exits 2 with argparse's usage message naming it."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: corral")
    assert message in err


def test_a_non_loopback_host_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """--host must be a loopback address: argparse's usage message names the option."""
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: corral serve")
    assert err.endswith(
        "corral serve: error: argument --host: must be a loopback address (127.0.0.0/8, "
        "::1 or localhost): corral serves on this machine only, got '0.0.0.0'\n"
    )


@pytest.mark.slow
def test_a_taken_port_fails_with_status_one(capsys: pytest.CaptureFixture[str]) -> None:
    """When the port is in use, serve says so and exits 1 instead of a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 1
    assert capsys.readouterr().err.startswith("corral serve: cannot listen: ")


def test_serve_without_aiohttp_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without aiohttp, serve prints the pip command for the lab extra and exits 2."""
    monkeypatch.setitem(sys.modules, "aiohttp", None)  # makes `import aiohttp` fail
    monkeypatch.delitem(sys.modules, "corral.lab.server", raising=False)
    assert main(["serve", "--port", "0"]) == 2
    assert capsys.readouterr().err == (
        "corral serve needs the lab extra: pip install 'corral[lab]'\n"
    )


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    """`corral serve --help` describes the model and returns 0."""
    assert main(["serve", "--help"]) == 0
    assert "--capacity" in capsys.readouterr().out


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "::1", "localhost"])
def test_every_loopback_host_is_taken_as_typed(host: str) -> None:
    """--host takes any loopback address; the server maps localhost to 127.0.0.1 itself."""
    from corral.cli import _parser

    assert _parser().parse_args(["serve", "--host", host]).host == host


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.5", "example.com", "", "::"])
def test_every_other_host_is_refused_by_name(host: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--llm", "--host", host]) == 2
    assert "argument --host: must be a loopback address" in capsys.readouterr().err
