"""The asyncio client: one WebSocket, many streams, reconnect with backoff that resubscribes what was open."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed as WsConnectionClosed
from websockets.exceptions import InvalidHandshake, InvalidURI

from streamplex.errors import (
    AuthenticationError,
    AuthThrottled,
    ConnectionClosed,
    DuplicateId,
    ProtocolError,
    StreamEnded,
    StreamplexError,
    protocol_error,
)
from streamplex.frames import decode_chunk, encode_push
from streamplex.held import HeldInput

log = logging.getLogger("streamplex.client")

# Close codes after which reconnecting with the same key cannot help.
_FATAL_CLOSES = {4001: AuthenticationError, 4002: AuthenticationError, 4003: AuthThrottled}
# Close codes that ask the client to wait (overloaded, rate limited): even the first reconnect waits the backoff.
_WAIT_CLOSES = {1013, 4008}


@dataclass(frozen=True, slots=True)
class Chunk:
    """One piece of a stream: `data` is the JSON value of a `chunk` op, or the bytes of a binary frame."""

    seq: int
    data: Any
    dropped: int = 0

    @property
    def binary(self) -> bool:
        """True when the chunk came as a binary frame (media)."""
        return isinstance(self.data, bytes)


class _End:
    pass


_END = _End()


@dataclass(frozen=True, slots=True)
class Retry:
    """Which refusals of a `subscribe` the client retries by itself, waiting the server's `retry_after` first.

    Only an error that carries `retry_after` is retried (without it, e.g. a channel with no model, waiting cannot
    help); a stream that already delivered chunks is not started over. After `max_attempts` retries of one
    stream, or once its waits would pass `max_wait` seconds in all, the error is raised as usual.
    """

    codes: frozenset[str] = field(default=frozenset({"unavailable", "overloaded", "rate_limited"}))
    max_attempts: int = 5
    max_wait: float = 60.0

    def allows(self, error: ProtocolError, attempts: int, waited: float) -> bool:
        return error.code in self.codes and error.retry_after is not None and attempts < self.max_attempts and waited + error.retry_after <= self.max_wait


class _Bucket:
    """Client-side pacing so the server's token bucket (`rate`, `burst` from `ready`) never refuses a frame."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate * 0.9
        self.capacity = max(1.0, burst * 0.9)
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    async def take(self) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1:
                self.tokens -= 1
                return
            await asyncio.sleep((1 - self.tokens) / self.rate)


class Subscription:
    """One stream. Iterate it (`async for chunk in sub`) to open it and read its chunks; leaving the loop unsubscribes.

    `async with client.subscribe(...) as sub:` opens it at once (errors such as `InvalidParams` are raised
    there) and unsubscribes on exit, which suits streams that take pushed input.
    """

    def __init__(self, client: Client, channel: str, params: dict[str, Any], id: str, resume: bool, limit: int, input_limit: int = 4 << 20) -> None:
        self.client = client
        self.channel = channel
        self.params = params
        self.id = id
        self.resume = resume
        self.restarts = 0
        self.retries = 0  # subscribes sent again after a retryable refusal
        self.retry_waited = 0.0
        self.last_seq = -1
        self.reason: str | None = None
        self.push_errors: deque[ProtocolError] = deque(maxlen=32)
        self._limit = limit
        self._items: deque[Chunk] = deque()
        self._terminal: BaseException | _End | None = None
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._opened: asyncio.Future[None] | None = None
        self._awaiting_subscribed = False
        self._resumed = False
        self._left = False
        self._input_limit = input_limit
        self._input: HeldInput | None = None  # pushed input kept until acknowledged, when the server acknowledges it
        self._push_lock = asyncio.Lock()
        self._send_lock = asyncio.Lock()

    # called by the client's reader --------------------------------------------------------------

    async def _deliver(self, chunk: Chunk) -> None:
        while len(self._items) >= self._limit and not self._left:
            self._writable.clear()
            await self._writable.wait()
        if not self._left:
            self.last_seq = chunk.seq
            self._items.append(chunk)
            self._readable.set()

    def _subscribed(self, acks: bool = False) -> None:
        if self._awaiting_subscribed:  # a new stream (or one started over): its input counts from 0
            self._input = HeldInput(self._input_limit) if acks else None
        if self._awaiting_subscribed and self._opened is not None and not self._opened.done():
            self._opened.set_result(None)
        elif self._awaiting_subscribed:
            self.restarts += 1
        self._awaiting_subscribed = False

    def _refused(self, error: ProtocolError) -> None:
        """An `error` frame naming this stream: a refused subscribe ends it; a refused push is recorded."""
        if not self._awaiting_subscribed:
            log.warning("stream %s: %s", self.id, error)
            self.push_errors.append(error)
            return
        self._awaiting_subscribed = False
        if self._opened is not None and not self._opened.done():
            self._opened.set_exception(error)
        self._finish(error)

    def _finish(self, outcome: BaseException | None, reason: str | None = None) -> None:
        if self._terminal is None:
            self._terminal = outcome if outcome is not None else _END
            self.reason = reason or ("error" if outcome is not None else None)
            self._readable.set()
            if self._input is not None:
                self._input.data.clear()  # nothing is sent again for an ended stream
                self._input.room.set()  # a push waiting for room gives up
            if self._opened is not None and not self._opened.done():
                self._opened.set_exception(outcome or StreamEnded(self.id, reason or "ended"))

    # the user's side ----------------------------------------------------------------------------

    @property
    def ended(self) -> bool:
        """True once the server ended the stream (or the client gave up on it)."""
        return self._terminal is not None

    async def open(self) -> Subscription:
        """Send `subscribe` and wait for `subscribed`; raise the protocol error when it is refused."""
        if self._opened is None:
            self._opened = asyncio.get_running_loop().create_future()
            await self.client._open_stream(self)
        await asyncio.shield(self._opened)
        return self

    async def _iterate(self) -> AsyncIterator[Chunk]:
        try:
            await self.open()
            while True:
                while not self._items:
                    if isinstance(self._terminal, BaseException):
                        raise self._terminal
                    if self._terminal is not None:
                        return
                    self._readable.clear()
                    await self._readable.wait()
                chunk = self._items.popleft()
                self._writable.set()
                yield chunk
        finally:
            await self.cancel()

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._iterate()

    async def __aenter__(self) -> Subscription:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.cancel()

    async def push(self, data: Any = None, *, end: bool = False) -> None:
        """Push input to this stream: a JSON value, or bytes (sent as a binary frame)."""
        await self.client.push(self.id, data, end=end)

    async def end_input(self) -> None:
        """Tell the stream its pushed input is over (`push` with `end: true`)."""
        await self.client.push(self.id, end=True)

    async def cancel(self) -> None:
        """Unsubscribe (when still open) and stop reading; safe to call more than once."""
        self._left = True
        self._writable.set()
        if self._terminal is None and self._opened is not None:
            self._finish(None, "unsubscribed")
            await self.client._unsubscribe(self)


class Client:
    """A streamplex connection. Use `async with connect(url, api_key=...) as client:`."""

    def __init__(
        self,
        url: str | Sequence[str],
        api_key: str | None,
        *,
        reconnect: bool = True,
        max_retries: int | None = None,
        backoff: tuple[float, float] = (0.5, 30.0),
        open_timeout: float = 10.0,
        queue_size: int = 256,
        input_buffer: int = 4 << 20,
        retry: Retry | None = Retry(),
        **ws_options: Any,
    ) -> None:
        self.urls = [url] if isinstance(url, str) else list(url)
        if not self.urls:
            raise StreamplexError("give at least one URL")
        self.url = self.urls[0]
        self.api_key = api_key
        self.reconnect = reconnect
        self.max_retries = max_retries
        self.backoff = backoff
        self.open_timeout = open_timeout
        self.queue_size = queue_size
        self.input_buffer = input_buffer
        self.retry = retry
        self.ws_options = ws_options
        self.ready: dict[str, Any] = {}
        self.reconnects = 0
        self.resumes = 0
        self._resume_token: str | None = None
        self._ws: ClientConnection | None = None
        self._bucket = _Bucket(100.0, 200)
        self._connected = asyncio.Event()
        self._failure: StreamplexError | None = None
        self._subs: dict[str, Subscription] = {}
        self._pongs: deque[asyncio.Future[None]] = deque()
        self._ids = itertools.count(1)
        self._supervisor: asyncio.Task[None] | None = None
        self._retrying: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def channels(self) -> dict[str, dict[str, Any]]:
        """The channels this key may use, by name, as the latest `ready` listed them."""
        return {c["name"]: c for c in self.ready.get("channels", [])}

    async def __aenter__(self) -> Client:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> Client:
        """Open the socket and authenticate (raises at once when the first attempt fails)."""
        await self._handshake()
        self._supervisor = asyncio.create_task(self._supervise(), name="streamplex-client")
        return self

    async def close(self) -> None:
        """Close the socket (code 1000); open streams end with ConnectionClosed."""
        self._closing = True
        if self._ws is not None:
            await self._ws.close()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        for task in list(self._retrying):
            task.cancel()
        self._fail_all(ConnectionClosed(1000, "closed by the client"))

    def subscribe(self, channel: str, /, *, id: str | None = None, resume: bool = True, **params: Any) -> Subscription:
        """A stream of `channel` with `params` (sent when it is opened or first iterated).

        With `resume` (the default), a stream cut by a lost connection or a server shutdown is subscribed
        again, with the same params, once the client has reconnected; it then starts over (`restarts` counts).
        """
        stream_id = id if id is not None else f"{channel[:8]}-{next(self._ids)}"
        if stream_id in self._subs:
            raise DuplicateId(f"stream id {stream_id!r} is already open", id=stream_id)
        return Subscription(self, channel, params, stream_id, resume, self.queue_size, self.input_buffer)

    async def push(self, stream_id: str, data: Any = None, *, end: bool = False) -> None:
        """Push input to a stream: bytes go in a binary frame, anything else in a `push` op.

        On a stream whose input the server acknowledges (live transcription), bytes are kept until acknowledged (at
        most `input_buffer` bytes: past that, `push` waits for an `ack`) and sent again from where the server asks
        after a resume on another node."""
        sub = self._subs.get(stream_id)
        if sub is not None and sub._input is not None and (data is None or isinstance(data, bytes | bytearray | memoryview)):
            await self._push_held(sub, sub._input, b"" if data is None else bytes(data), end)
            return
        if isinstance(data, bytes | bytearray | memoryview):
            await self._send(encode_push(stream_id, bytes(data)))
            if end:
                await self._send_op({"op": "push", "id": stream_id, "end": True})
            return
        frame: dict[str, Any] = {"op": "push", "id": stream_id}
        if data is not None:
            frame["data"] = data
        if end:
            frame["end"] = True
        await self._send_op(frame)

    async def ping(self, timeout: float = 10.0) -> float:
        """Send a protocol `ping`; return the seconds until its `pong`."""
        waiter = asyncio.get_running_loop().create_future()
        self._pongs.append(waiter)
        start = time.monotonic()
        await self._send_op({"op": "ping"})
        await asyncio.wait_for(waiter, timeout)
        return time.monotonic() - start

    # internals ----------------------------------------------------------------------------------

    async def _push_held(self, sub: Subscription, held: HeldInput, payload: bytes, end: bool) -> None:
        async with sub._push_lock:  # pushes are held in the order they were made
            while not held.fits(len(payload)) and not sub.ended:
                held.room.clear()
                await held.room.wait()
            if sub.ended:
                raise sub._terminal if isinstance(sub._terminal, BaseException) else StreamEnded(sub.id, sub.reason or "ended")
            held.add(payload)
            held.ended = held.ended or end
        await self._send_held(sub, held)

    async def _send_held(self, sub: Subscription, held: HeldInput) -> None:
        """Send what `held` has not sent on this connection (then its end, once pushed); resumes rewind it."""
        async with sub._send_lock:
            while sub._input is held and not sub.ended:
                await self._connected.wait()
                if self._failure is not None:
                    raise self._failure
                ws, epoch = self._ws, held.epoch
                if ws is None:
                    continue
                piece = held.piece()
                if piece is not None:
                    upto, payload = piece
                    message: str | bytes = encode_push(sub.id, payload)
                elif held.ended and not held.end_sent:
                    upto, message = held.sent, orjson.dumps({"op": "push", "id": sub.id, "end": True}).decode()
                else:
                    return
                await self._bucket.take()
                if ws is not self._ws or epoch != held.epoch:
                    continue  # the connection changed meanwhile: what to send is decided again
                try:
                    await ws.send(message)
                except WsConnectionClosed:
                    await asyncio.sleep(0.05)  # the supervisor reconnects (and may rewind)
                    continue
                if epoch == held.epoch:
                    held.sent = max(held.sent, upto)
                    held.end_sent = held.end_sent or isinstance(message, str)

    async def _resume(self, ws: ClientConnection, token: str) -> None:
        """Take the dropped session over: its streams go on where this client left them (lossless ones replayed)."""
        inputs = {sub.id: sub._input.base for sub in self._subs.values() if sub._input is not None}
        await ws.send(
            orjson.dumps({"op": "resume", "token": token, "streams": {sub.id: sub.last_seq for sub in self._subs.values()}, "inputs": inputs}).decode()
        )
        try:
            answer = orjson.loads(await asyncio.wait_for(ws.recv(), self.open_timeout))
        except WsConnectionClosed as exc:
            raise _closed(exc) from None
        except TimeoutError:
            await ws.close()
            raise ConnectionClosed(None, "no answer to `resume` in time") from None
        if answer.get("op") != "resumed":
            log.info("session not resumed (%s); subscribing again", answer.get("message", answer))
            return
        self.resumes += 1
        for stream_id, entry in answer.get("streams", {}).items():
            sub = self._subs.get(stream_id)
            if sub is not None:
                sub._resumed = True  # `resumed: false` is followed by its `end` (reason resume_gap)
                position = entry.get("input") if isinstance(entry, dict) else None
                if sub._input is not None and isinstance(position, int) and not sub._input.rewind(position):
                    log.warning("stream %s: the server needs its input from byte %d, no longer held", sub.id, position)
        log.info("resumed session %s", answer.get("session"))

    async def _handshake(self, resume: bool = False) -> None:
        headers = {"X-API-Key": self.api_key} if self.api_key else {}
        try:
            ws = await websockets.connect(self.url, additional_headers=headers, open_timeout=self.open_timeout, **self.ws_options)
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise ConnectionClosed(None, f"cannot connect to {self.url}: {exc}") from exc
        except InvalidURI as exc:
            raise StreamplexError(f"invalid URL {self.url!r}: {exc}") from exc
        try:
            ready = orjson.loads(await asyncio.wait_for(ws.recv(), self.open_timeout))
        except WsConnectionClosed as exc:
            raise _closed(exc) from None
        except TimeoutError:
            await ws.close()
            raise ConnectionClosed(None, "no `ready` from the server in time") from None
        if not isinstance(ready, dict) or ready.get("op") != "ready":
            await ws.close()
            raise StreamplexError(f"expected `ready`, got {ready!r}")
        self.ready = ready
        previous, self._resume_token = self._resume_token, (ready.get("resume") or {}).get("token") or self._resume_token
        if resume and previous and self._subs:
            await self._resume(ws, previous)
        limits = ready.get("limits", {})
        self._bucket = _Bucket(float(limits.get("rate", 100.0)), int(limits.get("burst", 200)))
        self._ws = ws
        self._connected.set()
        log.info("connected to %s (session %s)", self.url, ready.get("session"))

    async def _supervise(self) -> None:
        while True:
            assert self._ws is not None
            closed = await self._read(self._ws)
            self._connected.clear()
            self._ws = None
            for waiter in self._pongs:
                if not waiter.done():
                    waiter.set_exception(closed)
            self._pongs.clear()
            if self._closing:
                return
            if not self.reconnect or isinstance(closed, AuthenticationError | AuthThrottled):
                self._fail_all(closed)
                return
            log.warning("%s; reconnecting", closed)
            if not await self._reconnect(closed):
                return
            await self._resubscribe()

    async def _reconnect(self, closed: ConnectionClosed) -> bool:
        """Connect again and resume: the first attempt at once (a node that died, a drain: the session is waiting on
        another node), unless the server asked to wait (1013, 4008); then with backoff."""
        delay, ceiling = self.backoff
        attempt = 0
        start = self.urls.index(self.url)
        while not self._closing:
            attempt += 1
            if attempt > 1 or closed.code in _WAIT_CLOSES:
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            # With several URLs (nodes of one deployment), each attempt tries the next: the session resumes on any.
            self.url = self.urls[(start + attempt) % len(self.urls)] if len(self.urls) > 1 else self.url
            try:
                await self._handshake(resume=True)
                self.reconnects += 1
                return True
            except (AuthenticationError, AuthThrottled) as exc:
                self._fail_all(exc)
                return False
            except StreamplexError as exc:
                log.info("reconnect attempt %d failed: %s", attempt, exc)
                if self.max_retries is not None and attempt >= self.max_retries:
                    self._fail_all(exc if isinstance(exc, ConnectionClosed) else ConnectionClosed(None, str(exc)))
                    return False
            if attempt > 1 or closed.code in _WAIT_CLOSES:
                delay = min(ceiling, delay * 2)
        return False

    async def _resubscribe(self) -> None:
        for sub in list(self._subs.values()):
            if sub._resumed:
                sub._resumed = False
                if sub._input is not None:  # its held input goes out again from where the server asked
                    self._spawn(self._send_held_quietly(sub, sub._input), f"streamplex-resend:{sub.id}")
                continue
            if not sub.resume:
                del self._subs[sub.id]
                sub._finish(StreamEnded(sub.id, "the connection was lost"), "lost")
                continue
            sub._awaiting_subscribed = True
            await self._send_op({"op": "subscribe", "id": sub.id, "channel": sub.channel, "params": sub.params})

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._retrying.add(task)
        task.add_done_callback(self._retrying.discard)

    async def _send_held_quietly(self, sub: Subscription, held: HeldInput) -> None:
        with contextlib.suppress(StreamplexError):
            await self._send_held(sub, held)

    def _fail_all(self, exc: StreamplexError) -> None:
        self._failure = exc
        self._connected.set()  # wake senders so they see the failure
        for sub in list(self._subs.values()):
            sub._finish(exc)
        self._subs.clear()

    async def _read(self, ws: ClientConnection) -> ConnectionClosed:
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    stream_id, seq, payload = decode_chunk(message)
                    if (sub := self._subs.get(stream_id)) is not None:
                        await sub._deliver(Chunk(seq, payload))
                    continue
                await self._dispatch(orjson.loads(message))
        except WsConnectionClosed as exc:
            return _closed(exc)
        return _closed_from(ws)

    async def _dispatch(self, frame: dict[str, Any]) -> None:
        op = frame.get("op")
        ident = frame.get("id")
        sub = self._subs.get(ident) if isinstance(ident, str) else None
        if op == "chunk":
            if sub is not None:
                await sub._deliver(Chunk(frame["seq"], frame.get("data"), frame.get("dropped", 0)))
        elif op == "subscribed":
            if sub is not None:
                sub._subscribed(frame.get("ack") is True)
        elif op == "ack":
            if sub is not None and sub._input is not None and isinstance(frame.get("input"), int):
                sub._input.ack(frame["input"])
        elif op == "end":
            if sub is not None:
                self._ended(sub, frame)
        elif op == "error":
            error = protocol_error(frame)
            if sub is not None:
                if sub._awaiting_subscribed and self._retry_later(sub, error):
                    return
                if sub._awaiting_subscribed:
                    del self._subs[sub.id]
                sub._refused(error)
            else:
                log.warning("server refused a frame: %s", error)
        elif op == "pong":
            if self._pongs:
                waiter = self._pongs.popleft()
                if not waiter.done():
                    waiter.set_result(None)
        else:
            log.debug("ignoring frame %r", frame)

    def _ended(self, sub: Subscription, frame: dict[str, Any]) -> None:
        reason = frame.get("reason")
        if reason == "shutdown" and sub.resume and self.reconnect:
            sub._awaiting_subscribed = True  # resubscribed once the client has reconnected
            return
        if reason == "error":
            error = protocol_error({**frame.get("error", {}), "id": sub.id})
            if sub.last_seq < 0 and self._retry_later(sub, error):  # refused before its first chunk: nothing to start over
                return
            del self._subs[sub.id]
            sub._finish(error, "error")
            return
        del self._subs[sub.id]
        if reason == "shutdown":
            sub._finish(StreamEnded(sub.id, "the server shut down"), "shutdown")
        elif reason == "resume_gap":
            sub._finish(StreamEnded(sub.id, "chunks were lost while the connection was down (resume_gap)"), "resume_gap")
        elif reason == "producer_lost":
            sub._finish(StreamEnded(sub.id, "its server node died and the stream cannot go on elsewhere (producer_lost)"), "producer_lost")
        elif reason == "input_lost":
            sub._finish(StreamEnded(sub.id, "the pushed input the stream needs to go on is no longer held by the client (input_lost)"), "input_lost")
        else:
            sub._finish(None, reason)

    def _retry_later(self, sub: Subscription, error: ProtocolError) -> bool:
        """Subscribe `sub` again after `retry_after` when the retry policy allows it; False when the error stands."""
        if self.retry is None or not self.retry.allows(error, sub.retries, sub.retry_waited) or error.retry_after is None:
            return False
        sub.retries += 1
        sub.retry_waited += error.retry_after
        sub._awaiting_subscribed = True
        log.info("stream %s: %s; subscribing again in %.3g s (retry %d)", sub.id, error, error.retry_after, sub.retries)
        task = asyncio.create_task(self._subscribe_again(sub, error.retry_after), name=f"streamplex-retry:{sub.id}")
        self._retrying.add(task)
        task.add_done_callback(self._retrying.discard)
        return True

    async def _subscribe_again(self, sub: Subscription, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._subs.get(sub.id) is not sub or sub._left:
            return
        try:
            await self._send_op({"op": "subscribe", "id": sub.id, "channel": sub.channel, "params": sub.params})
        except StreamplexError as exc:
            self._subs.pop(sub.id, None)
            sub._finish(exc)

    async def _open_stream(self, sub: Subscription) -> None:
        if sub.id in self._subs:
            raise DuplicateId(f"stream id {sub.id!r} is already open", id=sub.id)
        self._subs[sub.id] = sub
        sub._awaiting_subscribed = True
        try:
            await self._send_op({"op": "subscribe", "id": sub.id, "channel": sub.channel, "params": sub.params})
        except BaseException:
            self._subs.pop(sub.id, None)
            raise

    async def _unsubscribe(self, sub: Subscription) -> None:
        if self._subs.get(sub.id) is not sub:
            return
        del self._subs[sub.id]
        if self._ws is not None and self._failure is None:
            with contextlib.suppress(StreamplexError):
                await self._send_op({"op": "unsubscribe", "id": sub.id})

    async def _send_op(self, frame: dict[str, Any]) -> None:
        await self._send(orjson.dumps(frame).decode())

    async def _send(self, message: str | bytes) -> None:
        while True:
            await self._connected.wait()
            if self._failure is not None:
                raise self._failure
            ws = self._ws
            if ws is None:
                continue
            await self._bucket.take()
            try:
                await ws.send(message)
                return
            except WsConnectionClosed:
                if not self.reconnect or self._closing:
                    raise ConnectionClosed(None, "the connection is closed") from None
                # the supervisor notices too and reconnects; send again on the new socket
                await asyncio.sleep(0.05)


def _closed(exc: WsConnectionClosed) -> ConnectionClosed:
    close = exc.rcvd
    code, reason = (close.code, close.reason) if close is not None else (1006, "connection lost")
    return _FATAL_CLOSES.get(code, ConnectionClosed)(code, reason)


def _closed_from(ws: ClientConnection) -> ConnectionClosed:
    code = ws.close_code if ws.close_code is not None else 1006
    return _FATAL_CLOSES.get(code, ConnectionClosed)(code, ws.close_reason or "")


def connect(url: str | Sequence[str], api_key: str | None = None, **options: Any) -> Client:
    """A client for `url` (e.g. `ws://127.0.0.1:8000/ws`), or for a list of URLs of one deployment's nodes, tried in
    turn when reconnecting (a session resumes on any node sharing Redis); use it as `async with connect(...) as client:`."""
    return Client(url, api_key, **options)
