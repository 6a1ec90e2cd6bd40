"""One client connection: the handshake, the read loop, and the one writer task.

Talks to the socket through the small `Transport` protocol, so it knows nothing of ASGI.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Coroutine
from typing import Any, Protocol

from streamplex.server.auth import Principal
from streamplex.server.budget import Budget
from streamplex.server.outbox import Outbox, OutboxOverflow, Payload, Pending
from streamplex.server.protocol import (
    Auth,
    CloseCode,
    EndReason,
    ErrorCode,
    Ping,
    ProtocolError,
    Push,
    Resume,
    Subscribe,
    Unsubscribe,
    decode_binary,
    decode_text,
    encode,
    end_frame,
    frame_id,
    subscribe_id,
)
from streamplex.server.ratelimit import TokenBucket
from streamplex.server.runtime import Runtime
from streamplex.server.session import Session, parse

log = logging.getLogger(__name__)

OFFLOAD_BYTES = 65536  # a larger message is decoded and its params validated in the runtime's parser thread, off the event loop


class Disconnected(Exception):
    """The client is gone."""


class TrySend(Protocol):
    def __call__(self, payload: str | bytes, compress: bool = True) -> bool: ...


class Transport(Protocol):
    """The socket as the connection sees it."""

    left_cleanly: bool
    """After `receive` returned None: whether the client closed with 1000 or 1001 (not a dropped connection)."""

    async def receive(self) -> str | bytes | None:
        """The next message, or None once the client has disconnected."""
        ...

    def try_send(self, payload: str | bytes, compress: bool = True) -> bool:
        """Send one message at once if the socket takes it without waiting; False if it cannot (then `send` it).

        `compress=False` asks for the message to go uncompressed even on a permessage-deflate connection.
        """
        ...

    async def send(self, payload: str | bytes) -> None:
        """Send one message; raise Disconnected if the client is gone."""
        ...

    async def close(self, code: int, reason: str) -> None:
        """Close the WebSocket with `code`."""
        ...


class Waiting:
    """A subscribe waiting for its admission turn: its task, its turn, and the bytes of its message charged to the
    connection's budget while it is held (so that waiting subscribes stay within `connection_memory`)."""

    __slots__ = ("budget", "charged", "task", "turn")

    def __init__(self, budget: Budget, size: int, turn: asyncio.Future[None] | None) -> None:
        self.budget, self.charged, self.turn = budget, size, turn
        self.task: asyncio.Task[None] | None = None
        budget.params += size

    def release(self) -> None:
        """Give the charge back (once)."""
        self.budget.params -= self.charged
        self.charged = 0

    def done(self, _: object = None) -> None:
        """Its task ended, however (one cancelled before it ran never entered its body): nothing of it is held any more."""
        if self.turn is not None:
            self.turn.cancel()  # the admitter skips a cancelled turn
        self.release()

    def give_up(self) -> None:
        """Unsubscribed, or the client left: stop waiting now (the charge comes back at once, for the next op)."""
        if self.task is not None:
            self.task.cancel()
        self.done()


class Connection:
    """Drives one authenticated session over one transport."""

    __slots__ = (
        "_close",
        "_dropped",
        "_finished",
        "_moved",
        "_reading",
        "_resumed",
        "_sending_since",
        "_stopping",
        "_task",
        "_try_send",
        "_waiting",
        "_writer",
        "address",
        "header_key",
        "runtime",
        "session",
        "settings",
        "stats",
        "transport",
    )

    def __init__(self, runtime: Runtime, transport: Transport, address: str, header_key: str | None) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.stats = runtime.telemetry.stats
        self.transport = transport
        self._try_send = transport.try_send  # one lookup less per frame
        self.address = address
        self.header_key = header_key
        self.session: Session | None = None
        self._close: tuple[int, str] | None = None
        self._task: asyncio.Task[Any] | None = None
        self._writer: asyncio.Task[None] | None = None  # exists only while frames wait (see server/outbox.py)
        self._reading = False
        self._stopping = False
        self._dropped = False  # the connection dropped (no close frame with 1000 or 1001): resumable
        self._resumed = False
        self._moved = False  # the session was resumed on another connection (see `hand_over`)
        self._finished: asyncio.Future[None] | None = None  # made only when shutdown() waits for the end
        self._sending_since: float | None = None
        self._waiting: dict[str, Waiting] = {}  # subscribes waiting for their admission turn, by stream id

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
        session = self.session = Session(self.settings, self.runtime.channels, principal, self.stats, self.runtime.store)
        self.stats.connections += 1
        self.stats.connections_total += 1
        self.runtime.connections.add(self)
        log.debug("session %s opened from %s (%s)", session.id, self.address, principal.label)
        # This task reads; a writer task exists only while frames wait for the socket.
        self._task = asyncio.current_task()
        session.outbox.attach(self._send_now, self._wake_writer)
        self._send_ready(session)
        self._reading = True
        try:
            await self._read()
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            assert self._task is not None  # set above, by this very task
            self._task.uncancel()
        finally:
            self._reading = False
            waiting, self._waiting = list(self._waiting.values()), {}
            for entry in waiting:
                entry.give_up()
            session = self.session
            session.outbox.detach()
            writer, self._writer = self._writer, None
            resumable = self._dropped and self._close is None and self.settings.resume_window > 0 and not self.runtime.draining
            if not resumable:
                await session.end_all(EndReason.UNSUBSCRIBED, notify=False)
                if not self._moved:
                    self.runtime.forget(session)
            if writer is not None:
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
            if resumable:
                self.runtime.detach(session)
            self.runtime.connections.discard(self)
            self.stats.connections -= 1
            await limits.release(principal.label, conn_id)
            if self._close is not None:
                await self._send_close(*self._close)
            if self._finished is not None:
                self._finished.set_result(None)
            log.debug("session %s closed (%s)", session.id, self._close[1] if self._close else "client left")

    async def shutdown(self, timeout: float) -> None:
        """End every stream with reason `shutdown`, flush, and close with 1001."""
        session = self.session
        if session is None or not self._reading:
            return
        self._close = (CloseCode.GOING_AWAY, "server shutting down; reconnect")
        self._finished = asyncio.get_running_loop().create_future()
        waiting, self._waiting = self._waiting, {}
        for stream_id, entry in waiting.items():  # never opened here: told so like the open ones, not opened while draining
            entry.give_up()
            with contextlib.suppress(OutboxOverflow):
                session.reply(end_frame(stream_id, EndReason.SHUTDOWN))
        await session.end_all(EndReason.SHUTDOWN)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await session.outbox.drained()
        self._stop_reading()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._finished)

    def _send_ready(self, session: Session) -> None:
        """Send `ready` (apart from `run`, whose frame would keep it for the whole connection), uncompressed when the
        socket takes it at once: with permessage-deflate, a connection sent nothing else then never makes its compressor."""
        frame = {
            "op": "ready",
            "session": session.id,
            "node": self.settings.node,
            "channels": self.runtime.channel_table(session.principal),
            "limits": self.runtime.limits(),
        }
        if self.settings.resume_window > 0:
            frame["resume"] = {"token": session.token, "window_s": self.settings.resume_window}
        ready = encode(frame)
        if self._try_send(ready, compress=False):
            self._count_out(len(ready))
        else:
            session.outbox.put_control(ready)

    def _wake_writer(self) -> None:
        """The outbox's `wake` hook: frames wait, so start the writer that sends them."""
        session = self.session
        assert session is not None and self._writer is None
        writer = self._writer = asyncio.create_task(self._write(session.outbox), name=f"writer:{session.id}")
        writer.add_done_callback(self._writer_done)

    def _writer_done(self, writer: asyncio.Task[None]) -> None:
        if writer is self._writer:  # it did not finish draining: the client is gone or too slow
            self._stop_reading()

    async def _resume(self, op: Resume) -> None:
        """Take over the detached session named by `op.token`: replay what the client missed, then go on."""
        fresh = self.session
        if fresh is None or fresh.streams or fresh.ended or self._waiting or self._resumed:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "resume must be the first op after ready")
        old = self.runtime.reattach(op.token, fresh.principal.label)
        adopted = None if old is not None else await self.runtime.adopt(op.token, fresh.principal, op.streams, op.inputs)
        if old is None and adopted is None:
            raise ProtocolError(ErrorCode.RESUME_FAILED, "no session to resume: its token is unknown or expired, or it belongs to another API key")
        self._resumed = True
        fresh.outbox.detach()
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
        if adopted is not None:
            old, report, frames = adopted
        else:
            assert old is not None
            report, frames = await old.resume(op.streams, op.inputs)
        for sid in op.streams.keys() - report.keys():
            # The client has this stream, the session does not: subscribed on a node that died before recording it in
            # Redis, or ended and forgotten since. It cannot go on, and never silently.
            report[sid] = {"channel": None, "resumed": False}
            frames.append(encode(end_frame(sid, EndReason.RESUME_GAP)))
        self.session = old
        old.reply({"op": "resumed", "session": old.id, "streams": report})
        old.outbox.extend(frames)
        old.start_restored()
        old.outbox.attach(self._send_now, self._wake_writer)
        log.info("session %s resumed from %s: %d stream(s), %d frame(s) replayed", old.id, self.address, len(report), len(frames))

    async def hand_over(self) -> None:
        """The client resumed this session on another connection: stop its streams quietly and close this one with 4010."""
        session = self.session
        if session is None:
            return
        self._moved = True
        self._close = (CloseCode.SESSION_MOVED, "the session was resumed on another connection")
        await session.end_all(EndReason.UNSUBSCRIBED, notify=False)
        self._stop_reading()

    def _stop_reading(self) -> None:
        """End the read loop (the writer has stopped, the client is too slow, or the server drains)."""
        if self._reading and not self._stopping and self._task is not None:
            self._stopping = True
            self._task.cancel()

    def check_slow(self, now: float) -> None:
        """Close the client as a slow consumer if its one pending send has been blocked past `slow_consumer_timeout`."""
        since, timeout = self._sending_since, self.settings.slow_consumer_timeout
        if since is not None and now - since > timeout and self._writer is not None and not self._writer.done():
            log.warning("session %s: client has not read for %g s; closing as slow consumer", self.session.id if self.session else "?", timeout)
            self._close = (CloseCode.SLOW_CONSUMER, f"client did not read for {timeout:g} s")
            self._writer.cancel()

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
        key, self.header_key = self.header_key, None  # not kept for the connection's life
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

    async def _read(self) -> None:
        bucket = TokenBucket(self.settings.rate, self.settings.burst)
        key_limits = self.runtime.key_limits
        strikes = 0
        try:
            while (message := await self.transport.receive()) is not None:
                session = self.session
                assert session is not None
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
                        limit = (
                            f"this API key's {key_limits.rate:g} ops/s (burst {self.settings.key_burst})"
                            if per_key
                            else f"{self.settings.rate:g} ops/s (burst {self.settings.burst})"
                        )
                        raise ProtocolError(ErrorCode.RATE_LIMITED, f"over {limit}", id=frame_id(message), retry_after=wait)
                    strikes = 0
                    await self._dispatch(session, message)
                except ProtocolError as exc:
                    self.stats.errors[str(exc.code)] += 1
                    session.reply(exc.frame())
            self._dropped = not self.transport.left_cleanly
        except OutboxOverflow:
            self._close = (CloseCode.SLOW_CONSUMER, "client does not read its frames")

    async def _dispatch(self, session: Session, message: str | bytes) -> None:
        if isinstance(message, bytes):
            stream_id, payload = decode_binary(message)
            session.push(stream_id, payload, size=len(message))
            return
        size = len(message)
        if size > OFFLOAD_BYTES:
            if (subscribing := subscribe_id(message)) is not None:  # refused before it is decoded while overloaded
                self._subscribe(session, subscribing, size, message)
                return
            await self.runtime.admission.wait_turn(size)  # another op this large: its turn, then decoded off the loop
            op = await asyncio.get_running_loop().run_in_executor(self.runtime.parser, decode_text, message)
        else:
            op = decode_text(message)
        match op:
            case Subscribe():
                self._subscribe(session, op.id, size, op)
            case Push():
                session.push(op.id, op.data, op.end, size=len(message))
            case Unsubscribe():
                if (waiting := self._waiting.pop(op.id, None)) is not None:
                    waiting.give_up()
                    session.reply(end_frame(op.id, EndReason.UNSUBSCRIBED))
                else:
                    await session.unsubscribe(op.id)
            case Ping():
                session.reply({"op": "pong"})
            case Resume():
                await self._resume(op)
            case Auth():
                raise ProtocolError(ErrorCode.BAD_REQUEST, "already authenticated")

    def _subscribe(self, session: Session, stream_id: str, size: int, op: Subscribe | str) -> None:
        """Pass a subscribe (`op`, or a large one's undecoded message) through the server's admission gate without
        blocking the reader: opened now when its turn is now, else it waits in its own task (see `_open_when_admitted`)."""
        admission = self.runtime.admission
        if isinstance(op, Subscribe):
            session.check(op, size, self._waiting)
        else:
            if stream_id in self._waiting or stream_id in session.streams:
                raise ProtocolError(ErrorCode.DUPLICATE_ID, f"stream id {stream_id!r} is already open", id=stream_id)
            session.check_budget(stream_id, size)
            admission.check(stream_id)
        turn = admission.take(size)
        if isinstance(turn, float):
            admission.refuse_late(stream_id, turn)
        if turn is None and isinstance(op, Subscribe):
            admission.check(stream_id)
            session.subscribe(op, size)
            return
        waiting = Waiting(session.budget, size, turn)
        waiting.task = asyncio.create_task(self._open_when_admitted(session, stream_id, size, op, waiting), name=f"admit:{session.id}:{stream_id}")
        waiting.task.add_done_callback(waiting.done)
        self._waiting[stream_id] = waiting

    async def _open_when_admitted(self, session: Session, stream_id: str, size: int, op: Subscribe | str, waiting: Waiting) -> None:
        """Wait for a subscribe's turn (`turn`; None: it is now), check the load again, decode a large one in the parser thread
        and open the stream (a subscribe whose params were parsed is not refused for load: that work is done); a refusal is answered as the reader would. Cancelled by `unsubscribe` or when the client leaves."""
        loop = asyncio.get_running_loop()
        try:
            if waiting.turn is not None:
                await waiting.turn
            self.runtime.admission.check(stream_id)  # the load now, before a large one's params are decoded and parsed
            params = None
            if isinstance(op, str):
                decoded = await loop.run_in_executor(self.runtime.parser, decode_text, op)
                if not isinstance(decoded, Subscribe) or decoded.id != stream_id:  # keys repeated after `params`
                    raise ProtocolError(ErrorCode.BAD_REQUEST, "a subscribe's op and id must not be repeated", id=stream_id)
                op = decoded
                waiting.release()  # the checks count its size again
                channel = session.check(op, size, self._waiting.keys() - {stream_id})
                params = await loop.run_in_executor(self.runtime.parser, parse, channel, op)
            if self._waiting.get(stream_id) is waiting:
                del self._waiting[stream_id]
            waiting.release()
            session.subscribe(op, size, params)
        except ProtocolError as exc:
            self.stats.errors[str(exc.code)] += 1
            with contextlib.suppress(OutboxOverflow):
                session.reply(exc.frame())
        except OutboxOverflow:
            pass  # the client does not read: the writer's watchdog closes it as a slow consumer
        finally:
            if self._waiting.get(stream_id) is waiting:
                del self._waiting[stream_id]

    async def _write(self, outbox: Outbox) -> None:
        """Send what waits in the outbox, then end (the direct path takes over again); on a disconnect, end the connection."""
        with contextlib.suppress(Disconnected):
            while (item := outbox.next()) is not None:
                await self._send(item)
            self._writer = None

    async def _send(self, item: Payload | Pending) -> None:
        """Send one frame (or finish one the direct path started); kept apart so no frame outlives its send in the writer's locals."""
        if isinstance(item, Pending):
            self._sending_since = asyncio.get_running_loop().time()
            await item.rest
            size = item.size
        else:
            size = len(item)
            if not self._try_send(item):
                self._sending_since = asyncio.get_running_loop().time()
                await self.transport.send(item)
        self._sending_since = None
        self._count_out(size)

    def _send_now(self, payload: Payload) -> Awaitable[None] | None:
        """The outbox's direct path: send at once, in the caller's stack; what could not finish is left to the writer."""
        if self._try_send(payload):  # every lossy chunk comes this way: counted inline, without a call
            self.stats.frames_out += 1
            self.stats.bytes_out += len(payload)
            return None
        try:
            rest = start_eagerly(self.transport.send(payload))
        except Disconnected:
            return None  # the reader sees the disconnect and ends the connection
        if rest is None:
            self._count_out(len(payload))
        return rest

    def _count_out(self, size: int) -> None:
        self.stats.frames_out += 1
        self.stats.bytes_out += size


async def watch_slow_consumers(runtime: Runtime) -> None:
    """One task for the whole server: close every client whose pending send has been blocked past `slow_consumer_timeout`."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(min(1.0, runtime.settings.slow_consumer_timeout / 4))
        now = loop.time()
        for connection in list(runtime.connections):
            connection.check_slow(now)


def start_eagerly(coro: Coroutine[Any, Any, None]) -> Awaitable[None] | None:
    """Run `coro` now, up to its first suspension (3.12's eager tasks, for one coroutine on 3.11).

    Returns None when it finished without suspending (a send into a writable socket does), else an
    awaitable that drives the rest. An exception raised before the first suspension propagates.
    """
    try:
        waiting = coro.send(None)
    except StopIteration:
        return None
    return _drive(coro, waiting)


async def _drive(coro: Coroutine[Any, Any, None], waiting: Any) -> None:
    """Go on driving a coroutine that suspended on `waiting` (a future, or None for a bare yield), as a task would."""
    try:
        while True:
            if waiting is None:
                await asyncio.sleep(0)
            else:
                waiting._asyncio_future_blocking = False
                await asyncio.wait({waiting})
            try:
                waiting = coro.send(None)
            except StopIteration:
                return
    finally:
        coro.close()
