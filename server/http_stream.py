"""HTTP streaming for people with curl: `POST /api/v1/stream/{channel}` (and `GET /api/v1/stream/metrics`).

The same channel code as `/ws`, one stream per request, answered as NDJSON (default), Server-Sent Events
(`Accept: text/event-stream`) or raw bytes (media channels). Authenticated by `X-API-Key`, limited per
client address and by the API key's limits (open HTTP streams, connections, op rate: `KeyLimits`, as the
socket), ended by the server's drain like WebSocket streams, or by `http_stream_timeout`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import orjson
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from streamplex.server.auth import Principal, address_key, refusal
from streamplex.server.channel import END_OF_INPUT, Binary, Channel, ChannelError, Checkpoint, Gap, Shared, StreamContext, as_generator
from streamplex.server.protocol import ErrorCode
from streamplex.server.ratelimit import TokenBucket
from streamplex.server.runtime import Runtime

log = logging.getLogger(__name__)

PREFIX = "/api/v1/stream"
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
BODY_PIECE = 32_768  # a raw request body is pushed to the stream in pieces of this many bytes (even: whole 16-bit samples)
MAX_INFO_HEADER = 4096
MJPEG_BOUNDARY = "streamplex-frame"

STATUS = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.INVALID_PARAMS: 400,
    ErrorCode.UNKNOWN_CHANNEL: 404,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.BAD_SOURCE: 422,
    ErrorCode.INTERNAL: 500,
}


def error_response(status: int, code: str, message: str, *, details: list[dict[str, Any]] | None = None, retry_after: float | None = None) -> JSONResponse:
    """The JSON error body every refused HTTP stream request gets: `{"error": {"code", "message", "details"?}}`."""
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    headers = {"Retry-After": str(max(1, round(retry_after + 0.5)))} if retry_after is not None else None
    return JSONResponse({"error": error}, status_code=status, headers=headers)


async def read_bounded(request: Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it is known to exceed `limit` bytes (never buffering more than that)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            return None
    return bytes(body)


def header_key(headers: Headers) -> str | None:
    """The API key a request carries in `X-API-Key` or `Authorization: Bearer`, if any."""
    if key := headers.get("x-api-key"):
        return key
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def check_key(runtime: Runtime, key: str, address: str) -> Principal | Response:
    """The key's principal, or the refusal: 429 while `address` is throttled, 403 for a wrong key (counted by the throttle)."""
    if wait := runtime.throttle.retry_after(address):
        return error_response(429, str(ErrorCode.RATE_LIMITED), "too many failed authentications from this address", retry_after=wait)
    principal = runtime.keys.authenticate(key)
    if principal is None:
        runtime.throttle.failed(address)
        runtime.telemetry.stats.auth_failures += 1
        return error_response(403, "forbidden", "invalid API key")
    return principal


class AddressLimiter:
    """A token bucket per client address (`per_minute` requests, refilled evenly); bounded in addresses tracked."""

    def __init__(self, per_minute: int, max_addresses: int = 10_000, ipv6_prefix: int = 64) -> None:
        self.per_minute = per_minute
        self.max_addresses = max_addresses
        self.ipv6_prefix = ipv6_prefix
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, address: str) -> float:
        """0.0 when `address` may make a request now, else the seconds until it may."""
        address = address_key(address, self.ipv6_prefix)
        bucket = self._buckets.get(address)
        if bucket is None:
            bucket = self._buckets[address] = TokenBucket(self.per_minute / 60.0, self.per_minute)
            while len(self._buckets) > self.max_addresses:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(address)
        return bucket.take()


_DONE = object()


def negotiate(accept: str, channel: Channel) -> str:
    """`ndjson` unless the client asks for `sse`; `raw` bytes for media channels unless the client asks for NDJSON or SSE."""
    accept = accept.lower()
    if SSE in accept:
        return "sse"
    if NDJSON in accept or "application/json" in accept:
        return "ndjson"
    return "raw" if channel.media else "ndjson"


def _is_array(prop: dict[str, Any]) -> bool:
    return prop.get("type") == "array" or any(branch.get("type") == "array" for branch in prop.get("anyOf", []))


def query_params(request: Request, channel: Channel) -> dict[str, Any]:
    """Params from the query string: each value as JSON when it parses, else a string; a list param may repeat (`?f=a&f=b`)."""
    arrays = {key for key, prop in channel.Params.model_json_schema().get("properties", {}).items() if _is_array(prop)}
    params: dict[str, Any] = {}
    for key, text in request.query_params.multi_items():
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError:
            value = text  # a bare word is a string
        if key in arrays and not isinstance(value, list):
            params.setdefault(key, []).append(value)
        else:
            params[key] = value
    return params


class HttpStreams:
    """The `/api/v1/stream/{channel}` endpoint."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.limiter = AddressLimiter(self.settings.http_rate_limit, ipv6_prefix=self.settings.address_ipv6_prefix) if self.settings.http_rate_limit else None
        self._releasing: set[asyncio.Task[None]] = set()

    def _authenticate(self, request: Request, address: str) -> Principal | Response:
        key = header_key(request.headers)
        if not key:
            return error_response(401, "unauthorized", "send your API key in the X-API-Key header")
        return check_key(self.runtime, key, address)

    async def endpoint(self, request: Request) -> Response:
        """Validate, then stream one channel's chunks in the negotiated format."""
        address = request.client.host if request.client else "unknown"
        name = request.url.path.removeprefix(PREFIX + "/")
        if self.limiter is not None and (wait := self.limiter.take(address)):
            return error_response(
                429, str(ErrorCode.RATE_LIMITED), f"over {self.settings.http_rate_limit} requests per minute from this address", retry_after=wait
            )
        principal = self._authenticate(request, address)
        if isinstance(principal, Response):
            return principal
        if self.runtime.draining or not self.runtime.started:
            return error_response(503, str(ErrorCode.UNAVAILABLE), "the server is not serving now (starting or draining)", retry_after=5.0)
        channel = self.runtime.channels.get(name)
        if channel is None:
            return error_response(404, str(ErrorCode.UNKNOWN_CHANNEL), f"unknown channel {name!r}; available: {sorted(self.runtime.channels)}")
        if not principal.may_use(name, channel.admin):
            return error_response(403, str(ErrorCode.FORBIDDEN), refusal(name, channel.admin))
        status = channel.status()
        if status.state != "available":
            return error_response(
                503,
                str(ErrorCode.UNAVAILABLE),
                f"channel {name!r} is {status.state}: {status.reason}",
                retry_after=5.0 if status.state == "loading" and status.retry_after is None else status.retry_after,
            )
        key_limits = self.runtime.key_limits
        if key_limits.rate > 0 and (wait := await key_limits.take(principal.label)):
            self.runtime.telemetry.stats.rate_limited += 1
            return error_response(
                429, str(ErrorCode.RATE_LIMITED), f"over this API key's {key_limits.rate:g} ops/s (burst {self.settings.key_burst})", retry_after=wait
            )
        slot = f"http-{secrets.token_hex(8)}"
        if refused := await self._admit(principal.label, slot):
            log.warning("refused an HTTP stream of %s from %s: %s", name, address, bytes(refused.body).decode())
            return refused
        try:
            response = await self._open(request, channel, principal, address)
        except BaseException:
            self._release(principal.label, slot)
            raise
        return _Releasing(response, lambda: self._release(principal.label, slot))

    async def _admit(self, label: str, slot: str) -> Response | None:
        """Hold one of the key's HTTP streams and one of its connections; the 429 refusal when either is used up."""
        streams, connections = self.runtime.http_limits, self.runtime.key_limits
        if not await streams.admit(label, slot):
            self.runtime.telemetry.stats.rate_limited += 1
            return error_response(
                429, str(ErrorCode.RATE_LIMITED), f"this API key holds its {streams.max_connections} HTTP streams (http_key_max_streams)", retry_after=1.0
            )
        if not await connections.admit(label, slot):
            await streams.release(label, slot)
            self.runtime.telemetry.stats.rate_limited += 1
            return error_response(
                429, str(ErrorCode.RATE_LIMITED), f"this API key holds its {connections.max_connections} connections (key_max_connections)", retry_after=1.0
            )
        return None

    def _release(self, label: str, slot: str) -> None:
        # A task of its own: the request's cancel scope would cancel an await here at once.
        task = asyncio.create_task(self._release_now(label, slot), name=f"http-release:{slot}")
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _release_now(self, label: str, slot: str) -> None:
        await self.runtime.http_limits.release(label, slot)
        await self.runtime.key_limits.release(label, slot)

    async def _open(self, request: Request, channel: Channel, principal: Principal, address: str) -> Response:
        """Read the params (query or body), start the stream and answer with its response."""
        name = channel.name
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        raw_body = request.method == "POST" and (content_type == "application/octet-stream" or content_type.startswith("audio/"))
        if raw_body and not channel.accepts_push:
            return error_response(415, str(ErrorCode.BAD_REQUEST), f"channel {name!r} takes no pushed input: send its params as a JSON body")
        if request.method == "GET" or raw_body:
            raw = query_params(request, channel)
        else:
            body = await read_bounded(request, self.settings.max_frame_bytes)
            if body is None:
                return error_response(413, str(ErrorCode.BAD_REQUEST), f"the body is over {self.settings.max_frame_bytes} bytes (max_frame_bytes)")
            try:
                raw = orjson.loads(body) if body.strip() else {}
            except orjson.JSONDecodeError as exc:
                return error_response(400, str(ErrorCode.BAD_REQUEST), f"the body is not valid JSON: {exc}")
            if not isinstance(raw, dict):
                return error_response(400, str(ErrorCode.BAD_REQUEST), "the body must be a JSON object of the channel's params")
        try:
            params = channel.parse(raw)
        except ChannelError as exc:
            return error_response(STATUS.get(exc.code, 400), str(exc.code), exc.message, details=exc.details)

        inbox: asyncio.Queue[Any] = asyncio.Queue(self.settings.push_queue + 1)
        if not raw_body:
            inbox.put_nowait(END_OF_INPUT)
        ctx = StreamContext(f"http-{id(request):x}", inbox, tenant=principal.label)
        fmt = negotiate(request.headers.get("accept", ""), channel)
        stream = _Stream(self.runtime, channel, params, ctx, request if raw_body else None)
        log.debug("HTTP stream %s of %s from %s (%s, %s)", ctx.stream_id, name, address, principal.label, fmt)
        if fmt == "raw":
            return await stream.raw_response()
        render = _sse if fmt == "sse" else _ndjson
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        response_class = _BodyStreamingResponse if raw_body else StreamingResponse
        return response_class(stream.rendered(render), media_type=SSE if fmt == "sse" else NDJSON, headers=headers)


class _Releasing(Response):
    """A response that gives back the stream's per-key slots once it has been sent, however that ends."""

    def __init__(self, inner: Response, release: Callable[[], None]) -> None:
        self.inner = inner
        self.release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.inner(scope, receive, send)
        finally:
            self.release()


class _BodyStreamingResponse(StreamingResponse):
    """A streaming response whose request body is still being read by the stream (pushed input).

    Starlette's StreamingResponse reads the request's messages to notice a disconnect, which would take body
    chunks from the stream; here the stream's body reader notices the disconnect itself.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.stream_response(send)


def _ndjson(event: str, body: dict[str, Any]) -> bytes:
    return orjson.dumps(body) + b"\n"


def _sse(event: str, body: dict[str, Any]) -> bytes:
    seq = f"id: {body['seq']}\n" if "seq" in body else ""
    return f"event: {event}\n{seq}data: ".encode() + orjson.dumps(body) + b"\n\n"


class _Stream:
    """One HTTP stream: runs the channel, feeds a raw request body to it, ends on drain or timeout."""

    def __init__(self, runtime: Runtime, channel: Channel, params: Any, ctx: StreamContext, body: Request | None) -> None:
        self.runtime = runtime
        self.channel = channel
        self.params = params
        self.ctx = ctx
        self.body = body
        self.reason = "complete"
        self.error: dict[str, Any] | None = None

    async def _feed(self, request: Request) -> None:
        """Push the request body to the stream as it arrives, then end the input; return once the client has gone."""
        carry = b""
        async for piece in request.stream():
            carry += piece
            while len(carry) >= BODY_PIECE:
                await self.ctx.inbox.put(carry[:BODY_PIECE])
                carry = carry[BODY_PIECE:]
        if carry:
            await self.ctx.inbox.put(carry)
        await self.ctx.inbox.put(END_OF_INPUT)
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def _produce(self, out: asyncio.Queue[Any]) -> None:
        try:
            async with contextlib.aclosing(as_generator(self.channel.stream(self.params, self.ctx))) as chunks:
                async for item in chunks:
                    await out.put(item.data if isinstance(item, Checkpoint) else item)
        except ChannelError as exc:
            await out.put(exc)
            return
        except Exception as exc:
            log.exception("HTTP stream %s of channel %s failed", self.ctx.stream_id, self.channel.name)
            await out.put(exc)
            return
        await out.put(_DONE)

    async def items(self) -> AsyncGenerator[tuple[int, Any, int], None]:
        """(seq, chunk, dropped before it); sets `reason` and `error` when the stream is over.

        The channel runs in its own task (as under /ws), handing chunks over one at a time; this side
        waits for the next one, the server's drain, or the stream's deadline.
        """
        stats = self.runtime.telemetry.stats
        name = self.channel.name
        stats.streams[name] += 1
        stats.streams_total[name] += 1
        timeout = self.runtime.settings.http_stream_timeout
        deadline = time.monotonic() + timeout if timeout else None
        handoff: asyncio.Queue[Any] = asyncio.Queue(1)
        tasks: list[asyncio.Task[Any]] = [asyncio.create_task(self._produce(handoff), name=f"http:{self.ctx.stream_id}")]
        drain = asyncio.create_task(self.runtime.drain_started.wait())
        tasks.append(drain)
        stops: set[asyncio.Task[Any]] = {drain}
        if self.body is not None:
            feeder = asyncio.create_task(self._feed(self.body))  # it ends when the client leaves
            tasks.append(feeder)
            stops.add(feeder)
        seq = dropped = 0
        try:
            while True:
                get = asyncio.ensure_future(handoff.get())
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                done, _ = await asyncio.wait({get, *stops}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    self.reason = "shutdown" if drain in done else "timeout" if not done else "client gone"
                    return
                item = get.result()
                if item is _DONE:
                    return
                if isinstance(item, ChannelError):
                    self.reason, self.error = "error", {"code": str(item.code), "message": item.message}
                    return
                if isinstance(item, Exception):
                    self.reason, self.error = "error", {"code": str(ErrorCode.INTERNAL), "message": "internal error; see the server log"}
                    return
                if isinstance(item, Gap):
                    dropped += item.count
                    stats.dropped[name] += item.count
                    continue
                yield seq, item.data if isinstance(item, Shared) else item, dropped
                seq += 1
                dropped = 0
        except asyncio.CancelledError:
            self.reason = "client gone"
            raise
        finally:
            # Bookkeeping first: under Starlette's cancel scope every await here is cancelled again at once.
            stats.streams[name] -= 1
            if self.error is not None:
                stats.errors[self.error["code"]] += 1
            log.debug("HTTP stream %s (%s) ended: %s", self.ctx.stream_id, name, self.reason)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def rendered(self, render: Callable[[str, dict[str, Any]], bytes]) -> AsyncIterator[bytes]:
        """NDJSON lines or SSE events: each chunk, then one `end` carrying the reason (and error)."""
        async for seq, item, dropped in self.items():
            body: dict[str, Any] = {"seq": seq}
            if isinstance(item, Binary):
                body["binary"] = base64.b64encode(item.payload).decode()
            else:
                body["data"] = item
            if dropped:
                body["dropped"] = dropped
            yield render("chunk", body)
        end: dict[str, Any] = {"end": self.reason}
        if self.error is not None:
            end["error"] = self.error
        yield render("end", end)

    async def raw_response(self) -> Response:
        """Media as raw bytes: the JSON chunks before the first binary one go in `X-Streamplex-Info`, later ones are left out."""
        items = self.items()
        info: list[Any] = []
        first: Binary | None = None
        async for _, item, _ in items:
            if isinstance(item, Binary):
                first = item
                break
            info.append(item)
        if first is None:
            await items.aclose()
            if self.error is not None:
                return error_response(STATUS.get(ErrorCode(self.error["code"]), 500), self.error["code"], self.error["message"])
            return error_response(422, str(ErrorCode.BAD_SOURCE), "the stream ended before any media")
        header = orjson.dumps(info[0] if len(info) == 1 else info).decode()
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        if len(header) <= MAX_INFO_HEADER:
            headers["X-Streamplex-Info"] = header
        described = info[0] if info and isinstance(info[0], dict) else {}
        if described.get("format") == "jpeg":
            return StreamingResponse(self._mjpeg(first, items), media_type=f"multipart/x-mixed-replace; boundary={MJPEG_BOUNDARY}", headers=headers)
        media_type = "audio/wav" if described.get("format") == "wav" else "application/octet-stream"
        return StreamingResponse(self._bytes(first, items), media_type=media_type, headers=headers)

    async def _bytes(self, first: Binary, items: AsyncIterator[tuple[int, Any, int]]) -> AsyncIterator[bytes]:
        yield first.payload
        async for _, item, _ in items:
            if isinstance(item, Binary):
                yield item.payload
        self._abort_on_error()

    async def _mjpeg(self, first: Binary, items: AsyncIterator[tuple[int, Any, int]]) -> AsyncIterator[bytes]:
        def part(jpeg: bytes) -> bytes:
            return f"--{MJPEG_BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n".encode() + jpeg + b"\r\n"

        yield part(first.payload)
        async for _, item, _ in items:
            if isinstance(item, Binary):
                yield part(item.payload)
        self._abort_on_error()
        yield f"--{MJPEG_BOUNDARY}--\r\n".encode()

    def _abort_on_error(self) -> None:
        # Raw bytes have no room for an in-band error: cut the response short so the client sees an incomplete transfer.
        if self.error is not None:
            raise RuntimeError(f"HTTP media stream {self.ctx.stream_id} ended with {self.error['code']}: {self.error['message']}")
