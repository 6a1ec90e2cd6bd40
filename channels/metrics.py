"""metrics: the machine (CPU, memory, disk, network, GPUs) and the server's own counters.

One sampler (a hub producer) reads raw cumulative counters at the shortest interval any
subscriber asked for; each subscriber turns the raw samples into rates over its own interval.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any, Literal, get_args

import psutil
from pydantic import BaseModel, ConfigDict, Field, JsonValue, TypeAdapter

from streamplex.channels.gpu import GpuProbe
from streamplex.server.channel import Channel, ChannelError, Gap, ParamsModel, Publish, Shared, StreamContext
from streamplex.server.protocol import ErrorCode

TOPIC = "metrics"
VIEW_CACHE = 256


Group = Literal["cpu", "memory", "swap", "disk", "network", "process", "gpu", "engine", "server"]


class MetricsParams(ParamsModel):
    interval_ms: int = Field(1000, le=3_600_000, description="Milliseconds between samples (at least the server's minimum, 100 by default).")
    fields: list[Group] | None = Field(None, min_length=1, description="Only these groups (besides `time` and `interval_s`); all when omitted.")


GROUPS: tuple[Group, ...] = get_args(Group)
SLOW: frozenset[str] = frozenset({"disk", "gpu"})
"""Groups whose reads may wait on a device or a driver (statvfs, NVML): sampled in a thread. The others read
procfs or the server's own state, which costs less on the event loop than a thread handoff (~0.3 ms a sample)."""


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Cpu(_Part):
    busy: list[tuple[float, float]] = Field(max_length=4096)
    load: list[float] = Field(max_length=3)


class _Memory(_Part):
    total: int
    available: int
    used: int
    percent: float


class _Swap(_Part):
    total: int
    used: int
    percent: float


class _DiskUsage(_Part):
    total: int
    used: int
    free: int
    percent: float


class _Disk(_Part):
    usage: _DiskUsage
    io: tuple[int, int] | None


class _Process(_Part):
    rss_bytes: int
    threads: int
    fds: int | None
    cpu_seconds: float


class _Server(_Part):
    connections: int
    streams: dict[str, int] = Field(max_length=256)
    frames_out: int
    bytes_out: int
    frames_in: int
    dropped: int
    errors: int


class RawSample(_Part):
    """A raw sample as `Sampler.sample` makes it: the fields `derive` reads, each group optional."""

    node: str = Field(max_length=256)
    t: float
    time: float
    cpu: _Cpu | None = None
    memory: _Memory | None = None
    swap: _Swap | None = None
    disk: _Disk | None = None
    network: tuple[int, int, int, int] | None = None
    process: _Process | None = None
    gpu: JsonValue = None
    engine: dict[str, JsonValue] | None = None
    server: _Server | None = None


_SAMPLE_PAIR = TypeAdapter(tuple[RawSample, RawSample])


def check_samples(message: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Another node's published (previous, current) samples, reduced to what a sample holds; raises pydantic's ValidationError otherwise."""
    prev, cur = _SAMPLE_PAIR.validate_python(message)
    return prev.model_dump(exclude_unset=True), cur.model_dump(exclude_unset=True)


class Sampler:
    """Reads raw machine and server counters, only for the groups asked for."""

    def __init__(self, stats: Callable[[], dict[str, Any]], engine: Callable[[], dict[str, Any]] = dict, disk_path: str = "/", node: str = "") -> None:
        self.node = node
        self.stats = stats
        self.engine = engine
        self.disk_path = disk_path
        self.process = psutil.Process()
        self.gpu = GpuProbe()

    def sample(self, groups: Collection[str] = GROUPS) -> dict[str, Any]:
        """One raw sample of `groups`: cumulative counters and instantaneous gauges (blocking when `groups` meet SLOW)."""
        raw: dict[str, Any] = {"node": self.node, "t": time.monotonic(), "time": time.time()}
        for group in groups:
            raw[group] = getattr(self, f"_read_{group}")()
        return raw

    def _read_cpu(self) -> dict[str, Any]:
        busy = [(t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0), sum(t)) for t in psutil.cpu_times(percpu=True)]
        return {"busy": busy, "load": list(os.getloadavg())}

    def _read_memory(self) -> dict[str, Any]:
        return psutil.virtual_memory()._asdict()

    def _read_swap(self) -> dict[str, Any]:
        return psutil.swap_memory()._asdict()

    def _read_disk(self) -> dict[str, Any]:
        io = psutil.disk_io_counters()
        return {"usage": psutil.disk_usage(self.disk_path)._asdict(), "io": (io.read_bytes, io.write_bytes) if io else None}

    def _read_network(self) -> tuple[int, int, int, int]:
        net = psutil.net_io_counters()
        return (net.bytes_sent, net.bytes_recv, net.packets_sent, net.packets_recv)

    def _read_process(self) -> dict[str, Any]:
        proc = self.process
        with proc.oneshot():
            cpu = proc.cpu_times()
            return {
                "rss_bytes": proc.memory_info().rss,
                "threads": proc.num_threads(),
                "fds": proc.num_fds() if hasattr(proc, "num_fds") else None,
                "cpu_seconds": cpu.user + cpu.system,
            }

    def _read_gpu(self) -> Any:
        return self.gpu.read()

    def _read_engine(self) -> dict[str, Any]:
        return self.engine()

    def _read_server(self) -> dict[str, Any]:
        return self.stats()


def _rate(new: float, old: float, dt: float) -> float:
    return round(max(0.0, new - old) / dt, 1) if dt > 0 else 0.0


def _busy_percent(new: tuple[float, float], old: tuple[float, float]) -> float:
    total = new[1] - old[1]
    return round(100.0 * (new[0] - old[0]) / total, 1) if total > 0 else 0.0


def _cpu(cur: dict[str, Any], prev: dict[str, Any], dt: float) -> dict[str, Any]:
    per_core = [_busy_percent(n, o) for n, o in zip(cur["busy"], prev["busy"], strict=False)]
    total = _busy_percent((sum(n[0] for n in cur["busy"]), sum(n[1] for n in cur["busy"])), (sum(o[0] for o in prev["busy"]), sum(o[1] for o in prev["busy"])))
    return {"percent": total, "per_core": per_core, "count": len(per_core), "load": [round(x, 2) for x in cur["load"]]}


def _memory(cur: dict[str, Any], prev: dict[str, Any], dt: float) -> dict[str, Any]:
    return {"total_bytes": cur["total"], "available_bytes": cur["available"], "used_bytes": cur["used"], "percent": cur["percent"]}


def _swap(cur: dict[str, Any], prev: dict[str, Any], dt: float) -> dict[str, Any]:
    return {"total_bytes": cur["total"], "used_bytes": cur["used"], "percent": cur["percent"]}


def _disk(cur: dict[str, Any], prev: dict[str, Any], dt: float) -> dict[str, Any]:
    usage = cur["usage"]
    out: dict[str, Any] = {"path": "/", "total_bytes": usage["total"], "used_bytes": usage["used"], "free_bytes": usage["free"], "percent": usage["percent"]}
    if cur["io"] and prev["io"]:
        out["read_bytes_per_s"] = _rate(cur["io"][0], prev["io"][0], dt)
        out["write_bytes_per_s"] = _rate(cur["io"][1], prev["io"][1], dt)
    return out


def _network(cur: tuple[int, ...], prev: tuple[int, ...], dt: float) -> dict[str, Any]:
    names = ("sent_bytes_per_s", "recv_bytes_per_s", "sent_packets_per_s", "recv_packets_per_s")
    return {name: _rate(n, o, dt) for name, n, o in zip(names, cur, prev, strict=True)}


def _process(cur: dict[str, Any], prev: dict[str, Any], dt: float) -> dict[str, Any]:
    busy = round(100.0 * max(0.0, cur["cpu_seconds"] - prev["cpu_seconds"]) / dt, 1) if dt > 0 else 0.0
    return {"rss_bytes": cur["rss_bytes"], "threads": cur["threads"], "fds": cur["fds"], "cpu_percent": busy}


def _as_is(cur: Any, prev: Any, dt: float) -> Any:
    return cur


def _server(cur: dict[str, Any], prev: dict[str, Any], dt: float) -> dict[str, Any]:
    return {
        "connections": cur["connections"],
        "streams": cur["streams"],
        "frames_out_per_s": _rate(cur["frames_out"], prev["frames_out"], dt),
        "bytes_out_per_s": _rate(cur["bytes_out"], prev["bytes_out"], dt),
        "frames_in_per_s": _rate(cur["frames_in"], prev["frames_in"], dt),
        "dropped_total": cur["dropped"],
        "dropped_per_s": _rate(cur["dropped"], prev["dropped"], dt),
        "errors_total": cur["errors"],
    }


DERIVE: dict[str, Callable[[Any, Any, float], Any]] = {
    "cpu": _cpu,
    "memory": _memory,
    "swap": _swap,
    "disk": _disk,
    "network": _network,
    "process": _process,
    "gpu": _as_is,
    "engine": _as_is,
    "server": _server,
}


def derive(prev: dict[str, Any], cur: dict[str, Any], groups: Collection[str] = GROUPS) -> dict[str, Any]:
    """The published metrics of `groups` (those both samples hold): gauges from `cur`, rates over the span from `prev` to `cur`."""
    dt = cur["t"] - prev["t"]
    out: dict[str, Any] = {"node": cur.get("node", ""), "time": round(cur["time"], 3), "interval_s": round(dt, 3)}
    for group in groups:
        if group in cur and group in prev:
            out[group] = DERIVE[group](cur[group], prev[group], dt)
    return out


class MetricsChannel(Channel):
    name = "metrics"
    summary = "CPU, memory, swap, disk, network, the server process, GPUs (NVML) and the server's counters, every `interval_ms`."
    Params = MetricsParams
    lossy = True

    def __init__(self, services: Any) -> None:
        super().__init__(services)
        self._intervals: Counter[float] = Counter()
        self._wants: Counter[tuple[str, ...]] = Counter()  # each stream's groups; () is all
        self._views: dict[tuple[str, float, float, tuple[str, ...]], Shared] = {}
        self._last_view: tuple[Any, ...] = (None, None, None, None)  # (start, end, fields, view): most streams ask for the same in a row

    def _view(self, node: str, last: dict[str, Any], cur: dict[str, Any], fields: tuple[str, ...]) -> Shared:
        """The chunk for `node`'s span `last`..`cur` with `fields`, derived and encoded once for every stream that sends it."""
        start, end, wanted, view = self._last_view
        if start is last and end is cur and wanted == fields:
            return view
        key = (node, last["t"], cur["t"], fields)
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= VIEW_CACHE:
                self._views.clear()
            data = derive(last, cur, fields or GROUPS)
            view = self._views[key] = Shared(data)
        self._last_view = (last, cur, fields, view)
        return view

    def check(self, params: MetricsParams) -> None:
        floor = self.settings.metrics_min_interval_ms
        if params.interval_ms < floor:
            raise ChannelError(
                ErrorCode.INVALID_PARAMS,
                f"interval_ms must be at least {floor}",
                [{"field": "interval_ms", "message": f"at least {floor}", "type": "greater_than_equal"}],
            )

    async def start(self) -> None:
        self.services.feeds.provide(TOPIC, self._sample_forever)
        self.services.feeds.accept(TOPIC, check_samples)

    def _groups(self) -> Collection[str]:
        """What the sampler reads: the groups any stream here asked for (all when one asked for all, or none is here)."""
        if not self._wants or () in self._wants:
            return GROUPS
        return {group for fields in self._wants for group in fields}

    async def _sample(self, sampler: Sampler) -> dict[str, Any]:
        groups = self._groups()
        if SLOW.isdisjoint(groups):
            return sampler.sample(groups)
        return await asyncio.to_thread(sampler.sample, groups)

    async def _sample_forever(self, publish: Publish) -> None:
        engine = self.services.engine
        sampler = Sampler(self.services.stats, engine.metrics if engine is not None else dict, node=self.settings.node)
        prev = await self._sample(sampler)
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            # On a fixed schedule (the time spent sampling does not add up), at the shortest interval asked for now.
            due = max(due + min(self._intervals, default=1.0), loop.time())
            await asyncio.sleep(due - loop.time())
            cur = await self._sample(sampler)
            publish((prev, cur))
            prev = cur

    async def stream(self, params: MetricsParams, ctx: StreamContext) -> AsyncIterator[Any]:
        interval = params.interval_ms / 1000
        fields = tuple(sorted(set(params.fields or ())))
        wanted = fields or GROUPS
        self._intervals[interval] += 1
        self._wants[fields] += 1
        try:
            last: dict[str, dict[str, Any]] = {}

            def pick(message: Any) -> Shared | None:
                """This stream's chunk for a sample, if its interval has passed (rates are per node)."""
                if isinstance(message, Gap):
                    return None
                prev, cur = message
                node = cur.get("node", "")
                start = last.get(node)
                if start is None:
                    # The first span starts at the sample before; if that was read before this stream asked
                    # for its groups, the first chunk waits for the next span.
                    start = last[node] = prev if all(group in prev for group in wanted) else cur
                if cur["t"] - start["t"] < interval * 0.95:
                    return None
                last[node] = cur
                return self._view(node, start, cur, fields)

            emit = ctx.emit
            if emit is not None:
                # Each sample goes to this stream in the sampler's own stack: no task switch per chunk.
                def sink(message: Any) -> None:
                    if (chunk := pick(message)) is not None:
                        emit(chunk)

                async with self.services.feeds.subscribe(TOPIC, self._sample_forever, sink=sink):
                    await asyncio.get_running_loop().create_future()  # until the stream is cancelled
            else:
                # Samples come from every node sharing the broker (see server/redis_broker.py).
                async with self.services.feeds.subscribe(TOPIC, self._sample_forever, depth=16) as samples:
                    async for message in samples:
                        if (chunk := pick(message)) is not None:
                            yield chunk
        finally:
            self._intervals[interval] -= 1
            if not self._intervals[interval]:
                del self._intervals[interval]
            self._wants[fields] -= 1
            if not self._wants[fields]:
                del self._wants[fields]
