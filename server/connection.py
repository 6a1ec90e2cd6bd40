"""One client connection: the handshake, the read loop, and the one writer task.

Talks to the socket through the small `Transport` protocol, so it knows nothing of ASGI.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import Protocol

from server.auth import Principal
from server.outbox import OutboxOverflow
from server.protocol import (
    Auth,
    CloseCode,
    EndReason,
    ErrorCode,
    Ping,
    ProtocolError,
    Push,
    Subscribe,
    Unsubscribe,
    decode_binary,
    decode_text,
)
from server.ratelimit import TokenBucket
from server.runtime import Runtime
from server.session import Session

log = logging.getLogger(__name__)


class Disconnected(Exception):
    """The client is gone."""


class Transport(Protocol):
    """The socket as the connection sees it."""

    async def receive(self) -> str | bytes | None:
        """The next message, or None once the client has disconnected."""
        ...

    async def send(self, payload: str | bytes) -> None:
        """Send one message; raise Disconnected if the client is gone."""
        ...

    async def close(self, code: int, reason: str) -> None:
        """Close the WebSocket with `code`."""
        ...


class Connection:
    """Drives one authenticated session over one transport."""

    def __init__(self, runtime: Runtime, transport: Transport, address: str, header_key: str | None) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.stats = runtime.telemetry.stats
        self.transport = transport
        self.address = address
        self.header_key = header_key
        self.session: Session | None = None
        self._close: tuple[int, str] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._finished = asyncio.Event()
        self._sending_since: float | None = None

    def outbox_bytes(self) -> int:
        """Bytes waiting in this connection's outbox."""
        return self.session.outbox.size if self.session else 0

    async def run(self) -> None:
        """Authenticate, then serve until the client leaves, breaks the protocol, or the server drains."""
        if self.runtime.draining:
            await self._send_close(CloseCode.GOING_AWAY, "server shutting down; reconnect elsewhere")
            return
        principal = await self._authenticate()
        if principal is None:
            return
        limits = self.runtime.key_limits
        conn_id = f"{id(self):x}"
        if not await limits.admit(principal.label, conn_id):
            log.warning("refused a connection from %s: %s already holds %d connection(s)", self.address, principal.label, limits.max_connections)
            await self._send_close(CloseCode.RATE_LIMITED, f"this API key already holds its {limits.max_connections} connections")
            return
        session = self.session = Session(self.settings, self.runtime.channels, principal, self.stats)
        self.stats.connections += 1
        self.stats.connections_total += 1
        self.runtime.connections.add(self)
        log.info("session %s opened from %s (%s)", session.id, self.address, principal.label)
        session.reply({"op": "ready", "session": session.id, "node": self.settings.node, "channels": self.runtime.channel_table(principal.scopes), "limits": self.runtime.limits()})
        writer = asyncio.create_task(self._write(session), name=f"writer:{session.id}")
        self._reader = asyncio.create_task(self._read(session), name=f"reader:{session.id}")
        watchdog = asyncio.create_task(self._watch(writer), name=f"watchdog:{session.id}")
        try:
            await asyncio.wait({writer, self._reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watchdog.cancel()
            self._reader.cancel()
            await session.end_all(EndReason.UNSUBSCRIBED, notify=False)
            writer.cancel()
            await asyncio.gather(writer, self._reader, watchdog, return_exceptions=True)
            self.runtime.connections.discard(self)
            self.stats.connections -= 1
            await limits.release(principal.label, conn_id)
            if self._close is not None:
                await self._send_close(*self._close)
            self._finished.set()
            log.info("session %s closed (%s)", session.id, self._close[1] if self._close else "client left")

    async def shutdown(self, timeout: float) -> None:
        """End every stream with reason `shutdown`, flush, and close with 1001."""
        session = self.session
        if session is None or self._reader is None:
            return
        self._close = (CloseCode.GOING_AWAY, "server shutting down; reconnect")
        await session.end_all(EndReason.SHUTDOWN)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await session.outbox.drained()
        self._reader.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._finished.wait()

    async def _send_close(self, code: int, reason: str) -> None:
        self.stats.closes[code] += 1
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.settings.slow_consumer_timeout):
                await self.transport.close(code, reason)

    async def _authenticate(self) -> Principal | None:
        wait = self.runtime.throttle.retry_after(self.address)
        if wait:
            await self._send_close(CloseCode.AUTH_THROTTLED, f"too many failed authentications; retry in {math.ceil(wait)} s")
            return None
        key = self.header_key
        if key is None:
            try:
                async with asyncio.timeout(self.settings.auth_timeout):
                    message = await self.transport.receive()
            except TimeoutError:
                await self._send_close(CloseCode.AUTH_TIMEOUT, f"no auth frame within {self.settings.auth_timeout:g} s")
                return None
            if message is None:
                return None
            self._count_in(message)
            key = self._auth_key(message)
        principal = self.runtime.keys.authenticate(key) if key is not None else None
        if principal is None:
            self.runtime.throttle.failed(self.address)
            self.stats.auth_failures += 1
            log.warning("authentication failed from %s", self.address)
            await self._send_close(CloseCode.UNAUTHORIZED, "invalid API key" if key is not None else 'first frame must be {"op":"auth","api_key":...}')
        return principal

    @staticmethod
    def _auth_key(message: str | bytes) -> str | None:
        if isinstance(message, bytes):
            return None
        try:
            op = decode_text(message)
        except ProtocolError:
            return None
        return op.api_key if isinstance(op, Auth) else None

    def _count_in(self, message: str | bytes) -> None:
        self.stats.frames_in += 1
        self.stats.bytes_in += len(message)

    async def _read(self, session: Session) -> None:
        bucket = TokenBucket(self.settings.rate, self.settings.burst)
        key_limits = self.runtime.key_limits
        strikes = 0
        try:
            while (message := await self.transport.receive()) is not None:
                self._count_in(message)
                try:
                    wait = bucket.take()
                    per_key = not wait and key_limits.rate > 0
                    if per_key:
                        wait = await key_limits.take(session.principal.label)
                    if wait:
                        self.stats.rate_limited += 1
                        strikes += 1
                        if strikes >= self.settings.rate_limit_strikes:
                            self._close = (CloseCode.RATE_LIMITED, "rate limit exceeded repeatedly")
                            return
                        limit = f"this API key's {key_limits.rate:g} ops/s (burst {self.settings.key_burst})" if per_key else f"{self.settings.rate:g} ops/s (burst {self.settings.burst})"
                        raise ProtocolError(ErrorCode.RATE_LIMITED, f"over {limit}", retry_after=wait)
                    strikes = 0
                    await self._dispatch(session, message)
                except ProtocolError as exc:
                    self.stats.errors[str(exc.code)] += 1
                    session.reply(exc.frame())
        except OutboxOverflow:
            self._close = (CloseCode.SLOW_CONSUMER, "client does not read its frames")

    async def _dispatch(self, session: Session, message: str | bytes) -> None:
        if isinstance(message, bytes):
            stream_id, payload = decode_binary(message)
            session.push(stream_id, payload)
            return
        op = decode_text(message)
        match op:
            case Subscribe():
                session.subscribe(op)
            case Push():
                session.push(op.id, op.data, op.end)
            case Unsubscribe():
                await session.unsubscribe(op.id)
            case Ping():
                session.reply({"op": "pong"})
            case Auth():
                raise ProtocolError(ErrorCode.BAD_REQUEST, "already authenticated")

    async def _write(self, session: Session) -> None:
        loop = asyncio.get_running_loop()
        while True:
            payload = await session.outbox.get()
            self._sending_since = loop.time()
            try:
                await self.transport.send(payload)
            except Disconnected:
                return
            self._sending_since = None
            self.stats.frames_out += 1
            self.stats.bytes_out += len(payload)

    async def _watch(self, writer: asyncio.Task[None]) -> None:
        """Close a client whose one pending send has been blocked for slow_consumer_timeout (one timer per connection, not per frame)."""
        timeout = self.settings.slow_consumer_timeout
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            since = self._sending_since
            if since is not None and loop.time() - since > timeout:
                log.warning("session %s: client has not read for %g s; closing as slow consumer", self.session.id if self.session else "?", timeout)
                self._close = (CloseCode.SLOW_CONSUMER, f"client did not read for {timeout:g} s")
                writer.cancel()
                return
