"""Running plain ``def`` functions off the event loop: threads and process pools.

A sync ``fn`` never runs on the loop thread: a blocking call there stalls every
other call in flight. By default it runs in a thread pool that the map creates
(as wide as the limit, so ``limit=50`` really means 50 concurrent blocking
calls) and shuts down when the map ends. ``executor="process"`` runs it in a
process pool instead, for CPU-bound work.

Process calls are sent in chunks: one pool submission costs a round trip of
pickling and a pipe write, a few hundred microseconds, which would dominate
a 1 ms task. Calls started in the same loop iteration are collected and sent
as a few chunks, so the chunk size follows the concurrency: one item per
submission when calls trickle in, up to ``MAX_CHUNK`` when a wide map starts
many at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import math
import os
import pickle
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger("corral")

#: The most items sent to a worker process in one submission.
MAX_CHUNK = 256
#: Threads a map creates for a sync ``fn`` when its limit is ``None``.
UNBOUNDED_THREADS = 100

Call = Callable[[Any], Awaitable[Any]]
OnClose = Callable[[bool], Awaitable[None]]


def is_async_callable(fn: object) -> bool:
    """True for ``async def`` functions, partials of them and objects with an async ``__call__``."""
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(type(fn), "__call__", None)  # noqa: B004 - we want the class attribute
    return call is not None and inspect.iscoroutinefunction(call)


def offload(
    fn: Callable[[Any], Any],
    executor: str | concurrent.futures.Executor | None,
    limit: int | None,
) -> tuple[Call, OnClose | None]:
    """Wrap a sync ``fn`` as a coroutine function running on ``executor``.

    Returns the call and, for an executor corral created, a closer that shuts
    it down: gracefully after a clean run, at once (processes terminated)
    after a failure or cancellation.
    """
    if isinstance(executor, concurrent.futures.Executor):
        if isinstance(executor, concurrent.futures.ProcessPoolExecutor):
            return _ProcessCalls(fn, lambda: executor), None
        return _thread_call(fn, lambda: executor), None
    if executor == "process":
        return _owned_process_pool(fn)
    return _owned_thread_pool(fn, limit)


def _thread_call(
    fn: Callable[[Any], Any], get_pool: Callable[[], concurrent.futures.Executor]
) -> Call:
    warned = False

    async def call(item: Any) -> Any:
        nonlocal warned
        result = await asyncio.get_running_loop().run_in_executor(get_pool(), fn, item)
        if inspect.isawaitable(result):
            # e.g. ``lambda url: fetch(session, url)``: the coroutine was made in
            # a thread and must run on the loop. Correct, but a thread hop per call.
            if not warned:
                warned = True
                logger.warning(
                    "corral: %r is a plain function that returns an awaitable; it runs in "
                    "a thread first. Write it as `async def` to avoid a thread hop per call.",
                    fn,
                )
            result = await result
        return result

    return call


def _owned_thread_pool(fn: Callable[[Any], Any], limit: int | None) -> tuple[Call, OnClose]:
    pool: concurrent.futures.ThreadPoolExecutor | None = None
    threads = limit if limit is not None else UNBOUNDED_THREADS

    def get_pool() -> concurrent.futures.ThreadPoolExecutor:
        nonlocal pool
        if pool is None:
            pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="corral")
        return pool

    async def close(clean: bool) -> None:
        if pool is not None:
            # A running thread cannot be interrupted: wait for the calls in
            # progress (off the loop thread), drop the queued ones.
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: pool.shutdown(wait=True, cancel_futures=True)
            )

    return _thread_call(fn, get_pool), close


def _owned_process_pool(fn: Callable[[Any], Any]) -> tuple[Call, OnClose]:
    _check_picklable(fn)
    calls = _ProcessCalls(fn, _new_process_pool)

    async def close(clean: bool) -> None:
        pool = calls.pool
        if pool is None:
            return
        if clean:
            await asyncio.get_running_loop().run_in_executor(None, pool.shutdown, True)
        else:
            terminate_pool(pool)

    return calls, close


def _new_process_pool() -> concurrent.futures.ProcessPoolExecutor:
    import multiprocessing  # only here: it costs import time and a __mp_main__ alias

    # Not "fork": the parent runs an event loop and often threads, and forking
    # a threaded process can deadlock the child (Python 3.12 warns about it).
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return concurrent.futures.ProcessPoolExecutor(
        os.cpu_count() or 1, mp_context=multiprocessing.get_context(method)
    )


def terminate_pool(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    """Stop a process pool now: busy workers are terminated, then killed if they linger."""
    # ProcessPoolExecutor offers no public way to stop busy workers; its
    # _processes map is the only handle on them.
    processes = list(getattr(pool, "_processes", {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=1.0)
        if process.is_alive():
            process.kill()
            process.join()


def _check_picklable(fn: Callable[[Any], Any]) -> None:
    try:
        pickle.dumps(fn)
    except Exception as exc:
        raise TypeError(
            f"executor='process' needs a function it can send to another process; "
            f"{fn!r} cannot be pickled ({exc}). Define it at module level (not a lambda, "
            "closure or method of a local class) so worker processes can import it."
        ) from None


class _ProcessCalls:
    """Per-item coroutine calls, batched into chunked process-pool submissions."""

    def __init__(
        self,
        fn: Callable[[Any], Any],
        make_pool: Callable[[], concurrent.futures.ProcessPoolExecutor],
    ) -> None:
        self._fn = fn
        self._make_pool = make_pool
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._batch: list[tuple[Any, asyncio.Future[Any]]] = []

    async def __call__(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._batch:
            loop.call_soon(self._flush)
        self._batch.append((item, future))
        return await future

    def _flush(self) -> None:
        batch, self._batch = self._batch, []
        batch = [(item, future) for item, future in batch if not future.done()]
        if not batch:
            return
        if self.pool is None:
            self.pool = self._make_pool()
        pool = self.pool
        processes = getattr(pool, "_max_workers", None) or os.cpu_count() or 1
        # Enough chunks to keep every process busy twice over, no chunk bigger
        # than MAX_CHUNK.
        size = min(MAX_CHUNK, max(1, math.ceil(len(batch) / (2 * processes))))
        for start in range(0, len(batch), size):
            chunk = batch[start : start + size]
            try:
                submitted = pool.submit(_run_chunk, self._fn, [item for item, _ in chunk])
            except Exception as exc:  # a broken or shut-down pool
                for _, future in chunk:
                    if not future.done():
                        future.set_exception(exc)
                continue
            futures = [future for _, future in chunk]
            asyncio.wrap_future(submitted).add_done_callback(
                lambda done, futures=futures: _distribute(done, futures)  # type: ignore[misc]
            )


def _distribute(done: asyncio.Future[Any], futures: list[asyncio.Future[Any]]) -> None:
    if done.cancelled():
        for future in futures:
            future.cancel()
        return
    error = done.exception()
    if error is not None:
        for future in futures:
            if not future.done():
                future.set_exception(error)
        return
    for future, (ok, value) in zip(futures, done.result(), strict=True):
        if future.done():
            continue  # the caller was cancelled meanwhile
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


def _run_chunk(fn: Callable[[Any], Any], items: list[Any]) -> list[tuple[bool, Any]]:
    """Runs in the worker process: each item's result or its exception, in order."""
    out: list[tuple[bool, Any]] = []
    for item in items:
        try:
            out.append((True, fn(item)))
        except Exception as exc:
            out.append((False, _portable(exc)))
    return out


def _portable(exc: Exception) -> Exception:
    """The exception with its remote traceback as a note, made safe to pickle."""
    remote = "".join(traceback.format_exception(exc))
    exc.add_note(f"Traceback in the worker process (pid {os.getpid()}):\n{remote}")
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        fallback = RuntimeError(f"{type(exc).__qualname__}: {exc} (not picklable)")
        fallback.add_note(f"Traceback in the worker process (pid {os.getpid()}):\n{remote}")
        return fallback
    return exc
