"""Per-API-key limits: connections open at once and op rate (GCRA), across nodes through Redis.

Each check runs as one atomic Lua script on Redis, with Redis's clock. Without Redis, or while it
is unreachable, the same limits hold on this node alone (in memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable

from redis.exceptions import RedisError, ResponseError

from streamplex.server.redis_broker import RedisBroker

log = logging.getLogger(__name__)

# A connection's entry lives CONN_TTL seconds unless refreshed, so a node that dies frees its keys' slots.
CONN_TTL = 30.0
REDIS_TIMEOUT = 0.5
MAX_WAIT_MS = 86_400_000.0  # a GCRA answer beyond a day is not one this script gives
BAD_ANSWER_LOG_INTERVAL = 10.0

# KEYS[1] sorted set of "node/conn" members scored by expiry (ms); ARGV: member, max, ttl_ms. 1 admitted, 0 refused.
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"""

# KEYS: one sorted set per member; ARGV[1] ttl_ms, then the members in KEYS' order. Pushes each expiry forward.
REFRESH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', key, ttl)
end
return #KEYS
"""

# GCRA. KEYS[1] holds the theoretical arrival time (ms); ARGV: emission interval ms, burst * interval ms.
# Returns "0" when allowed, else the milliseconds until it would be.
GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval
local ahead = new_tat - now
if ahead > limit then
  return tostring(ahead - limit)
end
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil(ahead))
return '0'
"""


class Gcra:
    """The same GCRA in memory: `burst` ops back to back, then one per 1/`rate` seconds."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = 1.0 / rate
        self.limit = self.interval * burst
        self._clock = clock
        self._tat: dict[str, float] = {}

    def take(self, key: str) -> float:
        """0.0 when allowed, else the seconds until it would be."""
        now = self._clock()
        new_tat = max(self._tat.get(key, now), now) + self.interval
        if new_tat - now > self.limit:
            return new_tat - now - self.limit
        self._tat[key] = new_tat
        if len(self._tat) > 10_000:
            self._tat = {k: v for k, v in self._tat.items() if v > now}
        return 0.0


class KeyLimits:
    """Connections and op rate per API key (by its non-secret label); 0 turns a limit off."""

    def __init__(self, node: str, max_connections: int, rate: float, burst: int, broker: RedisBroker | None = None, prefix: str = "streamplex") -> None:
        self.node = node
        self.max_connections = max_connections
        self.rate = rate
        self.broker = broker
        self.prefix = prefix
        self.local_gcra = Gcra(rate, burst) if rate > 0 else None
        self._local: defaultdict[str, set[str]] = defaultdict(set)
        self._refresher: asyncio.Task[None] | None = None
        self._bad_logged = -BAD_ANSWER_LOG_INTERVAL
        if broker is not None:
            self._acquire = broker.redis.register_script(ACQUIRE)
            self._refresh = broker.redis.register_script(REFRESH)
            self._gcra = broker.redis.register_script(GCRA)
            self._gcra_args = (str(1000.0 / rate), str(1000.0 * burst / rate)) if rate > 0 else ("0", "0")

    def _shared(self) -> RedisBroker | None:
        return self.broker if self.broker is not None and self.broker.up else None

    def _failed(self, exc: BaseException) -> None:
        """Redis failed: mark it down, unless it answered with an error or a value a script never gives (a key of
        the wrong type or content, e.g. written by hand), which is logged while Redis stays in use."""
        assert self.broker is not None
        if not isinstance(exc, ResponseError | ValueError):
            self.broker.mark_down(exc)
            return
        now = time.monotonic()
        if now - self._bad_logged >= BAD_ANSWER_LOG_INTERVAL:
            self._bad_logged = now
            log.warning("Redis gave a per-key limit check an unusable answer (%s); this check used the node's own count", str(exc)[:200])

    async def start(self) -> None:
        """Keep this node's connection entries alive in Redis (and put them back after an outage)."""
        if self.broker is not None and self.max_connections:
            self._refresher = asyncio.create_task(self._refresh_forever(), name="keylimits:refresh")

    async def stop(self) -> None:
        """Stop refreshing."""
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher

    async def admit(self, key: str, conn: str) -> bool:
        """Count a new connection of `key`; False when the key already holds `max_connections`."""
        if not self.max_connections:
            return True
        member = f"{self.node}/{conn}"
        shared = self._shared()
        if shared is not None:
            try:
                async with asyncio.timeout(REDIS_TIMEOUT):
                    admitted = await self._acquire(keys=[self._conn_key(key)], args=[member, self.max_connections, int(CONN_TTL * 1000)])
                if admitted not in (0, 1):
                    raise ValueError(f"ACQUIRE answered {admitted!r}")
            except (RedisError, OSError, TimeoutError, ValueError) as exc:
                self._failed(exc)
            else:
                if admitted:
                    self._local[key].add(conn)
                return bool(admitted)
        if len(self._local[key]) >= self.max_connections:
            return False
        self._local[key].add(conn)
        return True

    async def release(self, key: str, conn: str) -> None:
        """Forget a connection counted by `admit`."""
        if not self.max_connections:
            return
        held = self._local.get(key)
        if held is None or conn not in held:
            return
        held.discard(conn)
        if not held:
            del self._local[key]
        shared = self._shared()
        if shared is not None:
            try:
                async with asyncio.timeout(REDIS_TIMEOUT):
                    await shared.redis.zrem(self._conn_key(key), f"{self.node}/{conn}")
            except (RedisError, OSError, TimeoutError) as exc:
                self._failed(exc)

    async def take(self, key: str) -> float:
        """Take one op of `key`'s rate: 0.0 when allowed, else seconds to wait."""
        if self.local_gcra is None:
            return 0.0
        if self._shared() is not None:
            try:
                async with asyncio.timeout(REDIS_TIMEOUT):
                    answer = await self._gcra(keys=[self._rate_key(key)], args=list(self._gcra_args))
                wait_ms = float(answer) if isinstance(answer, bytes | str) else math.nan
                if not 0.0 <= wait_ms <= MAX_WAIT_MS:
                    raise ValueError(f"GCRA answered {answer!r}")
            except (RedisError, OSError, TimeoutError, ValueError) as exc:
                self._failed(exc)
            else:
                return wait_ms / 1000.0
        return self.local_gcra.take(key)

    def _conn_key(self, key: str) -> str:
        return f"{self.prefix}:conn:{key}"

    def _rate_key(self, key: str) -> str:
        return f"{self.prefix}:rate:{key}"

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(CONN_TTL / 3)
            if self._shared() is None or not self._local:
                continue
            pairs = [(self._conn_key(key), f"{self.node}/{conn}") for key, conns in self._local.items() for conn in conns]
            try:
                async with asyncio.timeout(REDIS_TIMEOUT * 4):
                    await self._refresh(keys=[k for k, _ in pairs], args=[int(CONN_TTL * 1000), *(m for _, m in pairs)])
            except (RedisError, OSError, TimeoutError) as exc:
                self._failed(exc)
