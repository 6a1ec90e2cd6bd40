"""nginx with the shipped deploy/nginx/streamplex.conf on loopback, in front of server processes: the file is copied with
the upstream ports, listen ports and a test certificate (trustme) rendered in; everything else as shipped."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import trustme

from tests.serverproc import ROOT, free_port

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
CONF = ROOT / "deploy" / "nginx" / "streamplex.conf"


def render(conf: str, upstreams: list[int], http_port: int, https_port: int, cert: Path, key: Path) -> str:
    """The shipped config with this test's ports and certificate; everything else as shipped."""
    shipped = re.search(r"(?:    server streamplex-\d:8000([^\n]*)\n)+", conf)
    assert shipped, "the upstream block's servers were not found"
    # Each loopback port with the parameters the shipped servers have (max_fails, fail_timeout).
    servers = "".join(f"    server 127.0.0.1:{port}{shipped.group(1)}\n" for port in upstreams)
    conf = conf[: shipped.start()] + servers + conf[shipped.end() :]
    replacements = {
        "listen 80;": f"listen 127.0.0.1:{http_port};",
        "listen 443 ssl;": f"listen 127.0.0.1:{https_port} ssl;",
        "/etc/nginx/tls/tls.crt": str(cert),
        "/etc/nginx/tls/tls.key": str(key),
    }
    for old, new in replacements.items():
        assert conf.count(old) == 1, old
        conf = conf.replace(old, new)
    return conf


@dataclass
class Nginx:
    proc: subprocess.Popen[bytes]
    http_port: int
    https_port: int
    prefix: Path
    ca: trustme.CA

    def ws(self, tls: bool = False) -> str:
        return f"wss://localhost:{self.https_port}/ws" if tls else f"ws://127.0.0.1:{self.http_port}/ws"

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.prefix.glob("*.log"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def start_nginx(prefix: Path, upstreams: list[int], worker_connections: int = 256) -> Nginx:
    """nginx (one worker) with the shipped config over these loopback upstream ports, serving once /health answers."""
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = prefix / "tls.crt", prefix / "tls.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    http_port, https_port = free_port(), free_port()
    (prefix / "streamplex.conf").write_text(render(CONF.read_text(), upstreams, http_port, https_port, cert, key))
    # A root master would run its workers as `nobody`, who cannot read the prefix: keep them root (they only touch the prefix).
    user = "user root;" if os.geteuid() == 0 else ""
    (prefix / "nginx.conf").write_text(
        f"""
{user}
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log notice;
events {{ worker_connections {worker_connections}; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {prefix}/streamplex.conf;
}}
"""
    )
    assert NGINX is not None, "nginx is not installed (scripts/packages/apt-test.txt)"
    args = [NGINX, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(prefix / "nginx.conf")]
    test = subprocess.run([*args, "-t"], capture_output=True, text=True)
    assert test.returncode == 0, test.stderr
    proc = subprocess.Popen([*args, "-g", "daemon off;"], stderr=subprocess.STDOUT, stdout=(prefix / "stdout.log").open("wb"))
    server = Nginx(proc, http_port, https_port, prefix, ca)
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=2) as resp:
                assert resp.status == 200
                return server
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"nginx did not serve:\n{server.log()}") from None
            time.sleep(0.1)


@contextlib.contextmanager
def running_nginx(prefix: Path, upstreams: list[int], worker_connections: int = 256) -> Iterator[Nginx]:
    """start_nginx until the block ends."""
    server = start_nginx(prefix, upstreams, worker_connections)
    try:
        yield server
    finally:
        server.stop()
