"""The edge node's side of the model tier: its remote channels queue jobs in Redis and stream the workers' results.

A remote channel keeps its channel's params model and flags, so clients see no difference; its `stream()` adds a
job to the channel's job stream (consumer group `workers`), forwards pushed input, and reads the job's result
stream with a blocking XREAD, yielding each chunk with its checkpoint (so that the session journals it as a local
producer's). When the client leaves, the job is cancelled. See server/model_tier.py for the keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

import orjson
import redis.asyncio as aioredis
from prometheus_client.core import GaugeMetricFamily, Metric
from redis.exceptions import RedisError, ResponseError

from streamplex.server.channel import AVAILABLE, CannotGoOn, Channel, ChannelError, ChannelStatus, Checkpoint, StreamContext
from streamplex.server.config import Settings
from streamplex.server.model_tier import EDGE_BEAT, EDGE_TTL, GROUP, LIVE, WORKER_TTL, Keys, entries
from streamplex.server.protocol import ErrorCode
from streamplex.server.redis_broker import redis_options

log = logging.getLogger("streamplex")

READ_BLOCK_MS = 1000
LOST_CHECK_EVERY = 5  # empty reads between checks that the job still exists


@dataclass(slots=True)
class ChannelView:
    """What the edge last read of one remote channel: live workers serving it and its jobs."""

    available: int = 0
    loading: int = 0
    waiting: int = 0
    pending: int = 0


class ModelClient:
    """One edge node's connection to the model tier: queues jobs, reads results, watches the workers and the queues."""

    def __init__(self, settings: Settings, channels: list[str], edge: bool = True) -> None:
        """`edge`: this process holds clients, and keeps its sign of life for the workers (a model worker watching the
        queues does not)."""
        self.settings = settings
        self.edge = edge
        self.keys = Keys(settings.redis_prefix)
        self.node = settings.node
        self.channels = channels
        self.redis = aioredis.Redis.from_url(settings.redis_url, **redis_options(settings))
        self.views = {name: ChannelView() for name in channels}
        self.fresh = False  # the last refresh reached Redis
        self._live = self.redis.register_script(LIVE)
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Start watching the workers and queues (returns at once even if Redis is down)."""
        self._task = asyncio.create_task(self._watch(), name="model-tier-watch")

    async def close(self) -> None:
        """Stop watching; let pending cancellations finish."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._background:
            await asyncio.wait(list(self._background), timeout=2)
        if self.edge:
            with contextlib.suppress(RedisError, OSError):
                await self.redis.delete(self.keys.edge(self.node))
        await self.redis.aclose()

    async def _ensure_groups(self) -> None:
        for name in self.channels:
            with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
                await self.redis.xgroup_create(self.keys.jobs(name), GROUP, id="0", mkstream=True)

    async def _watch(self) -> None:
        groups = False
        while True:
            try:
                if not groups:
                    await self._ensure_groups()
                    groups = True
                await self.refresh()
                self.fresh = True
            except ResponseError as exc:
                log.warning("model tier: %s", exc)
                groups = "NOGROUP" not in str(exc)
                self.fresh = False
            except (RedisError, OSError) as exc:
                if self.fresh:
                    log.warning("model tier: Redis unreachable (%s); remote channels are unavailable until it is back", exc)
                self.fresh = False
            await asyncio.sleep(EDGE_BEAT)

    async def refresh(self) -> None:
        """Read the live workers and each channel's queue; renew this node's sign of life."""
        infos = await self._live(keys=[self.keys.workers, self.keys.info], args=[int(WORKER_TTL * 1000)])
        async with self.redis.pipeline(transaction=False) as pipe:
            if self.edge:
                pipe.set(self.keys.edge(self.node), "1", px=int(EDGE_TTL * 1000))
            for name in self.channels:
                pipe.xlen(self.keys.jobs(name))
                pipe.xpending(self.keys.jobs(name), GROUP)
            replies = await pipe.execute()
        views = {name: ChannelView() for name in self.channels}
        for raw in infos:
            if raw is None:
                continue
            for name, state in orjson.loads(raw).get("channels", {}).items():
                view = views.get(name)
                if view is not None and state == "available":
                    view.available += 1
                elif view is not None and state == "loading":
                    view.loading += 1
        for i, name in enumerate(self.channels):
            first = 2 * i + int(self.edge)
            length, pending = replies[first], replies[first + 1]["pending"]
            views[name].pending = pending
            views[name].waiting = max(0, length - pending)  # acked jobs are deleted: the rest wait or run
        self.views = views

    def status(self, name: str) -> ChannelStatus:
        """Whether `name` can take a stream now: a live worker serves it and its queue has room."""
        retry = self.settings.model_retry_after
        if not self.fresh:
            return ChannelStatus("unavailable", "the model tier's Redis is unreachable", retry)
        view = self.views[name]
        if not view.available:
            if view.loading:
                return ChannelStatus("loading", "the model workers are loading their models")
            return ChannelStatus("unavailable", "no model worker is alive for it (streamplex serve --role model)", retry)
        if view.waiting >= self.settings.model_max_queue:
            return ChannelStatus("unavailable", f"{view.waiting} jobs wait for a model worker (model_max_queue)", retry)
        return AVAILABLE

    def families(self) -> list[Metric]:
        """Per channel: jobs waiting for a worker, jobs running, live workers (the model tier's autoscaling signals)."""
        waiting = GaugeMetricFamily("streamplex_model_queue_depth", "Jobs of a remote channel waiting in Redis for a model worker.", labels=["channel"])
        pending = GaugeMetricFamily("streamplex_model_jobs_pending", "Jobs of a remote channel taken by a model worker and not yet done.", labels=["channel"])
        workers = GaugeMetricFamily("streamplex_model_workers", "Live model workers serving a remote channel (its model loaded).", labels=["channel"])
        for name, view in self.views.items():
            waiting.add_metric([name], view.waiting)
            pending.add_metric([name], view.pending)
            workers.add_metric([name], view.available)
        return [waiting, pending, workers]

    async def submit(self, channel: str, params: Any, ctx: StreamContext) -> tuple[str, bytes]:
        """Queue a job: (its id, its entry id in the job stream)."""
        job = secrets.token_hex(12)
        fields = {
            "job": job,
            "params": orjson.dumps(params),
            "tenant": ctx.tenant,
            "start": ctx.start,
            "positions": orjson.dumps(ctx.positions),
            "edge": self.node,
        }
        try:
            entry = cast("bytes", await self.redis.xadd(self.keys.jobs(channel), fields))  # type: ignore[arg-type]  # redis-py's field types are narrower than what it takes
        except (RedisError, OSError) as exc:
            raise ChannelError(ErrorCode.UNAVAILABLE, f"the model tier's Redis is unreachable: {exc}") from None
        log.info("%s job %s queued for a model worker", channel, job)
        return job, entry

    async def forward(self, job: str, ctx: StreamContext) -> None:
        """Hand the stream's pushed input to the job's worker, then mark its end."""
        key, cap = self.keys.input(job), self.settings.model_result_max
        ttl = int(self.settings.model_result_ttl * 1000)
        try:
            async for item in ctx.pushed():
                fields = {"k": "b", "d": item} if isinstance(item, bytes) else {"k": "j", "d": orjson.dumps(item)}
                await self.redis.xadd(key, fields, maxlen=cap, approximate=True)  # type: ignore[arg-type]
                await self.redis.pexpire(key, ttl)
            await self.redis.xadd(key, {"k": "e"})
            await self.redis.pexpire(key, ttl)
        except (RedisError, OSError) as exc:  # the results' reader ends the stream when Redis stays away
            log.warning("model job %s: pushed input not forwarded (%s)", job, exc)

    async def results(self, channel: str, job: str, entry: bytes, start: int) -> AsyncIterator[Checkpoint]:
        """The job's chunks from `start` on, each once and in order; returns at its end, or raises what it ended with."""
        out, last, expected, idle = self.keys.out(job), b"0-0", start, 0
        while True:
            try:
                reply = await self.redis.xread({out: last}, count=256, block=READ_BLOCK_MS)
            except (RedisError, OSError) as exc:
                raise ChannelError(ErrorCode.UNAVAILABLE, f"the model tier's Redis is unreachable: {exc}") from None
            if not reply:
                idle += 1
                if self.fresh and not (self.views[channel].available or self.views[channel].loading):
                    raise ChannelError(ErrorCode.UNAVAILABLE, "no model worker is alive to go on with this stream")
                if idle % LOST_CHECK_EVERY == 0 and not await self._exists(channel, entry, out):
                    raise ChannelError(ErrorCode.INTERNAL, "the model tier lost this stream's job (was Redis restarted?)")
                continue
            idle = 0
            for entry_id, fields in entries(reply):
                last = entry_id
                try:
                    seq, chunk, end = _result(fields)
                except (KeyError, ValueError) as exc:  # not what a worker writes: never forwarded
                    log.warning("%s job %s: malformed result entry %r dropped the stream (%s)", channel, job, entry_id, exc)
                    raise ChannelError(ErrorCode.INTERNAL, "the model tier returned a malformed result; see the server log") from None
                if chunk is not None:
                    if seq < expected:
                        continue
                    if seq > expected:
                        raise ChannelError(ErrorCode.INTERNAL, f"results {expected} to {seq - 1} were trimmed before this node read them (model_result_max)")
                    expected += 1
                    yield chunk
                    continue
                reason, code, message = end
                if reason == "complete":
                    return
                if reason == "producer_lost":
                    raise CannotGoOn(message)
                raise ChannelError(code, message)

    async def _exists(self, channel: str, entry: bytes, out: str) -> bool:
        """Whether the job is still queued or running, or has results to read."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xrange(self.keys.jobs(channel), entry, entry)
            pipe.exists(out)
            queued, results = await pipe.execute()
        return bool(queued) or bool(results)

    def cancel(self, job: str) -> None:
        """The client left: tell the job's worker to stop (in the background), and drop the job's streams."""
        task = asyncio.create_task(self._cancel(job), name=f"model-cancel:{job}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def finished(self, job: str) -> None:
        """The job ended and its results were read: drop its streams now rather than at their expiry."""
        task = asyncio.create_task(self._delete(self.keys.out(job), self.keys.input(job)), name=f"model-done:{job}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _delete(self, *keys: str) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.redis.delete(*keys)

    async def _cancel(self, job: str) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(self.keys.cancelled(job), "1", px=int(self.settings.model_result_ttl * 1000))
                pipe.publish(self.keys.cancel, job)
                pipe.delete(self.keys.out(job), self.keys.input(job))
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("could not cancel model job %s (%s); its worker stops when this node's sign of life expires", job, exc)


def _result(fields: dict[bytes, bytes]) -> tuple[int, Checkpoint | None, tuple[str, ErrorCode, str]]:
    """A result entry as (seq, the chunk, or None for the end and its reason, code and message); KeyError or ValueError
    when it is not what a worker writes."""
    if fields[b"k"] == b"c":
        return int(fields[b"s"]), Checkpoint(orjson.loads(fields[b"d"]), orjson.loads(fields[b"p"])), ("", ErrorCode.INTERNAL, "")
    if fields[b"k"] != b"e":
        raise ValueError(f"unknown kind {fields[b'k']!r}")
    reason = fields[b"r"].decode()
    if reason not in ("complete", "error", "producer_lost"):
        raise ValueError(f"unknown end reason {reason!r}")
    code = ErrorCode(fields[b"c"].decode()) if reason == "error" else ErrorCode.INTERNAL
    return 0, None, (reason, code, fields.get(b"m", b"").decode())


class RemoteChannel(Channel):
    """A channel whose streams run on model workers; made per channel by `remote()`, with that channel's params and flags."""

    inner: Channel
    client: ModelClient

    def status(self) -> ChannelStatus:
        return self.client.status(self.name)

    def check(self, params: Any) -> None:
        """Only the schema is checked here; the worker checks the rest (models, language pairs) and ends the stream with
        `invalid_params` when they fail."""

    async def start(self) -> None:
        await self.inner.start()
        type(self).Params = self.inner.Params  # a channel may refine its params model at start (translation's pairs)

    async def stop(self) -> None:
        await self.inner.stop()

    def restarts(self, params: Any) -> bool:
        return self.inner.restarts(params)

    async def stream(self, params: Any, ctx: StreamContext) -> AsyncIterator[Any]:
        status = self.status()
        if status.state != "available":
            raise ChannelError(ErrorCode.UNAVAILABLE, f"channel {self.name!r} is {status.state}: {status.reason}")
        job, entry = await self.client.submit(self.name, params.model_dump(mode="json"), ctx)
        forwarding = asyncio.create_task(self.client.forward(job, ctx), name=f"model-input:{job}") if self.accepts_push else None
        done = False
        try:
            async for chunk in self.client.results(self.name, job, entry, ctx.start):
                yield chunk
            done = True
        except (ChannelError, CannotGoOn):
            done = True
            raise
        finally:
            if forwarding is not None:
                forwarding.cancel()
            if done:
                self.client.finished(job)
            else:
                self.client.cancel(job)


def remote_capable(classes: dict[str, type[Channel]], names: set[str]) -> dict[str, type[Channel]]:
    """The channel classes `names` (`remote_channels`) name, or ValueError when one is unknown or cannot run on a model worker."""
    unknown = sorted(names - classes.keys())
    local = sorted(name for name in names & classes.keys() if not classes[name].remote)
    if unknown or local:
        capable = ", ".join(sorted(name for name, cls in classes.items() if cls.remote))
        problems = [f"no channel {', '.join(unknown)}"] * bool(unknown) + [f"{', '.join(local)} cannot run on a model worker"] * bool(local)
        raise ValueError(f"remote_channels: {'; '.join(problems)} (the channels that can: {capable})")
    return {name: classes[name] for name in sorted(names)}


def families(classes: dict[str, type[Channel]]) -> set[str]:
    """The engine families the channels' streams use."""
    return {family for cls in classes.values() for family in cls.engine_families}


def remote(inner: Channel, client: ModelClient) -> Channel:
    """`inner`'s channel as served by model workers: same name, params and flags, streams run elsewhere."""
    cls = type(inner)
    attributes = {
        "name": cls.name,
        "summary": cls.summary,
        "Params": inner.Params,
        "lossy": cls.lossy,
        "accepts_push": cls.accepts_push,
        "media": cls.media,
        "admin": cls.admin,
        "restartable": cls.restartable,
        "needs_positions": cls.needs_positions,
        "inner": inner,
        "client": client,
        "__doc__": cls.__doc__,
    }
    made: type[RemoteChannel] = type(f"Remote{cls.__name__}", (RemoteChannel,), attributes)
    return made(inner.services)
