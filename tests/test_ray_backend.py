"""backend="ray": a map on a real local Ray cluster (loopback only), started once per module.

Ray is a heavy optional extra (``corral[ray]``): these tests skip with a
reason where it is not installed, except under ``CI``, where .ci/run installs
it on the default Python and a missing Ray is a failure.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import _flaky
import corral
from _work import logged_calls, worker_processes
from corral._checkpoint_file import read_checkpoint

if importlib.util.find_spec("ray") is None:  # pragma: no cover - depends on the machine
    _REASON = "Ray is not installed (pip install 'corral[ray]'); the Ray backend's tests need it"
    if os.environ.get("CI"):
        pytest.fail(
            f"{_REASON}. .ci/run installs it on the default Python: CI must not skip these.",
            pytrace=False,
        )
    pytest.skip(_REASON, allow_module_level=True)

import ray

from corral import _ray

pytestmark = pytest.mark.slow


def _cluster_processes(session_dir: str) -> list[str]:
    """``pid name`` of every live process started for the Ray session ``session_dir``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            status = (entry / "stat").read_text().split()[2]
        except OSError:
            continue
        if session_dir in cmdline and status != "Z":
            found.append(f"{entry.name} {cmdline[:80]}")
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    except OSError:
        return "(gone)"


def _wait_gone(session_dir: str, seconds: float = 30.0) -> list[str]:
    deadline = time.monotonic() + seconds
    while (left := _cluster_processes(session_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[str]:
    """The local cluster corral starts, shared by the module; shut down and checked after."""
    # The actors cannot import this test module by name (tests/ is not on
    # their path): its functions travel by value, as a script's would.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.register_pickle_by_value(_flaky)
    _ray.connect_sync(None)
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    assert _cluster_processes(session_dir), "the local cluster runs no process of its session"
    yield session_dir
    assert _ray.shutdown() is True
    left = _wait_gone(session_dir)
    assert not left, f"processes of the local Ray cluster survived its shutdown: {left}"
    deadline = time.monotonic() + 30
    while worker_processes():
        assert time.monotonic() < deadline, "a process the cluster started outlived it: " + str(
            {pid: _cmdline(pid) for pid in worker_processes()}
        )
        time.sleep(0.1)
    deadline = time.monotonic() + 5
    while any(t.name == "corral-ray" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "corral's Ray thread outlived the cluster"
        time.sleep(0.01)


# -- functions the actors run (imported by name there, so at module level) ---


def mark(directory: str | Path, name: str) -> None:
    """Leave a marker file: what ran where, seen from the test afterwards."""
    Path(directory, name).touch()


def marked(directory: Path, prefix: str) -> set[str]:
    """The markers named ``prefix-X``: their X."""
    return {p.name.removeprefix(f"{prefix}-") for p in directory.glob(f"{prefix}-*")}


class Boom(Exception):
    """An exception type of this module: it must come back as itself."""


async def jittered_square(item: int) -> int:
    # Later items often finish first: order is the merge's work, not luck.
    await asyncio.sleep(((item * 7919) % 13) / 2000)
    return item * item


async def slow_head(item: int) -> int:
    await asyncio.sleep(3.0 if item == 0 else 0.001)  # 3 s: room for a loaded machine
    return item


def tagged(item: int, state: dict[str, Any]) -> tuple[int, int, str]:
    return item, os.getpid(), state["token"]


class Session:
    """What a setup= may return: a live client with an async close."""

    def __init__(self, marker_dir: str) -> None:
        self.token = f"{os.getpid()}-{id(self)}"
        self.marker_dir = marker_dir

    async def aclose(self) -> None:
        mark(self.marker_dir, f"closed-{self.token}")


async def use_session(item: int, session: Session) -> tuple[int, int, str]:
    await asyncio.sleep(0)
    return item, os.getpid(), session.token


async def hang_marked(marker_dir: str, item: int) -> int:
    """Sleep a minute, leaving a marker when started and another when cancelled."""
    mark(marker_dir, f"started-{item}")
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        mark(marker_dir, f"cancelled-{item}")
        raise
    return item


async def fail_at_the_16th_start(marker_dir: str, item: int) -> int:
    """Like hang_marked, except that the one call that finds 16 started fails at once."""
    mark(marker_dir, f"started-{item}")
    mark(marker_dir, f"pid-{os.getpid()}")
    mark(marker_dir, f"on-{os.getpid()}-{item}")
    if len(marked(Path(marker_dir), "started")) >= 16:
        try:  # one call only: the first to create the file
            os.close(os.open(Path(marker_dir, "failing"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            pass
        else:
            mark(marker_dir, f"failed-{item}")
            raise Boom(f"the 16th start, item {item}")
    return await hang_marked(marker_dir, item)


def failing_on_7(item: int) -> int:
    if item == 7:
        raise Boom(f"item {item}")
    return item


# ---------------------------------------------------------------------------


async def _dead(handle: Any) -> None:
    """Wait (bounded) until a call to the actor fails: ``ray.kill`` takes effect asynchronously."""
    for _ in range(100):
        try:
            await handle.pid.remote()
        except ray.exceptions.RayActorError:
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"actor {handle} still answers 10 s after the map ended")


async def test_results_come_back_in_input_order_exactly_once() -> None:
    """Ordered: every item's result once, in input order, though chunks finish out of order."""
    async with corral.map(
        jittered_square, range(3000), backend="ray", limit=40, ray_actors=2
    ) as results:
        got = [r async for r in results]
        handles = results._run.actor_handles  # type: ignore[attr-defined]
    assert got == [i * i for i in range(3000)]
    stats = results.stats
    assert (stats.completed, stats.failed, stats.in_flight, stats.started) == (3000, 0, 0, 3000)
    assert stats.latency_p50 is not None
    assert len(handles) == 2
    for handle in handles:  # the map killed its actors on the way out
        await _dead(handle)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(0, 2500),
    limit=st.one_of(st.none(), st.integers(1, 300)),
    actors=st.integers(1, 3),
    ordered=st.booleans(),
)
def test_every_item_comes_back_exactly_once_whatever_the_split(
    size: int, limit: int | None, actors: int, ordered: bool
) -> None:
    """Property: any size, limit, actor count and order mode: each result once."""

    async def main() -> list[int]:
        async with corral.map(
            jittered_square,
            range(size),
            backend="ray",
            limit=limit,
            ray_actors=actors,
            ordered=ordered,
        ) as results:
            return [r async for r in results]

    got = asyncio.run(main())
    expected = [i * i for i in range(size)]
    if ordered:
        assert got == expected
    else:
        assert sorted(got) == expected


async def test_as_completed_mode_yields_every_result_once_in_completion_order() -> None:
    """ordered=False: the slow first item's chunk comes last; nothing lost or doubled."""
    async with corral.map(
        slow_head, range(640), backend="ray", limit=20, ordered=False, ray_actors=2
    ) as results:
        got = [r async for r in results]
    assert sorted(got) == list(range(640))
    assert got[0] != 0  # item 0's chunk was still running while others were handed out
    assert got.index(0) > 64


def test_setup_runs_once_per_actor_and_its_state_reaches_fn() -> None:
    """setup=: one state per actor, passed as fn's second argument."""
    out = corral.run(
        tagged,
        range(400),
        backend="ray",
        ray_actors=2,
        limit=4,
        setup=lambda: {"token": os.urandom(8).hex()},
    )
    assert [item for item, _, _ in out] == list(range(400))
    tokens_by_pid: dict[int, set[str]] = {}
    for _, pid, token in out:
        tokens_by_pid.setdefault(pid, set()).add(token)
    assert 1 <= len(tokens_by_pid) <= 2
    assert all(len(tokens) == 1 for tokens in tokens_by_pid.values())
    assert len({t for tokens in tokens_by_pid.values() for t in tokens}) == len(tokens_by_pid)


async def test_an_async_setup_is_awaited_and_its_state_closed_at_the_end(
    tmp_path: Path,
) -> None:
    """An async setup= (e.g. an HTTP session) is awaited once per actor and closed after."""
    marker_dir = str(tmp_path)

    async def open_session() -> Session:
        await asyncio.sleep(0)
        return Session(marker_dir)

    out = await corral.gather(
        use_session, range(300), backend="ray", ray_actors=2, setup=open_session
    )
    assert [item for item, _, _ in out] == list(range(300))
    tokens = {token for _, _, token in out}
    assert tokens <= marked(tmp_path, "closed")


def test_an_exception_comes_back_as_its_own_type() -> None:
    """The first failure is raised as itself (not Ray's wrapper), the actor's traceback noted."""
    with pytest.raises(Boom, match=r"^item 7\n") as caught:
        corral.run(failing_on_7, range(200), backend="ray", ray_actors=2)
    assert type(caught.value) is Boom
    assert any("Traceback in the Ray actor" in n for n in caught.value.__notes__)


def test_return_exceptions_puts_the_exception_in_the_items_place() -> None:
    """return_exceptions=True: the Boom takes item 7's place, the rest are results."""
    out = corral.run(failing_on_7, range(200), backend="ray", return_exceptions=True)
    assert out[:7] == list(range(7))
    assert out[8:] == list(range(8, 200))
    assert type(out[7]) is Boom
    assert str(out[7]) == "item 7"


def test_an_error_in_setup_is_unwrapped_from_rays_task_error() -> None:
    """setup= failing raises its own exception type too."""

    def broken_setup() -> None:
        raise Boom("no session")

    with pytest.raises(Boom, match=r"^no session\n"):
        corral.run(tagged, range(10), backend="ray", ray_actors=1, setup=broken_setup)


def test_the_first_failure_cancels_running_coroutines_on_every_actor(tmp_path: Path) -> None:
    """The call that fills the last slot fails; the calls running on both actors see CancelledError.

    Which items an actor runs first is Ray's choice (an async actor may start
    a later chunk before an earlier one), so the failure waits for no item in
    particular: it comes when all 16 slots, 8 on each actor, hold a call.
    """
    marker_dir = str(tmp_path)

    async def fail_when_full(item: int) -> int:
        return await fail_at_the_16th_start(marker_dir, item)

    began = time.monotonic()
    with pytest.raises(Boom, match="the 16th"):
        corral.run(fail_when_full, range(128), backend="ray", limit=16, ray_actors=2)
    assert time.monotonic() - began < 30
    started = marked(tmp_path, "started")
    cancelled = marked(tmp_path, "cancelled")
    failed = marked(tmp_path, "failed")
    assert len(failed) == 1
    # The failing call's slot may take one more call before its actor stops.
    assert len(started) in (16, 17)
    assert cancelled == started - failed
    per_actor = sorted(len(marked(tmp_path, f"on-{pid}")) for pid in marked(tmp_path, "pid"))
    assert per_actor in ([8, 8], [8, 9])


async def test_calls_cut_short_by_a_failure_are_counted_but_not_timed(tmp_path: Path) -> None:
    """The failing chunk's cancelled calls started, but their time is no latency.

    One actor, limit 8: items 0-6 hang until cancelled, 7 takes 2 s, then 8
    and 9 return at once and 10 fails at once. The calls that ended are 7-10
    (p50 near 0); the seven cancelled after 2 s or more must not count.
    """
    marker_dir = str(tmp_path)

    async def shaped(item: int) -> int:
        if item < 7:
            return await hang_marked(marker_dir, item)
        if item == 7:
            await asyncio.sleep(2.0)
        if item == 10:
            raise Boom("ten")
        return item

    with pytest.raises(Boom, match="ten"):
        async with corral.map(shaped, range(12), backend="ray", limit=8, ray_actors=1) as out:
            async for _ in out:
                pass
    stats = out.stats
    assert marked(tmp_path, "cancelled") == {str(item) for item in range(7)}
    assert 11 <= stats.started <= 12  # item 11 may start in item 10's slot, and be cut short
    assert stats.latency_p50 is not None
    assert stats.latency_p50 < 1.0


async def test_cancelling_the_consumer_cancels_the_calls_in_the_actors(tmp_path: Path) -> None:
    """A cancelled consumer: ray.cancel reaches every running call before the map returns."""
    marker_dir = str(tmp_path)

    async def hang(item: int) -> int:
        return await hang_marked(marker_dir, item)

    async def consume() -> None:
        async with corral.map(hang, range(1000), backend="ray", limit=10, ray_actors=2) as out:
            async for _ in out:
                pass

    task = asyncio.ensure_future(consume())
    deadline = time.monotonic() + 60
    while len(marked(tmp_path, "started")) < 10:
        assert time.monotonic() < deadline, "the actors did not start 10 calls"
        await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    started = marked(tmp_path, "started")
    cancelled = marked(tmp_path, "cancelled")
    # A call cancelled first frees its slot for a queued one of the actor's
    # other chunk, which is cancelled in turn: every call that started saw it.
    assert len(started) >= 10
    assert cancelled == started


async def test_a_sigkilled_actor_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    """An actor killed mid-run is restarted, its chunk re-run; results still exactly once."""
    calls_dir = tmp_path

    async def record(item: int) -> int:
        await asyncio.sleep(0.005)
        mark(calls_dir, f"{item}-{os.getpid()}-{os.urandom(4).hex()}")
        return item * 3

    got: list[int] = []
    async with corral.map(record, range(1500), backend="ray", limit=20, ray_actors=2) as out:
        async for value in out:
            got.append(value)
            if len(got) == 200:
                victim = out._run.actor_handles[1]  # type: ignore[attr-defined]
                pid = await victim.pid.remote()
                os.kill(pid, signal.SIGKILL)
    assert got == [i * 3 for i in range(1500)]
    assert out.stats.completed == 1500
    calls: dict[int, int] = {}
    pids: set[str] = set()
    for path in calls_dir.iterdir():
        item, pid, _ = path.name.split("-")
        calls[int(item)] = calls.get(int(item), 0) + 1
        pids.add(pid)
    assert set(calls) == set(range(1500))  # every item ran; some maybe twice (at-least-once)
    assert str(pid) in pids
    assert len(pids) == 3  # two actors, and the killed one's successor took over


async def test_cancel_ends_early_keeping_what_is_done() -> None:
    """results.cancel(): the results already merged are handed out, then iteration ends."""
    got: list[int] = []
    async with corral.map(
        jittered_square, range(100_000), backend="ray", limit=20, ray_actors=2
    ) as results:
        async for value in results:
            got.append(value)
            if len(got) == 100:
                results.cancel()
    assert len(got) >= 100
    assert got == [i * i for i in range(len(got))]  # an unbroken prefix, in order
    assert results.stats.completed < 100_000
    assert results.stats.in_flight == 0


async def test_a_checkpointed_map_on_ray_resumes_calling_fn_only_for_the_rest(
    tmp_path: Path,
) -> None:
    """checkpoint= with backend="ray": the driver records; a re-run sends only the rest."""
    log, path = tmp_path / "calls", tmp_path / "run.sqlite"

    async def logged(item: tuple[str, int]) -> int:
        # Like _work.async_logged, defined here: the actors cannot import _work.
        name, x = item
        fd = os.open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, b"%d %d\n" % (os.getpid(), x))
        os.close(fd)
        await asyncio.sleep(0)
        if x < 0:
            raise ValueError(x)
        return x * x

    options: dict[str, Any] = {
        "backend": "ray",
        "ray_actors": 2,
        "limit": 20,
        "checkpoint": path,
        "item_id": lambda item: item[1],
        "return_exceptions": True,
    }
    xs = [*range(150), -1]
    first = await corral.gather(logged, [(str(log), x) for x in xs], **options)
    assert first[:150] == [x * x for x in range(150)]
    assert isinstance(first[150], ValueError)
    assert sorted(x for _, x in logged_calls(log)) == sorted(xs)

    log.unlink()
    xs = [*range(250), -1]
    async with corral.map(logged, [(str(log), x) for x in xs], **options) as results:
        second = [r async for r in results]
    assert second[:250] == [x * x for x in range(250)]
    assert isinstance(second[250], ValueError)  # replayed: recorded as a failure
    assert sorted(x for _, x in logged_calls(log)) == list(range(150, 250))
    assert {key for key, _, _ in read_checkpoint(path)} == set(xs)


async def test_the_deadline_on_ray_cancels_the_chunks_in_flight(tmp_path: Path) -> None:
    """deadline= with backend="ray": the results done, then DeadlineExceeded; the
    coroutines still running in the actors are cancelled."""
    got = []
    with pytest.raises(corral.DeadlineExceeded):
        async with corral.map(
            functools.partial(hang_marked, str(tmp_path)),
            range(4),
            backend="ray",
            ray_actors=2,
            limit=4,
            deadline=15.0,  # the actors start within it, even on a loaded machine
        ) as results:
            async for value in results:
                got.append(value)
    assert got == []
    deadline = time.monotonic() + 30
    while marked(tmp_path, "cancelled") != marked(tmp_path, "started") or not marked(
        tmp_path, "started"
    ):
        assert time.monotonic() < deadline, "the actors' calls were not cancelled"
        await asyncio.sleep(0.05)


async def test_stats_with_the_engine_in_front_count_the_calls_the_actors_run(
    tmp_path: Path,
) -> None:
    """progress= on Ray: the engine hands 2x the limit over; started counts the 4 that run.

    The 8 items handed over are spread so that both actors run their share
    (given whole to one actor, only its 2 ran). And no call starts after
    cancel(): the driver cancels the chunks one by one, and the calls of the
    chunks not yet cancelled must not start in the slots the cancelled ones
    free.
    """
    async with corral.map(
        functools.partial(hang_marked, str(tmp_path)),
        range(20),
        backend="ray",
        ray_actors=2,
        limit=4,
        progress=lambda stats: None,
    ) as results:
        deadline = time.monotonic() + 60
        while len(marked(tmp_path, "started")) < 4:
            assert time.monotonic() < deadline, (
                f"the actors started only {sorted(marked(tmp_path, 'started'))}"
            )
            await asyncio.sleep(0.05)
        running = results.stats
        results.cancel()
        assert [r async for r in results] == []
    assert (running.started, running.in_flight) == (4, 4)
    assert len(marked(tmp_path, "started")) == 4
    final = results.stats
    assert (final.started, final.completed, final.failed, final.in_flight) == (4, 0, 0, 0)


def test_the_retry_budget_holds_across_actors(tmp_path: Path) -> None:
    """Half of all calls fail, 6 attempts each: attempts stay <= 1.1 x items + the floor."""
    retry = _flaky.budgeted_retry(ratio=0.1, attempts=6)
    options = {"backend": "ray", "ray_actors": 2, "limit": 20, "retries": retry}
    inputs = _flaky.jobs(tmp_path, 1_000)
    results, stats = asyncio.run(
        _flaky.collect(_flaky.half_failing, inputs, **options, return_exceptions=True)
    )
    _flaky.check_budget_held(tmp_path, results, stats, attempts=6)


def test_the_retry_budget_floor_is_not_multiplied_by_the_actors(tmp_path: Path) -> None:
    """Every call fails, ratio 0, floor 10 over 2 actors: 10 retries in all, not 20."""
    out = corral.run(
        _flaky.always_failing,
        _flaky.jobs(tmp_path, 200),
        backend="ray",
        ray_actors=2,
        limit=8,  # chunks of 64: both actors get two
        retries=_flaky.budgeted_retry(ratio=0.0, attempts=3),
        return_exceptions=True,
    )
    assert _flaky.attempts_logged(tmp_path) == 200 + _flaky.FLOOR
    assert all(isinstance(r, ConnectionError | corral.RetryBudgetExhausted) for r in out)


def test_a_local_cluster_corral_started_is_shut_down_at_exit(tmp_path: Path) -> None:
    """A script using backend='ray' leaves no Ray process behind once it exits."""
    script = textwrap.dedent(
        """
        import corral, ray
        print(corral.run(abs, [-1, -2], backend="ray", ray_actors=1))
        print(ray._private.worker._global_node.get_session_dir_path(), flush=True)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split()
    assert lines[:2] == ["[1,", "2]"]
    session_dir = lines[2]
    left = _wait_gone(session_dir)
    assert not left, f"the cluster outlived the script: {left}"


def test_an_existing_cluster_is_used_by_address_and_left_running(tmp_path: Path) -> None:
    """ray_address= (or RAY_ADDRESS) joins a cluster another process runs; corral leaves it up."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # that cluster too stays on 127.0.0.1
    owner_code = (
        "import ray, sys; ray.init(address='local', include_dashboard=False, num_cpus=1); "
        "print(ray.get_runtime_context().gcs_address, flush=True); sys.stdin.read()"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", owner_code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        assert owner.stdout is not None
        address = owner.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), address
        user_code = (
            "import os, corral, ray\n"
            "print(corral.run(lambda x: x + 1, [1, 2], backend='ray', ray_actors=1, "
            "ray_address=os.environ.pop('CORRAL_TEST_ADDRESS', None)))\n"
            "print(ray.get_runtime_context().gcs_address, corral._ray._started_here)\n"
        )
        # A client of a cluster with token authentication (Ray's default) says so.
        client_env = {**env, "RAY_AUTH_MODE": "token"}
        for extra in ({"CORRAL_TEST_ADDRESS": address}, {"RAY_ADDRESS": address}):
            done = subprocess.run(
                [sys.executable, "-c", user_code],
                capture_output=True,
                text=True,
                timeout=120,
                env={**client_env, **extra},
                cwd=tmp_path,
                check=False,
            )
            assert done.returncode == 0, done.stderr[-3000:]
            assert done.stdout.splitlines() == ["[2, 3]", f"{address} False"]
            assert owner.poll() is None  # the cluster corral only joined is still up
    finally:
        if owner.stdin is not None:
            owner.stdin.close()  # the owner exits, shutting its cluster down
        try:
            owner.wait(timeout=60)
        except subprocess.TimeoutExpired:  # pragma: no cover - a hung owner
            owner.kill()
            owner.wait()
        if owner.stdout is not None:
            owner.stdout.close()
