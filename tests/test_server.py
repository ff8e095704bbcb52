"""The lab's target server: its queueing model, refusals, capacity changes and admin paths.

The socket tests are real HTTP over loopback, marked ``slow``, each under a
30 s hang guard. Time bounds are lower bounds only: a loaded machine can make
requests slower, never faster than the model allows. The admission gate itself
is tested on virtual time, exactly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

import corral.lab
from corral.lab.server import ServerStats, TargetServer, _Gate

HANG_GUARD = 30.0


async def _wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Poll ``predicate`` every 5 ms, at most 2000 times; fail naming ``what``."""
    for _ in range(2000):
        if predicate():
            return
        await asyncio.sleep(0.005)  # let requests reach the server
    raise AssertionError(f"never saw {what}")


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any], float]:
    """GET ``url``: status, JSON body and the client-side seconds it took."""
    start = time.perf_counter()
    async with session.get(url) as response:
        body = await response.json()
        return response.status, body, time.perf_counter() - start


async def _cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# --------------------------------------------------------------------------
# Serving and the queueing model
# --------------------------------------------------------------------------


@pytest.mark.slow
async def test_every_path_is_served_and_counted() -> None:
    """Any path and method gets a small JSON answer; the stats count each one."""
    async with asyncio.timeout(HANG_GUARD):
        async with (
            TargetServer(capacity=4, service_ms=20, host="localhost") as server,
            aiohttp.ClientSession() as session,
        ):
            assert server.url.startswith("http://127.0.0.1:")
            status, body, _ = await _get(session, f"{server.url}/anything")
            assert status == 200
            assert body["ok"] is True
            assert body["path"] == "/anything"
            assert body["served_ms"] >= 19.0  # timers may round to the millisecond
            async with session.post(f"{server.url}/item/123", json={"x": 1}) as response:
                assert response.status == 200
                assert (await response.json())["path"] == "/item/123"
            stats = server.stats()
    assert stats.served == 2
    assert stats.rejected == stats.failed == stats.stalled == 0
    assert stats.in_service == stats.queued == 0
    assert stats.latency_p50_ms is not None
    assert stats.latency_p50_ms >= 19.0


@pytest.mark.slow
async def test_latency_grows_with_concurrency_beyond_capacity() -> None:
    """Six requests on two slots take three service times; one alone takes one."""
    service_s = 0.1
    async with asyncio.timeout(HANG_GUARD):
        async with (
            TargetServer(capacity=2, service_ms=service_s * 1e3, queue=10) as server,
            aiohttp.ClientSession() as session,
        ):
            _, _, alone = await _get(session, f"{server.url}/alone")
            start = time.perf_counter()
            results = await asyncio.gather(*(_get(session, f"{server.url}/{i}") for i in range(6)))
            batch = time.perf_counter() - start
            stats = server.stats()
    assert alone >= 0.9 * service_s
    assert all(status == 200 for status, _, _ in results)
    # Two slots do six service times of work in no less than three: whatever
    # the arrival spread, the last answer comes at least 3 x service after the
    # batch began (2.5 x leaves room for millisecond timer rounding).
    assert max(took for _, _, took in results) >= 2.5 * service_s
    assert batch >= 2.5 * service_s
    assert stats.served == 7
    assert stats.peak_in_service <= 2


@pytest.mark.slow
@pytest.mark.parametrize("status", [429, 503])
async def test_a_full_queue_refuses_with_retry_after(status: int) -> None:
    """With every slot busy and the queue full, the next request is refused at once."""
    async with asyncio.timeout(HANG_GUARD):
        async with (
            TargetServer(
                capacity=1, service_ms=20_000, queue=2, status=status, retry_after=1.5
            ) as server,
            aiohttp.ClientSession() as session,
        ):
            held = [asyncio.create_task(_get(session, f"{server.url}/held/{i}")) for i in range(3)]
            try:
                await _wait_until(
                    lambda: (server.stats().in_service, server.stats().queued) == (1, 2),
                    "one request in service and two queued",
                )
                async with session.get(f"{server.url}/one-too-many") as response:
                    assert response.status == status
                    assert response.headers["Retry-After"] == "2"  # 1.5 s, rounded up
                    assert response.headers["retry-after-ms"] == "1500"
                    body = await response.json()
                stats = server.stats()
            finally:
                await _cancel_all(held)
    assert body == {"ok": False, "error": "over capacity", "retry_after": 1.5}
    assert stats.rejected == 1
    assert stats.peak_concurrency == 3


@pytest.mark.slow
async def test_peak_concurrency_never_exceeds_capacity_plus_queue() -> None:
    """A burst far beyond capacity + queue is served or refused, never queued past the bound."""
    async with asyncio.timeout(HANG_GUARD):
        async with (
            TargetServer(capacity=3, service_ms=20, queue=4) as server,
            aiohttp.ClientSession() as session,
        ):
            results = await asyncio.gather(*(_get(session, f"{server.url}/{i}") for i in range(40)))
            stats = server.stats()
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 429}
    assert stats.served == statuses.count(200)
    assert stats.rejected == statuses.count(429)
    assert stats.served + stats.rejected == 40
    assert stats.peak_concurrency <= 3 + 4
    assert stats.peak_in_service <= 3


# --------------------------------------------------------------------------
# Faults: failures and stalls
# --------------------------------------------------------------------------


@pytest.mark.slow
async def test_fail_fraction_one_fails_every_request() -> None:
    """fail_fraction=1.0 answers every request 500 and counts it as failed."""
    async with asyncio.timeout(HANG_GUARD):
        async with (
            TargetServer(capacity=4, service_ms=1, fail_fraction=1.0) as server,
            aiohttp.ClientSession() as session,
        ):
            results = await asyncio.gather(*(_get(session, f"{server.url}/{i}") for i in range(8)))
            stats = server.stats()
    assert [status for status, _, _ in results] == [500] * 8
    assert results[0][1] == {"ok": False, "path": "/0", "error": "modelled failure"}
    assert (stats.failed, stats.served) == (8, 0)


@pytest.mark.slow
async def test_a_stalled_request_times_a_client_out() -> None:
    """A 0.05 s client timeout loses to a 30 s stall; stopping the server ends the stall."""
    async with asyncio.timeout(HANG_GUARD):
        async with TargetServer(stall_fraction=1.0, stall_s=30.0) as server:
            # Slowness can only delay the client's timeout, never let a 30 s
            # stall answer first.
            timeout = aiohttp.ClientTimeout(total=0.05)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                with pytest.raises(TimeoutError):
                    await _get(session, f"{server.url}/slow")
            await _wait_until(lambda: server.stats().stalled == 1, "the stall counted")
            stats = server.stats()
    assert (stats.stalled, stats.served, stats.in_service, stats.queued) == (1, 0, 0, 0)


@pytest.mark.slow
async def test_the_same_seed_makes_the_same_choices() -> None:
    """Two servers with one seed fail the same requests of a sequence; another seed differs."""

    async def pattern(seed: int) -> list[int]:
        async with (
            TargetServer(service_ms=0, fail_fraction=0.5, jitter=0.5, seed=seed) as server,
            aiohttp.ClientSession() as session,
        ):
            return [(await _get(session, f"{server.url}/{i}"))[0] for i in range(40)]

    async with asyncio.timeout(HANG_GUARD):
        first, again, other = await pattern(7), await pattern(7), await pattern(8)
    assert first == again
    assert set(first) == {200, 500}
    assert other != first


# --------------------------------------------------------------------------
# Capacity changes and the admin paths
# --------------------------------------------------------------------------


@pytest.mark.slow
async def test_admin_capacity_grows_and_shrinks_during_a_run() -> None:
    """Growing the capacity admits queued requests at once; shrinking admits fewer."""
    async with asyncio.timeout(HANG_GUARD):
        async with (
            TargetServer(capacity=1, service_ms=20_000, queue=10) as server,
            aiohttp.ClientSession() as session,
        ):
            held = [asyncio.create_task(_get(session, f"{server.url}/held/{i}")) for i in range(4)]
            try:
                await _wait_until(lambda: server.stats().queued == 3, "three requests queued")
                async with session.post(f"{server.url}/_corral/capacity?value=4") as response:
                    assert response.status == 200
                    assert await response.json() == {"ok": True, "capacity": 4}
                grown = server.stats()

                async with session.post(f"{server.url}/_corral/capacity?value=1") as response:
                    assert response.status == 200
                held.append(asyncio.create_task(_get(session, f"{server.url}/late")))
                await _wait_until(lambda: server.stats().queued == 1, "the late request queued")
                shrunk = server.stats()
            finally:
                await _cancel_all(held)
    assert (grown.capacity, grown.in_service, grown.queued) == (4, 4, 0)
    # The four in service carry on; the late one waits until fewer than one are.
    assert (shrunk.capacity, shrunk.in_service, shrunk.queued) == (1, 4, 1)


@pytest.mark.slow
async def test_set_capacity_admits_queued_requests() -> None:
    """TargetServer.set_capacity is the admin path without HTTP; bad values are refused."""
    async with asyncio.timeout(HANG_GUARD):
        async with (
            TargetServer(capacity=1, service_ms=50, queue=10) as server,
            aiohttp.ClientSession() as session,
        ):
            requests = [asyncio.create_task(_get(session, f"{server.url}/{i}")) for i in range(3)]
            await _wait_until(lambda: server.stats().queued == 2, "two requests queued")
            server.set_capacity(3)
            assert (server.capacity, server.stats().in_service) == (3, 3)
            with pytest.raises(
                ValueError,
                match=r"^capacity must be an int >= 1 \(requests served in parallel\); "
                r"got capacity=0$",
            ):
                server.set_capacity(0)
            results = await asyncio.gather(*requests)
    assert [status for status, _, _ in results] == [200, 200, 200]


@pytest.mark.slow
async def test_schedule_changes_capacity_at_its_times() -> None:
    """Steps at t=0 apply before the first request; later steps at (not before) their time."""
    async with asyncio.timeout(HANG_GUARD):
        async with (
            TargetServer(capacity=5, schedule=[(0.3, 1), (0.0, 3)]) as server,
            aiohttp.ClientSession() as session,
        ):
            started = time.perf_counter()
            assert server.capacity == 3
            await _wait_until(lambda: server.capacity == 1, "the scheduled capacity")
            waited = time.perf_counter() - started
            async with session.get(f"{server.url}/_corral/stats") as response:
                reported = await response.json()
    assert waited >= 0.25  # 0.3 s after the start, itself a moment before `started`
    assert reported["capacity"] == 1


@pytest.mark.slow
async def test_stats_endpoint_and_reset() -> None:
    """GET /_corral/stats reports every ServerStats field; POST /_corral/reset zeroes them."""
    async with asyncio.timeout(HANG_GUARD):
        async with (
            TargetServer(capacity=2, service_ms=5) as server,
            aiohttp.ClientSession() as session,
        ):
            for i in range(3):
                await _get(session, f"{server.url}/{i}")
            async with session.get(f"{server.url}/_corral/stats") as response:
                before = await response.json()
            async with session.post(f"{server.url}/_corral/reset") as response:
                assert await response.json() == {"ok": True}
            async with session.get(f"{server.url}/_corral/stats") as response:
                after = await response.json()
            local = server.stats()
    assert list(before) == [field.name for field in dataclasses.fields(ServerStats)]
    assert before["served"] == 3
    assert before["capacity"] == 2
    assert before["latency_p50_ms"] >= 4.5
    assert before["latency_p50_ms"] <= before["latency_p90_ms"] <= before["latency_p99_ms"]
    assert (after["served"], after["rejected"], after["peak_concurrency"]) == (0, 0, 0)
    assert after["latency_p50_ms"] is None
    assert local.served == 0
    assert local.as_dict().keys() == after.keys()


@pytest.mark.slow
async def test_admin_paths_refuse_bad_requests() -> None:
    """Bad capacity values get 400, wrong methods 405, unknown admin paths 404."""
    async with asyncio.timeout(HANG_GUARD):
        async with TargetServer(capacity=2) as server, aiohttp.ClientSession() as session:
            replies = {}
            for method, path in [
                ("POST", "/_corral/capacity?value=0"),
                ("POST", "/_corral/capacity?value=many"),
                ("GET", "/_corral/capacity?value=3"),
                ("POST", "/_corral/stats"),
                ("GET", "/_corral/nothing"),
            ]:
                async with session.request(method, server.url + path) as response:
                    replies[method, path] = (response.status, await response.json())
            capacity = server.capacity
    assert replies["POST", "/_corral/capacity?value=0"] == (
        400,
        {"ok": False, "error": "value must be an int >= 1 (the new capacity); got value='0'"},
    )
    assert replies["POST", "/_corral/capacity?value=many"][0] == 400
    assert replies["GET", "/_corral/capacity?value=3"] == (
        405,
        {"ok": False, "error": "/_corral/capacity takes POST only"},
    )
    assert replies["POST", "/_corral/stats"][0] == 405
    status, body = replies["GET", "/_corral/nothing"]
    assert status == 404
    assert body["error"].startswith("no admin path '/_corral/nothing'; try GET /_corral/stats")
    assert capacity == 2


@pytest.mark.slow
async def test_a_wrong_method_on_an_admin_path_is_405_with_allow() -> None:
    """Each admin path asked the wrong way: 405 and Allow naming its method; nothing changes."""
    known = [
        ("/_corral/stats", "GET", ("POST", "PUT", "DELETE")),
        ("/_corral/reset", "POST", ("GET", "PUT", "DELETE")),
        ("/_corral/capacity?value=9", "POST", ("GET", "PUT", "DELETE")),
    ]
    async with asyncio.timeout(HANG_GUARD):
        async with TargetServer(capacity=2) as server, aiohttp.ClientSession() as session:
            async with session.get(f"{server.url}/work") as response:
                assert response.status == 200
            replies = {}
            for path, _, wrong in known:
                for method in wrong:
                    async with session.request(method, server.url + path) as response:
                        replies[method, path] = (response.status, response.headers.get("Allow"))
            stats = server.stats()
    assert replies == {
        (method, path): (405, allowed) for path, allowed, wrong in known for method in wrong
    }
    assert (stats.served, stats.capacity) == (1, 2)  # no reset, no resize


# --------------------------------------------------------------------------
# The admission gate, on virtual time
# --------------------------------------------------------------------------


@pytest.mark.virtual_time
async def test_gate_admits_in_arrival_order_and_shrinks_gracefully() -> None:
    """Waiters enter first come, first served; a lower capacity lets holders finish."""
    gate = _Gate(capacity=2, bound=10)
    loop = asyncio.get_running_loop()
    entered: list[tuple[int, float]] = []

    async def visit(i: int) -> None:
        assert await gate.acquire()
        entered.append((i, loop.time()))
        await asyncio.sleep(1.0)
        gate.release()

    async with asyncio.TaskGroup() as tg:
        for i in range(6):
            tg.create_task(visit(i))
            await asyncio.sleep(0.01)  # arrive in index order, 10 ms apart
        gate.resize(1)  # 0 and 1 are in service, 2..5 wait
        assert (gate.in_service, gate.queued) == (2, 4)
    # 0 leaving at t=1.0 frees no slot (two held, capacity one); 1 leaving does.
    assert [i for i, _ in entered] == [0, 1, 2, 3, 4, 5]
    assert [at for _, at in entered] == pytest.approx([0.0, 0.01, 1.01, 2.01, 3.01, 4.01])
    assert gate.peak_in_service == 2
    assert gate.peak_concurrency == 6


@pytest.mark.virtual_time
async def test_gate_refuses_beyond_its_bound_and_forgets_cancelled_waiters() -> None:
    """The bound+1-th waiter is refused; a cancelled waiter gives its place to the next."""
    gate = _Gate(capacity=1, bound=2)
    assert await gate.acquire()
    first = asyncio.create_task(gate.acquire())
    second = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)  # both reach the queue
    assert gate.queued == 2
    assert not await gate.acquire()
    first.cancel()
    await asyncio.sleep(0)  # first sees its cancellation and leaves the line
    gate.release()
    assert await second
    assert (gate.in_service, gate.queued) == (1, 0)
    assert first.cancelled()


@pytest.mark.virtual_time
async def test_gate_opened_at_stop_adds_nothing_to_the_peaks() -> None:
    """Waiters let through at stop are answered, not served: the peaks stay at the model's."""
    gate = _Gate(capacity=2, bound=10)
    holders = [asyncio.create_task(gate.acquire()) for _ in range(8)]
    await asyncio.sleep(0)  # two in service, six waiting
    assert (gate.in_service, gate.queued) == (2, 6)
    gate.open_all()
    assert await gate.acquire()  # a late arrival while stopping
    assert all(await asyncio.gather(*holders))
    assert gate.in_service == 9
    assert (gate.peak_in_service, gate.peak_concurrency) == (2, 8)


@pytest.mark.slow
async def test_stats_after_stop_never_show_more_than_the_capacity_in_service() -> None:
    """Requests still queued at stop() are refused at once, and not counted as served."""
    async with asyncio.timeout(HANG_GUARD):
        server = TargetServer(capacity=2, service_ms=20_000, queue=10)
        await server.start()
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            tasks = [asyncio.create_task(_get(session, f"{server.url}/{i}")) for i in range(6)]
            await _wait_until(lambda: server.stats().queued == 4, "4 requests queued")
            await server.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
        stats = server.stats()
    assert (stats.peak_in_service, stats.capacity) == (2, 2)
    assert stats.peak_concurrency == 6


# --------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::", "example.com", ""])
def test_non_loopback_hosts_are_refused(host: str) -> None:
    """Only loopback addresses are served; the error says which and why."""
    message = (
        "host must be a loopback address (127.0.0.0/8, ::1 or localhost): corral serves "
        f"on this machine only; got host={host!r}"
    )
    with pytest.raises(ValueError) as info:
        TargetServer(host=host)
    assert str(info.value) == message
    with pytest.raises(ValueError) as info:
        corral.lab.serve(host=host)  # checked at the call, before any `async with`
    assert str(info.value) == message


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "::1", "localhost"])
def test_loopback_hosts_are_accepted(host: str) -> None:
    """Every loopback spelling is accepted (binding happens only in start())."""
    TargetServer(host=host)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"capacity": 0},
            "capacity must be an int >= 1 (requests served in parallel); got capacity=0",
        ),
        (
            {"capacity": True},
            "capacity must be an int >= 1 (requests served in parallel); got capacity=True",
        ),
        (
            {"service_ms": -1},
            "service_ms must be a number between 0 and 86400000 (milliseconds per request); "
            "got service_ms=-1",
        ),
        (
            {"service_ms": 1e300},
            "service_ms must be a number between 0 and 86400000 (milliseconds per request); "
            "got service_ms=1e+300",
        ),
        (
            {"queue": -1},
            "queue must be an int >= 0 (requests that may wait for a slot); got queue=-1",
        ),
        ({"status": 500}, "status must be 429 or 503; got status=500"),
        (
            {"retry_after": float("inf")},
            "retry_after must be a number between 0 and 86400 (seconds clients are asked to "
            "wait); got retry_after=inf",
        ),
        (
            {"retry_after": 1e308},
            "retry_after must be a number between 0 and 86400 (seconds clients are asked to "
            "wait); got retry_after=1e+308",
        ),
        (
            {"jitter": 1.5},
            "jitter must be a number between 0 and 1 (fraction of service_ms); got jitter=1.5",
        ),
        (
            {"stall_fraction": -0.1},
            "stall_fraction must be a number between 0 and 1 (share of requests that hang); "
            "got stall_fraction=-0.1",
        ),
        (
            {"fail_fraction": "half"},
            "fail_fraction must be a number between 0 and 1 (share of requests answered 500); "
            "got fail_fraction='half'",
        ),
        (
            {"stall_s": -1},
            "stall_s must be a number between 0 and 86400 (seconds a stalled request hangs); "
            "got stall_s=-1",
        ),
        (
            {"stall_s": 1e300},
            "stall_s must be a number between 0 and 86400 (seconds a stalled request hangs); "
            "got stall_s=1e+300",
        ),
        (
            {"port": 70000},
            "port must be an int from 0 to 65535 (0 picks a free port); got port=70000",
        ),
        ({"seed": 1.5}, "seed must be an int; got seed=1.5"),
        (
            {"schedule": [(1.0, 0)]},
            "schedule capacity must be an int >= 1 (requests served in parallel); "
            "got schedule capacity=0",
        ),
        (
            {"schedule": [(1e300, 2)]},
            "schedule time must be a number between 0 and 86400 (seconds after the start); "
            "got schedule time=1e+300",
        ),
        (
            {"schedule": [5]},
            "schedule must be a list of (t_seconds, capacity) pairs, like [(5.0, 32)]; "
            "got the entry 5",
        ),
        (
            {"schedule": "5:32"},
            "schedule must be a list of (t_seconds, capacity) pairs, like [(5.0, 32)]; "
            "got schedule='5:32'",
        ),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, Any], message: str) -> None:
    """Each bad argument fails at construction with its name, its value and the rule."""
    with pytest.raises(ValueError) as info:
        TargetServer(**kwargs)
    assert str(info.value) == message


def test_url_before_start_is_an_error() -> None:
    """The URL exists only once the server listens."""
    with pytest.raises(RuntimeError, match=r"^the server has no URL before start\(\); "):
        _ = TargetServer().url


@pytest.mark.slow
async def test_a_server_starts_once() -> None:
    """A second start() is refused; stop() is idempotent; stats stay readable, frozen."""
    async with asyncio.timeout(HANG_GUARD):
        server = TargetServer()
        await server.start()
        with pytest.raises(
            RuntimeError, match=r"^a TargetServer starts once; this one is running$"
        ):
            await server.start()
        await server.stop()
        await server.stop()
        frozen = server.stats()
        await asyncio.sleep(0.02)  # time passes; a stopped server's clock does not
    assert server.stats() == frozen
    assert frozen.served == 0


# --------------------------------------------------------------------------
# Import weight
# --------------------------------------------------------------------------


@pytest.mark.slow
def test_importing_the_lab_loads_no_third_party_module() -> None:
    """``import corral.lab`` defers aiohttp to first use; ``import corral`` skips the lab."""
    code = (
        "import sys, corral; lab_loaded = 'corral.lab' in sys.modules; import corral.lab; "
        "print(lab_loaded, 'aiohttp' in sys.modules, callable(corral.lab.serve), "
        "'aiohttp' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.split() == ["False", "False", "True", "True"]


@pytest.mark.slow
async def test_latencies_are_measured_finer_than_the_loop_clock() -> None:
    """A request served at once reads a real, non-zero latency on every loop.

    uvloop's clock ticks in whole milliseconds and is read once per loop
    iteration: timed with it, a request answered within one iteration read
    0.0 ms and every percentile was a whole number of milliseconds.
    """
    async with asyncio.timeout(HANG_GUARD):
        async with (
            TargetServer(capacity=4, service_ms=0) as server,
            aiohttp.ClientSession() as session,
        ):
            bodies = [(await _get(session, f"{server.url}/x"))[1] for _ in range(5)]
            stats = server.stats()
    assert stats.served == 5
    assert all(0 < body["served_ms"] < 1000 for body in bodies), bodies
    assert stats.latency_p50_ms is not None
    assert stats.latency_p50_ms > 0
