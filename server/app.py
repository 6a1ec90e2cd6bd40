"""The ASGI app, the only module that knows ASGI: `/ws` served directly; `/health`, `/ready`, `/metrics`, `/channels`, the HTTP streams
(`/api/v1/stream/*`), the API documents (`/openapi.json`, `/asyncapi.json`) and the dashboard (`/`) by Starlette."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from streamplex.server import apidocs, docpages
from streamplex.server.auth import Principal
from streamplex.server.config import ROOT, Settings
from streamplex.server.connection import Connection, Disconnected, TrySend, watch_slow_consumers
from streamplex.server.http_stream import PREFIX, HttpStreams, check_key, header_key
from streamplex.server.logbuffer import RingLogHandler
from streamplex.server.protocol import CloseCode
from streamplex.server.runtime import Runtime
from streamplex.server.wsprotocol import TRY_SEND


class _AsgiTransport:
    """streamplex.server.connection.Transport straight over the ASGI callables (Starlette's per-send wrappers cost more than the send)."""

    __slots__ = ("_receive", "_send", "left_cleanly", "try_send")

    def __init__(self, receive: Receive, send: Send, try_send: TrySend | None) -> None:
        self._receive = receive
        self._send = send
        self.left_cleanly = False
        self.try_send: TrySend = try_send or _cannot_send  # server.wsprotocol's direct send when uvicorn runs with it

    async def receive(self) -> str | bytes | None:
        message = await self._receive()
        if message["type"] != "websocket.receive":
            self.left_cleanly = message.get("code") in (1000, 1001)
            return None
        text = message.get("text")
        return text if text is not None else message.get("bytes") or b""

    async def send(self, payload: str | bytes) -> None:
        message = {"type": "websocket.send", "text": payload} if isinstance(payload, str) else {"type": "websocket.send", "bytes": payload}
        try:
            await self._send(message)
        except (OSError, RuntimeError) as exc:  # uvicorn's ClientDisconnected is an OSError
            raise Disconnected from exc

    async def close(self, code: int, reason: str) -> None:
        await self._send({"type": "websocket.close", "code": code, "reason": reason})


def _cannot_send(payload: str | bytes, compress: bool = True) -> bool:
    return False


def trusted_proxies(settings: Settings) -> list[str]:
    """`trusted_proxies` as normalised networks (`10.0.0.5` -> `10.0.0.5/32`)."""
    return [str(ipaddress.ip_network(part.strip(), strict=False)) for part in settings.trusted_proxies.split(",") if part.strip()]


class App:
    """The ASGI app: `/ws` handled directly, everything else by the Starlette app at `http`.

    With `trusted_proxies`, uvicorn's ProxyHeadersMiddleware first takes the client's address (and scheme) from
    `X-Forwarded-For` (`X-Forwarded-Proto`) of requests that come from one of them; otherwise those headers are
    ignored, whatever the ASGI server is told (`python -m streamplex.server` runs uvicorn with its own proxy handling off).
    """

    def __init__(self, runtime: Runtime, http: Starlette) -> None:
        self.runtime = runtime
        self.http = http
        self.state = http.state
        self.sockets = 0  # open /ws connections, before and after authentication
        proxies = trusted_proxies(runtime.settings)
        # uvicorn types ASGI apps with its own TypedDicts, Starlette with plain mappings: the same protocol.
        self._entry: ASGIApp = ProxyHeadersMiddleware(self._route, trusted_hosts=proxies) if proxies else self._route  # type: ignore[arg-type,assignment]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._entry(scope, receive, send)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == "/ws":
            await self._websocket(scope, receive, send)
        else:
            await self.http(scope, receive, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        limit = self.runtime.settings.max_connections
        if self.sockets >= limit:
            self.runtime.telemetry.stats.closes[CloseCode.TRY_AGAIN_LATER] += 1
            await send({"type": "websocket.close", "code": CloseCode.TRY_AGAIN_LATER, "reason": f"the server holds its {limit} connections; try again later"})
            return
        client = scope.get("client")
        address = client[0] if client else "unknown"
        transport = _AsgiTransport(receive, send, (scope.get("extensions") or {}).get(TRY_SEND))
        self.sockets += 1
        try:
            await Connection(self.runtime, transport, address, header_key(Headers(scope=scope))).run()
        finally:
            self.sockets -= 1


CLIENT_JS = ROOT / "client_js"


def _cors(settings: Settings) -> list[Middleware]:
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if not origins:
        return []
    return [
        Middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["X-API-Key", "Authorization", "Content-Type", "Accept"],
            expose_headers=["Retry-After", "X-Streamplex-Info"],
            max_age=600,
        )
    ]


def create_app(settings: Settings | None = None, log_handler: RingLogHandler | None = None) -> App:
    """Build the app; its Runtime is at `app.state.runtime`."""
    runtime = Runtime(settings or Settings(), log_handler)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "alive", "node": runtime.settings.node})

    def keyed(request: Request) -> Principal | Response | None:
        """The principal of the request's key (X-API-Key or bearer), None without one, or the refusal of a bad one
        (counted by the failed-auth throttle, as on /ws and the HTTP streams)."""
        key = header_key(request.headers)
        if key is None:
            return None
        return check_key(runtime, key, request.client.host if request.client else "unknown")

    async def ready(request: Request) -> Response:
        principal = keyed(request)
        if isinstance(principal, Response):
            return principal
        serving = runtime.started and not runtime.draining
        body = {
            "status": "ready" if serving else "draining" if runtime.draining else "starting",
            "channels": {c["name"]: c["status"] for c in runtime.channel_table(principal)},
        }
        return JSONResponse(body, status_code=200 if serving else 503)

    async def metrics(request: Request) -> Response:
        return Response(runtime.telemetry.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def channels(request: Request) -> Response:
        principal = keyed(request)
        if isinstance(principal, Response):
            return principal
        schemas = {name: channel.Params.model_json_schema() for name, channel in runtime.channels.items()}
        return JSONResponse({"channels": [entry | {"params": schemas[entry["name"]]} for entry in runtime.channel_table(principal)]})

    http_streams = HttpStreams(runtime)

    async def openapi(request: Request) -> Response:
        return JSONResponse(apidocs.openapi(runtime.channels))

    async def asyncapi(request: Request) -> Response:
        return JSONResponse(apidocs.asyncapi(runtime.channels))

    async def dashboard(request: Request) -> Response:
        return FileResponse(CLIENT_JS / "index.html", headers={"Cache-Control": "no-cache"})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await runtime.start()
        watchdog = asyncio.create_task(watch_slow_consumers(runtime), name="slow-consumer-watchdog")
        try:
            yield
        finally:
            await runtime.drain(runtime.settings.shutdown_timeout)
            watchdog.cancel()
            await runtime.stop()

    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/ready", ready),
            Route("/metrics", metrics),
            Route("/channels", channels),
            Route(PREFIX + "/metrics", http_streams.endpoint, methods=["GET", "POST"]),
            Route(PREFIX + "/{channel}", http_streams.endpoint, methods=["POST"]),
            Route("/openapi.json", openapi),
            Route("/asyncapi.json", asyncapi),
            *docpages.routes(),
            Route("/", dashboard),
            Mount("/client", StaticFiles(directory=CLIENT_JS)),
        ],
        middleware=_cors(runtime.settings),
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    return App(runtime, app)
