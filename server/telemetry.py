"""The server's own counters: plain integers on the hot path, exported to Prometheus at scrape time.

One metric name per quantity, labelled by `channel`, `direction` or `code`; counters end in `_total`.
Other parts of the server (the runtime's gauges, the engine) add their families with `Telemetry.register`.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

DELAY_BOUNDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class SendDelay:
    """How long frames waited in outboxes before their send began, bucketed by hand.

    Only frames that had to queue are observed (the slow path: the socket was busy); frames sent at once
    waited 0 and are counted at scrape time as `frames_out` minus the observed ones, so the direct path
    pays nothing.
    """

    __slots__ = ("buckets", "observed", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(DELAY_BOUNDS) + 1)  # the last one is +Inf
        self.observed = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect_left(DELAY_BOUNDS, seconds)] += 1
        self.observed += 1
        self.sum += seconds

    def family(self, frames_out: int) -> HistogramMetricFamily:
        immediate = max(0, frames_out - self.observed)  # a frame taken from the queue counts once its send has finished
        cumulative, running = [], immediate
        for bound, n in zip((*DELAY_BOUNDS, float("inf")), self.buckets, strict=True):
            running += n
            cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return HistogramMetricFamily(
            "streamplex_frame_send_delay_seconds",
            "Time an outgoing WebSocket frame waited in its connection's outbox before its send began (0 when sent at once).",
            buckets=cumulative,
            sum_value=self.sum,
        )


@dataclass
class Stats:
    """Live counters of one server process."""

    connections: int = 0
    connections_total: int = 0
    streams: Counter[str] = field(default_factory=Counter)
    streams_total: Counter[str] = field(default_factory=Counter)
    frames_in: int = 0
    bytes_in: int = 0
    frames_out: int = 0
    bytes_out: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    closes: Counter[int] = field(default_factory=Counter)
    rate_limited: int = 0
    auth_failures: int = 0
    send_delay: SendDelay = field(default_factory=SendDelay)

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy (cumulative counters and current gauges)."""
        return {
            "connections": self.connections,
            "connections_total": self.connections_total,
            "streams": dict(self.streams),
            "streams_total": dict(self.streams_total),
            "frames_in": self.frames_in,
            "bytes_in": self.bytes_in,
            "frames_out": self.frames_out,
            "bytes_out": self.bytes_out,
            "dropped": sum(self.dropped.values()),
            "errors": sum(self.errors.values()),
            "rate_limited": self.rate_limited,
            "auth_failures": self.auth_failures,
        }


class Activity:
    """What happened since the last look, as one log line: the INFO summary that stands in for per-connection and
    per-stream lines (those are DEBUG, so that thousands of streams do not flood the log and the logs channel)."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.last = self._totals()

    def _totals(self) -> dict[str, int]:
        s = self.stats
        return {
            "connections opened": s.connections_total,
            "streams opened": sum(s.streams_total.values()),
            "subscribes refused overloaded": s.errors["overloaded"],
            "other errors": sum(s.errors.values()) - s.errors["overloaded"],
            "lossy chunks dropped": sum(s.dropped.values()),
            "connections closed by the server": sum(s.closes.values()),
        }

    def line(self) -> str | None:
        """`N connections opened, ... (now C connections, S streams)` for what changed since the last call; None if nothing did."""
        now = self._totals()
        changes = [f"{now[k] - self.last[k]} {k}" for k in now if now[k] != self.last[k]]
        self.last = now
        if not changes:
            return None
        return f"{', '.join(changes)} (now {self.stats.connections} connections, {sum(self.stats.streams.values())} streams)"


class _StatsCollector(Collector):
    def __init__(self, stats: Stats, node: str) -> None:
        self.stats = stats
        self.node = node

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        # Which process answers: with `workers` > 1 each scrape of the shared port reaches one worker.
        info = GaugeMetricFamily("streamplex_node", "The node (server process) these figures are from.", labels=["node", "pid"])
        info.add_metric([self.node, str(os.getpid())], 1)
        yield info
        yield GaugeMetricFamily("streamplex_connections", "Open WebSocket connections.", value=s.connections)
        yield CounterMetricFamily("streamplex_connections_accepted", "WebSocket connections accepted.", value=s.connections_total)
        streams = GaugeMetricFamily("streamplex_streams", "Open streams by channel.", labels=["channel"])
        opened = CounterMetricFamily("streamplex_streams_opened", "Streams opened by channel.", labels=["channel"])
        for channel in sorted(s.streams_total):
            streams.add_metric([channel], s.streams[channel])
            opened.add_metric([channel], s.streams_total[channel])
        yield streams
        yield opened
        # All channels together: the per-pod figure the Kubernetes HPA scales on (deploy/gke/base/hpa.yaml).
        yield GaugeMetricFamily("streamplex_streams_active", "Open streams, all channels together.", value=sum(s.streams.values()))
        frames = CounterMetricFamily("streamplex_frames", "WebSocket messages by direction.", labels=["direction"])
        frames.add_metric(["in"], s.frames_in)
        frames.add_metric(["out"], s.frames_out)
        yield frames
        data = CounterMetricFamily("streamplex_bytes", "WebSocket payload bytes by direction.", labels=["direction"])
        data.add_metric(["in"], s.bytes_in)
        data.add_metric(["out"], s.bytes_out)
        yield data
        yield s.send_delay.family(s.frames_out)
        dropped = CounterMetricFamily("streamplex_dropped_frames", "Frames of lossy streams dropped for slow clients.", labels=["channel"])
        for channel, n in sorted(s.dropped.items()):
            dropped.add_metric([channel], n)
        yield dropped
        errors = CounterMetricFamily("streamplex_errors", "Error replies and stream errors by code.", labels=["code"])
        for code, n in sorted(s.errors.items()):
            errors.add_metric([code], n)
        yield errors
        closes = CounterMetricFamily("streamplex_closes", "Connections closed by the server, by close code.", labels=["code"])
        for close, n in sorted(s.closes.items()):
            closes.add_metric([str(close)], n)
        yield closes
        yield CounterMetricFamily("streamplex_rate_limited", "Ops refused by the rate limiter.", value=s.rate_limited)
        yield CounterMetricFamily("streamplex_auth_failures", "Failed authentications.", value=s.auth_failures)


class _FunctionCollector(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        yield from self._collect()


class Telemetry:
    """Stats plus a Prometheus registry of its own (so several apps can live in one process), with the standard
    process, platform and garbage-collector collectors."""

    def __init__(self, node: str = "") -> None:
        self.stats = Stats()
        self.registry = CollectorRegistry()
        self.registry.register(_StatsCollector(self.stats, node))
        for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(standard)
        self.loop_lag = Histogram(
            "streamplex_event_loop_lag_seconds",
            "How late the event loop ran a 50 ms timer, sampled 20 times a second.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )

    def register(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Add families computed at scrape time by `collect`."""
        self.registry.register(_FunctionCollector(collect))

    def exposition(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
