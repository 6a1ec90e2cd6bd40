"""`python -m streamplex.server` (and `streamplex serve`, which the `streamplex` console script hands here): run the server with uvicorn, draining on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import math
import socket
import sys
from pathlib import Path
from typing import Any, get_args, get_origin

import uvicorn
from pydantic import ValidationError

from streamplex.server.app import create_app
from streamplex.server.config import Settings
from streamplex.server.model_worker import run_worker
from streamplex.server.runtime import Runtime, configure_logging
from streamplex.server.workers import bind_reuse_port, supervise
from streamplex.server.wsprotocol import DirectProtocol


class DrainingServer(uvicorn.Server):
    """A uvicorn server that drains streams before uvicorn closes the sockets."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime

    async def main_loop(self) -> None:
        """uvicorn's main loop, ticking once a second instead of ten times (each tick wakes the event loop; it refreshes
        the Date header once a second and notices `should_exit`, so a signal takes up to a second to act on)."""
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 10) % 864000
            await asyncio.sleep(1.0)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self.runtime.drain(self.runtime.settings.shutdown_timeout)
        await super().shutdown(sockets)


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        text = (field.description or "").replace("%", "%%")  # argparse formats help with %
        annotation = field.annotation
        if annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
            continue
        if get_origin(annotation) is not None:
            args = [a for a in get_args(annotation) if a is not type(None)]
            annotation = args[0] if len(args) == 1 else str
        kind: Any = annotation if annotation in (int, float, Path) else str
        parser.add_argument(flag, dest=name, type=kind, default=None, help=text)


def build_parser() -> argparse.ArgumentParser:
    """The `serve` argument parser: one flag per setting."""
    parser = argparse.ArgumentParser(prog="streamplex serve", description="Run the streamplex server. Flags override STREAMPLEX_* variables.")
    _add_setting_flags(parser)
    return parser


def serve(argv: list[str] | None = None) -> None:
    """Parse flags, then serve until SIGINT/SIGTERM (with `workers` > 1, supervise that many server processes)."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = "\n".join(f"  {'.'.join(map(str, e['loc'])) + ': ' if e['loc'] else ''}{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
        sys.exit(f"streamplex serve: invalid settings:\n{problems}")
    if settings.role == "model":
        sys.exit(run_worker(settings, configure_logging(settings)))
    if settings.workers > 1:
        sys.exit(supervise(settings, argv))
    ring = configure_logging(settings)
    app = create_app(settings, ring)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        ws_max_size=settings.max_frame_bytes,
        ws_ping_interval=settings.heartbeat_interval or None,
        ws_ping_timeout=settings.heartbeat_timeout,
        ws_per_message_deflate=settings.per_message_deflate,
        ws=DirectProtocol,
        log_config=None,
        # Forwarded headers are the app's business (`trusted_proxies`); uvicorn would otherwise trust
        # 127.0.0.1 or its FORWARDED_ALLOW_IPS variable.
        proxy_headers=False,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout + 2),
    )
    server = DrainingServer(config, app.state.runtime)
    # A worker binds its own SO_REUSEPORT socket; uvicorn listens on it.
    sockets = [bind_reuse_port(settings.host, settings.port)] if settings.reuse_port else None
    # uvloop when installed (uvicorn's "auto" loop): asyncio.run alone would always pick the default loop.
    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(server.serve(sockets))
