"""The server's own counters: plain integers on the hot path, exported to Prometheus at scrape time."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


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


class _StatsCollector(Collector):
    def __init__(self, stats: Stats, extra: Callable[[], dict[str, float]], node: str) -> None:
        self.stats = stats
        self.extra = extra
        self.node = node

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        # Which process answers: with `workers` > 1 each scrape of the shared port reaches one worker.
        info = GaugeMetricFamily("streamplex_node", "The node (server process) these figures are from.", labels=["node", "pid"])
        info.add_metric([self.node, str(os.getpid())], 1)
        yield info
        yield GaugeMetricFamily("streamplex_connections", "Open WebSocket connections.", value=s.connections)
        yield CounterMetricFamily("streamplex_connections", "WebSocket connections accepted.", value=s.connections_total)
        streams = GaugeMetricFamily("streamplex_streams", "Open streams by channel.", labels=["channel"])
        opened = CounterMetricFamily("streamplex_streams_opened", "Streams opened by channel.", labels=["channel"])
        for channel in sorted(s.streams_total):
            streams.add_metric([channel], s.streams[channel])
            opened.add_metric([channel], s.streams_total[channel])
        yield streams
        yield opened
        frames = CounterMetricFamily("streamplex_frames", "WebSocket messages by direction.", labels=["direction"])
        frames.add_metric(["in"], s.frames_in)
        frames.add_metric(["out"], s.frames_out)
        yield frames
        data = CounterMetricFamily("streamplex_bytes", "WebSocket payload bytes by direction.", labels=["direction"])
        data.add_metric(["in"], s.bytes_in)
        data.add_metric(["out"], s.bytes_out)
        yield data
        dropped = CounterMetricFamily("streamplex_dropped_frames", "Frames of lossy streams dropped for slow clients.", labels=["channel"])
        for channel, n in sorted(s.dropped.items()):
            dropped.add_metric([channel], n)
        yield dropped
        errors = CounterMetricFamily("streamplex_errors", "Error replies and stream errors by code.", labels=["code"])
        for code, n in sorted(s.errors.items()):
            errors.add_metric([code], n)
        yield errors
        closes = CounterMetricFamily("streamplex_closes", "Connections closed by the server, by close code.", labels=["code"])
        for code, n in sorted(s.closes.items()):
            closes.add_metric([str(code)], n)
        yield closes
        yield CounterMetricFamily("streamplex_rate_limited", "Ops refused by the rate limiter.", value=s.rate_limited)
        yield CounterMetricFamily("streamplex_auth_failures", "Failed authentications.", value=s.auth_failures)
        for name, value in sorted(self.extra().items()):
            yield GaugeMetricFamily(f"streamplex_{name}", f"{name.replace('_', ' ')}.", value=value)


class Telemetry:
    """Stats plus a Prometheus registry of its own (so several apps can live in one process)."""

    def __init__(self, extra: Callable[[], dict[str, float]] = dict, node: str = "") -> None:
        self.stats = Stats()
        self.registry = CollectorRegistry()
        self.registry.register(_StatsCollector(self.stats, extra, node))

    def exposition(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
