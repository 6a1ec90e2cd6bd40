"""`/health` on its own port, answered by a thread (issue 15): alive while the event loop ticks, 503 once it has stalled."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

from streamplex.server.health import HealthServer
from tests.serverproc import free_port, start_server


def get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_alive_while_the_loop_ticks_and_503_once_it_stalled() -> None:
    last = [time.monotonic()]
    health = HealthServer("127.0.0.1", 0, "n1", lambda: last[0], lambda: 0.0125, stall=2.0)
    health.start()
    try:
        url = f"http://127.0.0.1:{health.port}"
        assert get(url + "/health") == (200, {"status": "alive", "node": "n1", "loop_lag_s": 0.0125})
        last[0] = time.monotonic() - 5  # the loop's monitor has not run for 5 s
        status, body = get(url + "/health")
        assert status == 503 and body["status"] == "stalled" and body["loop_stalled_s"] >= 5
        assert get(url + "/ready")[0] == 404, "only /health is served there"
    finally:
        health.stop()


def test_the_server_answers_health_on_its_health_port(tmp_path: Path) -> None:
    port = free_port()
    server = start_server(tmp_path, health_port=port, node="hp")
    try:
        status, body = get(f"http://127.0.0.1:{port}/health")
        assert status == 200 and body["status"] == "alive" and body["node"] == "hp" and body["loop_lag_s"] >= 0
        assert server.get("/health")[0] == 200, "the main port's /health is still there"
    finally:
        server.stop()
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
        raise AssertionError("the health port should be closed with the server")
    except urllib.error.URLError:
        pass
