"""Starting the real server (uvicorn via `python -m streamplex.server`) on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil
import websockets

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-key"  # scoped `admin`: the operator's key, like the key a development run generates
PLAIN = "sk-test-plain"  # unscoped: every channel but the admin ones (logs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProc:
    """A running server subprocess."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    key: str = KEY
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.http + path, timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def metric(self, name: str, labels: str = "") -> float:
        """One sample's value from /metrics (0 when absent)."""
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in self.get("/metrics")[1].decode().splitlines():
            if line.startswith(wanted + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(tmp: Path, port: int | None = None, **settings: Any) -> ServerProc:
    """Start a server with STREAMPLEX_* settings (chat, transcription and embedding models off, and no lag-based admission,
    unless given) on `port` (default: a free one) and wait until /ready. Lag-based admission is off by default here because a
    loaded CI host (or a model loading in the server) can make any test's subscribe `overloaded`; tests/server/test_overload.py
    turns it on."""
    port = port or free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMPLEX_")}
    env.update(
        {
            "STREAMPLEX_API_KEYS": f"{KEY}:admin,{PLAIN}",
            "STREAMPLEX_CHAT_MODEL": "",
            "STREAMPLEX_ASR_MODEL": "",
            "STREAMPLEX_EMBEDDING_MODEL": "",
            "STREAMPLEX_OVERLOAD_LAG": "0",
            "STREAMPLEX_HEARTBEAT_INTERVAL": "5",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update({f"STREAMPLEX_{k.upper()}": str(v) for k, v in settings.items()})
    log_path = tmp / f"server-{port}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamplex.server", "--port", str(port)], cwd=ROOT, env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT
    )
    server = ServerProc(proc, port, log_path, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
        try:
            if server.get("/ready")[0] == 200:
                return server
        except OSError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"server did not become ready:\n{server.log()}")


async def connect(server: ServerProc, **kwargs: Any) -> websockets.ClientConnection:
    """An authenticated connection (first-frame auth); the `ready` frame is consumed and kept as `.ready`."""
    ws = await websockets.connect(server.url, **kwargs)
    await ws.send(json.dumps({"op": "auth", "api_key": server.key}))
    ready = orjson.loads(await ws.recv())
    assert ready["op"] == "ready", ready
    ws.ready = ready  # type: ignore[attr-defined]
    return ws


async def send(ws: websockets.ClientConnection, **frame: Any) -> None:
    await ws.send(orjson.dumps(frame).decode())


async def recv(ws: websockets.ClientConnection, timeout: float = 10) -> dict[str, Any]:
    import asyncio

    return orjson.loads(await asyncio.wait_for(ws.recv(), timeout))


async def collect(ws: websockets.ClientConnection, stream_id: str, timeout: float = 20) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every chunk of `stream_id` until its `end`; frames of other streams are skipped."""
    chunks: list[dict[str, Any]] = []
    while True:
        frame = await recv(ws, timeout)
        if frame.get("id") != stream_id:
            continue
        if frame["op"] == "chunk":
            chunks.append(frame)
        elif frame["op"] == "end":
            return chunks, frame


def start_model_worker(tmp: Path, **settings: Any) -> ServerProc:
    """Start a model worker (`python -m streamplex.server --role model`) with STREAMPLEX_* settings on a free metrics port; returns
    once the metrics answer (its models may still be loading: the edge node's `/ready` says when they are)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMPLEX_")}
    env.update({"STREAMPLEX_CHAT_MODEL": "", "STREAMPLEX_ASR_MODEL": "", "STREAMPLEX_EMBEDDING_MODEL": "", "PYTHONUNBUFFERED": "1"})
    env.update({f"STREAMPLEX_{k.upper()}": str(v) for k, v in settings.items()})
    log_path = tmp / f"worker-{port}.log"
    command = [sys.executable, "-m", "streamplex.server", "--role", "model", "--port", str(port)]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    worker = ServerProc(proc, port, log_path, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"model worker exited with {proc.returncode}:\n{worker.log()}")
        try:
            if worker.get("/metrics")[0] == 200:
                return worker
        except OSError:
            pass
        time.sleep(0.1)
    worker.stop()
    raise RuntimeError(f"model worker did not start:\n{worker.log()}")
