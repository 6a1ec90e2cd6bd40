"""Failover: clients on lossless streams through nginx over three nodes sharing a redis-server, one node SIGKILLed every 20 s.

Everything runs on this machine on loopback: a redis-server, three server nodes (`python -m streamplex.server`, sharing it
through STREAMPLEX_REDIS_URL), and nginx with the shipped deploy/nginx/streamplex.conf (the upstreams rewritten
to the nodes' loopback ports; everything else as shipped). The load generator is this process.

Each client reads paced lossless streams one after another (the data channel: `--records` records of
`{"i": n}`, one per chunk, every `--interval-ms`), checks every record, and when its connection drops
reconnects through nginx and sends `resume` with its token and the last `seq` it received, as
docs/protocol.md says. It counts, over all streams:
- lost: records of a stream never received (a failed resume, a `resume_gap`, an end before the last record);
- duplicated: records received twice; out of order: a record that is not the next one;
- resume time: from the SIGKILL to the first frame of the resumed stream, per client whose node was killed, and
  its phases: the client noticing the close (through nginx), reconnecting (failed attempts and the 50 ms between
  them), the handshake up to `ready`, the `resume` round trip (of which the new node's wait for the old owner,
  read from the nodes' logs), and from `resumed` to the stream's first frame (the producer's restart).

Phase `failover`: three nodes, one killed (SIGKILL) every `--kill-every` seconds and started again at once on
the same port under the same node name, for `--duration` seconds; then the streams in flight run to their end.
Phase `cpu`: the same clients without kills over 1, 2 and 3 nodes, `--cpu-seconds` each after a warm-up: the
nodes' CPU time (user + system, from /proc) per delivered frame, and its ratio to one node; also less the nodes'
idle CPU measured just before. Redis's CPU is shown apart.

Example (the figures in docs/benchmarks.md): `python bench/failover.py --clients 50 --duration 60`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil
import websockets

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.nginxproc import running_nginx  # noqa: E402
from tests.redisproc import RedisProc  # noqa: E402
from tests.serverproc import KEY, ServerProc, free_port, start_server  # noqa: E402

NODES = ("fo-1", "fo-2", "fo-3")
TAKEN_OVER = re.compile(r"taken over from node \S+, (.+?), after ([\d.]+) s of waiting for it")


@dataclass
class Tally:
    """What every client saw, summed."""

    streams: int = 0
    complete: int = 0
    frames: int = 0
    lost: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    drops: int = 0
    resumed: int = 0
    resume_failed: int = 0
    reconnect_failures: int = 0
    resubscribed: int = 0
    ends: Counter[str] = field(default_factory=Counter)
    connect_errors: Counter[str] = field(default_factory=Counter)
    resume_times: list[float] = field(default_factory=list)
    ready_times: list[float] = field(default_factory=list)  # from the kill to `ready` on the new connection
    resumed_times: list[float] = field(default_factory=list)  # from the kill to the `resumed` answer
    phases: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in PHASES})


PHASES = {
    "notice": "the client sees the close (kill -> close through nginx)",
    "reconnect": "reconnecting (close -> start of the connect that worked)",
    "handshake": "handshake (connect -> `ready`)",
    "resume": "resume round trip (`resume` sent -> `resumed`)",
    "first": "producer restart (`resumed` -> first frame of the stream)",
}


class Cluster:
    """redis-server and the nodes on fixed loopback ports; a killed node starts again on its port."""

    def __init__(self, tmp: Path, settings: dict[str, Any]) -> None:
        self.tmp = tmp
        self.settings = settings
        self.logs: list[str] = []  # the logs of the nodes killed so far (a node started again on its port writes its log anew)
        self.redis = RedisProc(free_port(), tmp / "redis.log", password="failover-bench")
        self.redis.start()
        self.ports = {name: free_port() for name in NODES}
        self.nodes: dict[str, ServerProc] = {}

    def start(self, name: str) -> None:
        self.nodes[name] = start_server(self.tmp, port=self.ports[name], node=name, redis_url=self.redis.url, **self.settings)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        node = self.nodes.pop(name)
        node.stop(sig)
        self.logs.append(node.log())

    def takeovers(self) -> list[tuple[str, float]]:
        """Every session a node took over from another, from the nodes' logs: how, and how long it waited for the owner."""
        found = []
        for text in [*self.logs, *(node.log() for node in self.nodes.values())]:
            found += [(how, float(waited)) for how, waited in TAKEN_OVER.findall(text)]
        return found

    def cpu(self) -> float:
        """CPU seconds of the running node processes so far."""
        return sum(_cpu(node.proc.pid) for node in self.nodes.values())

    def redis_cpu(self) -> float:
        assert self.redis.proc is not None
        return _cpu(self.redis.proc.pid)

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()
        self.nodes.clear()
        self.redis.stop()


def _cpu(pid: int) -> float:
    with contextlib.suppress(psutil.NoSuchProcess):
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    return 0.0


class Client:
    """One client: paced lossless streams in a row, resuming through nginx after a drop."""

    def __init__(self, n: int, url: str, args: argparse.Namespace, tally: Tally, kills: list[float]) -> None:
        self.n = n
        self.url = url
        self.args = args
        self.tally = tally
        self.kills = kills
        self.token: str | None = None
        self.stream = 0
        self.seen: set[int] = set()
        self.next = 0
        self.last_seq = -1
        self.dropped_at: float | None = None  # when the connection dropped with a stream open
        self.marks: dict[str, float] = {}  # the moments of the current resume (see PHASES)
        self.acked = False  # `subscribed` came for the current stream

    @property
    def sid(self) -> str:
        return f"c{self.n}s{self.stream}"

    async def _connect(self) -> tuple[websockets.ClientConnection, dict[str, Any]]:
        deadline = time.monotonic() + 30
        while True:
            self.marks["connect"] = time.monotonic()
            try:
                ws = await asyncio.wait_for(websockets.connect(self.url, additional_headers={"X-API-Key": KEY}, max_queue=None), 5)
                ready = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
                if ready.get("op") == "ready":
                    self.marks["ready"] = time.monotonic()
                    return ws, ready
                await ws.close()
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                self.tally.connect_errors[type(exc).__name__ + (f" {exc.response.status_code}" if isinstance(exc, websockets.InvalidStatus) else "")] += 1
            self.tally.reconnect_failures += 1
            if time.monotonic() > deadline:
                raise RuntimeError(f"client {self.n}: no connection through nginx for 30 s")
            await asyncio.sleep(0.05)

    def _finish(self, reason: str) -> None:
        """The current stream is over: count what never came."""
        self.tally.ends[reason] += 1
        self.tally.complete += reason == "complete"
        self.tally.lost += self.args.records - len(self.seen)
        self.stream += 1
        self.seen = set()
        self.next = 0
        self.last_seq = -1

    async def _subscribe(self, ws: websockets.ClientConnection) -> None:
        params = {"records": [{"i": i} for i in range(self.args.records)], "chunk_size": 1, "interval_ms": self.args.interval_ms}
        await ws.send(orjson.dumps({"op": "subscribe", "id": self.sid, "channel": "data", "params": params}).decode())
        self.acked = False

    async def _resume(self, ws: websockets.ClientConnection, ready: dict[str, Any]) -> bool:
        """Resume the dropped session on this new connection; False when the stream could not go on."""
        self.marks["resume"] = time.monotonic()
        await ws.send(orjson.dumps({"op": "resume", "token": self.token, "streams": {self.sid: self.last_seq}}).decode())
        while True:
            frame = orjson.loads(await asyncio.wait_for(ws.recv(), 30))
            if frame["op"] == "resumed":
                self.marks["resumed"] = time.monotonic()
                self.tally.resumed += 1
                if self.dropped_at is not None:
                    self.tally.resumed_times.append(self._since_kill())
                entry = frame.get("streams", {}).get(self.sid)
                if entry is not None and (entry.get("resumed") or self.acked):
                    return True  # resumed, or not (`resumed: false`): then its `end` (resume_gap) follows
                self.dropped_at = None
                if not self.acked:
                    # The node died before it answered `subscribed`: the stream never began (the new node does not know
                    # it: `resumed: false` and an `end` follow), so subscribe it again.
                    while entry is not None:
                        end = orjson.loads(await asyncio.wait_for(ws.recv(), 30))
                        if end["op"] == "end" and end["id"] == self.sid:
                            break
                    self.tally.resubscribed += 1
                    return False
                self._finish("missing_from_resumed")
                return False
            if frame["op"] == "error" and frame.get("code") == "resume_failed":
                self.tally.resume_failed += 1
                self.token = ready.get("resume", {}).get("token")
                self._finish("resume_failed")
                self.dropped_at = None  # nothing came back: no resume time
                return False

    def _since_kill(self) -> float:
        """Seconds since the kill that dropped the connection (since the drop, if no kill caused it)."""
        assert self.dropped_at is not None
        return time.monotonic() - max((k for k in self.kills if k <= self.dropped_at + 0.001), default=self.dropped_at)

    def _back(self) -> None:
        """The first frame of the stream since the drop: the resume time counts from the kill that caused it."""
        if self.dropped_at is not None:
            self.tally.resume_times.append(self._since_kill())
            m = self.marks
            if "resumed" in m:
                kill = max((k for k in self.kills if k <= self.dropped_at + 0.001), default=self.dropped_at)
                steps = {
                    "notice": self.dropped_at - kill,
                    "reconnect": m["connect"] - self.dropped_at,
                    "handshake": m["ready"] - m["connect"],
                    "resume": m["resumed"] - m["resume"],
                    "first": time.monotonic() - m["resumed"],
                }
                for name, value in steps.items():
                    self.tally.phases[name].append(value)
            self.dropped_at = None

    def _record(self, frame: dict[str, Any]) -> None:
        self._back()
        i = orjson.loads(frame["data"])["i"]
        self.tally.frames += 1
        self.last_seq = frame["seq"]
        if i in self.seen:
            self.tally.duplicated += 1
            return
        if i != self.next:
            self.tally.out_of_order += 1
        self.seen.add(i)
        self.next = i + 1

    async def run(self, until: float) -> None:
        """Streams until `until` (monotonic), then the one in flight to its end."""
        open_stream = False
        while open_stream or time.monotonic() < until:
            ws, ready = await self._connect()
            try:
                if open_stream and self.token:
                    if self.dropped_at is not None:
                        self.tally.ready_times.append(self._since_kill())
                    open_stream = await self._resume(ws, ready)
                else:
                    self.token = ready.get("resume", {}).get("token")
                if not open_stream:
                    if time.monotonic() >= until:
                        return
                    await self._subscribe(ws)
                    open_stream = True
                while True:
                    try:
                        frame = orjson.loads(await asyncio.wait_for(ws.recv(), 30))
                    except TimeoutError:
                        self._finish("stalled_30s")
                        open_stream = False
                        await ws.close()
                        break
                    if frame.get("id") != self.sid:
                        continue
                    if frame["op"] == "subscribed":
                        self.acked = True
                        self.tally.streams += 1
                    elif frame["op"] == "chunk":
                        self._record(frame)
                    elif frame["op"] == "end":
                        self._back()  # a stream that ended while the client was away: the end is the first frame back
                        self._finish(frame["reason"])
                        open_stream = False
                        if time.monotonic() >= until:
                            await ws.close()
                            return
                        await self._subscribe(ws)
                        open_stream = True
                    elif frame["op"] == "error":
                        raise RuntimeError(f"client {self.n}: {frame}")
            except websockets.ConnectionClosed:
                self.tally.drops += 1
                self.dropped_at = time.monotonic() if open_stream else None
                self.marks = {}


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else (values[0] if values else float("nan"))


async def _clients(url: str, args: argparse.Namespace, seconds: float, kills: list[float]) -> Tally:
    tally = Tally()
    until = time.monotonic() + seconds
    clients = [Client(n, url, args, tally, kills) for n in range(args.clients)]
    await asyncio.gather(*(c.run(until) for c in clients))
    return tally


async def _killer(cluster: Cluster, every: float, until: float, kills: list[float], log: list[str]) -> None:
    """SIGKILL the nodes in turn at every/2, every/2 + every, ... and start each again at once."""
    t0 = time.monotonic()
    for turn in range(len(NODES) * 1000):
        at = t0 + every / 2 + turn * every
        if at >= until:
            return
        await asyncio.sleep(at - time.monotonic())
        name = NODES[turn % len(NODES)]
        if name not in cluster.nodes:  # still starting after its previous kill
            log.append(f"  {at - t0:5.1f} s  {name} not back yet: no kill")
            continue
        kills.append(time.monotonic())
        cluster.kill(name)
        log.append(f"  {kills[-1] - t0:5.1f} s  SIGKILL {name}")
        started = time.monotonic()
        await asyncio.to_thread(cluster.start, name)
        log.append(f"  {time.monotonic() - t0:5.1f} s  {name} ready again ({time.monotonic() - started:.1f} s after the kill)")


def _print_tally(tally: Tally, takeovers: list[tuple[str, float]] | None = None) -> None:
    print(f"  streams: {tally.streams} started, {tally.complete} complete; ends: {dict(tally.ends)}")
    print(
        f"  frames delivered: {tally.frames}; connection drops: {tally.drops}; failed connect attempts: {tally.reconnect_failures} {dict(tally.connect_errors)}"
    )
    print(
        f"  resumes: {tally.resumed} accepted, {tally.resume_failed} refused (resume_failed); subscribes sent again (node died before `subscribed`): {tally.resubscribed}"
    )
    print(f"  LOST records: {tally.lost}   DUPLICATED: {tally.duplicated}   out of order: {tally.out_of_order}   (goal: 0 and 0)")
    times = tally.resume_times
    if times:
        print(
            f"  resume time from the kill to the first frame back: p50 {_pct(times, 50):.3f} s, p99 {_pct(times, 99):.3f} s, max {max(times):.3f} s (n={len(times)}; goal p99 < 2 s)"
        )
        for name, values in (("`ready` on the new connection", tally.ready_times), ("the `resumed` answer", tally.resumed_times)):
            if values:
                print(f"    of which, from the kill to {name}: p50 {_pct(values, 50):.3f} s, p99 {_pct(values, 99):.3f} s")
        print(f"  its phases (n={len(tally.phases['first'])}, the resumes that got a frame back), p50 / p99 / max:")
        for key, label in PHASES.items():
            values = tally.phases[key]
            if values:
                print(f"    {label:60s} {_pct(values, 50):.3f} / {_pct(values, 99):.3f} / {max(values):.3f} s")
        if takeovers:
            waits = [w for _, w in takeovers]
            print(
                f"    of the resume round trip, the new node waiting for the old owner: {_pct(waits, 50):.3f} / {_pct(waits, 99):.3f} / {max(waits):.3f} s"
                f" (n={len(waits)} takeovers; the owner was: {dict(Counter(how for how, _ in takeovers))})"
            )
    else:
        print("  resume time: no stream came back after a kill")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients (the shipped nginx allows 64 connections per address)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of the failover phase (kills happen within it); 0 skips it")
    parser.add_argument("--kill-every", type=float, default=20.0, help="seconds between kills (the first after half of it)")
    parser.add_argument("--records", type=int, default=100, help="records per stream")
    parser.add_argument("--interval-ms", type=int, default=100, help="milliseconds between a stream's records")
    parser.add_argument("--cpu-seconds", type=float, default=20.0, help="seconds of each CPU phase (1, 2, 3 nodes); 0 skips them")
    parser.add_argument("--resume-window", type=float, default=30.0, help="the nodes' resume_window")
    parser.add_argument("--cpu-nodes", default="1,2,3,1", help="node counts of the CPU steps, in order (the last 1 shows the drift)")
    parser.add_argument("--warmup-seconds", type=float, default=5.0, help="seconds of the same load before each CPU step (not measured)")
    parser.add_argument("--idle-seconds", type=float, default=5.0, help="seconds the nodes' idle CPU is measured before each CPU step")
    parser.add_argument("--nginx-log", help="copy nginx's logs of the failover phase to this file")
    parser.add_argument("--node-logs", help="write the nodes' logs of the failover phase to this file (the killed processes' too)")
    args = parser.parse_args()

    settings = {"redis_prefix": "failover", "resume_window": args.resume_window, "heartbeat_interval": 5}
    print(f"failover: {args.clients} clients, streams of {args.records} records every {args.interval_ms} ms, through nginx")
    print(f"{psutil.cpu_count()} CPU cores shared by the load generator (this process), nginx, redis-server and the nodes")
    with tempfile.TemporaryDirectory(prefix="failover-") as tmp:
        cluster = Cluster(Path(tmp), settings)
        try:
            for name in NODES:
                cluster.start(name)
            if args.duration > 0:
                (Path(tmp) / "nginx").mkdir()
                with running_nginx(Path(tmp) / "nginx", list(cluster.ports.values()), 4096) as proxy:
                    kills: list[float] = []
                    log: list[str] = []
                    until = time.monotonic() + args.duration
                    killer = asyncio.create_task(_killer(cluster, args.kill_every, until, kills, log))
                    tally = await _clients(proxy.ws(), args, args.duration, kills)
                    await killer
                    if args.nginx_log:
                        Path(args.nginx_log).write_text(proxy.log())
                    if args.node_logs:
                        Path(args.node_logs).write_text("\n".join([*cluster.logs, *(node.log() for node in cluster.nodes.values())]))
                    errors = Counter(
                        re.sub(r"^\S+ \S+ \[error\] \d+#\d+: \*\d+ |, client: .*$|\d+", "", line) for line in proxy.log().splitlines() if "[error]" in line
                    )
                print(
                    f"\nphase failover: 3 nodes, one SIGKILLed every {args.kill_every:g} s for {args.duration:g} s ({len(kills)} kills), streams in flight then run to their end"
                )
                print("\n".join(log))
                _print_tally(tally, cluster.takeovers())
                print(f"  nginx errors: {dict(errors.most_common(5))}")

            if args.cpu_seconds > 0:
                print(f"\nphase cpu: the same clients, no kills, {args.cpu_seconds:g} s per step after {args.warmup_seconds:g} s of warm-up")
                rows = []
                for step, n in enumerate(int(x) for x in args.cpu_nodes.split(",")):
                    for name in NODES[n:]:
                        if name in cluster.nodes:
                            cluster.kill(name, signal.SIGTERM)
                    for name in NODES[:n]:
                        if name not in cluster.nodes:
                            cluster.start(name)
                    prefix = Path(tmp) / f"nginx-cpu-{step}"
                    prefix.mkdir()
                    with running_nginx(prefix, [cluster.ports[name] for name in NODES[:n]], 4096) as proxy:
                        await _clients(proxy.ws(), args, args.warmup_seconds, [])  # a node's first streams import and warm what it needs
                        idle0 = cluster.cpu()
                        await asyncio.sleep(args.idle_seconds)
                        idle = (cluster.cpu() - idle0) / args.idle_seconds
                        cpu0, redis0, t0 = cluster.cpu(), cluster.redis_cpu(), time.monotonic()
                        tally = await _clients(proxy.ws(), args, args.cpu_seconds, [])
                        cpu, redis_cpu, seconds = cluster.cpu() - cpu0, cluster.redis_cpu() - redis0, time.monotonic() - t0
                    if tally.lost or tally.duplicated:
                        print(f"  (with {n} node(s): lost {tally.lost}, duplicated {tally.duplicated})")
                    rows.append((n, tally.frames, cpu, redis_cpu, idle, seconds))
                base = rows[0][2] / max(rows[0][1], 1)
                base_busy = (rows[0][2] - rows[0][4] * rows[0][5]) / max(rows[0][1], 1)
                print("  nodes | frames | nodes' CPU s | us/frame | vs 1 node | idle nodes' CPU s/s | us/frame less idle | vs 1 node | redis us/frame")
                for n, frames, cpu, redis_cpu, idle, seconds in rows:
                    per = cpu / max(frames, 1)
                    busy = (cpu - idle * seconds) / max(frames, 1)
                    print(
                        f"  {n:5d} | {frames:6d} | {cpu:12.2f} | {per * 1e6:8.1f} | {per / base:8.2f}x | {idle:19.3f} | {busy * 1e6:18.1f} | {busy / base_busy:8.2f}x | {redis_cpu / max(frames, 1) * 1e6:8.1f}"
                    )
                print("  (goal: flat, within 1.2x of one node; only the step's nodes run; idle: the same nodes with no client, just before)")
        finally:
            cluster.stop()


if __name__ == "__main__":
    asyncio.run(main())
