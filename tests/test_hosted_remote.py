"""checkpoint=, deadline= and progress= with processes=N: corral's engine here, the calls there.

The worker processes are real; each call logs ``pid x`` to a file before it
runs (see ``_work.async_logged``), so the tests know which items were called,
in which process, and how often.
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import corral
from _work import (
    alive,
    async_logged,
    async_logged_dies_at_25,
    complete_lines,
    ctrl_c,
    logged_calls,
    no_worker_left,
    run_killed,
    worker_processes,
)
from corral import _checkpoint_file
from corral._checkpoint_file import as_key, read_checkpoint

pytestmark = pytest.mark.slow


def items(log: Path, xs: range | list[int]) -> list[tuple[str, int]]:
    return [(str(log), x) for x in xs]


def called(log: Path) -> list[int]:
    return [x for _, x in logged_calls(log)]


def recorded_ids(path: Path) -> set[Any]:
    return {key for key, _, _ in read_checkpoint(path)}


def ids(log: Path, xs: range | list[int]) -> set[Any]:
    """The ids the file holds for these items (a tuple is stored in a canonical form)."""
    return {as_key((str(log), x)) for x in xs}


async def test_a_checkpointed_map_on_processes_resumes_calling_fn_only_for_the_rest(
    tmp_path: Path,
) -> None:
    """Run 0..199 on 2 processes, then 0..299: the second run calls fn for 200..299 only."""
    log, path = tmp_path / "calls", tmp_path / "run.sqlite"
    first = await corral.gather(
        async_logged, items(log, range(200)), processes=2, limit=20, checkpoint=path
    )
    assert first == [x * x for x in range(200)]
    assert sorted(called(log)) == list(range(200))
    assert len({pid for pid, _ in logged_calls(log)}) == 2  # both processes took items
    assert recorded_ids(path) == ids(log, range(200))

    log.unlink()
    async with corral.map(
        async_logged, items(log, range(300)), processes=2, limit=20, checkpoint=path
    ) as results:
        second = [r async for r in results]
    assert second == [x * x for x in range(300)]
    assert sorted(called(log)) == list(range(200, 300))
    assert results.stats.completed == 300
    await no_worker_left()


async def test_a_full_resume_starts_no_process(tmp_path: Path) -> None:
    """Everything recorded: the results come from the file, and no worker process starts."""
    log, path = tmp_path / "calls", tmp_path / "run.sqlite"
    await corral.gather(async_logged, items(log, range(50)), processes=2, checkpoint=path)
    log.unlink()
    async with corral.map(
        async_logged, items(log, range(50)), processes=2, checkpoint=path
    ) as results:
        assert [r async for r in results] == [x * x for x in range(50)]
        assert not worker_processes()
    assert not log.exists()


async def test_failures_on_processes_are_recorded_and_replayed(tmp_path: Path) -> None:
    """return_exceptions=True: a failure in a worker process is recorded and comes back as
    itself on resume, without calling fn again; unordered output is complete too."""
    log, path = tmp_path / "calls", tmp_path / "run.sqlite"
    xs = [1, -2, 3, -4, 5]
    async with corral.map(
        async_logged,
        items(log, xs),
        processes=2,
        checkpoint=path,
        return_exceptions=True,
        ordered=False,
    ) as results:
        first = [r async for r in results]
    assert sorted(r for r in first if isinstance(r, int)) == [1, 9, 25]
    assert sorted(r.args[0] for r in first if isinstance(r, ValueError)) == [-4, -2]
    assert results.stats.failed == 2

    log.unlink()
    second = await corral.gather(
        async_logged, items(log, xs), processes=2, checkpoint=path, return_exceptions=True
    )
    assert [r if isinstance(r, int) else ("error", r.args) for r in second] == [
        1,
        ("error", (-2,)),
        9,
        ("error", (-4,)),
        25,
    ]
    assert not log.exists()


async def test_without_return_exceptions_a_failure_ends_the_map_unrecorded(
    tmp_path: Path,
) -> None:
    """The first failure ends the map as ever; the failed item is not recorded."""
    log, path = tmp_path / "calls", tmp_path / "run.sqlite"
    with pytest.raises(ValueError, match="-7"):
        await corral.gather(
            async_logged, items(log, [*range(20), -7]), processes=2, limit=4, checkpoint=path
        )
    assert not ids(log, [-7]) & recorded_ids(path)
    await no_worker_left()


async def test_a_worker_crash_stops_the_map_and_records_no_failure(tmp_path: Path) -> None:
    """A worker process that dies ends the map with WorkerCrashed; with
    return_exceptions=True the items it held are not recorded as failed, so a
    resume runs them."""
    log, path = tmp_path / "calls", tmp_path / "run.sqlite"
    xs = list(range(40))
    options: dict[str, Any] = {
        "processes": 2,
        "limit": 4,
        "checkpoint": path,
        "return_exceptions": True,
        "fingerprint": "same",
    }
    with pytest.raises(corral.WorkerCrashed):
        await corral.gather(async_logged_dies_at_25, items(log, xs), **options)
    kinds = {kind for _, kind, _ in read_checkpoint(path)}
    assert _checkpoint_file.FAILED not in kinds
    done = recorded_ids(path)
    assert len(done) < len(xs)

    log.unlink(missing_ok=True)
    resumed = await corral.gather(async_logged, items(log, xs), **options)
    assert resumed == [x * x for x in xs]
    assert sorted(called(log)) == sorted(x for x in xs if not ids(log, [x]) & done)
    await no_worker_left()


async def test_the_deadline_stops_processes_and_keeps_what_is_done(tmp_path: Path) -> None:
    """deadline= with processes=N: the quick items' results, then DeadlineExceeded; the
    calls still running are stopped with their processes."""
    log = tmp_path / "calls"
    xs = [*range(10), 10**6, 10**6 + 1]  # the last two sleep a minute
    got = []
    began = time.monotonic()
    with pytest.raises(corral.DeadlineExceeded):
        async with corral.map(
            async_logged, items(log, xs), processes=2, limit=4, deadline=5.0
        ) as results:
            async for value in results:
                got.append(value)
    assert got == [x * x for x in range(10)]
    assert time.monotonic() - began < 30
    await no_worker_left()


async def test_progress_sees_the_processes_work(tmp_path: Path) -> None:
    """progress=callable with processes=N: snapshots while it runs, the last one complete."""
    log = tmp_path / "calls"
    snaps: list[corral.Stats] = []
    results = await corral.gather(
        async_logged, items(log, range(300)), processes=2, limit=10, progress=snaps.append
    )
    assert results == [x * x for x in range(300)]
    assert snaps
    assert snaps[-1].completed == 300
    assert snaps[-1].limit == 10
    await no_worker_left()


async def test_retries_in_the_processes_are_counted(tmp_path: Path) -> None:
    """The workers retry; the engine here reports their retries in its stats."""
    log = tmp_path / "calls"
    async with corral.map(
        async_logged,
        items(log, [1, -1, 2]),
        processes=2,
        retries=corral.Retry(attempts=3, backoff=0.0, on=ValueError),
        checkpoint=tmp_path / "run.sqlite",
        return_exceptions=True,
    ) as results:
        got = [r async for r in results]
    assert got[0] == 1
    assert isinstance(got[1], ValueError)
    assert got[2] == 4
    assert results.stats.retried == 2
    assert called(log).count(-1) == 3


@pytest.mark.parametrize("keyword", ["item_id", "fingerprint"])
def test_checkpoint_keywords_without_checkpoint_are_refused_on_processes(keyword: str) -> None:
    """item_id= or fingerprint= without checkpoint= is a mistake with processes=N too."""
    value = {"item_id": repr, "fingerprint": "v2"}[keyword]
    with pytest.raises(ValueError, match=rf"^{keyword}= only applies to a checkpointed map"):
        corral.map(async_logged, [], processes=2, **{keyword: value})


@pytest.mark.parametrize("keyword", ["budget", "monitor", "executor"])
def test_keywords_processes_still_refuse(keyword: str) -> None:
    """What the engine here cannot do for remote calls is refused, naming both keywords."""
    value = {"budget": {"requests": 5}, "monitor": True, "executor": "thread"}[keyword]
    with pytest.raises(ValueError, match=rf"^{keyword}= is not available with processes=N"):
        corral.map(async_logged, [], processes=2, checkpoint="x.sqlite", **{keyword: value})


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    size=st.integers(0, 300),
    first=st.integers(0, 300),
    limit=st.integers(1, 24),
    ordered=st.booleans(),
    failing=st.booleans(),
)
def test_every_item_once_through_the_engine_in_front_of_processes(
    tmp_path: Path, size: int, first: int, limit: int, ordered: bool, failing: bool
) -> None:
    """A first run records some items, a second runs them all: each result exactly once
    (in input order when ordered), fn called once per item across both runs."""
    directory = Path(tempfile.mkdtemp(dir=tmp_path))
    log, path = directory / "calls", directory / "run.sqlite"
    xs = [-(i + 1) if failing and i % 7 == 3 else i for i in range(size)]
    expected = [ValueError(x) if x < 0 else x * x for x in xs]
    options: dict[str, Any] = {
        "processes": 2,
        "limit": limit,
        "checkpoint": path,
        "return_exceptions": True,
    }

    async def both() -> list[Any]:
        await corral.gather(async_logged, items(log, xs[:first]), **options)
        async with corral.map(async_logged, items(log, xs), ordered=ordered, **options) as out:
            return [r async for r in out]

    got = asyncio.run(both())
    plain = [("error", r.args) if isinstance(r, ValueError) else r for r in got]
    want = [("error", r.args) if isinstance(r, ValueError) else r for r in expected]
    if ordered:
        assert plain == want
    else:
        assert sorted(plain, key=repr) == sorted(want, key=repr)
    assert sorted(called(log)) == sorted(xs)  # each once, over both runs


# -- SIGKILL of the parent -------------------------------------------------------------

CRASHING_MAP = """
import asyncio, sys
sys.path.insert(0, {tests!r})
import corral
from _work import async_logged

checkpoint, log, out_file = sys.argv[1:]

async def main():
    out = open(out_file, "a", buffering=1)
    async with corral.map(async_logged, [(log, x) for x in range({n})], processes=2,
                          limit=40, checkpoint=checkpoint,
                          item_id=lambda item: item[1]) as results:
        async for value in results:
            out.write("%d\\n" % value)

if __name__ == "__main__":
    asyncio.run(main())
"""


def test_a_killed_parent_resumes_to_exactly_once_and_leaves_no_worker(tmp_path: Path) -> None:
    """SIGKILL the parent of a checkpointed processes=2 map twice, then resume: every result
    once, in order; each kill's worker processes exit on their own (their parent is gone)."""
    n = 6_000
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    script = tmp_path / "crashing_map.py"
    tests = str(Path(__file__).parent)
    script.write_text(textwrap.dedent(CRASHING_MAP.format(tests=tests, n=n)))
    checkpoint = tmp_path / "run.sqlite"
    before: set[int] = set()
    total_calls = unfinished_at_kills = 0
    for attempt in range(3):
        log, out_file = tmp_path / f"calls-{attempt}", tmp_path / f"out-{attempt}"
        context = f"seed {seed}, run {attempt}"
        run_killed(
            [sys.executable, str(script), str(checkpoint), str(log), str(out_file)],
            lambda: len(logged_calls(log)),  # noqa: B023 - called before the next loop
            rng.randint(1, (n - len(before)) * 2 // 3) if attempt < 2 else None,
            context=context,
        )
        calls = logged_calls(log)
        xs = [x for _, x in calls]
        out = complete_lines(out_file)
        after = recorded_ids(checkpoint)
        assert len(xs) == len(set(xs)), f"{context}: an item was called twice"
        assert not set(xs) & before, f"{context}: a recorded item was called again"
        assert out == [i * i for i in range(len(out))], f"{context}: results out of order"
        assert {int(v**0.5 + 0.5) for v in out} <= after, f"{context}: seen, not recorded"
        assert before <= after
        total_calls += len(xs)
        unfinished_at_kills += len(set(xs) - after)
        before = after
        # The workers of a killed parent see their link close and exit.
        workers = {pid for pid, _ in calls}
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in workers):
            assert time.monotonic() < deadline, f"{context}: a worker outlived its parent"
            time.sleep(0.05)

    assert out == [i * i for i in range(n)]
    assert recorded_ids(checkpoint) == set(range(n))
    assert total_calls == n + unfinished_at_kills, f"seed {seed}"


def test_ctrl_c_on_a_checkpointed_run_on_processes_says_how_to_resume(tmp_path: Path) -> None:
    """Ctrl-C on corral.run(..., processes=2, checkpoint=...): the workers are gone, the
    recorded results stay, and stderr says how to resume (not a WorkerCrashed)."""
    pids = tmp_path / "pids"
    pids.mkdir()
    path = tmp_path / "run.sqlite"
    call = (
        f"corral.run(async_record_pid_and_sleep, [({str(pids)!r}, 0.0)] * 1 + "
        f"[({str(pids)!r}, 60.0 + i) for i in range(4)], processes=2, limit=4, "
        f"checkpoint={str(path)!r}, item_id=repr)"
    )
    stderr, survivors = ctrl_c(call, pids, workers=2)
    assert b"KeyboardInterrupt" in stderr
    assert b"run the same call again to resume" in stderr
    assert b"WorkerCrashed" not in stderr
    assert survivors == []
    # The quick item is recorded unless Ctrl-C came before its result did; the
    # sleeping ones never are.
    assert len(list(read_checkpoint(path))) <= 1
