"""Pub/sub across nodes through Redis, on top of in-process delivery.

Local subscribers are always served in process, so a node keeps working when Redis goes away.
A shared topic (logs, metrics) travels through Redis only while some other node wants it: every
node announces the shared topics it has subscribers for on a demand channel once a second, and a
node publishes a topic to Redis while such an announcement is fresher than `DEMAND_LEASE`.

Nothing read from Redis is trusted: each message is checked (its envelope here, its payload by the
check its topic's owner registered with `accept`) and a malformed one is dropped, counted and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson
import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from streamplex.server.broker import MemoryBroker, Subscription
from streamplex.server.config import Settings

log = logging.getLogger(__name__)

DEMAND_INTERVAL = 1.0
DEMAND_LEASE = 3.5
OUTBOUND_DEPTH = 4096
RECONNECT_MAX = 5.0
MAX_MESSAGE_BYTES = 1_048_576  # a larger pub/sub message is dropped unparsed
MALFORMED_LOG_INTERVAL = 10.0  # seconds between warnings about dropped messages, per channel


class Envelope(BaseModel):
    """What every node publishes: its name, and a feed's message (`m`) or the topics it wants (`topics`)."""

    model_config = ConfigDict(extra="ignore")

    node: str = Field(min_length=1, max_length=256)
    m: Any = None
    topics: list[str] = Field(default_factory=list, max_length=64)


class Malformed(ValueError):
    """A message from Redis that is not what a node publishes."""


def redis_options(settings: Settings) -> dict[str, Any]:
    """redis-py connection options from the settings: ACL user, password and, for `rediss://`, the TLS files.

    Certificates are always verified against the CA file (or the system's) and the URL's host name.
    """
    options: dict[str, Any] = {}
    if settings.redis_username:
        options["username"] = settings.redis_username
    if settings.redis_password:
        options["password"] = settings.redis_password
    if settings.redis_url.startswith("rediss://"):
        options |= {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
        if settings.redis_tls_ca_file is not None:
            options["ssl_ca_certs"] = str(settings.redis_tls_ca_file)
        if settings.redis_tls_cert_file is not None:
            options["ssl_certfile"] = str(settings.redis_tls_cert_file)
        if settings.redis_tls_key_file is not None:
            options["ssl_keyfile"] = str(settings.redis_tls_key_file)
    return options


class RedisBroker(MemoryBroker):
    """A MemoryBroker whose shared topics also reach, and come from, the other nodes through Redis."""

    def __init__(
        self, url: str, node: str, prefix: str = "streamplex", shared: Iterable[str] = ("logs", "metrics"), options: Mapping[str, Any] | None = None
    ) -> None:
        """`options` go to redis-py with the URL (credentials, TLS files); what the URL says wins."""
        super().__init__()
        self.url = url
        self.node = node
        self.prefix = prefix
        self.shared = frozenset(shared)
        self.redis: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_connect_timeout=1.0, socket_timeout=2.0, retry=Retry(NoBackoff(), 0), **dict(options or {})
        )
        self.up = False
        self.outbound_dropped = 0
        self.malformed_dropped = 0
        self.checks: dict[str, Callable[[Any], Any]] = {}
        self._malformed_logged: dict[str, tuple[float, int]] = {}  # channel -> (last warning, drops since)
        self.on_demand: Callable[[str], None] = lambda topic: None
        self.wanted: Callable[[], Iterable[str]] = lambda: self._topics.keys()
        self.connects = 0  # times Redis became reachable (after start or an outage): a restarted Redis may have lost every key
        self.handlers: dict[str, Callable[[Any], None]] = {}  # other pub/sub channels (session handover), by name; each gets `m`
        self._remote_demand: dict[str, float] = {}
        self._outbound: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(OUTBOUND_DEPTH)
        self._tasks: list[asyncio.Task[None]] = []
        self._announce = asyncio.Event()
        self._warned = False

    def channel(self, topic: str) -> str:
        """The Redis pub/sub channel of a shared topic."""
        return f"{self.prefix}:feed:{topic}"

    @property
    def demand_channel(self) -> str:
        return f"{self.prefix}:demand"

    async def start(self) -> None:
        """Start listening, publishing and announcing; returns at once even if Redis is down."""
        self._tasks = [
            asyncio.create_task(self._listen(), name="redis:listen"),
            asyncio.create_task(self._send(), name="redis:send"),
            asyncio.create_task(self._announce_demand(), name="redis:demand"),
        ]

    async def close(self) -> None:
        """Stop the background tasks and close the connection pool."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.redis.aclose()

    def publish(self, topic: str, message: Any) -> None:
        """Deliver to local subscribers, and queue for Redis while another node wants `topic`."""
        super().publish(topic, message)
        if not self.up or topic not in self.shared or self._remote_demand.get(topic, 0.0) < time.monotonic():
            return
        try:
            self._outbound.put_nowait((topic, orjson.dumps({"node": self.node, "m": message})))
        except asyncio.QueueFull:
            self.outbound_dropped += 1

    def subscribe(self, topic: str, depth: int, sink: Callable[[Any], None] | None = None) -> Subscription:
        """A new subscription; its topic is announced to the other nodes at once if it is shared."""
        if topic in self.shared:
            self._announce.set()
        return super().subscribe(topic, depth, sink)

    def accept(self, topic: str, check: Callable[[Any], Any]) -> None:
        """Deliver `topic`'s messages from other nodes only as `check` returns them; what it raises (ValueError,
        pydantic's ValidationError) drops the message. A shared topic with no check takes nothing from Redis."""
        self.checks[topic] = check

    def mark_down(self, exc: BaseException) -> None:
        """Record that Redis failed; the first failure of an outage logs one warning."""
        if self.up or not self._warned:
            log.warning("Redis at %s unreachable (%s); serving node-local only until it returns", self._safe_url(), str(exc) or type(exc).__name__)
            self._warned = True
        self.up = False
        self._remote_demand.clear()

    def _mark_up(self) -> None:
        if not self.up:
            self.connects += 1
            log.info("Redis at %s reachable%s; sharing with other nodes", self._safe_url(), " again" if self._warned else "")
        self._warned = False
        self.up = True

    def _safe_url(self) -> str:
        kwargs = self.redis.connection_pool.connection_kwargs
        return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"

    async def _listen(self) -> None:
        backoff = 0.2
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.demand_channel, *(self.channel(t) for t in sorted(self.shared)), *self.handlers)
                self._mark_up()
                self._announce.set()
                backoff = 0.2
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._receive(message["channel"].decode(), message["data"])
                    if not self.up:
                        # Another call failed (a pooled connection, not this one): once a ping answers, Redis is back.
                        await self.redis.ping()
                        self._mark_up()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self.mark_down(exc)
                # Pooled connections opened before the outage are dead too: drop them, or each would fail once after recovery.
                with contextlib.suppress(Exception):
                    await self.redis.connection_pool.disconnect()
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(backoff)
            backoff = min(RECONNECT_MAX, backoff * 2)

    def _receive(self, channel: str, data: Any) -> None:
        try:
            self._deliver(channel, data)
        except (Malformed, ValidationError) as exc:
            self._dropped(channel, exc)
        except Exception:
            # A check or a demand callback that breaks must not end the listener (every node's feeds).
            self.malformed_dropped += 1
            log.exception("handling a message from Redis channel %s failed; dropped", channel)

    def _deliver(self, channel: str, data: Any) -> None:
        """Check one pub/sub message and act on it; raise Malformed or ValidationError to drop it."""
        if not isinstance(data, bytes) or len(data) > MAX_MESSAGE_BYTES:
            raise Malformed(f"not a payload of at most {MAX_MESSAGE_BYTES} bytes")
        try:
            raw = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise Malformed(f"not JSON ({exc})") from None
        envelope = Envelope.model_validate(raw)
        if envelope.node == self.node:
            return
        if (handler := self.handlers.get(channel)) is not None:
            handler(envelope.m)  # it raises Malformed for a message it cannot take
            return
        if channel == self.demand_channel:
            until = time.monotonic() + DEMAND_LEASE
            for topic in envelope.topics:
                if topic in self.shared:
                    self._remote_demand[topic] = until
                    self.on_demand(topic)
            return
        topic = channel.removeprefix(f"{self.prefix}:feed:")
        check = self.checks.get(topic)
        if check is None:
            raise Malformed(f"no check for topic {topic!r}")
        try:
            message = check(envelope.m)
        except (TypeError, KeyError) as exc:
            raise Malformed(f"{type(exc).__name__}: {exc}") from None
        super().publish(topic, message)

    def _dropped(self, channel: str, exc: Exception) -> None:
        """Count a dropped message; warn at most once per MALFORMED_LOG_INTERVAL per channel."""
        self.malformed_dropped += 1
        now = time.monotonic()
        last, since = self._malformed_logged.get(channel, (-MALFORMED_LOG_INTERVAL, 0))
        if now - last < MALFORMED_LOG_INTERVAL:
            self._malformed_logged[channel] = (last, since + 1)
            return
        if isinstance(exc, ValidationError):
            first = exc.errors(include_url=False, include_input=False)[0]
            reason = f"{'.'.join(map(str, first['loc'])) or 'message'}: {first['msg']}"
        else:
            reason = str(exc)
        more = f" (and {since} more since the last warning)" if since else ""
        log.warning("dropped a malformed message on Redis channel %s: %s%s", channel, reason[:200], more)
        self._malformed_logged[channel] = (now, 0)

    async def _send(self) -> None:
        while True:
            topic, payload = await self._outbound.get()
            if not self.up:
                continue
            try:
                await self.redis.publish(self.channel(topic), payload)
            except (RedisError, OSError) as exc:
                self.mark_down(exc)

    async def _announce_demand(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DEMAND_INTERVAL):
                    await self._announce.wait()
            self._announce.clear()
            topics = sorted(set(self.wanted()) & self.shared)
            if not topics or not self.up:
                continue
            try:
                await self.redis.publish(self.demand_channel, orjson.dumps({"node": self.node, "topics": topics}))
            except (RedisError, OSError) as exc:
                self.mark_down(exc)
