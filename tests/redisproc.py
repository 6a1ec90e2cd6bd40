"""A real redis-server on a free loopback port, started and stopped by the tests; optionally with a password and TLS."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from tests.serverproc import free_port


@dataclass
class RedisProc:
    """A redis-server without persistence on a fixed loopback port, restartable on that port.

    With `password`, it requires it (`requirepass`); with `tls` (redis-server's TLS arguments), the port is its
    TLS port and `admin` holds the client's TLS options; `args` are further redis-server arguments.
    """

    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    password: str = ""
    args: tuple[str, ...] = ()
    tls: tuple[str, ...] = ()
    admin: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A client of the default user (the caller closes it)."""
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password or None, socket_connect_timeout=0.5, **self.admin)

    def start(self) -> None:
        ports = ["--port", "0", "--tls-port", str(self.port), *self.tls] if self.tls else ["--port", str(self.port)]
        args = ["redis-server", *ports, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no", *self.args]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT)
        client = self.client()
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start:\n{self.log_path.read_text()}") from None
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@contextmanager
def running_redis(folder: Path, **options: Any) -> Iterator[RedisProc]:
    """A started redis-server on a free loopback port, logging into `folder`; stopped afterwards. `options` go to RedisProc."""
    proc = RedisProc(free_port(), folder / "redis.log", **options)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
