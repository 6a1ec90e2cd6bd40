"""`python -m streamplex.server --workers 2` as real processes on one port with a real redis-server: refused without Redis,
connections spread over both workers, logs shared, a SIGKILLed worker restarted, SIGTERM draining both, no worker
outliving a SIGKILLed supervisor."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import psutil
import pytest
import websockets

from tests.redisproc import RedisProc, running_redis
from tests.serverproc import ROOT, free_port, recv, send

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed (scripts/packages/apt-test.txt)")

NODE = "wk"


def _env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMPLEX_")}
    env.update({"STREAMPLEX_CHAT_MODEL": "", "STREAMPLEX_ASR_MODEL": "", "STREAMPLEX_EMBEDDING_MODEL": "", "PYTHONUNBUFFERED": "1"})
    env.update({f"STREAMPLEX_{k.upper()}": v for k, v in settings.items()})
    return env


@dataclass
class Workers:
    """A supervisor and its workers; the API key is the one the supervisor generated and logged."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    key: str = ""

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> dict[str, int]:
        """Worker node name -> pid, from the supervisor's live children."""
        out = {}
        for child in psutil.Process(self.proc.pid).children():
            try:
                cmdline = child.cmdline()
            except psutil.NoSuchProcess:
                continue
            if child.status() != psutil.STATUS_ZOMBIE and cmdline[-2:-1] == ["--node"]:  # the supervisor appends it last
                out[cmdline[-1]] = child.pid
        return out

    def wait_ready(self, node: str, count: int, timeout: float = 60) -> None:
        """Until `node` has logged that it is ready `count` times (once per start)."""
        deadline = time.monotonic() + timeout
        while self.log().count(f"ready on node {node} ") < count:
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log()
            time.sleep(0.1)

    async def connect(self) -> websockets.ClientConnection:
        ws = await websockets.connect(self.url)
        await send(ws, op="auth", api_key=self.key)
        ready = await recv(ws)
        assert ready["op"] == "ready", ready
        ws.ready = ready  # type: ignore[attr-defined]
        return ws

    async def connect_to(self, node: str, tries: int = 64) -> websockets.ClientConnection:
        """A connection that the kernel happened to give to `node` (others are closed)."""
        for _ in range(tries):
            ws = await self.connect()
            if ws.ready["node"] == node:  # type: ignore[attr-defined]
                return ws
            await ws.close()
        raise AssertionError(f"no connection reached {node} in {tries} tries")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProc]:
    with running_redis(tmp_path_factory.mktemp("redis"), password="workers-secret") as proc:
        yield proc


@contextlib.contextmanager
def running_workers(tmp: Path, redis_server: RedisProc) -> Iterator[Workers]:
    """`python -m streamplex.server --workers 2` on a free port, both workers ready, until the block ends."""
    port = free_port()
    log_path = tmp / "workers.log"
    # The password in the environment (as compose.yaml and the GKE manifests give it), which the workers inherit.
    redis_url = f"redis://127.0.0.1:{redis_server.port}/0"
    env = _env(
        redis_url=redis_url,
        redis_password=redis_server.password,
        redis_prefix="sp-workers",
        node=NODE,
        heartbeat_interval="5",
        shutdown_timeout="5",
        activity_log_interval="0.5",
    )
    cmd = [sys.executable, "-m", "streamplex.server", "--workers", "2", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    server = Workers(proc, port, log_path)
    left: list[int] = []
    try:
        for node in (f"{NODE}-0", f"{NODE}-1"):
            server.wait_ready(node, 1)
        left = list(server.children().values())
        found = re.search(r"generated one for this run: (sk-\S+)", server.log())
        assert found, server.log()
        server.key = found.group(1)
        yield server
    finally:
        if proc.poll() is None:
            left = list(server.children().values())
            proc.kill()
            proc.wait()
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisProc) -> Iterator[Workers]:
    with running_workers(tmp_path_factory.mktemp("workers"), redis_server) as server:
        yield server


@pytest.mark.parametrize("how", ["flag", "env"])
def test_more_than_one_worker_without_redis_is_refused(how: str) -> None:
    env = _env(workers="3") if how == "env" else _env()
    args = [] if how == "env" else ["--workers", "3"]
    run = subprocess.run(
        [sys.executable, "-m", "streamplex.server", "--port", str(free_port()), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode != 0
    assert "workers=3 needs redis_url (STREAMPLEX_REDIS_URL)" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


async def test_connections_spread_over_both_workers_with_one_generated_key(workers: Workers) -> None:
    children = workers.children()
    assert set(children) == {f"{NODE}-0", f"{NODE}-1"}
    sockets = [await workers.connect() for _ in range(16)]
    assert {ws.ready["node"] for ws in sockets} == set(children)  # type: ignore[attr-defined]
    for ws in sockets:
        await ws.close()
    # /metrics answers for the worker that took the request, naming it and its pid.
    seen: dict[str, str] = {}
    for _ in range(40):
        with urllib.request.urlopen(f"http://127.0.0.1:{workers.port}/metrics", timeout=5) as resp:
            found = re.search(r'^streamplex_node\{node="([^"]+)",pid="(\d+)"\} 1\.0$', resp.read().decode(), re.M)
        assert found
        seen[found.group(1)] = found.group(2)
        if len(seen) == 2:
            break
    assert seen == {node: str(pid) for node, pid in children.items()}


async def test_a_logs_subscriber_on_one_worker_sees_the_others_records(workers: Workers) -> None:
    ws = await workers.connect()
    mine = ws.ready["node"]  # type: ignore[attr-defined]
    await send(ws, op="subscribe", id="l", channel="logs", params={"lines": 0})
    assert (await recv(ws))["op"] == "subscribed"
    nodes: set[str] = set()
    deadline = time.monotonic() + 30
    while len(nodes) < 2:
        assert time.monotonic() < deadline, f"logs seen only from {nodes}"
        poke = await workers.connect()  # each connection counts in the next activity line (INFO) of the worker that took it
        await poke.close()
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            try:
                frame = await recv(ws, timeout=0.2)
            except TimeoutError:
                continue
            if frame["op"] == "chunk":
                nodes.add(frame["data"]["node"])
    assert mine in nodes
    await ws.close()


async def test_a_killed_worker_is_restarted_and_serves_again(workers: Workers) -> None:
    before = workers.children()
    victim = f"{NODE}-0"
    os.kill(before[victim], signal.SIGKILL)
    workers.wait_ready(victim, 2)
    after = workers.children()
    assert after[victim] != before[victim] and after[f"{NODE}-1"] == before[f"{NODE}-1"]
    assert re.search(rf"worker 0 \(pid {before[victim]}, node {victim}\) died with -9", workers.log())
    ws = await workers.connect_to(victim)
    await send(ws, op="ping")
    assert (await recv(ws))["op"] == "pong"
    await ws.close()


async def test_sigterm_drains_every_worker(workers: Workers) -> None:
    clients = [await workers.connect_to(f"{NODE}-{i}") for i in range(2)]
    for ws in clients:
        await send(ws, op="subscribe", id="d", channel="data", params={"records": [{"i": i} for i in range(500)], "chunk_size": 1, "interval_ms": 50})
        assert (await recv(ws))["op"] == "subscribed"
    pids = list(workers.children().values())
    workers.proc.send_signal(signal.SIGTERM)

    async def until_end(ws: websockets.ClientConnection) -> tuple[list[int], dict, int | None]:
        records: list[int] = []
        while True:
            frame = await recv(ws, timeout=20)
            if frame["op"] == "chunk":
                records.append(orjson.loads(frame["data"])["i"])
            elif frame["op"] == "end":
                with pytest.raises(websockets.ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 20)
                return records, frame, ws.close_code

    for records, end, code in await asyncio.gather(*(until_end(ws) for ws in clients)):
        assert end["reason"] == "shutdown" and code == 1001
        assert records == list(range(len(records))), "nothing lost or reordered before the drain"
    assert await asyncio.to_thread(workers.proc.wait, 30) == 0
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)
    assert workers.log().count("stopped with") == 2 and "all workers stopped" in workers.log()


async def test_workers_leave_with_a_killed_supervisor(tmp_path: Path, redis_server: RedisProc) -> None:
    with running_workers(tmp_path, redis_server) as server:
        pids = list(server.children().values())
        ws = await server.connect()
        server.proc.kill()  # SIGKILL: no chance to pass anything on
        server.proc.wait()
        # Linux sends each worker SIGTERM (PR_SET_PDEATHSIG): it drains (1001) and exits; none keeps the port.
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 20)
        assert ws.close_code == 1001
        deadline = time.monotonic() + 20
        while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids):
            assert time.monotonic() < deadline, "a worker outlived its supervisor"
            await asyncio.sleep(0.1)
        with pytest.raises(OSError):
            await websockets.connect(server.url, open_timeout=2)
