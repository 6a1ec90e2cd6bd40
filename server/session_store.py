"""Sessions and replay in Redis, so a client may resume on any node (with `STREAMPLEX_REDIS_URL`).

Per session, a hash `{prefix}:sess:{sha256(token)}` holds its id, API-key label, owner node and each
stream's channel and subscribe params; its TTL is `resume_window`, pushed forward while a node holds
the session's connection. Per lossless stream, a Redis Stream `{prefix}:replay:{session id}:{stream id}`
holds its recent chunk frames, entry id `{seq}-1` (so `XRANGE` from `{seq}` reads what a client
missed), trimmed with `MINID` to what the node's own replay buffer holds (`resume_buffer_bytes`),
expiring `resume_window` after its last write; a stream's `end` frame is its last entry, with id
`{next seq}-1`.

Writes leave the session's path through one bounded queue, sent in batches (one script each) by one task:
a chunk never waits for Redis. While Redis is away they are dropped (and counted): what a client
then misses can be replayed only by the node that holds the session, or regenerated (channels that
restart at a position). A node announces it is alive with a key that expires `NODE_TTL` after its
last heartbeat, and with a pub/sub subscription of its own (`{prefix}:alive:{instance}`) that Redis
drops the moment the process's connection closes: a node taking over a session whose owner is gone
takes it at once; a live owner it asks, on a pub/sub channel, to let go first (see `claim`).

Every write a node makes for a session is fenced: it goes to Redis in a script that first checks the
session's record still names this node and process (`owner`, `inst`); a node that lost a session
(paused, or cut from Redis, while another node took it over) writes nothing more for it and stops
its streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import struct
import time
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError, ResponseError

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

# A batch of writes, each run only if the session it is for is still this process's.
# KEYS: the session records the batch writes for; ARGV[1] this node, ARGV[2] its instance, then per command:
# the index of its record in KEYS (0: none), its number of arguments, the arguments. A record that does not
# exist yet (its first HSET is in the batch) or names this node with this instance (or none) is this
# process's. Returns the records that are not (another node took them over), then how many commands failed.
FENCED_BATCH = """
local mine = {}
for i, key in ipairs(KEYS) do
  local o = redis.call('HMGET', key, 'owner', 'inst')
  mine[i] = (not o[1]) or (o[1] == ARGV[1] and (not o[2] or o[2] == ARGV[2]))
end
local failed = 0
local i = 3
while i <= #ARGV do
  local k = tonumber(ARGV[i])
  local n = tonumber(ARGV[i + 1])
  if k == 0 or mine[k] then
    local r = redis.pcall(unpack(ARGV, i + 2, i + 1 + n))
    if type(r) == 'table' and r.err then failed = failed + 1 end
  end
  i = i + 2 + n
end
local lost = {}
for j, key in ipairs(KEYS) do
  if not mine[j] then lost[#lost + 1] = key end
end
lost[#lost + 1] = failed
return lost
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


class SavedState(BaseModel):
    """A stream's last saved state as a node writes it (`state`); checked before use (Redis is not trusted), its
    `state` by the channel that reads it."""

    model_config = ConfigDict(extra="ignore")

    next: int = Field(ge=0)
    input: int = Field(ge=0)
    state: Any = None


@dataclass(slots=True)
class SessionRecord:
    """A session as Redis holds it."""

    id: str
    label: str
    owner: str
    inst: str = ""  # the owner's process (SessionStore.instance); empty in records of older nodes
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
        self.fenced = 0  # sessions this process lost to another node while it still wrote for them
        self.instance = secrets.token_hex(8)  # this process: a node restarted under the same name is another owner
        self.on_release: Any = None  # async (digest) -> None: let go of a session another node takes over
        self._queue: asyncio.Queue[tuple[str | None, tuple[Any, ...]] | asyncio.Future[None]] = asyncio.Queue(QUEUE_DEPTH)
        self._held: dict[str, _Held] = {}  # by digest
        self._fences: dict[str, str] = {}  # session id -> digest, for every session this process writes for
        self._tasks: list[asyncio.Task[None]] = []
        self._warned = False
        self._probe = True  # PUBSUB NUMSUB answers (an ACL may forbid it: then only the heartbeat key tells)
        self._let_go = self.redis.register_script(LET_GO)
        self._batch = self.redis.register_script(FENCED_BATCH)
        broker.handlers[self.handover_channel] = self._handover_requested
        broker.handlers[self.alive_channel] = _ignore

    # keys --------------------------------------------------------------------------------------

    @property
    def handover_channel(self) -> str:
        return f"{self.prefix}:handover"

    @property
    def alive_channel(self) -> str:
        """The channel this process stays subscribed to while it lives: its subscriber count says whether it is gone."""
        return self._alive_channel(self.instance)

    def _alive_channel(self, instance: str) -> str:
        return f"{self.prefix}:alive:{instance}"

    def _sess_key(self, token_digest: str) -> str:
        return f"{self.prefix}:sess:{token_digest}"

    def _replay_key(self, session_id: str, stream_id: str) -> str:
        return f"{self.prefix}:replay:{session_id}:{stream_id}"

    def _state_key(self, session_id: str, stream_id: str) -> str:
        return f"{self.prefix}:state:{session_id}:{stream_id}"

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
            self._fences[session_id] = key
            self._put(key, "HSET", self._sess_key(key), "id", session_id, "label", label, "owner", self.node, "inst", self.instance)
        spec = orjson.dumps({"channel": channel, "params": params})
        held.streams[stream_id] = spec
        self._put(key, "HSET", self._sess_key(key), f"s:{stream_id}", spec)
        self._put(key, "PEXPIRE", self._sess_key(key), self.window_ms)

    def chunk(self, session_id: str, stream_id: str, seq: int, payload: str | bytes, first_kept: int, position: Any = None) -> None:
        """A lossless chunk was sent: append it (with its producer's position, if any), and trim what the node's
        replay buffer no longer holds."""
        key = self._replay_key(session_id, stream_id)
        kind = "b" if isinstance(payload, bytes) else "c"
        extra = () if position is None else ("p", orjson.dumps(position))
        fence = self._fences.get(session_id)
        self._put(fence, "XADD", key, "MINID", f"{first_kept}-0", f"{seq}-1", kind, payload, *extra)
        self._put(fence, "PEXPIRE", key, self.window_ms)

    def ended(self, session_id: str, stream_id: str, next_seq: int, payload: str) -> None:
        """A stream ended with an `end` frame the client must get: it is the stream's last entry."""
        key = self._replay_key(session_id, stream_id)
        fence = self._fences.get(session_id)
        self._put(fence, "XADD", key, f"{next_seq}-1", "e", payload)
        self._put(fence, "PEXPIRE", key, self.window_ms)

    def state(self, session_id: str, stream_id: str, next_seq: int, input_from: int, state: Any) -> None:
        """A stream saved its state after chunk `next_seq` - 1 (streamplex.server.channel.StreamContext.save): it replaces the one
        before, and is written after the chunks before it (one queue), so Redis never holds a state ahead of them."""
        key = self._state_key(session_id, stream_id)
        self._put(self._fences.get(session_id), "SET", key, orjson.dumps({"next": next_seq, "input": input_from, "state": state}), "PX", self.window_ms)

    def attached(self, token: str, session_id: str, label: str, streams: dict[str, tuple[str, dict[str, Any]]]) -> None:
        """This node now holds the session's connection (after a resume): own it and keep it fresh."""
        key = digest(token)
        held = self._held[key] = _Held(session_id, label, {sid: orjson.dumps({"channel": c, "params": p}) for sid, (c, p) in streams.items()})
        self._fences[session_id] = key
        if held.streams:
            self._put(key, "HSET", self._sess_key(key), "id", session_id, "label", label, "owner", self.node, "inst", self.instance, *_flat(held.streams))
            self._put(key, "PEXPIRE", self._sess_key(key), self.window_ms)

    def detached(self, token: str) -> None:
        """The connection dropped: the record now lives `resume_window` more, unless resumed."""
        held = self._held.get(digest(token))
        if held is not None:
            held.attached = False
            self._put(digest(token), "PEXPIRE", self._sess_key(digest(token)), self.window_ms)

    def forget(self, token: str, session_id: str, stream_ids: list[str]) -> None:
        """The session is over (closed cleanly, expired, or ended): delete its record and replay."""
        key = digest(token)
        held = self._held.pop(key, None)
        ids = set(stream_ids) | set(held.streams if held else ())
        self._put(key, "DEL", self._sess_key(key), *(k for sid in ids for k in (self._replay_key(session_id, sid), self._state_key(session_id, sid))))
        self._fences.pop(session_id, None)

    def disown(self, token: str) -> None:
        """Stop refreshing a session another node takes over (its record stays)."""
        self._held.pop(digest(token), None)

    def _put(self, fence: str | None, *command: Any) -> None:
        """Queue a write; with `fence` (a session's digest), it is made only while that session is this process's."""
        try:
            self._queue.put_nowait((fence, command))
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
                    await self._execute(commands)
                    self._warned = False
                except (RedisError, OSError, TimeoutError) as exc:
                    self.broker.mark_down(exc)
                    self._drop(len(commands), "Redis failed")
            for item in batch:
                if isinstance(item, asyncio.Future) and not item.done():
                    item.set_result(None)

    async def _execute(self, commands: list[tuple[str | None, tuple[Any, ...]]]) -> None:
        """Run `commands` in one fenced batch (FENCED_BATCH); let go of the sessions another node took over."""
        records: dict[str, int] = {}
        args: list[Any] = [self.node, self.instance]
        for fence, command in commands:
            index = 0 if fence is None else records.setdefault(fence, len(records) + 1)
            args += [index, len(command), *command]
        async with asyncio.timeout(REDIS_TIMEOUT):
            answer = await self._batch(keys=[self._sess_key(k) for k in records], args=args)
        *lost, failed = cast("list[Any]", answer)
        if failed:
            # An XADD below the stream's top (another node wrote the stream on), a key of another type: kept quiet.
            log.debug("Redis refused %s of %d session write(s)", failed, len(commands))
        for key in lost:
            self._lost(key.decode().rsplit(":", 1)[-1])

    def _lost(self, key: str) -> None:
        """Another node owns the session this process still wrote for: write nothing more for it, stop its streams."""
        held = self._held.pop(key, None)
        if held is None:
            return  # already let go of
        self.fenced += 1
        log.warning("session %s is owned by another node now (this node was paused or cut from Redis meanwhile); its streams stop here", held.id)
        task = asyncio.get_running_loop().create_task(self._stop_lost(key, held.id), name="sessions:fenced")
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _stop_lost(self, key: str, session_id: str) -> None:
        if self.on_release is not None:
            await self.on_release(key)
        self._fences.pop(session_id, None)

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
        commands: list[tuple[str | None, tuple[Any, ...]]] = []
        for key, held in list(self._held.items()):
            if not held.attached:
                continue
            if rewrite and held.streams:  # Redis may have lost everything (a record another node owns now is not written: fenced)
                commands.append(
                    (key, ("HSET", self._sess_key(key), "id", held.id, "label", held.label, "owner", self.node, "inst", self.instance, *_flat(held.streams)))
                )
            commands.append((key, ("PEXPIRE", self._sess_key(key), self.window_ms)))
            for sid in held.streams:  # a stream that sends nothing for a while (a chat waiting for a turn) keeps its replay
                commands.append((key, ("PEXPIRE", self._replay_key(held.id, sid), self.window_ms)))
                commands.append((key, ("PEXPIRE", self._state_key(held.id, sid), self.window_ms)))
        if commands:
            await self._execute(commands)

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

    async def claim(self, token: str, record: SessionRecord) -> Claim | None:
        """Make this process the session's owner, and say how. An owner whose process is gone (its Redis connection
        closed: Redis dropped its `alive` subscription), or another process of this node's name (an earlier one; a live
        one is a misconfiguration, logged), is not waited for; a live owner is asked to let go first (it stops the
        streams and sends what it queued), waited for until it does, its heartbeat key lapses, or
        `resume_handover_timeout`. The owner's later writes for the session are fenced off (FENCED_BATCH). None when
        Redis failed."""
        key = digest(token)
        started = time.monotonic()
        how = "unowned"
        try:
            owner = record.owner
            if owner == self.node and record.inst == self.instance:
                how = "this process"
            elif owner == self.node:
                how = "an earlier process of this node"
                if await self._gone(record.inst) is False:  # fenced off from here on, like any owner that lost a session
                    log.warning("session %s is held by another live process named %s: every process needs its own STREAMPLEX_NODE", record.id, owner)
                    how = "another live process of the same name"
            elif owner and await self._gone(record.inst) is True:
                how = "gone (its Redis connection closed)"
            elif owner:
                how = await self._hand_over(key, record)
            async with asyncio.timeout(REDIS_TIMEOUT):
                await self.redis.hset(self._sess_key(key), mapping={"owner": self.node, "inst": self.instance})
        except (RedisError, OSError, TimeoutError) as exc:
            self.broker.mark_down(exc)
            return None
        self._fences[record.id] = key  # the writes of the streams restored next are fenced too
        return Claim(how, time.monotonic() - started)

    async def _hand_over(self, key: str, record: SessionRecord) -> str:
        """Ask the live-looking owner to let go, and wait: how it ended."""
        owner = record.owner
        await self.redis.publish(self.handover_channel, orjson.dumps({"node": self.node, "m": {"owner": owner, "session": key}}))
        deadline = time.monotonic() + self.handover_timeout
        while time.monotonic() < deadline:
            async with asyncio.timeout(REDIS_TIMEOUT):
                pipe = self.redis.pipeline(transaction=False)
                pipe.hget(self._sess_key(key), "owner")
                pipe.exists(self._node_key(owner))
                current, alive = await pipe.execute()
            if current != owner.encode():
                return "handed over"
            if not alive:
                return "dead (its heartbeat lapsed)"
            if await self._gone(record.inst) is True:
                return "gone (its Redis connection closed)"
            await asyncio.sleep(0.05)
        log.warning("node %s did not hand session %s over within %g s; taking it anyway", owner, record.id, self.handover_timeout)
        return "not handed over in time"

    async def _gone(self, instance: str) -> bool | None:
        """Whether the owner process `instance` is gone: nobody subscribes to its `alive` channel any more. None when
        Redis cannot tell (no instance in the record, or an ACL without PUBSUB NUMSUB: then the heartbeat key tells)."""
        if not instance or not self._probe:
            return None
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                counts = await self.redis.pubsub_numsub(self._alive_channel(instance))
        except ResponseError as exc:  # NOPERM: the ACL user may not count subscribers
            self._probe = False
            log.warning("Redis refused PUBSUB NUMSUB (%s); a node taking over a session from a dead node waits for its heartbeat to lapse", exc)
            return None
        return not counts or int(counts[0][1]) == 0

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

    async def saved(self, session_id: str, stream_id: str) -> SavedState | None:
        """The stream's last saved state, or None when Redis holds none, holds a malformed one, or failed."""
        key = self._state_key(session_id, stream_id)
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                raw = await self.redis.get(key)
        except (RedisError, OSError, TimeoutError) as exc:
            self.broker.mark_down(exc)
            return None
        if raw is None:
            return None
        try:
            return SavedState.model_validate_json(cast("bytes", raw))
        except ValueError as exc:
            log.warning("saved state %s in Redis is malformed (%s); taken as absent", key, str(exc).splitlines()[0][:200])
            return None

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
            held = self._held.pop(key, None)
            if held is not None:
                self._fences.pop(held.id, None)
            await self.flush()
            async with asyncio.timeout(REDIS_TIMEOUT):
                await self._let_go(keys=[self._sess_key(key)], args=[self.node])
        except (RedisError, OSError, TimeoutError) as exc:
            self.broker.mark_down(exc)


def _record(raw: dict[bytes, bytes]) -> SessionRecord:
    """A session's hash as read from Redis, checked; raise ValueError when it is not what a node writes."""
    record = SessionRecord(raw[b"id"].decode(), raw.get(b"label", b"").decode(), raw.get(b"owner", b"").decode(), raw.get(b"inst", b"").decode())
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


def _ignore(message: Any) -> None:
    """A message on a node's `alive` channel: nodes only count its subscribers."""


@dataclass(frozen=True, slots=True)
class Claim:
    """How a node took a session over: from whom (`how`), and how long it waited for the owner."""

    how: str
    waited: float


def _one_expiry_per_key(commands: list[tuple[str | None, tuple[Any, ...]]]) -> list[tuple[str | None, tuple[Any, ...]]]:
    """The batch with only the last PEXPIRE of each key (after the key's last write in it): one per stream, not per chunk."""
    seen: set[Any] = set()
    kept = []
    for item in reversed(commands):
        command = item[1]
        if command[0] == "PEXPIRE":
            if command[1] in seen:
                continue
            seen.add(command[1])
        kept.append(item)
    kept.reverse()
    return kept


def _flat(streams: dict[str, bytes]) -> list[Any]:
    return [x for sid, spec in streams.items() for x in (f"s:{sid}", spec)]
