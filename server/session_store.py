"""Sessions and replay in Redis, so a client may resume on any node (with `STREAMPLEX_REDIS_URL`).

Per session, a hash `{prefix}:sess:{sha256(token)}` holds its id, API-key label, owner node and each
stream's channel and subscribe params; its TTL is `resume_window`, pushed forward while a node holds
the session's connection. Per lossless stream, a Redis Stream `{prefix}:replay:{session id}:{stream id}`
holds its recent chunk frames, entry id `{seq}-1` (so `XRANGE` from `{seq}` reads what a client
missed), trimmed with `MINID` to what the node's own replay buffer holds (`resume_buffer_bytes`),
expiring `resume_window` after its last write; a stream's `end` frame is its last entry, with id
`{next seq}-1`.

Writes leave the session's path through one bounded queue, sent in pipelined batches by one task:
a chunk never waits for Redis. While Redis is away they are dropped (and counted): what a client
then misses can be replayed only by the node that holds the session, or regenerated (channels that
restart at a position). A node announces it is alive with a key that expires `NODE_TTL` after its
last heartbeat; a node taking over a session from a live owner asks it, on a pub/sub channel, to
let go first (see `claim`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import struct
import time
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError

from streamplex.server.protocol import MAX_ID_BYTES, parse_server_binary
from streamplex.server.redis_broker import Malformed, RedisBroker

log = logging.getLogger(__name__)

QUEUE_DEPTH = 65536
BATCH = 512
HEARTBEAT = 0.5
NODE_TTL = 1.5
REDIS_TIMEOUT = 2.0

# KEYS[1] a session's record; ARGV[1] this node. Let go only if still the owner (the taker may have stopped waiting).
LET_GO = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then redis.call('HSET', KEYS[1], 'owner', '') end
return 1
"""


def digest(token: str) -> str:
    """The name a session's record goes by in Redis: its token never appears in a key."""
    return hashlib.sha256(token.encode()).hexdigest()[:32]


@dataclass(slots=True)
class StreamSpec:
    """What a stream was opened with: enough to open it again on another node."""

    channel: str
    params: dict[str, Any]


class _SpecModel(BaseModel):
    """A stream's `s:{id}` field as a node writes it; checked before use (Redis is not trusted)."""

    model_config = ConfigDict(extra="ignore")

    channel: str = Field(min_length=1, max_length=128)
    params: dict[str, Any]


@dataclass(slots=True)
class SessionRecord:
    """A session as Redis holds it."""

    id: str
    label: str
    owner: str
    streams: dict[str, StreamSpec] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Entry:
    """One replay entry: a chunk frame with its seq, or (`end`) a stream's end frame."""

    seq: int
    payload: str | bytes
    end: bool = False
    position: Any = None  # what the channel recorded with the chunk (see streamplex.server.channel.Checkpoint)


@dataclass(slots=True)
class _Held:
    """A session this node holds a connection for: refreshed while attached, rewritten after a Redis outage."""

    id: str
    label: str
    streams: dict[str, bytes] = field(default_factory=dict)
    attached: bool = True


class SessionStore:
    """The Redis side of resumable sessions: the journal a `Session` writes, and what `Runtime.adopt` reads."""

    def __init__(self, broker: RedisBroker, node: str, prefix: str, window: float, handover_timeout: float) -> None:
        self.broker = broker
        self.redis = broker.redis
        self.node = node
        self.prefix = prefix
        self.window_ms = max(1, int(window * 1000))
        self.handover_timeout = handover_timeout
        self.refresh_interval = min(5.0, max(0.2, window / 3))
        self.dropped = 0
        self.on_release: Any = None  # async (digest) -> None: let go of a session another node takes over
        self._queue: asyncio.Queue[tuple[Any, ...] | asyncio.Future[None]] = asyncio.Queue(QUEUE_DEPTH)
        self._held: dict[str, _Held] = {}  # by digest
        self._tasks: list[asyncio.Task[None]] = []
        self._warned = False
        self._let_go = self.redis.register_script(LET_GO)
        broker.handlers[self.handover_channel] = self._handover_requested

    # keys --------------------------------------------------------------------------------------

    @property
    def handover_channel(self) -> str:
        return f"{self.prefix}:handover"

    def _sess_key(self, token_digest: str) -> str:
        return f"{self.prefix}:sess:{token_digest}"

    def _replay_key(self, session_id: str, stream_id: str) -> str:
        return f"{self.prefix}:replay:{session_id}:{stream_id}"

    def _node_key(self, node: str) -> str:
        return f"{self.prefix}:node:{node}"

    # life --------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the writer and the heartbeat; returns at once even if Redis is down."""
        self._tasks = [asyncio.create_task(self._write(), name="sessions:write"), asyncio.create_task(self._beat(), name="sessions:beat")]

    async def close(self) -> None:
        """Send what is queued (briefly), then stop."""
        with contextlib.suppress(TimeoutError):
            await self.flush(1.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self.broker.up:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(REDIS_TIMEOUT):
                    await self.redis.delete(self._node_key(self.node))

    async def flush(self, timeout: float = REDIS_TIMEOUT) -> None:
        """Wait until every write queued so far was sent (or dropped)."""
        marker = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(marker)
        except asyncio.QueueFull:
            return  # the queue drops writes already; waiting would not make this one surer
        async with asyncio.timeout(timeout):
            await marker

    # the journal (called by Session; never waits) ----------------------------------------------

    def subscribed(self, token: str, session_id: str, label: str, stream_id: str, channel: str, params: dict[str, Any]) -> None:
        """A stream opened: the session's record gets it (and is created with its first stream)."""
        key = digest(token)
        held = self._held.get(key)
        if held is None:
            held = self._held[key] = _Held(session_id, label)
            self._put("HSET", self._sess_key(key), "id", session_id, "label", label, "owner", self.node)
        spec = orjson.dumps({"channel": channel, "params": params})
        held.streams[stream_id] = spec
        self._put("HSET", self._sess_key(key), f"s:{stream_id}", spec)
        self._put("PEXPIRE", self._sess_key(key), self.window_ms)

    def chunk(self, session_id: str, stream_id: str, seq: int, payload: str | bytes, first_kept: int, position: Any = None) -> None:
        """A lossless chunk was sent: append it (with its producer's position, if any), and trim what the node's
        replay buffer no longer holds."""
        key = self._replay_key(session_id, stream_id)
        kind = "b" if isinstance(payload, bytes) else "c"
        extra = () if position is None else ("p", orjson.dumps(position))
        self._put("XADD", key, "MINID", f"{first_kept}-0", f"{seq}-1", kind, payload, *extra)
        self._put("PEXPIRE", key, self.window_ms)

    def ended(self, session_id: str, stream_id: str, next_seq: int, payload: str) -> None:
        """A stream ended with an `end` frame the client must get: it is the stream's last entry."""
        key = self._replay_key(session_id, stream_id)
        self._put("XADD", key, f"{next_seq}-1", "e", payload)
        self._put("PEXPIRE", key, self.window_ms)

    def attached(self, token: str, session_id: str, label: str, streams: dict[str, tuple[str, dict[str, Any]]]) -> None:
        """This node now holds the session's connection (after a resume): own it and keep it fresh."""
        key = digest(token)
        held = self._held[key] = _Held(session_id, label, {sid: orjson.dumps({"channel": c, "params": p}) for sid, (c, p) in streams.items()})
        if held.streams:
            self._put("HSET", self._sess_key(key), "id", session_id, "label", label, "owner", self.node, *_flat(held.streams))
            self._put("PEXPIRE", self._sess_key(key), self.window_ms)

    def detached(self, token: str) -> None:
        """The connection dropped: the record now lives `resume_window` more, unless resumed."""
        held = self._held.get(digest(token))
        if held is not None:
            held.attached = False
            self._put("PEXPIRE", self._sess_key(digest(token)), self.window_ms)

    def forget(self, token: str, session_id: str, stream_ids: list[str]) -> None:
        """The session is over (closed cleanly, expired, or ended): delete its record and replay."""
        key = digest(token)
        held = self._held.pop(key, None)
        ids = set(stream_ids) | set(held.streams if held else ())
        self._put("DEL", self._sess_key(key), *(self._replay_key(session_id, sid) for sid in ids))

    def disown(self, token: str) -> None:
        """Stop refreshing a session another node takes over (its record stays)."""
        self._held.pop(digest(token), None)

    def _put(self, *command: Any) -> None:
        try:
            self._queue.put_nowait(command)
        except asyncio.QueueFull:
            self._drop(1, "the write queue is full")

    def _drop(self, n: int, why: str) -> None:
        self.dropped += n
        if not self._warned:
            log.warning("session records not written to Redis (%s); resuming on another node may replay less until it recovers", why)
            self._warned = True

    async def _write(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            commands = _one_expiry_per_key([c for c in batch if isinstance(c, tuple)])
            if commands and not self.broker.up:
                self._drop(len(commands), "Redis is down")
            elif commands:
                try:
                    async with asyncio.timeout(REDIS_TIMEOUT):
                        pipe = self.redis.pipeline(transaction=False)
                        for command in commands:
                            pipe.execute_command(*command)
                        results = await pipe.execute(raise_on_error=False)
                    self._warned = False
                    for command, result in zip(commands, results, strict=True):
                        if isinstance(result, Exception):
                            # An XADD below the stream's top: another node took the stream over (we keep quiet).
                            log.debug("Redis refused %s %s: %s", command[0], command[1], result)
                except (RedisError, OSError, TimeoutError) as exc:
                    self.broker.mark_down(exc)
                    self._drop(len(commands), "Redis failed")
            for item in batch:
                if isinstance(item, asyncio.Future) and not item.done():
                    item.set_result(None)

    async def _beat(self) -> None:
        """Say this node is alive; keep attached sessions' records alive; rewrite them after every (re)connection to
        Redis, which may have restarted empty however short the outage was."""
        written = -1  # the broker's connection count when the records were last written in full
        last_refresh = 0.0
        while True:
            if self.broker.up:
                connects = self.broker.connects
                try:
                    async with asyncio.timeout(REDIS_TIMEOUT):
                        await self.redis.set(self._node_key(self.node), "1", px=int(NODE_TTL * 1000))
                        now = time.monotonic()
                        if connects != written or now - last_refresh >= self.refresh_interval:
                            await self._refresh(rewrite=connects != written)
                            last_refresh, written = now, connects
                except (RedisError, OSError, TimeoutError) as exc:
                    self.broker.mark_down(exc)
            await asyncio.sleep(HEARTBEAT)

    async def _refresh(self, rewrite: bool) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for key, held in self._held.items():
            if not held.attached:
                continue
            if rewrite and held.streams:  # Redis may have lost everything
                pipe.hset(
                    self._sess_key(key), mapping={"id": held.id, "label": held.label, "owner": self.node, **{f"s:{sid}": s for sid, s in held.streams.items()}}
                )
            pipe.pexpire(self._sess_key(key), self.window_ms)
            for sid in held.streams:  # a stream that sends nothing for a while (a chat waiting for a turn) keeps its replay
                pipe.pexpire(self._replay_key(held.id, sid), self.window_ms)
        await pipe.execute(raise_on_error=False)

    # taking a session over ---------------------------------------------------------------------

    async def load(self, token: str) -> SessionRecord | None:
        """The session's record, or None when Redis has none (unknown, expired, lost) or is away."""
        if not self.broker.up:
            return None
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                raw = await self.redis.hgetall(self._sess_key(digest(token)))
        except (RedisError, OSError, TimeoutError) as exc:
            self.broker.mark_down(exc)
            return None
        if not raw or b"id" not in raw:
            return None
        try:
            record = _record(cast("dict[bytes, bytes]", raw))  # the client does not decode responses
        except ValueError as exc:  # pydantic's ValidationError, UnicodeDecodeError and Malformed are ValueErrors
            log.warning("session record %s in Redis is malformed (%s); taken as absent", self._sess_key(digest(token)), str(exc).splitlines()[0][:200])
            return None
        return record

    async def claim(self, token: str, record: SessionRecord) -> bool:
        """Make this node the session's owner. A live owner is asked to let go first (it stops the streams and
        sends what it queued); a dead one (its heartbeat key expired) is not waited for. False when Redis failed."""
        key = digest(token)
        try:
            owner = record.owner
            if owner and owner != self.node:
                await self.redis.publish(self.handover_channel, orjson.dumps({"node": self.node, "m": {"owner": owner, "session": key}}))
                deadline = time.monotonic() + self.handover_timeout
                while time.monotonic() < deadline:
                    async with asyncio.timeout(REDIS_TIMEOUT):
                        pipe = self.redis.pipeline(transaction=False)
                        pipe.hget(self._sess_key(key), "owner")
                        pipe.exists(self._node_key(owner))
                        current, alive = await pipe.execute()
                    if current != owner.encode() or not alive:
                        break
                    await asyncio.sleep(0.05)
                else:
                    log.warning("node %s did not hand session %s over within %g s; taking it anyway", owner, record.id, self.handover_timeout)
            async with asyncio.timeout(REDIS_TIMEOUT):
                await self.redis.hset(self._sess_key(key), "owner", self.node)
        except (RedisError, OSError, TimeoutError) as exc:
            self.broker.mark_down(exc)
            return False
        return True

    async def replay(self, session_id: str, stream_id: str, after: int) -> list[Entry] | None:
        """The stream's entries after seq `after`, in order; None when Redis failed."""
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                rows = await self.redis.xrange(self._replay_key(session_id, stream_id), min=f"{after + 1}-0", max="+")
        except (RedisError, OSError, TimeoutError) as exc:
            self.broker.mark_down(exc)
            return None
        entries = []
        for entry_id, fields in cast("list[tuple[bytes, dict[bytes, bytes]]]", rows):  # the client does not decode responses
            try:
                entries.append(_entry(stream_id, entry_id, fields))
            except ValueError as exc:
                # Dropped: the stream then has a gap there, handled as any (replay stops, the stream restarts or ends).
                log.warning("dropped a malformed replay entry %r of session %s stream %s (%s)", entry_id[:40], session_id, stream_id, str(exc)[:200])
        return entries

    def _handover_requested(self, message: Any) -> None:
        if not isinstance(message, dict) or not isinstance(message.get("owner"), str) or not isinstance(key := message.get("session"), str) or len(key) != 32:
            raise Malformed("not a handover request")
        if message["owner"] != self.node or self.on_release is None:
            return
        task = asyncio.get_running_loop().create_task(self._release(key), name="sessions:handover")
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _release(self, key: str) -> None:
        try:
            await self.on_release(key)
            self._held.pop(key, None)
            await self.flush()
            async with asyncio.timeout(REDIS_TIMEOUT):
                await self._let_go(keys=[self._sess_key(key)], args=[self.node])
        except (RedisError, OSError, TimeoutError) as exc:
            self.broker.mark_down(exc)


def _record(raw: dict[bytes, bytes]) -> SessionRecord:
    """A session's hash as read from Redis, checked; raise ValueError when it is not what a node writes."""
    record = SessionRecord(raw[b"id"].decode(), raw.get(b"label", b"").decode(), raw.get(b"owner", b"").decode())
    if not record.id or len(record.id) > MAX_ID_BYTES:
        raise Malformed("no session id")
    for name, value in raw.items():
        if name.startswith(b"s:"):
            stream_id = name[2:].decode()
            if not stream_id or len(stream_id.encode()) > MAX_ID_BYTES:
                raise Malformed(f"stream id {stream_id[:40]!r}")
            spec = _SpecModel.model_validate_json(value)
            record.streams[stream_id] = StreamSpec(spec.channel, spec.params)
    return record


def _entry(stream_id: str, entry_id: bytes, fields: dict[bytes, bytes]) -> Entry:
    """One replay entry as read from Redis, checked against its stream and seq; raise ValueError when it is not what a node writes."""
    try:
        seq = int(entry_id.split(b"-")[0])
        if b"b" in fields:
            frame_id, frame_seq, _ = parse_server_binary(fields[b"b"])
            if frame_id != stream_id or frame_seq != seq & 0xFFFFFFFF:
                raise Malformed(f"a binary frame of stream {frame_id!r} seq {frame_seq}")
            return Entry(seq, fields[b"b"], position=_position(fields))
        end = b"e" in fields
        text = fields[b"e" if end else b"c"].decode()
        frame = orjson.loads(text)
        position = _position(fields)
    except (KeyError, IndexError, struct.error) as exc:
        raise Malformed(f"{type(exc).__name__}: {exc}") from None
    if not isinstance(frame, dict) or frame.get("op") != ("end" if end else "chunk") or frame.get("id") != stream_id or (not end and frame.get("seq") != seq):
        raise Malformed("not this stream's frame at this seq")
    return Entry(seq, text, end=end, position=position)


def _position(fields: dict[bytes, bytes]) -> Any:
    """The producer's position kept with a chunk (JSON), if any; the channel that reads it checks its shape."""
    return orjson.loads(fields[b"p"]) if b"p" in fields else None


def _one_expiry_per_key(commands: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The batch with only the last PEXPIRE of each key (after the key's last write in it): one per stream, not per chunk."""
    seen: set[Any] = set()
    kept = []
    for command in reversed(commands):
        if command[0] == "PEXPIRE":
            if command[1] in seen:
                continue
            seen.add(command[1])
        kept.append(command)
    kept.reverse()
    return kept


def _flat(streams: dict[str, bytes]) -> list[Any]:
    return [x for sid, spec in streams.items() for x in (f"s:{sid}", spec)]
