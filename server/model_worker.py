"""A model worker (`streamplex serve --role model`): runs the jobs edge nodes queue for their remote channels.

It loads the models of the channels it serves, reads jobs with XREADGROUP (only while it has room for more), runs
each job's stream with the real channel, and writes each chunk with its checkpoint to the job's result stream; at
the end it acknowledges and deletes the job. Every quarter of `model_claim_idle` it renews its running jobs' idle
time (XCLAIM to itself) and claims, with XAUTOCLAIM, jobs idle longer than that: their worker died, and the job goes
on from its results' checkpoints as a stream taken over by another node does. A job whose client left (the edge's
cancel message, or the edge node's sign of life gone) is stopped, freeing its batch slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Iterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError, ResponseError

from streamplex.server.broker import MemoryBroker
from streamplex.server.channel import END_OF_INPUT, Binary, CannotGoOn, Channel, ChannelError, Checkpoint, Services, StreamContext, as_generator
from streamplex.server.config import Settings
from streamplex.server.engine import build_engine
from streamplex.server.engine.metrics import families as engine_families
from streamplex.server.hub import Hub
from streamplex.server.logbuffer import RingLogHandler
from streamplex.server.model_tier import BEAT, GROUP, WORKER_BEAT, WORKER_TTL, WRITE, Entries, Fields, Keys, entries
from streamplex.server.protocol import EndReason, ErrorCode
from streamplex.server.redis_broker import redis_options
from streamplex.server.registry import discover, instantiate
from streamplex.server.remote import ModelClient, families, remote_capable

log = logging.getLogger("streamplex")


@dataclass(eq=False)
class Job:
    """One job this worker runs."""

    channel: str
    entry: bytes
    id: str
    raw: dict[str, Any]
    tenant: str
    start: int
    positions: list[Any]
    edge: str
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    cancelled: bool = False  # its client left: acknowledged and dropped, not left for another worker

    @classmethod
    def of(cls, channel: str, entry: bytes, fields: Fields) -> Job:
        return cls(
            channel,
            entry,
            fields[b"job"].decode(),
            orjson.loads(fields[b"params"]),
            fields[b"tenant"].decode(),
            int(fields[b"start"]),
            orjson.loads(fields[b"positions"]),
            fields[b"edge"].decode(),
        )


class ModelWorker:
    """Takes jobs of its channels from Redis and runs them, up to `model_worker_jobs` at once."""

    def __init__(self, settings: Settings, ring: RingLogHandler) -> None:
        self.settings = settings
        self.name = settings.node
        self.keys = Keys(settings.redis_prefix)
        classes = discover()
        served = remote_capable(classes, settings.remote_names())
        self.engine = build_engine(settings, without=families(classes) - families(served))
        hub = Hub(MemoryBroker())
        services = Services(settings=settings, feeds=hub, logs=ring, stats=dict, engine=self.engine)
        self.channels: dict[str, Channel] = instantiate(served, services)
        self.redis = aioredis.Redis.from_url(settings.redis_url, **redis_options(settings))
        self.queues = ModelClient(settings, sorted(self.channels), edge=False)  # what the autoscaling metrics read
        self._write = self.redis.register_script(WRITE)
        self._beat = self.redis.register_script(BEAT)
        self.jobs: dict[str, Job] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.room = asyncio.Condition()
        self.stopping = asyncio.Event()
        self.started = time.monotonic()
        self.done = 0
        self.claimed = 0

    @property
    def free(self) -> int:
        return self.settings.model_worker_jobs - len(self.jobs)

    async def run(self) -> None:
        """Serve until `stopping` is set, then let running jobs finish within `shutdown_timeout`."""
        await self.engine.start()
        for channel in self.channels.values():
            await channel.start()
        await self.queues.start()
        for name in self.channels:
            with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
                await self.redis.xgroup_create(self.keys.jobs(name), GROUP, id="0", mkstream=True)
        tasks = [
            asyncio.create_task(self._heartbeat(), name="model-heartbeat"),
            asyncio.create_task(self._keep(), name="model-keep"),
            asyncio.create_task(self._cancellations(), name="model-cancellations"),
            *(asyncio.create_task(self._take(name), name=f"model-take:{name}") for name in self.channels),
        ]
        log.info("model worker %s serving %s", self.name, ", ".join(self.channels))
        await self.stopping.wait()
        log.info("model worker %s stopping: %d job(s) running", self.name, len(self.jobs))
        for task in tasks[3:]:
            task.cancel()
        running = [job.task for job in self.jobs.values() if job.task is not None]
        if running:
            _, left = await asyncio.wait(running, timeout=self.settings.shutdown_timeout)
            for task in left:  # left pending in Redis: another worker claims them
                task.cancel()
            await asyncio.gather(*left, return_exceptions=True)
        for task in tasks[:3]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(RedisError, OSError):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zrem(self.keys.workers, self.name)
                pipe.hdel(self.keys.info, self.name)
                await pipe.execute()
        await self.redis.aclose()
        await self.queues.close()
        await self.engine.stop()
        for channel in self.channels.values():
            await channel.stop()

    async def _heartbeat(self) -> None:
        while True:
            states = {name: channel.status().state for name, channel in self.channels.items()}
            try:
                await self._beat(keys=[self.keys.workers, self.keys.info], args=[self.name, orjson.dumps({"channels": states}), int(WORKER_TTL * 1000)])
            except (RedisError, OSError) as exc:
                log.warning("model worker heartbeat failed: %s", exc)
            await asyncio.sleep(WORKER_BEAT)

    async def _take(self, name: str) -> None:
        """Read new jobs of channel `name` while there is room and its model is ready."""
        channel, key = self.channels[name], self.keys.jobs(name)
        while True:
            async with self.room:
                await self.room.wait_for(lambda: self.free > 0)
            if channel.status().state != "available":
                await asyncio.sleep(0.2)
                continue
            try:
                reply = await self.redis.xreadgroup(GROUP, self.name, {key: ">"}, count=self.free, block=1000)
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    await self.redis.xgroup_create(key, GROUP, id="0", mkstream=True)
                    continue
                raise
            except (RedisError, OSError) as exc:
                log.warning("model worker cannot read jobs: %s", exc)
                await asyncio.sleep(1)
                continue
            for entry, fields in entries(reply):
                self._begin(name, entry, fields, claimed=False)

    async def _keep(self) -> None:
        """Renew the running jobs' idle time, stop those whose client left, and claim jobs whose worker died."""
        period = self.settings.model_claim_idle / 4
        while True:
            await asyncio.sleep(period)
            try:
                await self._keep_once()
            except (RedisError, OSError) as exc:
                log.warning("model worker cannot renew its jobs: %s", exc)

    async def _keep_once(self) -> None:
        jobs = list(self.jobs.values())
        if jobs:
            edges = sorted({job.edge for job in jobs})
            async with self.redis.pipeline(transaction=False) as pipe:
                for name in self.channels:
                    mine: list[Any] = [job.entry for job in jobs if job.channel == name]
                    if mine:
                        pipe.xclaim(self.keys.jobs(name), GROUP, self.name, 0, mine, justid=True)
                pipe.mget([self.keys.cancelled(job.id) for job in jobs])
                pipe.mget([self.keys.edge(edge) for edge in edges])
                replies = await pipe.execute()
            alive = {edge for edge, beat in zip(edges, replies[-1], strict=True) if beat is not None}
            for job, cancelled in zip(jobs, replies[-2], strict=True):
                if cancelled is not None or job.edge not in alive:
                    why = "its client left" if cancelled is not None else f"its node {job.edge} is gone"
                    self._stop(job, why)
        for name, channel in self.channels.items():
            if self.free <= 0 or channel.status().state != "available":
                continue
            key = self.keys.jobs(name)
            reply = await self.redis.xautoclaim(key, GROUP, self.name, int(self.settings.model_claim_idle * 1000), "0-0", count=self.free)
            for entry, fields in cast("list[tuple[bytes, Fields | None]]", reply[1]):  # a deleted entry comes without fields
                if fields:
                    self.claimed += 1
                    self._begin(name, entry, fields, claimed=True)

    async def _cancellations(self) -> None:
        """Stop a job as soon as its edge node says its client left (`_keep` catches what is missed while Redis is away)."""
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(self.keys.cancel)
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            for job in list(self.jobs.values()):
                                if job.id == message["data"].decode():
                                    self._stop(job, "its client left")
            except (RedisError, OSError) as exc:
                log.warning("model worker: cancel messages interrupted (%s); listening again", exc)
                await asyncio.sleep(1)

    def _stop(self, job: Job, why: str) -> None:
        if job.task is not None and not job.task.done() and not job.cancelled:
            log.info("%s job %s stops: %s", job.channel, job.id, why)
            job.cancelled = True
            job.task.cancel()

    def _begin(self, name: str, entry: bytes, fields: Fields, claimed: bool) -> None:
        try:
            job = Job.of(name, entry, fields)
        except (KeyError, ValueError) as exc:
            log.warning("dropping malformed %s job %s: %s", name, entry, exc)
            task = asyncio.create_task(self._ack(name, entry), name=f"model-drop:{entry!r}")
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return
        if job.id in self.jobs:
            return
        self.jobs[job.id] = job
        job.task = asyncio.create_task(self._run(job, claimed), name=f"model-job:{job.id}")
        job.task.add_done_callback(lambda _: self._forget(job.id))

    def _forget(self, job: str) -> None:
        self.jobs.pop(job, None)
        task = asyncio.get_running_loop().create_task(self._notify())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _notify(self) -> None:
        async with self.room:
            self.room.notify_all()

    async def _ack(self, name: str, entry: bytes) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(self.keys.jobs(name), GROUP, entry)
            pipe.xdel(self.keys.jobs(name), entry)
            await pipe.execute()

    async def _put(self, job: Job, *fields: Any) -> bool:
        """Append to the job's results while this worker owns the job; False once another worker took it."""
        ttl = int(self.settings.model_result_ttl * 1000)
        written = await self._write(keys=[self.keys.owner(job.id), self.keys.out(job.id)], args=[self.name, self.settings.model_result_max, ttl, *fields])
        return bool(written)

    async def _history(self, job: Job) -> tuple[int, list[Any]] | None:
        """The chunks a claimed job's dead worker delivered: (next seq, every delivered chunk's position); None if it had ended."""
        start, positions = job.start, list(job.positions)
        for _, fields in cast("Entries", await self.redis.xrange(self.keys.out(job.id))):
            if fields[b"k"] != b"c":
                return None
            if int(fields[b"s"]) != start:
                raise CannotGoOn("the job's results were trimmed in Redis (model_result_max)")
            positions.append(orjson.loads(fields[b"p"]))
            start += 1
        return start, positions

    async def _run(self, job: Job, claimed: bool) -> None:
        channel = self.channels[job.channel]
        inbox: asyncio.Queue[Any] = asyncio.Queue(self.settings.push_queue + 1)
        feeding: asyncio.Task[None] | None = None
        reason, code, message = EndReason.COMPLETE, "", ""
        try:
            if await self.redis.exists(self.keys.cancelled(job.id)):
                job.cancelled = True
                await self._ack(job.channel, job.entry)
                return
            await self.redis.set(self.keys.owner(job.id), self.name, px=int(self.settings.model_result_ttl * 1000))
            start, positions = job.start, job.positions
            if claimed:
                history = await self._history(job)
                if history is None:  # it had ended; only the acknowledgement was missing
                    await self._ack(job.channel, job.entry)
                    return
                start, positions = history
                log.info("%s job %s claimed from a worker that stopped; goes on at chunk %d", job.channel, job.id, start)
            params = channel.parse(job.raw)
            if start > 0 and not channel.restarts(params):
                raise CannotGoOn("its output with these params may differ from run to run")
            if channel.accepts_push:
                feeding = asyncio.create_task(self._feed(job, inbox), name=f"model-feed:{job.id}")
            ctx = StreamContext(job.id, inbox, None, start, tenant=job.tenant, positions=positions)
            seq = start
            async with aclosing(as_generator(channel.stream(params, ctx))) as chunks:
                async for item in chunks:
                    data, position = (item.data, item.position) if isinstance(item, Checkpoint) else (item, None)
                    if isinstance(data, Binary):
                        raise ChannelError(ErrorCode.INTERNAL, "binary chunks cannot travel through the model tier")
                    if not await self._put(job, "k", "c", "s", seq, "d", orjson.dumps(data), "p", orjson.dumps(position)):
                        log.warning("%s job %s was taken by another worker; this one stops", job.channel, job.id)
                        return
                    seq += 1
        except ChannelError as exc:
            reason, code, message = EndReason.ERROR, str(exc.code), exc.message
        except CannotGoOn as exc:
            log.warning("%s job %s cannot go on on this worker: %s", job.channel, job.id, exc)
            reason, message = EndReason.PRODUCER_LOST, str(exc)
        except asyncio.CancelledError:
            if job.cancelled:
                await self._drop(job)
                return
            raise
        except (RedisError, OSError) as exc:
            log.warning("%s job %s: Redis failed (%s); another worker claims it", job.channel, job.id, exc)
            return
        except Exception:
            log.exception("%s job %s failed", job.channel, job.id)
            reason, code, message = EndReason.ERROR, str(ErrorCode.INTERNAL), "internal error; see the model worker's log"
        finally:
            if feeding is not None:
                feeding.cancel()
        try:
            if await self._put(job, "k", "e", "r", str(reason), "c", code, "m", message):
                await self._ack(job.channel, job.entry)
                await self.redis.delete(self.keys.owner(job.id))
                self.done += 1
        except (RedisError, OSError) as exc:
            log.warning("%s job %s ended but Redis failed (%s); another worker claims it", job.channel, job.id, exc)

    async def _drop(self, job: Job) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._ack(job.channel, job.entry)
            await self.redis.delete(self.keys.owner(job.id), self.keys.out(job.id), self.keys.input(job.id))

    async def _feed(self, job: Job, inbox: asyncio.Queue[Any]) -> None:
        """Move the job's pushed input from Redis into the channel's inbox (waiting while the inbox is full)."""
        key, last = self.keys.input(job.id), b"0-0"
        while True:
            for entry, fields in entries(await self.redis.xread({key: last}, count=16, block=1000)):
                last, kind = entry, fields[b"k"]
                if kind == b"e":
                    await inbox.put(END_OF_INPUT)
                    return
                await inbox.put(fields[b"d"] if kind == b"b" else orjson.loads(fields[b"d"]))

    def demand(self) -> float:
        """This worker's share of the work: its running jobs plus the waiting jobs of its channels split over the live
        workers. Averaged over the workers it is all the work per worker, which the model tier's HPA holds at its target."""
        views = self.queues.views.values()
        waiting = sum(view.waiting for view in views)
        return len(self.jobs) + waiting / max(1, max((view.available for view in views), default=1))

    def collect(self) -> Iterator[Metric]:
        """Scrape-time families: jobs running and done, this worker's demand, the queues, the engine's figures."""
        yield GaugeMetricFamily(
            "streamplex_model_worker_demand",
            "Jobs running on this model worker plus its share of the jobs waiting for one (the model tier's autoscaling signal).",
            value=self.demand(),
        )
        yield from self.queues.families()
        yield GaugeMetricFamily("streamplex_model_worker_jobs", "Jobs this model worker runs now.", value=len(self.jobs))
        yield CounterMetricFamily("streamplex_model_worker_jobs_done", "Jobs this model worker finished.", value=self.done)
        yield CounterMetricFamily("streamplex_model_worker_jobs_claimed", "Jobs this model worker claimed from workers that stopped.", value=self.claimed)
        yield from engine_families(self.engine.metrics())
        yield from self.engine.histograms.collect()


class _Families(Collector):
    def __init__(self, worker: ModelWorker) -> None:
        self.worker = worker

    def collect(self) -> Iterator[Metric]:
        return self.worker.collect()


def run_worker(settings: Settings, ring: RingLogHandler) -> int:
    """Run a model worker until SIGTERM or SIGINT; its metrics are served on `port`."""

    async def main() -> None:
        worker = ModelWorker(settings, ring)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stopping.set)
        registry = CollectorRegistry()
        registry.register(_Families(worker))
        server, thread = start_http_server(settings.port, addr=settings.host, registry=registry)
        try:
            await worker.run()
        finally:
            server.shutdown()
            thread.join(2)

    asyncio.run(main())
    return 0
