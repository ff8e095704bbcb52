"""One budget shared by many processes and machines, kept in Redis.

``corral.Limiter(limit=50, rate="200/s", redis="redis://HOST:6379/0",
name="api-key-1")`` is a :class:`~corral.Limiter` whose slots and rate live in
Redis, so every Limiter with the same Redis and ``name``, in any process on
any machine, draws on one budget: the case of N workers calling one API that
allows 200 requests a second from one key.

Three things are kept in Redis, under keys that share the hash tag
``{name}`` (so they live on one Redis Cluster node too):

- ``corral:{name}:holders``, the concurrency cap: a sorted set of *leases*,
  one per slot held, scored by when the lease ends (Redis server time, in
  microseconds). A holder's process renews its leases while it is alive
  (every third of the lease); a holder that dies without releasing (a
  SIGKILL, a lost machine) stops renewing, and its slots come back once its
  leases end. Nobody has to notice the death. Leases Redis lost (a restart
  without its data) are taken back at the next renewal while the cap has
  room.
- ``corral:{name}:tat``, the rate: one number, GCRA's theoretical arrival
  time (see :class:`corral.Rate`). A start *reserves* its slot in one atomic
  step and then sleeps until it, so every grant costs exactly one round trip
  however many clients compete: no "try, fail, retry" storm.
- ``corral:{name}:cool``, a shared cooldown (:meth:`Limiter.cooldown`, a
  server's Retry-After): no slot is granted anywhere until it ends, then the
  slots reopen in steps and the rate starts empty, as after a server with
  nothing left (callers whose rate slot fell inside it book a new one after
  it, rather than all starting at its end).

All times are Redis's own clock (``TIME`` inside the scripts), never a
client's: machines whose clocks disagree still share one schedule.

Each grant is one Lua script run (``EVALSHA``), atomic on the server. A
process that finds every slot taken queues its callers locally, in arrival
order, and one task per process asks again whenever any holder anywhere
releases a slot (releases publish on ``corral:{name}:released``, and so does
a process leaving the queue with slots still wanted) or the earliest lease
may have ended. Across processes, a freed slot goes to the
process that asks first.

Redis out of reach for a while (a restart, a network blip: connections
refused or reset) fails no caller waiting for a slot at once: each keeps
waiting and asks again, backing off (``RECONNECT_DELAY`` doubling up to
``RECONNECT_MAX``), and fails with a ``ConnectionError`` naming the Redis
address only once Redis has been unreachable for a lease. Callers holding
slots are not touched: their leases are renewed as before.

Releasing is synchronous in the Limiter API (``release()`` is a plain
method), so releases, rate give-backs and cooldowns are queued and sent in
batches by one background task per event loop. Everything this process
still holds is given back when the event loop shuts down
(``asyncio.run``'s end), or at :meth:`RedisLimiter.aclose`.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
import os
import sys
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from ._adaptive import Adaptive
from ._limits import (
    MAX_COOLDOWN,
    RAMP_FRACTION,
    RAMP_MAX,
    RAMP_STEPS,
    Limiter,
)
from ._numbers import is_finite, is_real
from ._rate import Rate, RateLike, as_rate

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

__all__ = ["DEFAULT_LEASE", "RedisLimiter"]

logger = logging.getLogger("corral")

#: Seconds a slot's lease lasts without renewal; holders renew every third of it.
DEFAULT_LEASE = 10.0
#: The longest lease (about 11.6 days): past it the slots of a dead process
#: would be lost for good in practice, and far past it Redis's integers overflow.
MAX_LEASE = 1e6
#: Connections to Redis per Limiter and event loop (callers beyond it wait for one).
POOL_SIZE = 16
#: The most waiting callers one round trip asks slots for.
GRANT_BATCH = 64
#: The most releases sent in one round trip.
RELEASE_BATCH = 512
#: After a failed send, wait this long before trying again (seconds).
RESEND_DELAY = 0.2
#: The most rate reservations kept, refused, for a start on top of them to be
#: given back (see RedisLimiter._give_back_one); the earliest go first.
_UNDER_KEPT = 64
#: After a lost subscription, the first wait before subscribing again
#: (seconds); it doubles with each loss in a row, capped by the pump's timeout.
RESUBSCRIBE_DELAY = 0.05
#: While Redis cannot be reached, a caller waiting for a slot asks again after
#: this long (seconds), doubling with each failure in a row up to
#: RECONNECT_MAX; it gives up once Redis has been unreachable for a lease.
RECONNECT_DELAY = 0.05
RECONNECT_MAX = 1.0

_T = TypeVar("_T")

_URL_SCHEMES = ("redis", "rediss", "unix")

# ---------------------------------------------------------------------------
# The scripts. Numbers are integer microseconds (exact in Lua's doubles up to
# 2**53 us, some 285 years); string.format('%.0f') writes them back exactly.
# Reading TIME before writing is allowed since Redis 5 (effects replication,
# the only mode from Redis 7 on); replicate_commands() asks for it on 3.2-4.
# ---------------------------------------------------------------------------

_PRELUDE = """
if redis.replicate_commands then redis.replicate_commands() end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local function us(x) return string.format('%.0f', x) end
"""

# KEYS: holders, tat, cool, queue, queue leases, wants. ARGV: limit (0: no
# cap), lease, interval (0: no rate), tolerance, channel, ticket ('' for
# none), slots the ticket's process wants, the number of tokens to release
# first, those tokens, then one token per slot asked for now.
#
# The queue makes the sharing fair between processes: a process whose
# callers had to wait queues a ticket (scored by arrival, with a lease of its
# own, renewed by each ask) saying how many slots it wants, and free slots go
# to tickets in arrival order; a newcomer gets one only when the queue's
# wants leave one free. Without it a process that releases and re-asks in
# one breath would keep its slots for ever.
#
# Returns {granted, retry, cooling, now, then for each grant when there is a
# rate: wait, tat after it, tat before it}. With nothing granted, `retry` is when
# asking again may help: the cooldown's end, the next ramp step, or the
# earliest lease's end (a release publishes a message before that).
_ACQUIRE = (
    _PRELUDE
    + """
local limit = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local interval = tonumber(ARGV[3])
local tolerance = tonumber(ARGV[4])
local ticket = ARGV[6]
local want = tonumber(ARGV[7])
local nrel = tonumber(ARGV[8])
local first = 9 + nrel
local granted = #ARGV - first + 1
if nrel > 0 then
  local n = redis.call('ZREM', KEYS[1], unpack(ARGV, 9, first - 1))
  if n > 0 then redis.call('PUBLISH', ARGV[5], n) end
end
local cap = limit
local retry = lease
local cool = redis.call('HMGET', KEYS[3], 'until', 'ramp', 'steps')
local untl = tonumber(cool[1])
if untl then
  if now < untl then return {0, untl - now, 1} end
  local ramp = tonumber(cool[2])
  if limit > 0 and now < untl + ramp then
    -- the ramp: step k of n (from 1) opens ceil(limit * k / n) slots
    local steps = math.min(limit, tonumber(cool[3]))
    local step = math.floor((now - untl) * steps / ramp) + 1
    cap = math.ceil(limit * step / steps)
    retry = math.ceil(untl + ramp * step / steps - now)
  end
end
if limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  local woken = false
  for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now)) do
    redis.call('ZREM', KEYS[4], gone)
    redis.call('ZREM', KEYS[5], gone)
    if redis.call('HDEL', KEYS[6], gone) > 0 and not woken then
      -- its wants held slots back from the tickets behind it: they may be served now
      redis.call('PUBLISH', ARGV[5], 0)
      woken = true
    end
  end
  local free = cap - redis.call('ZCARD', KEYS[1])
  for _, ahead in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
    if ahead == ticket then break end
    free = free - (tonumber(redis.call('HGET', KEYS[6], ahead)) or 0)
  end
  if free < granted then granted = math.max(free, 0) end
  if ticket ~= '' then
    if granted < want then
      if not redis.call('ZSCORE', KEYS[4], ticket) then
        redis.call('ZADD', KEYS[4], us(now), ticket)
      end
      redis.call('ZADD', KEYS[5], us(now + lease), ticket)
      redis.call('HSET', KEYS[6], ticket, want - granted)
      local ttl = math.ceil(lease / 1000) + 1000
      redis.call('PEXPIRE', KEYS[4], ttl)
      redis.call('PEXPIRE', KEYS[5], ttl)
      redis.call('PEXPIRE', KEYS[6], ttl)
    else
      redis.call('ZREM', KEYS[4], ticket)
      redis.call('ZREM', KEYS[5], ticket)
      redis.call('HDEL', KEYS[6], ticket)
    end
  end
  if granted == 0 then
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    if oldest[2] then retry = math.min(retry, tonumber(oldest[2]) - now) end
    return {0, math.max(retry, 1), 0}
  end
  for i = 0, granted - 1 do
    redis.call('ZADD', KEYS[1], us(now + lease), ARGV[first + i])
  end
  redis.call('PEXPIRE', KEYS[1], math.ceil(lease / 1000) + 1000)
end
local out = {granted, 0, 0, now}
if interval > 0 then
  local tat = tonumber(redis.call('GET', KEYS[2])) or now
  if tat < now then tat = now end
  for i = 1, granted do
    local wait = tat - tolerance - now
    if wait < 0 then wait = 0 end
    out[#out + 1] = wait
    out[#out + 1] = tat + interval
    out[#out + 1] = tat
    tat = tat + interval
  end
  redis.call('SET', KEYS[2], us(tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
end
return out
"""
)

# KEYS: queue, queue leases, wants. ARGV: a ticket, the channel, the slots the
# ticket still wants (0: it leaves the queue). Wants only go down here (an ask
# sets them): a process whose callers gave up lowers them between two asks.
# Wants given up held slots back from the tickets behind, which are told (as
# by a release) so that they ask again now.
_LEAVE = """
local want = tonumber(ARGV[3])
local had = tonumber(redis.call('HGET', KEYS[3], ARGV[1]))
if want > 0 then
  if not had or had <= want then return 0 end
  redis.call('HSET', KEYS[3], ARGV[1], want)
else
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  if not had then return 0 end
  redis.call('HDEL', KEYS[3], ARGV[1])
end
redis.call('PUBLISH', ARGV[2], 0)
return 1
"""

# KEYS: holders. ARGV: lease, limit, tokens. Extends the leases still held;
# returns n, then the n tokens whose lease it took back, then those it could
# not. (A lease past its end but not yet purged is renewed: nobody can have
# been granted its slot, since every grant purges first.) A lease Redis no longer
# has (it restarted without its data, or purged the lease while this
# process's loop was blocked) is taken back while the cap leaves room: the
# call it stands for is still running, and counting it again keeps other
# processes from taking its slot too.
_RENEW = (
    _PRELUDE
    + """
local limit = tonumber(ARGV[2])
local ends = us(now + tonumber(ARGV[1]))
local missing = {}
for i = 3, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', ends, ARGV[i])
  else
    missing[#missing + 1] = ARGV[i]
  end
end
local back, lost = {}, {}
if #missing > 0 then
  local live = redis.call('ZCOUNT', KEYS[1], '(' .. us(now), '+inf')
  for _, token in ipairs(missing) do
    if live < limit then
      redis.call('ZADD', KEYS[1], ends, token)
      live = live + 1
      back[#back + 1] = token
    else
      lost[#lost + 1] = token
    end
  end
end
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1]) / 1000) + 1000)
local out = {#back}
for _, token in ipairs(back) do out[#out + 1] = token end
for _, token in ipairs(lost) do out[#out + 1] = token end
return out
"""
)

# KEYS: holders. ARGV: channel, tokens. Idempotent: a token not held is skipped.
_RELEASE = """
local n = redis.call('ZREM', KEYS[1], unpack(ARGV, 2))
if n > 0 then redis.call('PUBLISH', ARGV[1], n) end
return n
"""

# KEYS: tat. ARGV: the tat a start left, the tat before it. Undoes the start's
# reservation only if no later start was booked on top of it.
_GIVE_BACK = (
    _PRELUDE
    + """
if tonumber(redis.call('GET', KEYS[1])) ~= tonumber(ARGV[1]) then return 0 end
local before = tonumber(ARGV[2])
if before > now then
  redis.call('SET', KEYS[1], us(before), 'PX', math.ceil((before - now) / 1000) + 1000)
else
  redis.call('DEL', KEYS[1])
end
return 1
"""
)

# KEYS: cool, tat. ARGV: seconds (us), ramp (us), ramp steps, the rate's
# tolerance (us; -1 without a rate). A cooldown ending later replaces the
# current one; one ending earlier changes nothing. With a rate, the rate is
# left empty at the cooldown's end (as a server with nothing left until
# then): the first start after it comes at its end and the rest at the
# rate's pace, not a burst.
_COOLDOWN = (
    _PRELUDE
    + """
local untl = now + tonumber(ARGV[1])
local old = tonumber(redis.call('HGET', KEYS[1], 'until'))
if old and old >= untl then return 0 end
redis.call('HSET', KEYS[1], 'until', us(untl), 'ramp', ARGV[2], 'steps', ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil((untl - now + tonumber(ARGV[2])) / 1000) + 1000)
local tolerance = tonumber(ARGV[4])
if tolerance >= 0 then
  local tat = untl + tolerance
  if (tonumber(redis.call('GET', KEYS[2])) or 0) < tat then
    redis.call('SET', KEYS[2], us(tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
  end
end
return 1
"""
)


# KEYS: cool. Returns the microseconds the cooldown in force has left (0: none).
_COOLING = (
    _PRELUDE
    + """
local untl = tonumber(redis.call('HGET', KEYS[1], 'until'))
if untl and now < untl then return untl - now end
return 0
"""
)


# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------


def _check_url(url: object) -> str:
    message = (
        "redis must be a Redis URL like 'redis://127.0.0.1:6379/0' (also rediss:// or "
        "unix://); got redis={!r}"
    )
    if not isinstance(url, str):
        raise TypeError(message.format(url))
    parts = urlsplit(url)
    if parts.scheme not in _URL_SCHEMES:
        raise ValueError(message.format(url))
    # Checked now, without connecting, rather than at the first call (inside a
    # map, at its first item) or never: redis-py reads a database path that is
    # not a number as db 0, the budget then silently shared with other data.
    connection = _import_redis().connection
    try:
        options = connection.parse_url(url)
        db = parts.path.strip("/")
        if parts.scheme != "unix" and db and "db" not in options:
            raise ValueError(f"the database must be a number, not {db!r}")
        if int(options.get("db") or 0) < 0:  # Redis refuses it, but only at the first call
            raise ValueError(f"the database must be a number >= 0, not {options['db']!r}")
        kind = options.pop("connection_class", connection.Connection)
        kind(**options)  # refuses unknown options; opens no socket
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{message.format(_safe_url(url))} ({exc})") from None
    return url


def _check_name(name: object) -> str:
    message = (
        "a Limiter shared through Redis needs name=, a non-empty str naming the budget "
        f"every Limiter with that name shares, like name='api-key-1'; got name={name!r}"
    )
    if not isinstance(name, str):
        raise TypeError(message)
    if not name:
        raise ValueError(message)
    return name


def _check_lease(lease: object) -> float:
    if lease is None:
        return DEFAULT_LEASE
    message = (
        f"lease must be a number of seconds >= 0.01 and <= {MAX_LEASE:.0f} (how long a slot "
        f"stays held after its holder stops renewing it), like lease=10; got lease={lease!r}"
    )
    if not is_real(lease):
        raise TypeError(message)
    if not (0.01 <= lease <= MAX_LEASE):  # NaN fails both
        raise ValueError(message)
    return float(lease)


def _safe_url(url: str) -> str:
    """The URL without its password, for reprs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return parts._replace(netloc=user + netloc).geturl()


def _import_redis() -> Any:
    try:
        import redis.asyncio
    except ImportError:
        raise ImportError(
            "corral.Limiter(redis=...) needs redis-py (redis>=5): pip install 'corral[redis]'"
        ) from None
    return redis.asyncio


def _restore(options: dict[str, Any]) -> RedisLimiter:
    """Unpickle: a new Limiter on the same budget (connections are never pickled)."""
    limiter = Limiter(**options)
    assert isinstance(limiter, RedisLimiter)
    return limiter


# A grant: the slot's token (None for a rate-only Limiter), then the loop time
# at which its rate slot comes, the TAT after this start and before it (0.0,
# 0, 0 without a rate).
_Grant = tuple[str | None, float, int, int]

#: How fast the estimate of Redis's clock against the loop's may drift (s/s):
#: far above what real clocks do, so a start is never early because of it.
CLOCK_DRIFT = 1e-4


# ---------------------------------------------------------------------------
# One event loop's connection to Redis, and the tasks serving it
# ---------------------------------------------------------------------------


class _Binding:
    """What a RedisLimiter has on one event loop: a client, its scripts, its tasks."""

    __slots__ = (
        "acquire",
        "arrivals",
        "client",
        "closed",
        "cool",
        "cooling",
        "down_since",
        "give_back",
        "guard",
        "idle",
        "landing",
        "last_failure",
        "leave",
        "loop",
        "lost",
        "n_rate",
        "n_waiting",
        "offset",
        "offset_at",
        "outbox",
        "pump",
        "release",
        "renew",
        "renewer",
        "sender",
        "ticket",
        "to_give_back",
        "to_leave",
        "to_release",
        "under",
        "unsure",
        "waiters",
        "wanted",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, url: str) -> None:
        aioredis = _import_redis()
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=POOL_SIZE)
        client: Redis = aioredis.Redis(connection_pool=pool)
        self.loop = loop
        self.client = client
        self.acquire: AsyncScript = client.register_script(_ACQUIRE)
        self.renew: AsyncScript = client.register_script(_RENEW)
        self.release: AsyncScript = client.register_script(_RELEASE)
        self.give_back: AsyncScript = client.register_script(_GIVE_BACK)
        self.leave: AsyncScript = client.register_script(_LEAVE)
        self.cool: AsyncScript = client.register_script(_COOLDOWN)
        self.cooling: AsyncScript = client.register_script(_COOLING)
        # Callers in line for a slot, in arrival order, each with its arrival
        # number; n_waiting counts the live ones (a cancelled future stays in
        # the deque until skipped).
        self.waiters: deque[tuple[int, asyncio.Future[_Grant]]] = deque()
        self.arrivals = itertools.count()  # numbers the callers asking for a slot
        self.n_waiting = 0
        self.n_rate = 0  # callers holding a grant, sleeping until their rate slot
        # Queued for the sender: tokens to release, (after, before) rate
        # reservations to give back, cooldown seconds to announce.
        self.to_release: list[str] = []
        self.to_give_back: list[tuple[int, int]] = []
        # Tokens in to_release of asks whose reply never came: maybe granted,
        # maybe not. Not counted as slots when a give-back fails (see _held_back).
        self.unsure: set[str] = set()
        # Rate reservations Redis refused to give back, by the tat each start
        # left (its ``after``): the ``before`` of the start booked on top of
        # it. When that start is given back, this one is on top again and
        # goes back in turn (see RedisLimiter._give_back_one).
        self.under: dict[int, tuple[int, int]] = {}
        self.to_leave: list[str] = []
        self.outbox: list[float] = []
        self.pump: asyncio.Task[None] | None = None
        self.idle = False  # the pump waits between two asks (cancelling it loses no grant)
        # The pump's place in the shared queue, and the slots Redis counts it
        # as wanting (as last set from here; 0: none).
        self.ticket: str | None = None
        self.wanted = 0
        # Calls to Redis whose caller was cancelled before the reply came:
        # what each gets is given back (see RedisLimiter._landed).
        self.landing: dict[asyncio.Task[Any], Callable[[Any], None]] = {}
        # The loop time the current outage began (None: Redis answered last),
        # and of the last failed attempt to reach Redis.
        self.down_since: float | None = None
        self.last_failure = -math.inf
        self.renewer: asyncio.Task[None] | None = None
        self.lost: set[str] = set()  # held tokens whose lease another process may have
        self.sender: asyncio.Task[None] | None = None
        self.guard: AsyncGenerator[None, None] | None = None
        self.closed = False
        # Redis's clock minus this loop's, estimated from replies (see _start_at).
        self.offset = -math.inf
        self.offset_at = 0.0


async def _close_at_shutdown(
    limiter: RedisLimiter, binding: _Binding
) -> AsyncGenerator[None, None]:
    """An async generator the loop finalises at shutdown: gives back slots, closes sockets.

    ``asyncio.run`` (and ``asyncio.Runner``, uvloop's too) calls
    ``loop.shutdown_asyncgens()`` before closing the loop, which runs this
    ``finally`` while the loop can still do I/O. Without it, slots held when
    the loop ended would stay taken until their leases run out, and the
    sockets would be left for the garbage collector.
    """
    try:
        yield
    finally:
        # redis-py's pool runs async context managers (async generators)
        # inside; the loop would warn that they start after its shutdown
        # began. They run to completion here, so the loop need not track them.
        hooks = sys.get_asyncgen_hooks()
        sys.set_asyncgen_hooks(firstiter=None, finalizer=None)
        try:
            await limiter._close(binding)
        finally:
            sys.set_asyncgen_hooks(*hooks)


def _held_back(b: _Binding) -> int:
    """The slots in ``b.to_release`` this process was granted (not asks that may have failed)."""
    return sum(1 for token in b.to_release if token not in b.unsure)


def _start_at(b: _Binding, now_us: int, wait_us: int) -> float:
    """The loop time of a rate slot that Redis put ``wait_us`` after its ``now_us``.

    Sleeping ``wait`` from when the reply arrived would start each call late
    by however long its reply took, and replies take different times under
    load: two starts could come closer than the rate's interval. Instead,
    each process keeps an estimate of Redis's clock minus the loop's, taking
    the highest ``server now - arrival`` seen (a lower bound of the true
    offset, tight for the fastest replies) and letting it sink by
    ``CLOCK_DRIFT`` per second so clock drift cannot make it too high. So
    starts keep Redis's spacing, and none comes before its slot.
    """
    arrived = b.loop.time()
    sample = now_us / 1e6 - arrived
    offset = b.offset - CLOCK_DRIFT * (arrived - b.offset_at)
    if sample > offset or offset - sample > 1.0:  # a tighter bound, or a clock step
        offset = sample
    b.offset, b.offset_at = offset, arrived
    return (now_us + wait_us) / 1e6 - offset


def _backoff(lost: int) -> float:
    """Seconds to wait before subscribing again after ``lost`` losses in a row."""
    return RESUBSCRIBE_DELAY * 2.0 ** min(max(lost - 1, 0), 10)


def _retry_delay(failures: int) -> float:
    """Seconds to wait before asking Redis again after ``failures`` failures in a row."""
    return min(RECONNECT_MAX, RECONNECT_DELAY * 2.0 ** min(max(failures - 1, 0), 10))


def _outage_errors() -> tuple[type[Exception], ...]:
    """What redis-py raises when Redis cannot be reached (refused, reset, timed out)."""
    from redis.exceptions import ConnectionError as Lost
    from redis.exceptions import TimeoutError as Unanswered

    return (Lost, Unanswered)


def _wants_stale(b: _Binding) -> bool:
    """Callers in line gave up since the pump's last ask: Redis counts too many wants."""
    return b.ticket is not None and b.n_waiting < b.wanted


async def _close_quietly(pubsub: Any) -> None:
    """Close a pub/sub connection, which may be broken already."""
    try:
        await pubsub.aclose()
    except Exception:
        pass


def _running(task: asyncio.Task[None] | None) -> bool:
    # Under an eager task factory a task may finish inside create_task(),
    # before the caller stores it: a stored task is not necessarily running.
    return task is not None and not task.done()


class RedisLimiter(Limiter):
    """A :class:`corral.Limiter` whose budget lives in Redis, shared by every process.

    Made by ``corral.Limiter(limit=..., rate=..., redis=URL, name=NAME)``; it
    is a ``Limiter`` in every way ``corral.map`` and ``async with`` use one.
    Every Limiter created with the same Redis and ``name`` shares one cap and
    one rate, whatever process or machine it is in; give them all the same
    ``limit``, ``rate`` and ``lease`` (each grant applies the asking
    Limiter's numbers).

    What differs from a Limiter in one process:

    - each grant is one round trip to Redis (a Lua script, atomic on the
      server, on Redis's clock), so it costs a fraction of a millisecond
      instead of a microsecond: meant for calls that take milliseconds;
    - a slot is a *lease*: held slots are renewed every ``lease / 3``
      seconds while their process lives, and the slots of a process that
      died are free again at most ``lease`` seconds after its last renewal.
      A process whose event loop stays blocked longer than ``2 * lease / 3``
      may lose its leases (a warning is logged on the ``corral`` logger);
      leases lost when Redis restarts without its data are taken back at
      the next renewal while the cap leaves room;
    - callers in one process waiting for a slot are served in arrival
      order; between processes a freed slot goes to whichever asks first.
      Callers that ask at the same moment book their rate starts in the
      order Redis runs their requests (one connection each), not
      necessarily in arrival order;
    - callers waiting for a slot ride out a Redis outage (a restart, a
      network blip) shorter than ``lease``, asking again with a growing
      pause; past it they fail with a ``ConnectionError`` naming the
      Redis address;
    - :meth:`cooldown` (and a Retry-After seen by ``corral.map``, or
      :meth:`sync_headers` with no request left) pauses every process
      sharing the name; the slots then reopen in steps;
    - ``limit`` is an int (an adaptive limit is one process's view, and is
      not shared), and there is no ``key=`` and no ``acquire_nowait()``.

    It can be pickled (to ship to worker processes): the copy opens its own
    connections. Slots still held are given back when the event loop ends
    (``asyncio.run`` returns), or at :meth:`aclose`.

    .. versionadded:: 0.1
    """

    __slots__ = (
        "_binding",
        "_counter",
        "_held",
        "_interval_us",
        "_keys",
        "_lease",
        "_lease_us",
        "_name",
        "_prefix",
        "_pumps",
        "_tolerance_us",
        "_url",
    )

    def __init__(
        self,
        limit: int | Adaptive | str | None = None,
        *,
        rate: RateLike = None,
        key: object = None,
        redis: str | None = None,
        name: str | None = None,
        lease: float | None = None,
    ) -> None:
        url = _check_url(redis)
        budget = _check_name(name)
        self._lease = _check_lease(lease)
        if key is not None:
            raise TypeError(
                "key= is not available on a Limiter shared through Redis: give each key its "
                f"own name= instead; got key={key!r}"
            )
        if isinstance(limit, Adaptive | str):
            raise ValueError(
                "a Limiter shared through Redis takes an int limit (an adaptive limit is one "
                f"process's view of the service, and is not shared); got limit={limit!r}"
            )
        if isinstance(rate, list | tuple) or (isinstance(rate, Rate) and not is_real(rate.n)):
            raise ValueError(
                "a Limiter shared through Redis takes one plain rate, like '200/s' or "
                f"corral.Rate(200, per=1.0, burst=5); got rate={rate!r}"
            )
        rate_spec = as_rate(rate)
        super().__init__(limit, rate=rate)
        _import_redis()  # fail now, not at the first call, when redis-py is missing
        self._url = url
        self._name = budget
        tag = "{" + budget + "}"
        self._keys = tuple(
            f"corral:{tag}:{part}"
            for part in ("holders", "tat", "cool", "queue", "queue-leases", "wants")
        )
        self._lease_us = max(1, round(self._lease * 1e6))
        # Whole microseconds: the rounding is below a microsecond per start.
        self._interval_us = max(1, round(rate_spec.interval * 1e6)) if rate_spec else 0
        self._tolerance_us = round(rate_spec.tolerance * 1e6) if rate_spec else 0
        self._prefix = f"{uuid.uuid4().hex[:12]}:{os.getpid()}:"
        self._counter = itertools.count()
        self._pumps = itertools.count()  # numbers the queue tickets of this process
        self._held: list[str] = []  # tokens of the slots this process holds
        self._binding: _Binding | None = None

    # -- what it is --------------------------------------------------------

    @property
    def name(self) -> str:
        """The name of the shared budget."""
        return self._name

    @property
    def lease(self) -> float:
        """Seconds a slot stays held after its holder stops renewing it."""
        return self._lease

    @property
    def waiting(self) -> int:
        """Callers of this process inside ``acquire()``: in line for a slot or for the rate."""
        b = self._binding
        return 0 if b is None else b.n_waiting + b.n_rate

    @property
    def cooling_down(self) -> bool:
        """True while a shared cooldown this process knows of is running."""
        b = self._binding
        return b is not None and not b.loop.is_closed() and self._cool_until > b.loop.time()

    def __repr__(self) -> str:
        return (
            f"<corral.Limiter limit={self._limit!r} rate={self.rate!r} "
            f"redis={_safe_url(self._url)!r} name={self._name!r} "
            f"in_flight={self._in_flight} waiting={self.waiting}>"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        options = {
            "limit": self._limit,
            "rate": self.rate,
            "redis": self._url,
            "name": self._name,
            "lease": self._lease,
        }
        return (_restore, (options,))

    # -- taking and giving back slots ----------------------------------------

    async def acquire(self, cost: object = None) -> None:
        """Wait for a slot of the shared budget (and then for the rate); pair with :meth:`release`.

        One round trip to Redis when a slot is free; a caller that had to
        wait for its rate slot then sits out, holding its slot, any cooldown
        begun meanwhile in any process (one more round trip). Cancelled while
        waiting, even while Redis is granting it a slot, the caller holds
        nothing afterwards: its place in line is given up, a slot granted to
        it is released, and its rate reservation is given back when no later
        start was booked after it.

        While Redis cannot be reached (connection refused or reset), the
        caller waits on and asks again, backing off from 0.05 s to at most
        1 s between attempts, until Redis has been unreachable for ``lease``
        seconds.

        Raises:
            redis.exceptions.ConnectionError: Redis stayed unreachable for
                ``lease`` seconds while this caller waited (the message names
                the Redis address).
            redis.exceptions.RedisError: Redis refused the script.
            TypeError: a ``cost`` (a shared budget has a plain rate only).
        """
        if cost is not None:
            raise TypeError(
                "a Limiter shared through Redis counts requests only, so a call has no "
                f"cost= to pay; got cost={cost!r}"
            )
        b = self._bound()
        if self._limit is None:
            grant = await self._reserve_rate(b)
        elif b.n_waiting:  # callers of this process are in line: join them
            grant = await self._wait_in_line(b, next(b.arrivals))
        else:
            grant = await self._ask_first(b)
        if grant[1] > b.loop.time():
            await self._wait_for_rate(b, grant)

    def acquire_nowait(self) -> bool:
        """Not available: every grant of a shared budget is a round trip to Redis.

        Raises:
            TypeError: always; use ``await limiter.acquire()`` or ``async with``.
        """
        raise TypeError(
            "a Limiter shared through Redis asks Redis for every slot, which cannot be done "
            "without waiting: use `await limiter.acquire()` or `async with limiter:`"
        )

    def release(self) -> None:
        """Give a slot back to the shared budget (sent to Redis in the background).

        Raises:
            RuntimeError: nothing is acquired (more releases than acquires).
        """
        if not self._in_flight:
            raise RuntimeError(
                "Limiter.release() called with nothing acquired: every release() must "
                "match one acquire() (or use `async with limiter:`)"
            )
        self._in_flight -= 1
        if self._held:
            b = self._bound()
            b.to_release.append(self._held.pop())
            self._send(b)

    def cooldown(self, seconds: float) -> None:
        """Grant no slot for ``seconds`` in any process sharing this budget.

        Calls already running go on. Then the slots reopen in
        ``min(limit, RAMP_STEPS)`` even steps over ``RAMP_FRACTION`` of the
        wait (at most ``RAMP_MAX`` seconds), and the rate starts empty: the
        first start at the cooldown's end, the next at the rate's pace
        (callers whose rate slot fell inside the cooldown book a new one).
        A cooldown ending earlier than one already running changes nothing.
        The announcement is sent to Redis in the background; this process
        grants nothing meanwhile. Needs a running event loop.

        Raises:
            ValueError: ``seconds`` is negative, NaN or infinite.
        """
        if not (is_real(seconds) and is_finite(seconds) and seconds >= 0):
            raise ValueError(
                f"cooldown seconds must be a finite number >= 0; got seconds={seconds!r}"
            )
        b = self._bound()
        if seconds == 0:
            return
        self._cool_until = max(self._cool_until, b.loop.time() + seconds)
        b.outbox.append(float(seconds))
        self._send(b)

    def sync_headers(self, headers: Any) -> None:
        """Pause every process sharing this budget when the server says no request is left.

        Reads the same headers as :meth:`Limiter.sync_headers` (OpenAI's
        ``x-ratelimit-*``, Anthropic's ``anthropic-ratelimit-*``). The budget
        lives in Redis, so there is no local schedule to clamp: when the
        ``requests`` remaining is below 1 and the headers give its reset, the
        Limiter goes into a shared :meth:`cooldown` until the server has
        refilled one request (with the budget's size, the missing share of
        the reset; without it, the whole reset), at most
        :data:`corral._limits.MAX_COOLDOWN` seconds (like a Retry-After seen
        by :meth:`Limiter.record_error`). Other headers, and a server with
        requests left, change nothing. Needs a running event loop.
        """
        from ._headers import read_rate_limits, refill_wait

        for dimension, remaining, reset, size in read_rate_limits(headers):
            if dimension == "requests" and remaining < 1 and reset:
                wait = refill_wait(remaining, 1.0, reset, size, 0.0)
                if wait > 0:
                    self.cooldown(min(wait, MAX_COOLDOWN))

    async def aclose(self) -> None:
        """Give back everything this process holds here, and close the connections.

        Callers still waiting for a slot get a ``RuntimeError``. Optional:
        the same happens when the event loop shuts down (at the end of
        ``asyncio.run``). The Limiter stays usable: a later call connects
        again.
        """
        b = self._binding
        if b is not None and b.loop is asyncio.get_running_loop():
            await self._close(b)

    # -- internals ---------------------------------------------------------

    def _bound(self) -> _Binding:
        """This event loop's binding, made on first use (sync: no await, no race)."""
        loop = asyncio.get_running_loop()
        b = self._binding
        if b is not None and b.loop is loop and not b.closed:
            return b
        if b is not None and not b.closed and not b.loop.is_closed():
            if b.loop.is_running():  # another loop runs now: in another thread
                raise RuntimeError(
                    "this Limiter is in use by an event loop running in another thread; "
                    "a Limiter can serve successive event loops, not two at once"
                )
            if b.n_waiting or b.n_rate:
                raise RuntimeError(
                    "this Limiter has tasks waiting on another event loop that is still open; "
                    "a Limiter can serve successive event loops, not two at once"
                )
        b = self._binding = _Binding(loop, self._url)
        self._cool_until = -math.inf  # the old loop's clock means nothing here
        guard = _close_at_shutdown(self, b)
        # Started once so the loop tracks it (its first-iteration hook) and
        # finalises it at shutdown; it stops at its first `yield`, before any
        # await, so this step completes here and now.
        step = guard.asend(None).__await__()
        try:
            step.send(None)
        except StopIteration:
            pass
        b.guard = guard
        if self._held:  # slots taken on an earlier loop: keep their leases alive
            self._renew_soon(b)
        return b

    def _token(self) -> str:
        return f"{self._prefix}{next(self._counter)}"

    async def _ask(
        self, b: _Binding, n: int, ticket: str = "", want: int = 0
    ) -> tuple[list[_Grant], float]:
        """Ask Redis for up to ``n`` slots (each with its rate reservation); one round trip.

        Releases still queued here go first, in the same script run, so a
        slot given back just before is free for this ask. ``ticket`` and
        ``want``: the pump's place in the shared queue and how many slots its
        callers wait for.

        Returns the grants, and with none, the seconds after which asking
        again may succeed even if no release is announced.
        """
        # A cooldown this process began may not have reached Redis yet (the
        # sender sends it in the background): asking now could be granted in it.
        left = self._cool_until - b.loop.time()
        if left > 0:
            return [], left
        return await self._ask_now(b, n, ticket, want)

    def _ask_now(
        self, b: _Binding, n: int, ticket: str = "", want: int = 0
    ) -> Coroutine[Any, Any, tuple[list[_Grant], float]]:
        """:meth:`_ask` past the cooldown check, the releases to send taken now.

        Taken before the caller's next await, not when the returned
        coroutine first runs (maybe in a task of its own, a step later):
        the sender would send them on their own first, a round trip more.
        """
        tokens = [self._token() for _ in range(n)]
        releases = b.to_release[:RELEASE_BATCH]
        del b.to_release[: len(releases)]
        return self._asked(b, tokens, releases, ticket, want)

    async def _asked(
        self, b: _Binding, tokens: list[str], releases: list[str], ticket: str, want: int
    ) -> tuple[list[_Grant], float]:
        try:
            reply: list[int] = await b.acquire(
                keys=self._keys,
                args=[
                    self._limit or 0,
                    self._lease_us,
                    self._interval_us,
                    self._tolerance_us,
                    self._channel,
                    ticket,
                    want,
                    len(releases),
                    *releases,
                    *tokens,
                ],
            )
        except BaseException:
            # The script may or may not have run: release the releases again
            # and these tokens too (a token not held is skipped).
            b.to_release.extend(releases)
            b.to_release.extend(tokens)
            b.unsure.update(tokens)
            self._send(b)
            raise
        granted = int(reply[0])
        if ticket and not reply[2]:  # (a reply in a cooldown left the queue as it was)
            b.wanted = want - granted if granted < want else 0
        if not granted:
            retry = int(reply[1]) / 1e6
            if reply[2]:
                self._cool_until = max(self._cool_until, b.loop.time() + retry)
            return [], retry
        grants: list[_Grant] = []
        for i in range(granted):
            if self._interval_us:
                wait, after, before = reply[4 + 3 * i : 7 + 3 * i]
                start_at = _start_at(b, int(reply[3]), int(wait))
                grants.append((tokens[i], start_at, int(after), int(before)))
            else:
                grants.append((tokens[i], 0.0, 0, 0))
        # Hold them now (counted, renewed); whoever they go to releases them.
        self._held.extend(tokens[:granted])
        self._in_flight += granted
        self._renew_soon(b)
        return grants, 0.0

    async def _ask_first(self, b: _Binding) -> _Grant:
        """A slot for a caller with nobody of this process in line: ask, else queue."""
        arrival = next(b.arrivals)
        if self._cool_until > b.loop.time():  # as in _ask: wait in line for its end
            return await self._wait_in_line(b, arrival)
        started = b.loop.time()
        asking = self._ask_now(b, 1)
        try:
            if self._interval_us:
                grants, _ = await self._landed(b, asking, functools.partial(self._undo, b))
            else:
                # Without a rate nothing is lost to a cancel mid-call (its
                # token is released either way, see _asked): no task needed.
                grants, _ = await asking
        except _outage_errors() as exc:
            self._unreachable(b, exc, started)  # raises once the outage is too long
            grants = []  # in line, the pump asks again as Redis comes back
        else:
            b.down_since = None
        if grants:
            waiters = b.waiters
            while waiters and waiters[0][1].done():  # cancelled in line
                waiters.popleft()
            if not waiters or waiters[0][0] > arrival:
                return grants[0]
            # Callers who came before this one are in line: asking at the same
            # time, their refusals came back first (or Redis was out when they
            # asked). The first of them takes the slot; this caller, its turn.
            b.n_waiting -= 1
            waiters.popleft()[1].set_result(grants[0])
        return await self._wait_in_line(b, arrival)

    def _undo(self, b: _Binding, asked: tuple[list[_Grant], float]) -> None:
        """The slots an ask got for a caller who has left: release them, give back the rate."""
        for grant in asked[0]:
            self._drop(b, grant)

    async def _landed(
        self, b: _Binding, call: Coroutine[Any, Any, _T], undo: Callable[[_T], None]
    ) -> _T:
        """Run a call to Redis that takes a slot or a rate slot in a task of its own.

        Cancelling the caller inside the call would cut redis-py off between
        Redis running the script and the reply arriving: the caller could not
        give back what it never learnt it got (the slot would come back only
        as its lease ends, the rate slot never). Instead the caller leaves at
        once, the call goes on, and ``undo`` gives back what it got when the
        reply lands.
        """
        task = b.loop.create_task(call)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            b.landing[task] = undo
            task.add_done_callback(functools.partial(self._settle, b))
            raise

    def _settle(self, b: _Binding, task: asyncio.Task[Any]) -> None:
        """A call whose caller left has landed: give back what it got (once)."""
        undo = b.landing.pop(task, None)
        if undo is None or task.cancelled():
            return
        # A call that failed got nothing; reading the error keeps asyncio quiet.
        if task.exception() is None:
            undo(task.result())

    def _unreachable(self, b: _Binding, exc: BaseException, started: float) -> float:
        """An attempt begun at ``started`` (loop time) could not reach Redis.

        Returns the seconds the outage may still last before callers waiting
        for a slot give up; raises ``redis.exceptions.ConnectionError``
        naming the Redis address once it has lasted a lease.
        """
        now = b.loop.time()
        # Attempts come at most RECONNECT_MAX apart while anyone waits; one
        # begun later, after nobody tried, cannot know that Redis stayed down
        # meanwhile: it begins a new outage.
        if b.down_since is None or started - b.last_failure > 2 * RECONNECT_MAX:
            b.down_since = started
        b.last_failure = now
        left = b.down_since + self._lease - now
        if left > 0:
            return left
        from redis.exceptions import ConnectionError as Lost

        raise Lost(
            f"corral: Redis at {_safe_url(self._url)} could not be reached for "
            f"{now - b.down_since:.3g} s, past the lease of the Limiter {self._name!r} "
            f"(lease={self._lease:g}), so the callers waiting for a slot give up; "
            f"last error: {exc!r}"
        ) from exc

    async def _reach(
        self,
        b: _Binding,
        call: Callable[[], Coroutine[Any, Any, _T]],
        undo: Callable[[_T], None] | None = None,
    ) -> _T:
        """``call()`` for a caller waiting to start, through an outage shorter than a lease.

        Asks again, backing off, while Redis cannot be reached; with
        ``undo``, a caller cancelled mid-call gives back what the call got
        (see :meth:`_landed`).
        """
        failures = 0
        while True:
            started = b.loop.time()
            try:
                result = await (call() if undo is None else self._landed(b, call(), undo))
            except _outage_errors() as exc:
                failures += 1
                left = self._unreachable(b, exc, started)
                await asyncio.sleep(min(left, _retry_delay(failures)))
                continue
            b.down_since = None
            return result

    async def _wait_in_line(self, b: _Binding, arrival: int) -> _Grant:
        """Wait for the pump to give this caller (the ``arrival``-th) a slot."""
        fut: asyncio.Future[_Grant] = b.loop.create_future()
        waiters = b.waiters
        # Callers asking Redis at the same time enter the line as their
        # refusals come back, in any order: each goes behind those who came
        # before it (the scan is short: only those who came after it).
        place = len(waiters)
        while place and waiters[place - 1][0] > arrival:
            place -= 1
        waiters.insert(place, (arrival, fut))
        b.n_waiting += 1
        if not _running(b.pump):
            b.pump = b.loop.create_task(self._pump(b))
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.cancelled():  # still in line: leave it; the pump skips its future
                b.n_waiting -= 1
                if not b.n_waiting:
                    b.waiters.clear()  # only cancelled futures are left
                    if b.idle and _running(b.pump):
                        # Its ticket's wants hold slots back from other
                        # processes in line: leave the queue now, not at the
                        # pump's next wake-up (up to a third of a lease away).
                        assert b.pump is not None
                        b.pump.cancel()
                else:
                    if b.idle and _wants_stale(b):
                        # Redis still counts this caller in the ticket's wants,
                        # holding a slot back from other processes in line:
                        # lower them now, not at the pump's next wake-up.
                        self._send(b)
                    if len(b.waiters) > 2 * b.n_waiting + 16:
                        # Mostly futures of callers who gave up behind one who
                        # waits on: drop them (amortised O(1) per caller), or a
                        # line that does not move grows without end.
                        b.waiters = deque(w for w in b.waiters if not w[1].done())
            else:  # granted a slot, cancelled before resuming: give it all back
                self._drop(b, fut.result())
            raise

    async def _reserve_rate(self, b: _Binding) -> _Grant:
        """A rate-only Limiter: reserve the next start (waiting out a shared cooldown)."""
        start_at, after, before = await self._book_rate(b)
        self._in_flight += 1
        return (None, start_at, after, before)

    async def _book_rate(self, b: _Binding) -> tuple[float, int, int]:
        """Reserve the next rate slot, after any shared cooldown: (loop time, tat after, before)."""
        while True:
            left = self._cool_until - b.loop.time()
            if left > 0:  # known here, maybe not yet in Redis (see _ask)
                await asyncio.sleep(left)
                continue
            reply, start_at = await self._reach(
                b, self._book_one(b), functools.partial(self._give_back, b)
            )
            if reply[0]:
                break
            self._cool_until = max(self._cool_until, b.loop.time() + int(reply[1]) / 1e6)
            await asyncio.sleep(int(reply[1]) / 1e6)
        return start_at, int(reply[5]), int(reply[6])

    def _book_one(self, b: _Binding) -> Callable[[], Coroutine[Any, Any, tuple[list[int], float]]]:
        """The call reserving one rate slot (a rate-only Limiter: no cap, no token).

        It returns Redis's reply and, when booked, the slot's loop time, read
        as the reply arrives (see _start_at), not a loop step or two later.
        """
        args: list[int | str] = [
            *(0, self._lease_us, self._interval_us, self._tolerance_us),
            *("", "", 0, 0, "-"),
        ]

        async def book() -> tuple[list[int], float]:
            reply: list[int] = await b.acquire(keys=self._keys, args=args)
            return reply, _start_at(b, int(reply[3]), int(reply[4])) if reply[0] else 0.0

        return book

    def _give_back(self, b: _Binding, booked: tuple[list[int], float]) -> None:
        """The rate slot a booking got for a caller who has left: give it back."""
        reply = booked[0]
        if reply[0]:
            b.to_give_back.append((int(reply[5]), int(reply[6])))
            self._send(b)

    async def _wait_for_rate(self, b: _Binding, grant: _Grant) -> None:
        """Sleep until the grant's rate slot, then sit out any cooldown, holding the slot."""
        b.n_rate += 1
        token, start_at, after, before = grant
        try:
            while True:
                await asyncio.sleep(start_at - b.loop.time())
                # A cooldown may have begun while this caller slept, here or in
                # another process (which only Redis knows of): no call starts in one.
                left = self._cool_until - b.loop.time()
                if left <= 0:
                    left = int(await self._reach(b, self._cooling_left(b))) / 1e6
                    if left <= 0:
                        return
                    self._cool_until = max(self._cool_until, b.loop.time() + left)
                # The slot booked fell in the cooldown and is gone (nothing to
                # give back). Starting at its end would start every caller held
                # back at once, a burst above the rate: book a slot after it
                # instead, at the rate's pace, as a caller arriving then would.
                after = 0
                await asyncio.sleep(left)
                start_at, after, before = await self._book_rate(b)
        except BaseException:  # cancelled, or Redis unreachable: this caller will not start
            self._drop(b, (token, start_at, after, before))
            raise
        finally:
            b.n_rate -= 1

    def _cooling_left(self, b: _Binding) -> Callable[[], Coroutine[Any, Any, int]]:
        """The call asking Redis how long the shared cooldown has left (us)."""

        async def cooling() -> int:
            return int(await b.cooling(keys=self._keys[2:3]))

        return cooling

    def _drop(self, b: _Binding, grant: _Grant) -> None:
        """A caller granted a slot will not start: release it and give its rate slot back."""
        token, _, after, before = grant
        self._in_flight -= 1
        # Tokens are interchangeable: release() gives back the last one held,
        # which may have been this caller's, so give back any one held.
        if token is not None and self._held:
            b.to_release.append(self._held.pop())
        if after:
            b.to_give_back.append((after, before))
        self._send(b)

    # Sending: releases, give-backs and cooldowns queue up here; one task per
    # loop sends them in batches, so release() never waits and a burst of
    # releases costs one round trip. Releasing a token twice is harmless (the
    # script skips tokens not held), so a send cut short is simply repeated.

    def _send(self, b: _Binding) -> None:
        if not _running(b.sender) and not b.closed:
            b.sender = b.loop.create_task(self._sender(b))

    async def _sender(self, b: _Binding) -> None:
        failures = 0
        while b.to_release or b.to_give_back or b.outbox or b.to_leave or _wants_stale(b):
            try:
                await self._send_once(b)
                failures = 0
            except Exception as exc:
                failures += 1
                # Redis unreachable: slots not given back come back anyway
                # when their leases end, so give up after about a lease.
                if failures * RESEND_DELAY >= self._lease:
                    if _held_back(b) or b.to_give_back or b.outbox:
                        logger.warning(
                            "corral: could not reach Redis to give back %d slot(s) of %r "
                            "(%r); they are free again when their leases end",
                            _held_back(b),
                            self._name,
                            exc,
                        )
                    b.to_release.clear()
                    b.unsure.clear()
                    b.to_give_back.clear()
                    b.outbox.clear()
                    b.to_leave.clear()
                    return
                await asyncio.sleep(RESEND_DELAY)
        if not b.to_release:  # all sent: none of them is left to count
            b.unsure.clear()

    async def _send_once(self, b: _Binding) -> None:
        # Each item leaves its queue before the await (an ask may take
        # releases meanwhile) and goes back if the send fails. Cooldowns go
        # first: a slot released in the same batch must not be granted
        # elsewhere before the pause is known.
        if b.outbox:
            seconds = b.outbox.pop()
            ramp = min(RAMP_MAX, RAMP_FRACTION * seconds)
            try:
                await b.cool(
                    keys=[self._keys[2], self._keys[1]],
                    args=[
                        round(seconds * 1e6),
                        max(1, round(ramp * 1e6)),
                        RAMP_STEPS,
                        self._tolerance_us if self._interval_us else -1,
                    ],
                )
            except BaseException:
                b.outbox.append(seconds)
                raise
        if b.to_release:
            batch = b.to_release[:RELEASE_BATCH]
            del b.to_release[: len(batch)]
            try:
                await b.release(keys=self._keys[:1], args=[self._channel, *batch])
            except BaseException:
                b.to_release.extend(batch)
                raise
        if b.to_leave:
            ticket = b.to_leave.pop()
            try:
                await b.leave(keys=self._keys[3:], args=[ticket, self._channel, 0])
            except BaseException:
                b.to_leave.append(ticket)
                raise
        if _wants_stale(b):
            assert b.ticket is not None
            # Counted as set before the reply, so it is sent once; not sent
            # again if it fails: the pump's next ask sets the wants anyway.
            b.wanted = b.n_waiting
            await b.leave(keys=self._keys[3:], args=[b.ticket, self._channel, b.wanted])
        if b.to_give_back:
            await self._give_back_one(b)

    async def _give_back_one(self, b: _Binding) -> None:
        """Give back the latest of the rate reservations queued (one round trip).

        Redis undoes a reservation only if no start was booked on top of it.
        Callers cancelled together (a map cancelled while its calls wait for
        the rate) booked on top of one another: given back latest first, all
        go back; and one refused because a start of this process lay on top
        of it goes back once that start is given back too. Else the rate
        stayed booked ahead for starts that never came: with Rate(1, per=60),
        the next caller waited minutes.
        """
        b.to_give_back.sort()  # by the tat each start left; linear when sorted already
        reservation = b.to_give_back.pop()
        try:
            undone = await b.give_back(keys=self._keys[1:2], args=list(reservation))
        except BaseException:
            b.to_give_back.append(reservation)
            raise
        after, before = reservation
        if undone:
            below = b.under.pop(before, None)
            if below is not None:  # on top now: its turn
                b.to_give_back.append(below)
        else:
            # Booked on top of by a start that may be given back later. Kept
            # a while only: most such starts run, and this one never goes back.
            if len(b.under) >= _UNDER_KEPT:
                del b.under[min(b.under)]
            b.under[after] = reservation

    @property
    def _channel(self) -> str:
        return f"corral:{{{self._name}}}:released"

    # The pump: while callers of this process wait in line, ask Redis for
    # slots for as many of them as possible in one round trip, then wait for
    # a release anywhere (a published message) or for the moment the earliest
    # lease, the cooldown or a ramp step ends, and ask again. It subscribes
    # before its first ask, so no release after a refusal goes unnoticed.
    #
    # A subscription can be dropped while Redis is fine (a proxy's idle
    # timeout, CLIENT KILL): the pump subscribes again and asks again. While
    # subscribing keeps failing it asks on a timer instead, backing off, so
    # no caller waits longer than it would have. An ask failing (Redis itself
    # unreachable: restarting, a network blip) is tried again, backing off,
    # and fails the callers in line only once Redis has been unreachable for
    # a lease.

    async def _pump(self, b: _Binding) -> None:
        from redis.exceptions import ConnectionError as Lost
        from redis.exceptions import TimeoutError as Unanswered

        ticket = b.ticket = f"{self._prefix}queue{next(self._pumps)}"
        b.wanted = 0
        pubsub: Any = None
        lost = 0  # subscriptions lost in a row
        failures = 0  # asks failed in a row
        try:
            while b.n_waiting:
                if pubsub is None:
                    pubsub = b.client.pubsub()
                    try:
                        await pubsub.subscribe(self._channel)
                    except (Lost, Unanswered):
                        broken, pubsub = pubsub, None
                        await _close_quietly(broken)
                        lost += 1
                n = min(b.n_waiting, GRANT_BATCH)
                started = b.loop.time()
                try:
                    grants, retry = await self._ask(b, n, ticket, b.n_waiting)
                except (Lost, Unanswered) as exc:
                    failures += 1
                    left = self._unreachable(b, exc, started)  # raises past a lease
                    b.idle = True  # the last caller leaving may cancel this wait
                    try:
                        await asyncio.sleep(min(left, _retry_delay(failures)))
                    finally:
                        b.idle = False
                    continue
                b.down_since = None
                failures = 0
                self._give_out(b, grants)
                if grants or not b.n_waiting:
                    continue
                if _wants_stale(b):  # callers left while it asked
                    self._send(b)
                # Every slot taken: ask again after a release anywhere, or
                # when a lease, the cooldown or a ramp step may have ended,
                # and often enough to keep the ticket's lease.
                timeout = min(retry, self._lease / 3)
                b.idle = True  # the last caller leaving may cancel this wait
                try:
                    if pubsub is None:  # not subscribed: ask again on a timer
                        await asyncio.sleep(min(timeout, _backoff(lost)))
                        continue
                    try:
                        await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
                        # Several releases may have come: one ask serves them all.
                        while await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.0):
                            pass
                        lost = 0
                    except (Lost, Unanswered):
                        broken, pubsub = pubsub, None
                        await _close_quietly(broken)
                        lost += 1
                        if lost > 1:  # the last one was lost too: back off, not a quick retry
                            await asyncio.sleep(min(timeout, _backoff(lost)))
                finally:
                    b.idle = False
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis unreachable for a lease: the callers in line fail
            while b.waiters:
                _, fut = b.waiters.popleft()
                if not fut.done():
                    b.n_waiting -= 1
                    fut.set_exception(exc)
        finally:
            # Out of the queue (a no-op when the last ask served everyone).
            b.ticket = None
            b.wanted = 0
            b.to_leave.append(ticket)
            self._send(b)
            if pubsub is not None:
                await _close_quietly(pubsub)
            # A caller that queued while the subscription closed found this
            # task still running and started none.
            if b.n_waiting and not b.closed:
                b.pump = b.loop.create_task(self._pump(b))

    def _give_out(self, b: _Binding, grants: Sequence[_Grant]) -> None:
        """Give granted slots to the callers in line, first come first served."""
        waiters = b.waiters
        for grant in grants:
            while waiters and waiters[0][1].done():  # cancelled in line
                waiters.popleft()
            if not waiters:
                self._drop(b, grant)  # they all left while we asked
                continue
            b.n_waiting -= 1
            waiters.popleft()[1].set_result(grant)

    def _renew_soon(self, b: _Binding) -> None:
        if not _running(b.renewer) and not b.closed:
            b.renewer = b.loop.create_task(self._renewer(b))

    async def _renewer(self, b: _Binding) -> None:
        """While this process holds slots, extend their leases every third of a lease."""
        while self._held:
            await asyncio.sleep(self._lease / 3)
            held = list(self._held)
            if not held:
                return
            try:
                reply: list[Any] = await b.renew(
                    keys=self._keys[:1], args=[self._lease_us, self._limit or 0, *held]
                )
            except Exception as exc:
                logger.warning(
                    "corral: could not renew %d lease(s) of %r (%r); retrying",
                    len(held),
                    self._name,
                    exc,
                )
                continue
            n_back = int(reply[0])
            back = [token.decode() for token in reply[1 : 1 + n_back]]
            lost = {token.decode() for token in reply[1 + n_back :]}
            # A slot released while the renewal was on its way is neither lost
            # nor to be taken back: release it again if Redis took it back.
            still = set(self._held)
            gone = [token for token in back if token not in still]
            if gone:
                b.to_release.extend(gone)
                self._send(b)
            back = [token for token in back if token in still]
            if back:
                logger.warning(
                    "corral: Redis had lost %d lease(s) of %r (restarted without its data?); "
                    "taken back",
                    len(back),
                    self._name,
                )
            # Each lost slot is reported once, not at every renewal.
            fresh = (lost & still) - b.lost
            b.lost = ((b.lost - set(back)) | lost) & still
            if fresh:
                logger.warning(
                    "corral: %d slot(s) of %r outlived their lease (was the event loop "
                    "blocked for over %.3g s, or Redis restarted?); others may have been "
                    "granted them",
                    len(fresh),
                    self._name,
                    self._lease * 2 / 3,
                )

    async def _close(self, b: _Binding) -> None:
        """Stop this loop's tasks, give back what is held or queued, close the sockets."""
        if b.closed:
            return
        b.closed = True
        if self._binding is b:
            self._binding = None
        for task in (b.pump, b.renewer, b.sender):
            if task is not None and not task.done():
                task.cancel()
        for task in (b.pump, b.renewer, b.sender):
            if task is not None:
                try:
                    await task
                except BaseException:
                    pass  # cancelled, or failed and already logged
        # Calls whose callers left: let them land (one round trip) so what
        # they got is given back below with the rest, not left to its lease.
        # Bounded: a Redis that stopped answering must not hold the close up
        # (what such a call got comes back as its lease ends).
        landing = list(b.landing)
        if landing:
            try:
                await asyncio.wait(landing, timeout=self._lease)
            except asyncio.CancelledError:
                pass  # as above: the close goes on
            for task in landing:
                if task.done():
                    self._settle(b, task)  # now, whether or not its callback has run
                else:
                    task.cancel()
        error = RuntimeError(f"the Redis Limiter {self._name!r} was closed while waiting")
        while b.waiters:
            _, fut = b.waiters.popleft()
            if not fut.done():
                fut.set_exception(error)
        b.n_waiting = 0
        # Slots still held on this loop will never be released by their tasks.
        b.to_release.extend(self._held)
        self._held.clear()
        self._in_flight = 0
        try:
            while b.to_release or b.to_give_back or b.to_leave or b.outbox:
                await self._send_once(b)
        except Exception as exc:
            # Only tokens of asks that failed, or a place in the queue (it ends with its
            # lease): nothing known to be held is left behind.
            if _held_back(b) or b.to_give_back or b.outbox:
                logger.warning(
                    "corral: could not give back %d slot(s) of %r on close (%r); they are "
                    "free again when their leases end",
                    _held_back(b),
                    self._name,
                    exc,
                )
        finally:
            await b.client.aclose(close_connection_pool=True)
