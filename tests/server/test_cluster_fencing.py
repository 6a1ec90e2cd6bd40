"""Fencing: a node paused (SIGSTOP) and cut from Redis while another node took its session over writes nothing more
for it once it runs again; two server processes on one real redis-server."""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import websockets

from tests.redisproc import RedisProc, running_redis
from tests.serverproc import ServerProc, connect, recv, send, start_server

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed (scripts/packages/apt-test.txt)")

WINDOW = 3.0  # resume_window: short, so that the paused node's own wait for its client runs out within the test
RECORDS = [{"i": i} for i in range(300)]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProc]:
    with running_redis(tmp_path) as proc:
        yield proc


@pytest.fixture
def nodes(tmp_path: Path, redis_server: RedisProc) -> Iterator[list[ServerProc]]:
    started = [
        start_server(tmp_path, node=name, redis_url=redis_server.url, redis_prefix="sp-fence", resume_window=WINDOW, overload_lag=0)
        for name in ("fence-a", "fence-b")
    ]
    yield started
    for node in started:
        if node.proc.poll() is None:
            node.proc.send_signal(signal.SIGCONT)
        node.stop()


async def _read(ws: websockets.ClientConnection, seen: dict[int, Any], until: Any, timeout: float = 30) -> dict[str, Any] | None:
    """Chunks into `seen` (each seq once) until `until()`; the `end` frame if one came."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, f"timed out with {len(seen)} chunks"
        frame = await recv(ws, timeout)
        if frame["op"] == "chunk":
            assert frame["seq"] not in seen, f"seq {frame['seq']} delivered twice"
            seen[frame["seq"]] = frame["data"]
        elif frame["op"] == "end":
            return frame
    return None


def _cut_from_redis(node: ServerProc, redis_server: RedisProc) -> int:
    """Close every connection `node` has to Redis, on Redis's side (as a network partition would): how many."""
    ports = [c.laddr.port for c in psutil.Process(node.proc.pid).net_connections("tcp") if c.raddr and c.raddr.port == redis_server.port]
    with redis_server.client() as admin:
        for port in ports:
            admin.client_kill_filter(_id=None, addr=f"127.0.0.1:{port}")
    return len(ports)


async def test_a_paused_owner_cut_from_redis_comes_back_and_writes_nothing_for_the_session_it_lost(nodes: list[ServerProc], redis_server: RedisProc) -> None:
    a, b = nodes
    ws = await connect(a)
    token = ws.ready["resume"]["token"]  # type: ignore[attr-defined]
    await send(ws, op="subscribe", id="d", channel="data", params={"records": RECORDS, "chunk_size": 1, "interval_ms": 40})
    seen: dict[int, Any] = {}
    await _read(ws, seen, lambda: len(seen) >= 10)
    a.proc.send_signal(signal.SIGSTOP)
    # Node A is paused and its Redis connections are gone: node B takes the session over at once (it asks
    # nobody to let go), and node A will not hear of it.
    assert _cut_from_redis(a, redis_server) >= 2
    ws.transport.abort()
    ws = await connect(b)
    await send(ws, op="resume", token=token, streams={"d": max(seen)})
    resumed = await recv(ws)
    assert resumed["op"] == "resumed" and resumed["streams"]["d"]["resumed"], resumed
    assert "gone (its Redis connection closed)" in b.log()
    a.proc.send_signal(signal.SIGCONT)
    # Node A reconnects to Redis and would write the session's record again as its own (its rewrite after every
    # reconnection), keep it for WINDOW seconds, then delete its record and replay: fenced, it stops the session
    # at its first write instead, and writes or deletes nothing.
    await _read(ws, seen, lambda: "is owned by another node now" in a.log(), timeout=15)
    await asyncio.sleep(WINDOW + 1)
    assert a.metric("streamplex_redis_sessions_fenced_total") == 1
    # The session is still in Redis, node B's: the client resumes it once more, on node A this time (B hands it over).
    ws.transport.abort()
    ws = await connect(a)
    await send(ws, op="resume", token=token, streams={"d": max(seen)})
    resumed = await recv(ws)
    assert resumed["op"] == "resumed" and resumed["streams"]["d"]["resumed"], resumed
    end = await _read(ws, seen, lambda: False, timeout=60)
    assert end is not None and end["reason"] == "complete", end
    assert sorted(seen) == list(range(len(RECORDS)))
    assert "handed over to another node" in b.log()
    await ws.close()
