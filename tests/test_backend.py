"""backend=: "local" or "ray"; what a map on Ray refuses, at once, whether or not Ray is installed.

The runs on a real Ray cluster are in test_ray_backend.py. These checks
happen before Ray is imported, so they hold on every Python.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import corral


async def echo(item: int) -> int:
    return item


def test_the_local_backend_runs_as_without_it() -> None:
    """backend='local' is the default, spelled out."""
    assert corral.run(abs, [-1, -2], backend="local") == [1, 2]


async def test_gather_refuses_an_unknown_backend() -> None:
    """gather checks backend= like map does, naming both choices."""
    with pytest.raises(
        ValueError,
        match=r"^backend must be 'local' \(this process\) or 'ray' \(a Ray cluster's actors\); "
        r"got backend='dask'$",
    ):
        await corral.gather(abs, [1], backend="dask")  # type: ignore[arg-type]


def test_without_ray_installed_the_ray_backend_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No Ray: an ImportError at the call, naming the extra to install."""
    monkeypatch.setitem(sys.modules, "ray", None)  # find_spec("ray") is None: as if absent
    with pytest.raises(ImportError, match=r"pip install 'corral\[ray\]'"):
        corral.map(echo, [1], backend="ray")
    with pytest.raises(ImportError, match=r"^backend='ray' needs Ray, which is not installed"):
        corral.run(echo, [1], backend="ray")


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("processes", 2),
        ("rate", "10/s"),
        ("monitor", True),
        ("executor", "thread"),
        ("budget", {"requests": 10}),
    ],
)
def test_keywords_the_ray_backend_does_not_take_are_refused_naming_both(
    keyword: str, value: object
) -> None:
    """Each unsupported keyword fails at once, naming itself and backend='ray'."""
    with pytest.raises(
        ValueError,
        match=rf"^{keyword}= is not available with backend='ray'; got {keyword}=.* and "
        r"backend='ray'\. Drop one of them\.$",
    ):
        corral.map(echo, [1], backend="ray", **{keyword: value})  # type: ignore[misc]


@pytest.mark.parametrize("limit", ["auto", corral.Limiter(limit=5)])
def test_a_limit_that_lives_in_this_process_is_refused(limit: object) -> None:
    """The ray backend splits an int limit over its actors: nothing else can be split."""
    with pytest.raises(ValueError, match=r"^backend='ray' splits an int limit across its actors"):
        corral.map(echo, [1], backend="ray", limit=limit)  # type: ignore[arg-type]


def test_ray_keywords_without_the_ray_backend_are_refused() -> None:
    """ray_address=, ray_actors= and setup= mean nothing to a local map: say so."""
    with pytest.raises(
        ValueError,
        match=r"^ray_address= is used with backend='ray' only; got "
        r"ray_address='10\.0\.0\.5:6379' and backend='local'",
    ):
        corral.map(echo, [1], ray_address="10.0.0.5:6379")
    with pytest.raises(ValueError, match=r"^setup= is used with backend='ray' only"):
        corral.run(echo, [1], setup=dict)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ray_actors": 0}, r"^ray_actors must be an int >= 1 .*; got ray_actors=0$"),
        ({"ray_actors": True}, r"got ray_actors=True$"),
        (
            {"ray_address": ""},
            r"^ray_address must be a Ray cluster's address .*; got ray_address=''$",
        ),
        ({"ray_address": 6379}, r"got ray_address=6379$"),
    ],
)
def test_bad_ray_arguments_fail_at_once(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        corral.map(echo, [1], backend="ray", **options)  # type: ignore[arg-type]


def test_a_setup_that_is_not_callable_fails_at_once() -> None:
    with pytest.raises(TypeError, match=r"^setup must be a function of no argument.*got setup=5$"):
        corral.map(echo, [1], backend="ray", setup=5)  # type: ignore[arg-type]


def test_the_usual_checks_still_apply_on_ray() -> None:
    """limit, timeout and fn are checked as for a local map."""
    with pytest.raises(ValueError, match=r"got limit=0$"):
        corral.map(echo, [1], backend="ray", limit=0)
    with pytest.raises(ValueError, match=r"got timeout=-1$"):
        corral.map(echo, [1], backend="ray", timeout=-1)
    with pytest.raises(TypeError, match=r"needs a function of one item as fn; got fn=3$"):
        corral.map(3, [1], backend="ray")  # type: ignore[call-overload]


def test_importing_corral_does_not_import_ray() -> None:
    """The extra is loaded on use only, even with the backend module in place."""
    code = "import sys, corral, corral._ray; print('ray' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
