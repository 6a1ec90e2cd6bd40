"""metrics: the machine (CPU, memory, disk, network, GPUs) and the server's own counters.

One sampler (a hub producer) reads raw cumulative counters at the shortest interval any
subscriber asked for; each subscriber turns the raw samples into rates over its own interval.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import psutil
from pydantic import Field

from channels.base import Channel, ChannelError, Gap, ParamsModel, Publish, Shared, StreamContext
from channels.gpu import GpuProbe
from server.protocol import ErrorCode

TOPIC = "metrics"
VIEW_CACHE = 256


Group = Literal["cpu", "memory", "swap", "disk", "network", "process", "gpu", "engine", "server"]


class MetricsParams(ParamsModel):
    interval_ms: int = Field(1000, le=3_600_000, description="Milliseconds between samples (at least the server's minimum, 100 by default).")
    fields: list[Group] | None = Field(None, min_length=1, description="Only these groups (besides `time` and `interval_s`); all when omitted.")


class Sampler:
    """Reads raw machine and server counters."""

    def __init__(self, stats: Callable[[], dict[str, Any]], engine: Callable[[], dict[str, Any]] = dict, disk_path: str = "/", node: str = "") -> None:
        self.node = node
        self.stats = stats
        self.engine = engine
        self.disk_path = disk_path
        self.process = psutil.Process()
        self.gpu = GpuProbe()

    def sample(self) -> dict[str, Any]:
        """One raw sample: cumulative counters and instantaneous gauges (blocking; run in a thread)."""
        disk_io = psutil.disk_io_counters()
        net = psutil.net_io_counters()
        proc = self.process
        with proc.oneshot():
            cpu = proc.cpu_times()
            process = {
                "rss_bytes": proc.memory_info().rss,
                "threads": proc.num_threads(),
                "fds": proc.num_fds() if hasattr(proc, "num_fds") else None,
                "cpu_seconds": cpu.user + cpu.system,
            }
        return {
            "node": self.node,
            "t": time.monotonic(),
            "time": time.time(),
            "cpu": [(t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0), sum(t)) for t in psutil.cpu_times(percpu=True)],
            "load": list(os.getloadavg()),
            "memory": psutil.virtual_memory()._asdict(),
            "swap": psutil.swap_memory()._asdict(),
            "disk": psutil.disk_usage(self.disk_path)._asdict(),
            "disk_io": (disk_io.read_bytes, disk_io.write_bytes) if disk_io else None,
            "net": (net.bytes_sent, net.bytes_recv, net.packets_sent, net.packets_recv),
            "process": process,
            "gpu": self.gpu.read(),
            "server": self.stats(),
            "engine": self.engine(),
        }


def _rate(new: float, old: float, dt: float) -> float:
    return round(max(0.0, new - old) / dt, 1) if dt > 0 else 0.0


def _busy_percent(new: tuple[float, float], old: tuple[float, float]) -> float:
    total = new[1] - old[1]
    return round(100.0 * (new[0] - old[0]) / total, 1) if total > 0 else 0.0


def derive(prev: dict[str, Any], cur: dict[str, Any]) -> dict[str, Any]:
    """The published metrics: gauges from `cur`, rates over the span from `prev` to `cur`."""
    dt = cur["t"] - prev["t"]
    per_core = [_busy_percent(n, o) for n, o in zip(cur["cpu"], prev["cpu"], strict=False)]
    total = (sum(n[0] for n in cur["cpu"]) - sum(o[0] for o in prev["cpu"]), sum(n[1] for n in cur["cpu"]) - sum(o[1] for o in prev["cpu"]))
    mem, swap, disk = cur["memory"], cur["swap"], cur["disk"]
    disk_out: dict[str, Any] = {"path": "/", "total_bytes": disk["total"], "used_bytes": disk["used"], "free_bytes": disk["free"], "percent": disk["percent"]}
    if cur["disk_io"] and prev["disk_io"]:
        disk_out["read_bytes_per_s"] = _rate(cur["disk_io"][0], prev["disk_io"][0], dt)
        disk_out["write_bytes_per_s"] = _rate(cur["disk_io"][1], prev["disk_io"][1], dt)
    proc, server, old_server = cur["process"], cur["server"], prev["server"]
    return {
        "node": cur.get("node", ""),
        "time": round(cur["time"], 3),
        "interval_s": round(dt, 3),
        "cpu": {"percent": round(100.0 * total[0] / total[1], 1) if total[1] > 0 else 0.0, "per_core": per_core, "count": len(per_core), "load": [round(x, 2) for x in cur["load"]]},
        "memory": {"total_bytes": mem["total"], "available_bytes": mem["available"], "used_bytes": mem["used"], "percent": mem["percent"]},
        "swap": {"total_bytes": swap["total"], "used_bytes": swap["used"], "percent": swap["percent"]},
        "disk": disk_out,
        "network": {
            "sent_bytes_per_s": _rate(cur["net"][0], prev["net"][0], dt),
            "recv_bytes_per_s": _rate(cur["net"][1], prev["net"][1], dt),
            "sent_packets_per_s": _rate(cur["net"][2], prev["net"][2], dt),
            "recv_packets_per_s": _rate(cur["net"][3], prev["net"][3], dt),
        },
        "process": {
            "rss_bytes": proc["rss_bytes"],
            "threads": proc["threads"],
            "fds": proc["fds"],
            "cpu_percent": round(100.0 * max(0.0, proc["cpu_seconds"] - prev["process"]["cpu_seconds"]) / dt, 1) if dt > 0 else 0.0,
        },
        "gpu": cur["gpu"],
        "engine": cur["engine"],
        "server": {
            "connections": server["connections"],
            "streams": server["streams"],
            "frames_out_per_s": _rate(server["frames_out"], old_server["frames_out"], dt),
            "bytes_out_per_s": _rate(server["bytes_out"], old_server["bytes_out"], dt),
            "frames_in_per_s": _rate(server["frames_in"], old_server["frames_in"], dt),
            "dropped_total": server["dropped"],
            "dropped_per_s": _rate(server["dropped"], old_server["dropped"], dt),
            "errors_total": server["errors"],
        },
    }


class MetricsChannel(Channel):
    name = "metrics"
    summary = "CPU, memory, swap, disk, network, the server process, GPUs (NVML) and the server's counters, every `interval_ms`."
    Params = MetricsParams
    lossy = True

    def __init__(self, services: Any) -> None:
        super().__init__(services)
        self._intervals: Counter[float] = Counter()
        self._views: dict[tuple[str, float, float, tuple[str, ...]], Shared] = {}

    def _view(self, node: str, last: dict[str, Any], cur: dict[str, Any], fields: tuple[str, ...]) -> Shared:
        """The chunk for `node`'s span `last`..`cur` with `fields`, derived and encoded once for every stream that sends it."""
        key = (node, last["t"], cur["t"], fields)
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= VIEW_CACHE:
                self._views.clear()
            data = derive(last, cur)
            if fields:
                data = {k: v for k, v in data.items() if k in fields or k in ("time", "interval_s")}
            view = self._views[key] = Shared(data)
        return view

    def check(self, params: MetricsParams) -> None:
        floor = self.settings.metrics_min_interval_ms
        if params.interval_ms < floor:
            raise ChannelError(ErrorCode.INVALID_PARAMS, f"interval_ms must be at least {floor}", [{"field": "interval_ms", "message": f"at least {floor}", "type": "greater_than_equal"}])

    async def start(self) -> None:
        self.services.feeds.provide(TOPIC, self._sample_forever)

    async def _sample_forever(self, publish: Publish) -> None:
        engine = self.services.engine
        sampler = Sampler(self.services.stats, engine.metrics if engine is not None else dict, node=self.settings.node)
        prev = await asyncio.to_thread(sampler.sample)
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            # On a fixed schedule (the time spent sampling does not add up), at the shortest interval asked for now.
            due = max(due + min(self._intervals, default=1.0), loop.time())
            await asyncio.sleep(due - loop.time())
            cur = await asyncio.to_thread(sampler.sample)
            publish((prev, cur))
            prev = cur

    async def stream(self, params: MetricsParams, ctx: StreamContext) -> AsyncIterator[Any]:
        interval = params.interval_ms / 1000
        fields = tuple(sorted(set(params.fields or ())))
        self._intervals[interval] += 1
        try:
            # Samples come from every node sharing the broker (see server/redis_broker.py); rates are per node.
            async with self.services.feeds.subscribe(TOPIC, self._sample_forever, depth=16) as samples:
                last: dict[str, dict[str, Any]] = {}
                async for message in samples:
                    if isinstance(message, Gap):
                        continue
                    prev, cur = message
                    node = cur.get("node", "")
                    start = last.setdefault(node, prev)
                    if cur["t"] - start["t"] >= interval * 0.95:
                        yield self._view(node, start, cur, fields)
                        last[node] = cur
        finally:
            self._intervals[interval] -= 1
            if not self._intervals[interval]:
                del self._intervals[interval]
