"""`streamplex serve --workers N`: a supervisor running N server processes on one port.

Each worker is a plain `python -m streamplex.server` process that binds its own `SO_REUSEPORT` socket, so the
kernel spreads new connections over the workers and no connection passes through the supervisor.
The workers are nodes like any other (`NODE-0`, `NODE-1`, ...) sharing Redis. The supervisor only
starts them, restarts one that dies, and passes SIGTERM/SIGINT on so each drains.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from types import FrameType

from streamplex.server.auth import ADMIN, generate_key
from streamplex.server.config import Settings

log = logging.getLogger("streamplex.workers")

POLL = 0.2
RESTART_MIN = 0.5  # seconds before restarting a worker that died soon after its start, doubling...
RESTART_MAX = 30.0  # ...up to this, so a worker that cannot start does not spin
STABLE_AFTER = 10.0  # a worker that ran this long is restarted at once when it dies
PR_SET_PDEATHSIG = 1


def bind_reuse_port(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT, not yet listening."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _die_with_parent() -> None:
    """In a worker, before exec: get SIGTERM when the supervisor dies, so no orphan keeps serving the port."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Worker:
    """One worker slot: its current process, and when to start the next one if it died."""

    index: int
    node: str
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    delay: float = RESTART_MIN
    restart_at: float = 0.0
    restarts: int = 0


class Supervisor:
    """Runs `settings.workers` server processes on one port until SIGTERM or SIGINT."""

    def __init__(self, settings: Settings, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.argv = argv
        self.env = env
        self.port = settings.port
        self.workers = [Worker(i, f"{settings.node}-{i}") for i in range(settings.workers)]
        self.stopping = False
        self.stop_deadline = 0.0

    def command(self, worker: Worker) -> list[str]:
        """A worker's command line: the supervisor's flags, then the ones that make it one worker (the last flag wins)."""
        return [
            sys.executable,
            "-m",
            "streamplex.server",
            *self.argv,
            "--workers",
            "1",
            "--reuse-port",
            "--port",
            str(self.port),
            "--node",
            worker.node,
        ]

    def spawn(self, worker: Worker) -> None:
        # start_new_session: a Ctrl-C in the terminal reaches the supervisor only, which passes one SIGTERM on
        # (a worker that got SIGINT and SIGTERM would take the second as "exit now" and skip its drain).
        # preexec_fn is safe here: the supervisor runs no threads.
        preexec = _die_with_parent if sys.platform == "linux" else None
        worker.proc = subprocess.Popen(self.command(worker), env=self.env, start_new_session=True, preexec_fn=preexec)
        worker.started = time.monotonic()
        log.info("worker %d started: node %s, pid %d", worker.index, worker.node, worker.proc.pid)

    def _signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.stopping:
            log.info("%s: stopping %d worker(s), each draining", signal.Signals(signum).name, len(self.workers))
        if not self.stopping:
            # A worker still running past its own drain timeout (plus a margin) is killed.
            self.stop_deadline = time.monotonic() + self.settings.shutdown_timeout + 10
        self.stopping = True
        for worker in self.workers:
            if worker.proc is not None and worker.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(signal.SIGTERM)

    def run(self) -> int:
        """Start the workers, keep them running, and return the exit status once all have stopped."""
        # Fail at once if the port is taken by anything but reuse-port sockets; with port 0, pick the port all workers bind.
        try:
            probe = bind_reuse_port(self.settings.host, self.port)
        except OSError as exc:
            log.error("cannot bind %s:%d: %s", self.settings.host, self.port, exc)
            return 1
        self.port = probe.getsockname()[1]
        probe.close()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._signal)
        log.info("supervising %d workers on %s:%d", len(self.workers), self.settings.host, self.port)
        for worker in self.workers:
            self.spawn(worker)
        while True:
            now = time.monotonic()
            alive = 0
            for worker in self.workers:
                if worker.proc is None:
                    if not self.stopping and now >= worker.restart_at:
                        worker.restarts += 1
                        self.spawn(worker)
                        alive += 1
                    continue
                code = worker.proc.poll()
                if code is None:
                    alive += 1
                    continue
                if self.stopping:
                    log.info("worker %d (pid %d) stopped with %d", worker.index, worker.proc.pid, code)
                    worker.proc = None
                    continue
                ran = now - worker.started
                worker.delay = RESTART_MIN if ran >= STABLE_AFTER else min(RESTART_MAX, worker.delay * 2)
                wait = 0.0 if ran >= STABLE_AFTER else worker.delay
                worker.restart_at = now + wait
                log.warning(
                    "worker %d (pid %d, node %s) died with %d after %.1f s; restarting in %.1f s", worker.index, worker.proc.pid, worker.node, code, ran, wait
                )
                worker.proc = None
            if self.stopping and not alive:
                log.info("all workers stopped")
                return 0
            if self.stopping and now > self.stop_deadline:
                for worker in self.workers:
                    if worker.proc is not None and worker.proc.poll() is None:
                        log.warning("worker %d (pid %d) still running past the drain timeout; killing it", worker.index, worker.proc.pid)
                        worker.proc.kill()
            time.sleep(POLL)


def supervise(settings: Settings, argv: list[str]) -> int:
    """Run `settings.workers` workers until SIGTERM/SIGINT; the exit status."""
    logging.basicConfig(level=settings.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)-8s %(name)s: %(message)s")
    if not hasattr(socket, "SO_REUSEPORT"):
        log.error("--workers needs SO_REUSEPORT (Linux, BSD, macOS)")
        return 2
    env = None
    if not settings.api_keys and settings.keys_file is None:
        # One generated key for all workers (each would otherwise make its own, valid on it alone).
        key = generate_key()
        env = os.environ | {"STREAMPLEX_API_KEYS": f"{key}:{ADMIN}"}  # admin, as a single process's generated key
        log.warning("no API key configured (STREAMPLEX_API_KEYS or STREAMPLEX_KEYS_FILE); generated one for this run: %s", key)
    return Supervisor(settings, argv, env).run()
