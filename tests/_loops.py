"""Event loops the suite runs on, and a loop whose clock jumps over idle time.

Every async test runs once per loop kind corral promises to support:

- ``asyncio``: the default loop in debug mode (catches non-threadsafe calls
  and slow callbacks);
- ``uvloop``: when installed;
- ``eager``: Python 3.12+'s ``asyncio.eager_task_factory``, where a task runs
  synchronously inside ``create_task`` until its first suspension.

``virtual_time`` tests run on :class:`VirtualClockLoop` instead: whenever every
task is blocked on a timer, the clock jumps straight to the next timer, so
sleeps, backoff, rate spacing and timeouts cost no real time and the schedule
can be asserted exactly.
"""

from __future__ import annotations

import asyncio
import gc
import selectors
import sys
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

try:
    import uvloop
except ImportError:  # pragma: no cover - depends on the machine
    uvloop = None

LOOP_KINDS: list[str] = ["asyncio"]
if uvloop is not None:
    LOOP_KINDS.append("uvloop")
if sys.version_info >= (3, 12):
    LOOP_KINDS.append("eager")


class _JumpingSelector(selectors.DefaultSelector):
    """A selector that, instead of sleeping until the next timer, jumps the clock."""

    def __init__(self, loop: VirtualClockLoop) -> None:
        super().__init__()
        self._virtual_loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready or timeout is None or timeout <= 0:
            # Real I/O is ready, or there is no timer: block for real (a thread
            # finishing, a socket) only in the latter case.
            return ready if ready or timeout is not None else super().select(None)
        self._virtual_loop.advance(timeout)
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An asyncio loop whose ``time()`` is virtual and skips idle periods."""

    def __init__(self) -> None:
        self._now = 0.0
        super().__init__(_JumpingSelector(self))
        # Timers due within this much of "now" run in the same iteration; keep
        # it tiny so schedules stay exact.
        self._clock_resolution = 1e-9

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds


class LoopErrors:
    """Collects what the loop's exception handler would have logged."""

    def __init__(self) -> None:
        self.contexts: list[Mapping[str, Any]] = []

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.contexts.append(context)

    def check(self) -> None:
        if self.contexts:
            messages = "\n".join(
                f"{c.get('message')}: {c.get('exception')!r} {c.get('task', c.get('future', ''))!r}"
                for c in self.contexts
            )
            raise AssertionError(f"the event loop reported errors:\n{messages}")


def run(
    main: Callable[[], Coroutine[Any, Any, Any]],
    kind: str = "asyncio",
    *,
    virtual_time: bool = False,
) -> Any:
    """Run ``main()`` on a fresh loop of ``kind``; fail on anything the loop logged.

    "Task was destroyed but it is pending" and unretrieved task exceptions are
    reported through the loop's exception handler, so they fail the test here
    instead of scrolling past in a log.
    """
    errors = LoopErrors()
    factory: Callable[[], asyncio.AbstractEventLoop] | None
    if virtual_time:
        factory = VirtualClockLoop
    elif kind == "uvloop":
        assert uvloop is not None
        factory = uvloop.new_event_loop
    else:
        factory = None
    # What was alive before this run is set aside while it runs, so the
    # collection at its end goes through what the run made, not the whole
    # heap: late in the suite the heap holds hundreds of thousands of
    # objects, and a property test that runs a loop per example spent 90% of
    # its time in full collections (25 s against 2.6 s alone).
    gc.freeze()
    try:
        with asyncio.Runner(
            debug=kind == "asyncio" and not virtual_time, loop_factory=factory
        ) as r:
            loop = r.get_loop()
            loop.set_exception_handler(errors)
            if kind == "eager":
                loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined,unused-ignore]
            try:
                return r.run(main())
            finally:
                # Collect inside the loop's lifetime so a pending task that is
                # garbage reports through our handler, not to stderr.
                gc.collect()
                errors.check()
    finally:
        gc.unfreeze()


class OffsetClockLoop(asyncio.SelectorEventLoop):
    """Real time plus an offset that only :meth:`skip` moves.

    For deadlines with a checkpoint: a :class:`VirtualClockLoop` jumps its clock
    whenever the loop waits, also for the checkpoint's writing thread, so a
    deadline would pass at some random write. Here timers due within a skip run
    at the loop's next iteration, and the others keep real time.
    """

    def __init__(self) -> None:
        super().__init__()
        self._offset = 0.0

    def time(self) -> float:
        return super().time() + self._offset

    def skip(self, seconds: float) -> None:
        self._offset += seconds


def skip_offset(seconds: float) -> None:
    """Move the running :class:`OffsetClockLoop`'s clock ``seconds`` on (a deadline comes due)."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, OffsetClockLoop)
    loop.skip(seconds)


async def skip_offset_once(ready: asyncio.Event, seconds: float) -> None:
    """Once ``ready`` is set, :func:`skip_offset` (as a task beside the map under test)."""
    await ready.wait()
    skip_offset(seconds)


def run_offset(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run ``main()`` on an :class:`OffsetClockLoop`; fail on anything the loop logged."""
    errors = LoopErrors()
    with asyncio.Runner(debug=True, loop_factory=OffsetClockLoop) as runner:
        runner.get_loop().set_exception_handler(errors)
        try:
            return runner.run(main())
        finally:
            errors.check()
