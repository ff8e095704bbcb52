"""Runs ``async def`` tests on every loop kind corral supports (see ``_loops``)."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from _loops import LOOP_KINDS, run
from corral import _offload


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if not inspect.iscoroutinefunction(metafunc.function):
        return
    if "loop_kind" not in metafunc.fixturenames:
        metafunc.fixturenames.append("loop_kind")
    virtual = metafunc.definition.get_closest_marker("virtual_time") is not None
    metafunc.parametrize("loop_kind", ["virtual"] if virtual else LOOP_KINDS, indirect=True)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    fn = pyfuncitem.obj
    if not inspect.iscoroutinefunction(fn):
        return None
    names = inspect.signature(fn).parameters
    kwargs: dict[str, Any] = {name: pyfuncitem.funcargs[name] for name in names}
    kind = str(pyfuncitem.callspec.params["loop_kind"])
    virtual = pyfuncitem.get_closest_marker("virtual_time") is not None
    run(lambda: fn(**kwargs), kind, virtual_time=virtual)
    return True


@pytest.fixture
def loop_kind(request: pytest.FixtureRequest) -> str:
    """The loop kind the current async test runs on."""
    return str(request.param)


# rich's view of a stream, for the progress display's tests.


@pytest.fixture
def plain(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Rich sees a StringIO as a non-terminal, whatever the environment says."""
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Rich treats any stream as a 200-column terminal (FORCE_COLOR)."""
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "200")
    return monkeypatch


@pytest.fixture
def pools(monkeypatch: pytest.MonkeyPatch) -> list[_offload.ProcessPool]:
    """Every ProcessPool that executor='process' creates during the test."""
    created: list[_offload.ProcessPool] = []

    class Recording(_offload.ProcessPool):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(_offload, "ProcessPool", Recording)
    return created
