"""A client's session: its streams, their seq counters and producers, and its outbox.

Kept apart from the socket that carries it (see server/connection.py), so that a session can be
reattached to a new socket, on this node or (with a `Journal` in Redis) on another one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import secrets
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from streamplex.server.auth import Principal, refusal
from streamplex.server.budget import Budget
from streamplex.server.channel import END_OF_INPUT, Binary, CannotGoOn, Channel, ChannelError, Checkpoint, Gap, Shared, StreamContext, as_generator
from streamplex.server.config import Settings
from streamplex.server.outbox import Lane, Outbox, OutboxOverflow, Payload
from streamplex.server.protocol import EndReason, ErrorCode, ProtocolError, Subscribe, chunk_prefix, encode, encode_binary, encode_chunk, end_frame
from streamplex.server.telemetry import Stats

log = logging.getLogger(__name__)

ROUTINE_ENDS = frozenset({EndReason.COMPLETE, EndReason.UNSUBSCRIBED, EndReason.SHUTDOWN})
ENTRY_BYTES = 64  # what a replay entry costs beside its frame's bytes (the str object and its slot), charged with it
ACK_INTERVAL = 0.2  # at most one `ack` per stream this often


class Journal(Protocol):
    """Where a session records what another node needs to take it over (server/session_store.py); never waits."""

    def subscribed(self, token: str, session_id: str, label: str, stream_id: str, channel: str, params: dict[str, Any]) -> None: ...

    def chunk(self, session_id: str, stream_id: str, seq: int, payload: Payload, first_kept: int, position: Any = None) -> None: ...

    def ended(self, session_id: str, stream_id: str, next_seq: int, payload: str) -> None: ...

    def state(self, session_id: str, stream_id: str, next_seq: int, input_from: int, state: Any) -> None: ...

    async def flush(self, timeout: float = ...) -> None:
        """Wait until what was recorded so far reached Redis (or was dropped)."""


class Inbox(asyncio.Queue[Any]):
    """A stream's pushed input, its bytes counted in the connection's budget until the channel takes them."""

    def __init__(self, maxsize: int, budget: Budget) -> None:
        super().__init__(maxsize)
        self._budget = budget
        self._sizes: deque[int] = deque()

    def put_sized(self, item: Any, size: int) -> None:
        """Queue `item`, charging `size` bytes (raises asyncio.QueueFull like put_nowait)."""
        self.put_nowait(item)
        self._sizes.append(size)
        self._budget.inbox += size

    def _get(self) -> Any:
        item = super()._get()
        self._budget.inbox -= self._sizes.popleft()
        return item

    def release(self) -> None:
        """Give back what is still queued (its stream ended)."""
        self._budget.inbox -= sum(self._sizes)
        self._sizes.clear()


@dataclass(eq=False, slots=True)
class Stream:
    """One subscription: its channel, params, next seq, producer task and pushed-input queue."""

    id: str
    channel: Channel
    params: Any
    inbox: Inbox
    outbox: Outbox = field(repr=False)
    budget: Budget = field(repr=False)
    params_bytes: int = 0
    seq: int = 0
    lane: Lane | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    prefix: str = field(init=False, repr=False)
    replay: deque[Payload] | None = field(default=None, repr=False)  # made on the first `record`; seqs contiguous, up to replay_next
    replay_times: deque[float] | None = field(default=None, repr=False)  # when each replay frame was sent
    replay_next: int = 0
    replay_bytes: int = 0
    end_payload: Payload | None = field(default=None, repr=False)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # the subscribe params as sent, to open it again elsewhere (only with a journal)
    start: int = 0  # chunks the client had when this node took the stream over (see StreamContext.start)
    positions: list[Any] = field(default_factory=list, repr=False)  # their positions, for a channel that needs them
    saved: Any = field(default=None, repr=False)  # the state another node saved, to go on from (see StreamContext.saved)
    saved_at: int = 0
    acks: bool = False  # its pushed input is acknowledged (`ack` ops)
    durable: bool = False  # its saved states go to Redis: acks follow them, not what was received
    received: int = 0  # bytes of pushed binary input taken so far (counted from where the client started sending)
    saved_input: int = 0  # the input position of the last state saved
    acked: int = 0
    ack_wanted: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    acker: asyncio.Task[None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.prefix = chunk_prefix(self.id)

    def record(self, seq: int, payload: Payload, limit: int, now: float, max_age: float) -> None:
        """Keep a sent chunk frame for replay on resume: the newest ones, up to `limit` bytes and `max_age` seconds (charged to the budget)."""
        if self.replay is None or self.replay_times is None or seq != self.replay_next:
            self.forget()  # (a gap: what a restored stream was handed does not join up)
            self.replay, self.replay_times = deque(), deque()
        self.replay.append(payload)
        self.replay_times.append(now)
        self.replay_next = seq + 1
        size = len(payload) + ENTRY_BYTES
        self.replay_bytes += size
        self.budget.replay += size
        replay, times, freed = self.replay, self.replay_times, 0
        while times[0] < now - max_age:  # the newest frame (just appended) is never stale
            freed += len(replay.popleft()) + ENTRY_BYTES
            times.popleft()
        self.replay_bytes -= freed
        self.budget.replay -= freed
        if self.replay_bytes > limit:
            self.evict(self.replay_bytes - limit)

    @property
    def first_kept(self) -> int:
        """The seq of the oldest frame in the replay buffer (`replay_next` when it is empty)."""
        return self.replay_next - len(self.replay or ())

    def evict(self, wanted: int) -> int:
        """Drop the oldest replay frames until `wanted` bytes are freed (or none is left); the bytes freed."""
        freed = 0
        replay, times = self.replay, self.replay_times
        while replay and times and freed < wanted:
            freed += len(replay.popleft()) + ENTRY_BYTES
            times.popleft()
        self.replay_bytes -= freed
        self.budget.replay -= freed
        return freed

    def forget(self) -> None:
        """Drop the whole replay buffer."""
        self.evict(self.replay_bytes)
        self.replay = self.replay_times = None

    def missed(self, last_seq: int) -> list[Payload] | None:
        """The chunk frames after `last_seq` (from the replay buffer), or None when some of them are no longer held."""
        if self.channel.lossy or last_seq + 1 >= self.seq:
            return []
        first = self.first_kept if self.replay else self.seq
        if first > last_seq + 1:
            return None
        return list(itertools.islice(self.replay or (), last_seq + 1 - first, None))

    def offer(self, item: Any) -> None:
        """Queue a lossy stream's chunk (or count a Gap) without waiting: it is dropped later if the client falls behind."""
        lane = self.lane
        if lane is None:  # the stream has ended
            return
        if isinstance(item, Gap):
            lane.dropped += item.count
            lane.on_drop(item.count)
            return
        seq = self.seq
        self.seq = seq + 1
        self.outbox.offer(lane, (seq, item))

    def render(self, item: tuple[int, Any]) -> Payload:
        """Encode one (seq, chunk) as a frame, reporting drops on lossy streams."""
        seq, data = item
        if isinstance(data, Binary):
            return encode_binary(self.id, seq, data.payload)
        lane, dropped = self.lane, 0
        if lane is not None and lane.dropped:  # report drops since the last chunk
            dropped, lane.dropped = lane.dropped, 0
        return encode_chunk(self.prefix, seq, data.json if isinstance(data, Shared) else orjson.dumps(data).decode(), dropped)


class Session:
    """Streams of one client, multiplexed onto one outbox."""

    __slots__ = ("budget", "channels", "ended", "id", "journal", "outbox", "principal", "settings", "stats", "streams", "token")

    def __init__(
        self,
        settings: Settings,
        channels: dict[str, Channel],
        principal: Principal,
        stats: Stats,
        journal: Journal | None = None,
        ids: tuple[str, str] | None = None,
    ) -> None:
        """A new session, or with `ids` (session id, resume token) one taken over from another node."""
        self.id, self.token = ids or (secrets.token_urlsafe(12), secrets.token_urlsafe(24))
        self.journal = journal if settings.resume_window > 0 else None
        self.settings = settings
        self.channels = channels
        self.principal = principal
        self.stats = stats
        self.streams: dict[str, Stream] = {}
        self.outbox = Outbox(settings.outbox_bytes, stats.send_delay)
        self.budget = Budget(settings.connection_memory, self.outbox)
        self.ended: dict[str, Stream] = {}  # recently ended streams, for a resume that missed their last frames

    def reply(self, frame: dict[str, Any]) -> None:
        """Queue a control frame (may raise OutboxOverflow)."""
        self.outbox.put_control(encode(frame))

    def check(self, op: Subscribe, size: int = 0, waiting: Collection[str] = ()) -> Channel:
        """The channel `op` names if a stream may open on it now (params not yet validated), or raise ProtocolError saying why not.

        `waiting`: ids of the connection's subscribes still waiting for admission (they count as open streams here).
        """
        if op.id in self.streams or op.id in waiting:
            raise ProtocolError(ErrorCode.DUPLICATE_ID, f"stream id {op.id!r} is already open", id=op.id)
        channel = self.channels.get(op.channel)
        if channel is None:
            raise ProtocolError(ErrorCode.UNKNOWN_CHANNEL, f"unknown channel {op.channel!r}; available: {sorted(self.channels)}", id=op.id)
        if not self.principal.may_use(op.channel, channel.admin):
            raise ProtocolError(ErrorCode.FORBIDDEN, refusal(op.channel, channel.admin), id=op.id)
        status = channel.status()
        if status.state != "available":
            raise ProtocolError(
                ErrorCode.UNAVAILABLE,
                f"channel {op.channel!r} is {status.state}: {status.reason}",
                id=op.id,
                retry_after=5.0 if status.state == "loading" and status.retry_after is None else status.retry_after,
            )
        if len(self.streams) + len(waiting) >= self.settings.max_streams:
            raise ProtocolError(ErrorCode.TOO_MANY_STREAMS, f"at most {self.settings.max_streams} streams per connection", id=op.id)
        self.check_budget(op.id, size)
        return channel

    def check_budget(self, stream_id: str, size: int) -> None:
        """Raise ProtocolError(over_budget) unless a subscribe of `size` bytes fits in the connection's budget."""
        if not self.budget.fits(size):
            raise ProtocolError(
                ErrorCode.OVER_BUDGET,
                f"this connection's streams would hold more than its {self.settings.connection_memory} bytes (connection_memory); "
                "end some streams or send smaller params",
                id=stream_id,
            )

    def subscribe(self, op: Subscribe, size: int = 0, params: Any = None) -> None:
        """Open a stream (`size`: the subscribe message's bytes, charged to the budget; `params`: already parsed), or raise ProtocolError saying why not."""
        channel = self.check(op, size)
        if params is None:
            params = parse(channel, op)
        stream = self._new_stream(op.id, channel, params, op.params, size)
        self.streams[op.id] = stream
        self.reply({"op": "subscribed", "id": op.id, "channel": op.channel, **({"ack": True} if stream.acks else {})})
        if self.journal is not None:
            self.journal.subscribed(self.token, self.id, self.principal.label, op.id, channel.name, op.params)
        self._start(stream)
        log.debug("session %s subscribed %s to %s", self.id, op.id, channel.name)

    def _new_stream(self, stream_id: str, channel: Channel, params: Any, raw: dict[str, Any], size: int) -> Stream:
        inbox = Inbox(self.settings.push_queue + 1, self.budget)
        # The params as sent are kept only where another node may have to open the stream again (they can be large).
        stream = Stream(stream_id, channel, params, inbox, self.outbox, self.budget, size, raw=raw if self.journal is not None else {})
        self.budget.params += size
        self._fit_replay()
        if channel.lossy:
            stream.lane = Lane(self.settings.lossy_depth, stream.render, functools.partial(self._dropped, channel.name))
        if params is not None:
            stream.acks = channel.accepts_push and channel.acks_input(params)
            stream.durable = channel.saves_state and self.journal is not None and channel.restarts(params)
        return stream

    def _start(self, stream: Stream) -> None:
        self.stats.streams[stream.channel.name] += 1
        self.stats.streams_total[stream.channel.name] += 1
        stream.task = asyncio.create_task(self._produce(stream), name=f"stream:{self.id}:{stream.id}")
        if stream.acks:
            stream.acker = asyncio.create_task(self._acknowledge(stream), name=f"ack:{self.id}:{stream.id}")

    def restore(
        self,
        stream_id: str,
        channel: Channel,
        params: Any,
        raw: dict[str, Any],
        next_seq: int,
        replayed: list[tuple[int, Payload]],
        end: Payload | None,
        positions: list[Any] | None = None,
        saved: Any = None,
        saved_at: int = 0,
        input_from: int = 0,
    ) -> None:
        """Take over a stream from another node: `replayed` are the frames the client gets again; with `end` the
        stream is over, else it goes on (producer started by `start_restored`) at chunk `next_seq`, from `positions`
        or its `saved` state, the client sending its pushed input again from byte `input_from`."""
        stream = self._new_stream(stream_id, channel, params, raw, len(orjson.dumps(raw)) if end is None else 0)
        stream.seq = next_seq
        stream.start = 0 if channel.lossy else next_seq
        stream.positions = positions or []
        stream.saved, stream.saved_at = saved, saved_at
        stream.received = stream.saved_input = stream.acked = input_from
        if self.settings.resume_buffer_bytes > 0:
            now = asyncio.get_running_loop().time()
            for seq, payload in replayed:
                stream.record(seq, payload, self.settings.resume_buffer_bytes, now, self.settings.resume_buffer_age)
            self._fit_replay(stream)
        if end is not None:
            stream.end_payload = end
            self.ended[stream_id] = stream
        else:
            self.streams[stream_id] = stream

    def start_restored(self) -> None:
        """Start the producers of the streams `restore` took over (once their replayed frames are queued)."""
        for stream in self.streams.values():
            if stream.task is None:
                self._start(stream)
                log.info("session %s: stream %s (%s) goes on at chunk %d on this node", self.id, stream.id, stream.channel.name, stream.start)

    def specs(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """Each open stream's channel and subscribe params, by id."""
        return {s.id: (s.channel.name, s.raw) for s in self.streams.values()}

    def push(self, stream_id: str, data: Any, end: bool = False, size: int = 0) -> None:
        """Hand pushed input (a JSON value or bytes; `size`: its message's bytes) to a stream, or raise ProtocolError."""
        stream = self.streams.get(stream_id)
        if stream is None:
            raise ProtocolError(ErrorCode.UNKNOWN_ID, f"no open stream {stream_id!r}", id=stream_id)
        if not stream.channel.accepts_push:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"channel {stream.channel.name!r} takes no pushed input", id=stream_id)
        if data is None and not end:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "push needs `data` or `end: true`", id=stream_id)
        items = ([data] if data is not None else []) + ([END_OF_INPUT] if end else [])
        refusal = None
        if stream.inbox.qsize() + len(items) > stream.inbox.maxsize:
            refusal = "the stream's input queue is full; push more slowly"
        elif not self.budget.fits(size):
            refusal = "this connection's memory budget is full of pushed input; push more slowly"
        if refusal is not None:
            if stream.acks and isinstance(data, bytes):  # its input is a byte stream: one piece missing would shift the rest, silently
                if stream.task is not None:
                    stream.task.cancel()
                self._finish(
                    stream,
                    EndReason.ERROR,
                    {"code": str(ErrorCode.RATE_LIMITED), "message": f"pushed input was refused ({refusal}): the stream cannot go on without it"},
                )
            raise ProtocolError(ErrorCode.RATE_LIMITED, refusal, id=stream_id, retry_after=0.1)
        for item in items:
            stream.inbox.put_sized(item, size if item is data else 0)
        if isinstance(data, bytes):
            stream.received += len(data)
            if stream.acks and not stream.durable:
                stream.ack_wanted.set()
        self._fit_replay()

    async def resume(self, last_seqs: dict[str, int], inputs: dict[str, int] | None = None) -> tuple[dict[str, Any], list[Payload]]:
        """Reattach after a dropped connection: drop what was queued for the old socket and return, per stream,
        what `resumed` reports and the frames to send again (chunks after the client's last seq, then any `end`).

        A lossless stream whose missed chunks are no longer all held ends with reason `resume_gap`; lossy
        streams go on from now. Open streams the client does not name are taken as having received nothing;
        ended ones it does not name as finished with. A stream whose pushed input is acknowledged reports `input`,
        the byte the client sends it again from; one whose client no longer holds that byte (`inputs`) ends with
        `input_lost`.
        """
        inputs = inputs or {}
        self.outbox.clear()
        report: dict[str, Any] = {}
        frames: list[Payload] = []
        ended = [s for s in self.ended.values() if s.id in last_seqs and s.id not in self.streams]
        for stream in [*self.streams.values(), *ended]:
            last = last_seqs.get(stream.id, -1)
            missed = stream.missed(last)
            if missed is None:
                if self.streams.get(stream.id) is stream:
                    await self._cancel(stream)
                    self._finish(stream, EndReason.RESUME_GAP, notify=False)
                frames.append(encode(end_frame(stream.id, EndReason.RESUME_GAP)))
                report[stream.id] = {"channel": stream.channel.name, "resumed": False}
                continue
            frames += missed
            entry = report[stream.id] = {"channel": stream.channel.name, "resumed": True, "replayed": len(missed), "next_seq": stream.seq}
            if stream.end_payload is not None and self.streams.get(stream.id) is not stream:
                frames.append(stream.end_payload)
            elif stream.acks:
                entry["input"] = stream.received
                if inputs.get(stream.id, 0) > stream.received:
                    log.warning(
                        "session %s stream %s: the client holds its input from byte %d only, not from %d",
                        self.id,
                        stream.id,
                        inputs[stream.id],
                        stream.received,
                    )
                    await self._cancel(stream)
                    self._finish(stream, EndReason.INPUT_LOST, notify=False)
                    frames.append(encode(end_frame(stream.id, EndReason.INPUT_LOST)))
        return report, frames

    async def unsubscribe(self, stream_id: str) -> None:
        """Cancel a stream's producer at once and tell the client."""
        stream = self.streams.get(stream_id)
        if stream is None:
            raise ProtocolError(ErrorCode.UNKNOWN_ID, f"no open stream {stream_id!r}", id=stream_id)
        await self._cancel(stream)
        self._finish(stream, EndReason.UNSUBSCRIBED)

    async def end_all(self, reason: EndReason, notify: bool = True) -> None:
        """Cancel every stream; with `notify`, queue an `end` for each."""
        streams = list(self.streams.values())
        await asyncio.gather(*(self._cancel(s) for s in streams))
        for stream in streams:
            self._finish(stream, reason, notify=notify)

    async def _cancel(self, stream: Stream) -> None:
        if stream.acker is not None:
            stream.acker.cancel()
        task = stream.task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _finish(self, stream: Stream, reason: EndReason, error: dict[str, Any] | None = None, notify: bool = True) -> None:
        if self.streams.get(stream.id) is not stream:
            return
        del self.streams[stream.id]
        self.stats.streams[stream.channel.name] -= 1
        if stream.acker is not None:
            stream.acker.cancel()
            stream.acker = None
        stream.inbox.release()
        self.budget.params -= stream.params_bytes
        stream.params_bytes = 0
        stream.params = None  # an ended stream is kept for a resume's replay only
        if stream.lane is not None:
            self.outbox.discard(stream.lane)
            stream.lane = None  # what the producer still offers is dropped (see `Stream.offer`)
        if notify:
            stream.end_payload = encode(end_frame(stream.id, reason, error))
            if self.journal is not None:
                self.journal.ended(self.id, stream.id, stream.seq, stream.end_payload)
            # Past the hard bound the client is not reading; the writer's watchdog closes it as a slow consumer.
            with contextlib.suppress(OutboxOverflow):
                self.outbox.put_control(stream.end_payload)
        if notify and self.settings.resume_window > 0:  # kept, with its replay buffer, for a resume that missed its last frames
            self.ended[stream.id] = stream
            if len(self.ended) > self.settings.max_streams:
                self.ended.pop(next(iter(self.ended))).forget()
        else:
            stream.forget()
        # A stream that ends as asked (or with the server) is routine; one that could not go on is worth a line at INFO.
        log.log(
            logging.DEBUG if reason in ROUTINE_ENDS else logging.INFO, "session %s stream %s (%s) ended: %s", self.id, stream.id, stream.channel.name, reason
        )

    async def _produce(self, stream: Stream) -> None:
        ctx = StreamContext(
            stream.id,
            stream.inbox,
            stream.offer if stream.lane is not None else None,
            stream.start,
            tenant=self.principal.label,
            positions=stream.positions,
            saved=stream.saved,
            saved_at=stream.saved_at,
            saver=functools.partial(self._save, stream) if stream.durable else None,
        )
        stream.positions, stream.saved = [], None
        reason, error = EndReason.COMPLETE, None
        try:
            async with contextlib.aclosing(as_generator(stream.channel.stream(stream.params, ctx))) as chunks:
                async for item in chunks:
                    await self._emit(stream, item)
        except ChannelError as exc:
            reason, error = EndReason.ERROR, {"code": str(exc.code), "message": exc.message}
        except CannotGoOn as exc:
            log.warning("session %s stream %s (%s) cannot go on on this node: %s", self.id, stream.id, stream.channel.name, exc)
            reason = EndReason.PRODUCER_LOST
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("stream %s of channel %s failed", stream.id, stream.channel.name)
            reason, error = EndReason.ERROR, {"code": str(ErrorCode.INTERNAL), "message": "internal error; see the server log"}
        if error is not None:
            self.stats.errors[error["code"]] += 1
        self._finish(stream, reason, error)

    def _save(self, stream: Stream, input_from: int, state: Any) -> None:
        """Record a stream's state in Redis (after the chunks it sent so far); its input before `input_from` is acknowledged once it is there."""
        assert self.journal is not None
        self.journal.state(self.id, stream.id, stream.seq, input_from, state())
        if input_from > stream.saved_input:
            stream.saved_input = input_from
            stream.ack_wanted.set()

    async def _acknowledge(self, stream: Stream) -> None:
        """Send `ack` as the input position the server no longer needs advances: what was received, or with Redis the
        saved state's position once the state is in Redis; at most every ACK_INTERVAL."""
        while True:
            await stream.ack_wanted.wait()
            stream.ack_wanted.clear()
            target = stream.saved_input if stream.durable else stream.received
            if stream.durable and self.journal is not None:
                try:
                    await self.journal.flush()
                except TimeoutError:  # not surely in Redis yet: try again
                    stream.ack_wanted.set()
                    await asyncio.sleep(ACK_INTERVAL)
                    continue
            if target > stream.acked:
                stream.acked = target
                with contextlib.suppress(OutboxOverflow):
                    self.reply({"op": "ack", "id": stream.id, "input": target})
            await asyncio.sleep(ACK_INTERVAL)

    def _dropped(self, channel: str, n: int) -> None:
        self.stats.dropped[channel] += n

    async def _emit(self, stream: Stream, item: Any) -> None:
        if stream.channel.lossy:
            stream.offer(item)
            return
        position = None
        if isinstance(item, Checkpoint):
            item, position = item.data, item.position
        seq = stream.seq
        stream.seq += 1
        payload = stream.render((seq, item))
        if self.settings.resume_window > 0 and self.settings.resume_buffer_bytes > 0:
            now = asyncio.get_running_loop().time()
            stream.record(seq, payload, self.settings.resume_buffer_bytes, now, self.settings.resume_buffer_age)
            self._fit_replay(stream)
            if self.journal is not None:
                self.journal.chunk(self.id, stream.id, seq, payload, stream.first_kept, position)
                if stream.channel.needs_positions:
                    # Another node goes on from the positions of every chunk the client has: this one is in Redis before it leaves.
                    with contextlib.suppress(TimeoutError):
                        await self.journal.flush()
        await self.outbox.put(payload)

    def _fit_replay(self, first: Stream | None = None) -> None:
        """Trim replay buffers, oldest frames first (of `first`, then of the other streams), until the budget holds."""
        over = -self.budget.replay_room()
        if over <= 0:
            return
        for stream in [*((first,) if first is not None else ()), *self.streams.values(), *self.ended.values()]:
            over -= stream.evict(over)
            if over <= 0:
                return


def parse(channel: Channel, op: Subscribe) -> Any:
    """`op`'s params validated by its channel, or ProtocolError (may run in a worker thread for large params)."""
    try:
        return channel.parse(op.params)
    except ChannelError as exc:
        raise ProtocolError(exc.code, exc.message, id=op.id, details=exc.details) from None
