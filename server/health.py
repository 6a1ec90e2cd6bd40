"""`/health` on a port of its own, answered by a thread: a liveness probe that never waits behind the event loop's backlog.

Under load the event loop runs every ready callback before it reads a new request, so `/health` on the
main port answers as late as the loop lags; a probe that times out then gets a busy node killed and its
load moved to the next one. This listener answers from its own thread (it needs the GIL only for the
few microseconds of an answer, and the loop hands it over at least every switch interval, 5 ms); it
says the node is alive while the loop's monitor has ticked within `stall` seconds, so a loop that has
truly stopped still fails the probe.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    reuse_port = False

    def server_bind(self) -> None:
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class HealthServer:
    """`GET /health` on (`host`, `port`) from a thread: 200 while `ticked()` (a `time.monotonic()` reading of the event loop's
    last sign of life) is less than `stall` seconds old, else 503."""

    def __init__(self, host: str, port: int, node: str, ticked: Callable[[], float], lag: Callable[[], float], stall: float, reuse_port: bool = False) -> None:
        self.node, self.ticked, self.lag, self.stall = node, ticked, lag, stall
        health = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 5  # a client that sends nothing does not hold its thread longer

            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] != "/health":
                    self._answer(404, {"error": "only /health is served on this port"})
                    return
                status, body = health.answer()
                self._answer(status, body)

            def _answer(self, status: int, body: dict[str, object]) -> None:
                data = orjson.dumps(body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass  # probes every few seconds would flood the log

        _Server.reuse_port = reuse_port
        self.server = _Server((host, port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.5}, name="health", daemon=True)

    def answer(self) -> tuple[int, dict[str, object]]:
        """The status and body of a `/health` answer now."""
        since = time.monotonic() - self.ticked()
        if since >= self.stall:
            return 503, {"status": "stalled", "node": self.node, "loop_stalled_s": round(since, 3)}
        return 200, {"status": "alive", "node": self.node, "loop_lag_s": round(self.lag(), 4)}

    def start(self) -> None:
        """Serve from the thread."""
        self.thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.server.shutdown()
        self.server.server_close()
