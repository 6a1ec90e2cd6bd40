"""The server's shared state: settings, keys, channels, hub, telemetry, and the live connections."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from streamplex.server.admission import Admission, LoopMonitor
from streamplex.server.auth import AuthThrottle, KeyStore, Principal
from streamplex.server.broker import MemoryBroker
from streamplex.server.channel import Channel, ChannelStatus, Services
from streamplex.server.cluster import ClusterHub
from streamplex.server.config import Settings
from streamplex.server.engine import build_engine
from streamplex.server.engine.metrics import families as engine_families
from streamplex.server.health import HealthServer
from streamplex.server.hub import Hub
from streamplex.server.keylimits import KeyLimits
from streamplex.server.logbuffer import RingLogHandler, check_record
from streamplex.server.protocol import PROTOCOL_VERSION, EndReason
from streamplex.server.redact import RedactKeys
from streamplex.server.redis_broker import RedisBroker, redis_options
from streamplex.server.registry import discover, instantiate
from streamplex.server.remote import ModelClient, families, remote, remote_capable
from streamplex.server.session import Session
from streamplex.server.session_store import SessionStore, digest
from streamplex.server.takeover import take_over
from streamplex.server.telemetry import Activity, Telemetry

if TYPE_CHECKING:
    from streamplex.server.connection import Connection

log = logging.getLogger("streamplex")


def settle_collector(settings: Settings) -> None:
    """Keep what start-up made out of the collector's full passes, and run those passes at most every `gc_full_every` middle-generation collections."""
    # What start-up made (modules, schemas, channels) lives as long as the process: frozen, the full passes
    # (which hold the GIL over every tracked object) no longer walk it every time.
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, settings.gc_full_every)


class Runtime:
    """Everything one server process shares across connections."""

    def __init__(self, settings: Settings, log_handler: RingLogHandler | None = None) -> None:
        self.settings = settings
        self.keys, self.generated_key = KeyStore.from_settings(settings)
        self.throttle = AuthThrottle(settings.auth_fail_limit, settings.auth_fail_window, ipv6_prefix=settings.address_ipv6_prefix)
        self.telemetry = Telemetry(settings.node)
        self.monitor = LoopMonitor(self.telemetry.loop_lag.observe)
        self.admission = Admission(settings, self.monitor)
        self._monitoring: asyncio.Task[None] | None = None
        self._reporting: asyncio.Task[None] | None = None
        self.health: HealthServer | None = None
        # Large subscribes are decoded and validated here, one at a time: off the loop, and never several
        # threads at once contending with the loop for the GIL.
        self.parser = ThreadPoolExecutor(1, thread_name_prefix="params")
        self.broker: MemoryBroker
        if settings.redis_url:
            self.broker = RedisBroker(settings.redis_url, settings.node, settings.redis_prefix, options=redis_options(settings))
            self.hub: Hub = ClusterHub(self.broker)
        else:
            self.broker = MemoryBroker()
            self.hub = Hub(self.broker)
        shared = self.broker if isinstance(self.broker, RedisBroker) else None
        self.store = (
            SessionStore(shared, settings.node, settings.redis_prefix, settings.resume_window, settings.resume_handover_timeout)
            if shared is not None and settings.resume_window > 0
            else None
        )
        if self.store is not None:
            self.store.on_release = self.release
        self.key_limits = KeyLimits(settings.node, settings.key_max_connections, settings.key_rate, settings.key_burst, shared, settings.redis_prefix)
        self.http_limits = KeyLimits(settings.node, settings.http_key_max_streams, 0.0, 1, shared, f"{settings.redis_prefix}:http")  # open HTTP streams per key
        self.logs = log_handler or RingLogHandler(settings.log_buffer, settings.node)
        self.hub.accept(self.logs.topic, check_record)
        classes = discover()
        handed = remote_capable(classes, settings.remote_names())  # channels that run on model workers: their models are not loaded here
        self.engine = build_engine(settings, without=families(handed))
        self.services = Services(settings=settings, feeds=self.hub, logs=self.logs, stats=self.telemetry.stats.snapshot, engine=self.engine)
        self.channels: dict[str, Channel] = instantiate(classes, self.services)
        self.models = ModelClient(settings, list(handed)) if handed else None  # the model tier's client
        if self.models is not None:
            for name in handed.keys() & self.channels.keys():
                self.channels[name] = remote(self.channels[name], self.models)
        self.telemetry.register(self.collect)
        self.connections: set[Connection] = set()
        self.detached: dict[str, tuple[Session, asyncio.TimerHandle]] = {}  # by resume token
        self.draining = False
        self.started = False
        self.drain_started = asyncio.Event()  # HTTP streams end with reason `shutdown` when it is set
        self._expiring: set[asyncio.Task[None]] = set()

    def collect(self) -> Iterator[Metric]:
        """Scrape-time families of the runtime and the engine: outbox bytes, asyncio tasks, Redis, the engine's figures and histograms."""
        yield GaugeMetricFamily(
            "streamplex_outbox_bytes", "Bytes of frames waiting in the connections' outboxes.", value=sum(c.outbox_bytes() for c in self.connections)
        )
        yield GaugeMetricFamily("streamplex_tasks", "asyncio tasks alive.", value=len(asyncio.all_tasks()))
        yield GaugeMetricFamily(
            "streamplex_event_loop_lag_recent_seconds",
            "The mean event-loop lag of the last second's probes (what overload_lag is compared with).",
            value=self.monitor.lag,
        )
        yield GaugeMetricFamily(
            "streamplex_overload_memory_threshold_bytes", "RSS past which new subscriptions are refused with overloaded.", value=self.admission.memory_threshold
        )
        if isinstance(self.broker, RedisBroker):
            yield GaugeMetricFamily("streamplex_redis_up", "1 while the Redis connection works.", value=float(self.broker.up))
            yield CounterMetricFamily(
                "streamplex_redis_outbound_dropped",
                "Feed messages for other nodes dropped because the outbound queue to Redis was full.",
                value=self.broker.outbound_dropped,
            )
            yield CounterMetricFamily(
                "streamplex_redis_malformed_dropped",
                "Messages from Redis dropped: malformed, invalid, or failing to be handled.",
                value=self.broker.malformed_dropped,
            )
        if self.store is not None:
            yield CounterMetricFamily(
                "streamplex_redis_session_writes_dropped", "Session and replay writes to Redis dropped while it was unreachable.", value=self.store.dropped
            )
            yield CounterMetricFamily(
                "streamplex_redis_sessions_fenced",
                "Sessions this node still wrote for after another node had taken them over (paused or cut from Redis meanwhile); their writes were refused.",
                value=self.store.fenced,
            )
        if self.models is not None:
            yield from self.models.families()
        yield from engine_families(self.engine.metrics())
        yield from self.engine.histograms.collect()

    async def start(self) -> None:
        """Start channels and live log publishing; announce the generated key once."""
        self._monitoring = asyncio.create_task(self.monitor.run(), name="loop-monitor")
        if self.settings.health_port is not None:
            monitor = self.monitor
            self.health = HealthServer(
                self.settings.host,
                self.settings.health_port,
                self.settings.node,
                lambda: monitor.ticked,
                lambda: monitor.lag,
                self.settings.health_stall,
                reuse_port=self.settings.reuse_port,
            )
            self.health.start()
            log.info("/health also on port %d, answered by its own thread", self.health.port)
        if self.settings.activity_log_interval > 0:
            self._reporting = asyncio.create_task(self._report_activity(), name="activity-log")
        self.logs.attach(asyncio.get_running_loop(), self.broker.publish)
        if self.store is not None:
            await self.store.start()  # before the broker listens: it registers the handover channel
        if isinstance(self.broker, RedisBroker):
            await self.broker.start()
        await self.key_limits.start()
        await self.http_limits.start()
        await self.engine.start()
        if self.models is not None:
            await self.models.start()
        for name, channel in list(self.channels.items()):
            try:
                await channel.start()
            except Exception:  # one channel's failure (a third-party one, say) must not keep the others from serving
                log.exception("channel %r is left out: its start() failed", name)
                del self.channels[name]
        if self.generated_key is not None:
            log.warning(
                "no API key configured (STREAMPLEX_API_KEYS or STREAMPLEX_KEYS_FILE); generated one for this run: %s",
                self.generated_key,
                extra={"secret": True},
            )
        settle_collector(self.settings)
        self.started = True
        log.info("streamplex ready on node %s with channels: %s", self.settings.node, ", ".join(self.channels))

    async def _report_activity(self) -> None:
        activity = Activity(self.telemetry.stats)
        while True:
            await asyncio.sleep(self.settings.activity_log_interval)
            if (line := activity.line()) is not None:
                log.info("last %g s: %s", self.settings.activity_log_interval, line)

    def detach(self, session: Session) -> None:
        """Keep a session whose connection dropped for `resume_window` seconds; its streams go on meanwhile."""
        while len(self.detached) >= self.settings.resume_max_sessions:
            self._expire(next(iter(self.detached)))
        handle = asyncio.get_running_loop().call_later(self.settings.resume_window, self._expire, session.token)
        self.detached[session.token] = (session, handle)
        if self.store is not None:
            self.store.detached(session.token)
        log.debug("session %s detached; resumable for %g s", session.id, self.settings.resume_window)

    def reattach(self, token: str, label: str) -> Session | None:
        """The detached session with this resume token, if it belongs to the same API key."""
        entry = self.detached.get(token)
        if entry is None or entry[0].principal.label != label:
            return None
        del self.detached[token]
        entry[1].cancel()
        session = entry[0]
        if self.store is not None:
            self.store.attached(session.token, session.id, session.principal.label, session.specs())
        return session

    def forget(self, session: Session) -> None:
        """A session that cannot be resumed any more: its record in Redis goes too."""
        if self.store is not None and session.journal is not None:
            self.store.forget(session.token, session.id, [*session.streams, *session.ended])

    async def adopt(
        self, token: str, principal: Principal, last_seqs: dict[str, int], inputs: dict[str, int] | None = None
    ) -> tuple[Session, dict[str, Any], list[Any]] | None:
        """Take over, from Redis, a session whose connection was on another node (or on this one, not yet noticed as
        dropped): what `resumed` reports, and the frames the client missed. None when there is no such session."""
        store = self.store
        if store is None:
            return None
        record = await store.load(token)
        if record is None or record.label != principal.label:
            return None
        if record.owner == self.settings.node and record.inst == store.instance:
            await self.release(digest(token))
        claim = await store.claim(token, record)
        if claim is None:
            return None
        session = Session(self.settings, self.channels, principal, self.telemetry.stats, store, (record.id, token))
        report, frames = await take_over(store, session, record, self.channels, last_seqs, inputs)
        store.attached(token, session.id, principal.label, session.specs())
        log.info(
            "session %s taken over from node %s, %s, after %.3f s of waiting for it: %d stream(s), %d frame(s) replayed",
            session.id,
            record.owner or "(released)",
            claim.how,
            claim.waited,
            len(report),
            len(frames),
        )
        return session, report, frames

    async def release(self, key: str) -> None:
        """Let go of the session whose record is `key` (another node takes it over): stop its streams quietly."""
        for token, (session, handle) in list(self.detached.items()):
            if digest(token) == key:
                del self.detached[token]
                handle.cancel()
                await session.end_all(EndReason.UNSUBSCRIBED, notify=False)
                log.info("session %s handed over to another node", session.id)
                return
        for connection in list(self.connections):
            live = connection.session
            if live is not None and digest(live.token) == key:
                await connection.hand_over()
                log.info("session %s resumed on another connection; closing its old one", live.id)
                return

    def _expire(self, token: str) -> None:
        """End a waiting session's streams now (its window is over, room is needed, or the server drains)."""
        entry = self.detached.pop(token, None)
        if entry is not None:
            entry[1].cancel()
            session = entry[0]
            log.debug("session %s ends unresumed (window of %g s over, room needed, or draining)", session.id, self.settings.resume_window)
            if self.draining and self.store is not None:
                self.store.disown(session.token)  # another node may still take it over from Redis
            else:
                self.forget(session)
            task = asyncio.create_task(session.end_all(EndReason.UNSUBSCRIBED, notify=False), name=f"expire:{session.id}")
            self._expiring.add(task)
            task.add_done_callback(self._expiring.discard)

    async def drain(self, timeout: float) -> None:
        """End every stream with reason `shutdown` and close every connection with 1001, within `timeout`."""
        self.draining = True
        self.drain_started.set()
        for token in list(self.detached):
            self._expire(token)
        if self.connections:
            log.info("draining %d connection(s)", len(self.connections))
            await asyncio.wait([asyncio.create_task(c.shutdown(timeout)) for c in list(self.connections)], timeout=timeout + 1)
        if self._expiring:
            await asyncio.wait(list(self._expiring), timeout=timeout)

    async def stop(self) -> None:
        """Stop channels and producers."""
        self.started = False
        self.admission.close()
        if self.health is not None:
            await asyncio.to_thread(self.health.stop)
            self.health = None
        for task in (self._monitoring, self._reporting):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.hub.close()
        await self.key_limits.stop()
        await self.http_limits.stop()
        if self.store is not None:
            await self.store.close()
        if isinstance(self.broker, RedisBroker):
            await self.broker.close()
        await self.engine.stop()
        for name, channel in self.channels.items():
            try:
                await channel.stop()
            except Exception:
                log.exception("channel %r: its stop() failed", name)
        if self.models is not None:
            await self.models.close()
        self.logs.detach()
        self.parser.shutdown(wait=False, cancel_futures=True)

    def channel_table(self, principal: Principal | None = None) -> list[dict[str, Any]]:
        """Each channel's name, status and kind, as `ready` and /channels report them: only those `principal` may use, when given."""
        table = []
        for name, channel in self.channels.items():
            if principal is not None and not principal.may_use(name, channel.admin):
                continue
            try:
                status = channel.status()
            except Exception as exc:
                log.exception("channel %r: its status() failed", name)
                status = ChannelStatus("unavailable", f"its status check failed: {exc}")
            entry: dict[str, Any] = {
                "name": name,
                "status": status.state,
                "lossy": channel.lossy,
                "push": channel.accepts_push,
                "admin": channel.admin,
                "summary": channel.summary,
            }
            if status.reason:
                entry["reason"] = status.reason
            table.append(entry)
        return table

    def limits(self) -> dict[str, Any]:
        """The limits in force, as `ready` reports them."""
        s = self.settings
        return {
            "protocol": PROTOCOL_VERSION,
            "max_frame_bytes": s.max_frame_bytes,
            "max_streams": s.max_streams,
            "rate": s.rate,
            "burst": s.burst,
            "push_queue": s.push_queue,
            "outbox_bytes": s.outbox_bytes,
            "heartbeat_interval": s.heartbeat_interval,
        }


def configure_logging(settings: Settings) -> RingLogHandler:
    """Route every logger to stderr and to the ring buffer the logs channel reads, with API keys redacted."""
    ring = RingLogHandler(settings.log_buffer, settings.node)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)-8s %(name)s: %(message)s"))
    for handler in (console, ring):
        handler.addFilter(RedactKeys())
    root = logging.getLogger()
    root.handlers[:] = [console, ring]
    root.setLevel(settings.log_level)
    return ring
