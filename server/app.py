"""The Starlette app: the only module that knows ASGI. `/ws`, `/health`, `/ready`, `/metrics`, `/channels`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from server.config import Settings
from server.connection import Connection, Disconnected
from server.logbuffer import RingLogHandler
from server.runtime import Runtime


class _StarletteTransport:
    """server.connection.Transport over a Starlette WebSocket."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket

    async def receive(self) -> str | bytes | None:
        message = await self.websocket.receive()
        if message["type"] == "websocket.disconnect":
            return None
        text = message.get("text")
        return text if text is not None else message.get("bytes", b"")

    async def send(self, payload: str | bytes) -> None:
        key = "text" if isinstance(payload, str) else "bytes"
        try:
            await self.websocket.send({"type": "websocket.send", key: payload})
        except (WebSocketDisconnect, OSError, RuntimeError) as exc:
            raise Disconnected from exc

    async def close(self, code: int, reason: str) -> None:
        await self.websocket.close(code, reason)


def _header_key(websocket: WebSocket) -> str | None:
    if key := websocket.headers.get("x-api-key"):
        return key
    scheme, _, token = websocket.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def create_app(settings: Settings | None = None, log_handler: RingLogHandler | None = None) -> Starlette:
    """Build the app; its Runtime is at `app.state.runtime`."""
    runtime = Runtime(settings or Settings(), log_handler)

    async def ws_endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        address = websocket.client.host if websocket.client else "unknown"
        await Connection(runtime, _StarletteTransport(websocket), address, _header_key(websocket)).run()

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "alive", "node": runtime.settings.node})

    async def ready(request: Request) -> Response:
        serving = runtime.started and not runtime.draining
        body = {"status": "ready" if serving else "draining" if runtime.draining else "starting", "channels": {c["name"]: c["status"] for c in runtime.channel_table()}}
        return JSONResponse(body, status_code=200 if serving else 503)

    async def metrics(request: Request) -> Response:
        return Response(runtime.telemetry.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def channels(request: Request) -> Response:
        schemas = {name: channel.Params.model_json_schema() for name, channel in runtime.channels.items()}
        return JSONResponse({"channels": [entry | {"params": schemas[entry["name"]]} for entry in runtime.channel_table()]})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.drain(runtime.settings.shutdown_timeout)
            await runtime.stop()

    app = Starlette(
        routes=[
            WebSocketRoute("/ws", ws_endpoint),
            Route("/health", health),
            Route("/ready", ready),
            Route("/metrics", metrics),
            Route("/channels", channels),
        ],
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    return app
