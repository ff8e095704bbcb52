"""Run lab measurements in fresh Python processes, streaming their progress back.

A measurement that shares a process with the one before it inherits its heap,
its caches and its garbage: the RSS high-water mark (``ru_maxrss``) only ever
grows, so the second strategy's "peak memory" would be whatever the first one
left. And a client sharing an event loop with the server it measures competes
with it for the same core. So the lab runs every measurement in a child
process::

    results = await run_specs([spec_a, spec_b], timeout=60)            # one child, in turn
    results = await run_specs([spec], timeout=60, on_progress=show)    # live progress

The protocol is JSON lines. The parent writes the list of specs to the child's
stdin; the child (:func:`corral.lab.workloads.child_main`) runs them one after
the other and prints ``{"progress": {...}}`` lines while one runs and one
``{"result": {...}}`` line when it ends. Every result has a ``status``: ``"ok"``,
``"timeout"``, ``"unavailable: ..."`` or ``"error: ..."``; a spec the child
never reached (it crashed or ran out of time) gets one too, so the parent
always holds one result per spec.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "Progress",
    "Result",
    "Spec",
    "prepare_out",
    "raise_open_files_limit",
    "remove_stale_parts",
    "replacing",
    "run_main",
    "run_specs",
    "unwritable",
    "write_text_whole",
]

T = TypeVar("T")

Spec = dict[str, Any]
Result = dict[str, Any]
#: ``on_progress(index_of_spec, payload)``: the child's latest counters for one spec.
Progress = Callable[[int, dict[str, Any]], None]

_CHILD_CODE = "from corral.lab.workloads import child_main; child_main()"


def prepare_out(out: Path) -> str | None:
    """Create the ``--out`` directory ``out``; ``None``, or why it cannot take the results.

    Called before a run, so a bad ``--out`` costs a second, not the whole run
    and its measurements.
    """
    reason = unwritable(out)
    if reason is None:
        return None
    return f"--out must be a directory to write into; got --out {str(out)!r} ({reason})"


def unwritable(out: Path) -> str | None:
    """Create the directory ``out``; ``None``, or why files cannot be written into it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if isinstance(exc, FileExistsError) or (out.exists() and not out.is_dir()):
            return "it exists and is not a directory"
        return exc.strerror or str(exc)
    # Try it: os.access says yes to root everywhere, and to anyone on a
    # read-only mount or /proc, where writing fails all the same.
    try:
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


#: A temporary file of a writer whose pid is gone is removed only once it has
#: not changed for this long: a writer in another pid namespace (a container
#: sharing the directory) looks dead from here but keeps its file fresh.
STALE_PART_S = 60.0


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (someone else's counts: it may be writing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: alive, not ours; others: unsure
        return True
    return True


def remove_stale_parts(path: Path, *, now: float | None = None) -> list[Path]:
    """Remove the temporary files beside ``path`` that a killed writer left; return them.

    :func:`replacing` cleans up after an exception or a Ctrl-C, but nothing
    runs after a SIGKILL (or a power cut): its ``.NAME.PID.part`` stays. Such a
    file is removed when its pid is not a running process and it has not
    changed for :data:`STALE_PART_S` seconds; a live writer's file is never
    touched. Only ``path``'s own temporary files are considered.
    """
    prefix, suffix = f".{path.name}.", ".part"
    now = time.time() if now is None else now
    removed: list[Path] = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed  # the write that follows reports the directory's problem
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        digits = name[len(prefix) : -len(suffix)]
        if not (digits.isascii() and digits.isdigit()):
            continue
        pid = int(digits)
        # pid 0 would ask about our own process group: not a writer's name.
        if pid <= 0 or pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            if now - entry.stat(follow_symlinks=False).st_mtime < STALE_PART_S:
                continue
            os.unlink(entry.path)
        except OSError:
            continue  # gone already (another run cleaned it) or not ours to remove
        removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``, moved over it when the body succeeds.

    Results are written whole or not at all: a full disk, a Ctrl-C or an
    error halfway leaves the previous file (or none), never a truncated one
    that a later run or a reader would take for the real thing::

        with replacing(out / "results.json") as part:
            part.write_text(text)

    The temporary file is ``.NAME.PID.part``; one that a killed writer left is
    removed by the next write of the same ``path`` (see :func:`remove_stale_parts`).
    """
    remove_stale_parts(path)
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        yield part
        os.replace(part, path)
    except BaseException:
        with contextlib.suppress(OSError):
            part.unlink()
        raise


def write_text_whole(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` whole or not at all (see :func:`replacing`)."""
    with replacing(path) as part:
        part.write_text(text, encoding="utf-8")


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to the hard limit; return it.

    Plain ``asyncio.gather`` over 10,000 requests opens 10,000 sockets, and the
    usual soft limit (1,024 on Linux, 256 on macOS) would turn most of them
    into "Too many open files" errors: a property of the shell, not of the
    strategy. The server side needs as many. Where the hard limit is lower
    than that, the errors that remain are real and are counted as such.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def run_main(main: Coroutine[Any, Any, T]) -> T:
    """Run a command's ``main`` on uvloop when installed (the command owns its process)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The loop watch would tax corral's strategies only, and unevenly.
    env.pop("CORRAL_MONITOR", None)
    # Children print JSON lines the parent reads as they come.
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def run_specs(
    specs: list[Spec],
    *,
    timeout: float,
    on_progress: Progress | None = None,
) -> list[Result]:
    """Run ``specs`` one after the other in one new process; one result per spec.

    Args:
        specs: JSON-serialisable dicts, each naming its ``measure`` (see
            :data:`corral.lab.workloads.MEASURES`).
        timeout: seconds for the whole child; past it the child is killed and
            the specs without a result get ``{"status": "timeout"}``.
        on_progress: called with the index of the running spec and the child's
            counters a few times per second.
    """
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CHILD_CODE,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_child_env(),
        limit=2**20,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    assert process.stderr is not None
    stdout, stderr = process.stdout, process.stderr
    process.stdin.write(json.dumps(specs).encode())
    await process.stdin.drain()
    process.stdin.close()
    # Drain stderr alongside stdout, or a chatty child blocks on a full pipe.
    errors = asyncio.ensure_future(stderr.read())
    results: list[Result] = []
    missing: Result = {"status": "timeout"}
    try:
        async with asyncio.timeout(timeout):
            while line := await stdout.readline():
                message = json.loads(line)
                if "result" in message:
                    results.append(message["result"])
                elif "progress" in message and on_progress is not None:
                    on_progress(len(results), message["progress"])
            await process.wait()
    except TimeoutError:
        pass
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if not errors.done():
            errors.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            tail = (await errors).decode(errors="replace").strip().splitlines()
            if process.returncode not in (0, -9) and len(results) < len(specs):
                why = tail[-1] if tail else f"exit code {process.returncode}"
                missing = {"status": f"error: {why[:300]}"}
    results.extend(dict(missing) for _ in range(len(specs) - len(results)))
    return results
