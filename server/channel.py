"""The interface every channel implements, and what the server hands to channels.

Channels never import Starlette or the session layer: they validate params, produce an async
stream of chunks, read pushed input from their context, and clean up in `finally` blocks.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, aclosing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, cast

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from streamplex.server.config import Settings
from streamplex.server.engine import Engine
from streamplex.server.protocol import ErrorCode, validation_details


@dataclass(frozen=True, slots=True)
class Binary:
    """A chunk whose payload travels in a binary frame (media)."""

    payload: bytes


class Shared:
    """A chunk that many streams send alike: its JSON is encoded once, on first use, and reused by every stream."""

    __slots__ = ("_json", "data")

    def __init__(self, data: Any) -> None:
        self.data = data
        self._json: str | None = None

    @property
    def json(self) -> str:
        """The data as compact JSON text (cached)."""
        if self._json is None:
            self._json = orjson.dumps(self.data).decode()
        return self._json


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A chunk with its producer's position: kept with the chunk in Redis, so that another node can go on from it
    (a channel with `needs_positions` gets every delivered chunk's position in `StreamContext.positions`)."""

    data: Any
    position: Any


def plain(item: Any) -> Any:
    """A yielded chunk without its position, if it came as a `Checkpoint`."""
    return item.data if isinstance(item, Checkpoint) else item


class CannotGoOn(Exception):
    """Raised by `stream()` on another node when it cannot go on from the positions it got: the stream ends with
    reason `producer_lost`."""


Saver = Callable[[int, Callable[[], Any]], None]


class ChannelError(Exception):
    """A failure to report to the client: at subscribe time as `error`, mid-stream as `end` with reason `error`."""

    def __init__(self, code: ErrorCode, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


class ParamsModel(BaseModel):
    """Base of every channel's params: unknown fields are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


Publish = Callable[[Any], None]
Producer = Callable[[Publish], Awaitable[None]]


class Feeds(Protocol):
    """Shared fan-out streams (the hub): one producer per topic, however many subscribers."""

    def subscribe(
        self, topic: str, producer: Producer | None = None, depth: int = 64, sink: Callable[[Any], None] | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[Any]]:
        """Subscribe to `topic` (starting `producer` with its first subscriber); with `sink`, each message is handed to it at once instead of queued."""
        ...

    def provide(self, topic: str, producer: Producer) -> None:
        """Register `topic`'s producer, so that another node's demand can start it with no local subscriber."""
        ...

    def accept(self, topic: str, check: Callable[[Any], Any]) -> None:
        """Register how `topic`'s messages from other nodes are checked: `check` returns the message to deliver or
        raises (ValueError, pydantic's ValidationError) to drop it. Without one, other nodes' messages are dropped."""
        ...


class LogSource(Protocol):
    """The server's own log records: a ring buffer of recent ones, and their broker topic."""

    topic: str
    node: str

    def recent(self) -> list[dict[str, Any]]: ...


@dataclass
class Services:
    """What the server lends to channels."""

    settings: Settings
    feeds: Feeds
    logs: LogSource
    stats: Callable[[], dict[str, Any]]
    engine: Engine | None = None


@dataclass(frozen=True, slots=True)
class Gap:
    """Yielded by a lossy feed in place of `count` items it had to drop."""

    count: int


class EndOfInput:
    """Marks the end of pushed input (`{"op":"push","end":true}`)."""


END_OF_INPUT = EndOfInput()


@dataclass
class StreamContext:
    """Per-stream state a channel sees: its id and the input pushed by the client."""

    stream_id: str
    inbox: asyncio.Queue[Any]
    emit: Callable[[Any], None] | None = None
    """Where a lossy stream may hand chunks at once instead of yielding them (no task switch per chunk); None where the caller only iterates."""
    start: int = 0
    """Chunks the client already has (a stream going on after its node died): a `restartable` channel skips them."""
    tenant: str = ""
    """The API key's non-secret label: what per-tenant state (the chat prefix cache) is partitioned by."""
    positions: list[Any] = field(default_factory=list)
    """With `needs_positions`, going on elsewhere: the position of each of the `start` chunks delivered (None where none was recorded)."""
    saved: Any = None
    """With `saves_state`, going on elsewhere: the last state the stream saved (`save`), None when it saved none."""
    saved_at: int = 0
    """The chunks yielded before `saved` was saved: those from there to `start` are made again, not sent."""
    saver: Saver | None = None
    """Where `save` records a state; None where nothing would read it (no Redis), so that the state is not even built."""

    def save(self, input_from: int, state: Callable[[], Any]) -> None:
        """Record where the stream stands after the chunks yielded so far: `state()` (JSON) is what another node goes
        on from, needing the client's pushed input again from byte `input_from` (what `ack` tells the client)."""
        if self.saver is not None:
            self.saver(input_from, state)

    async def pushed(self) -> AsyncIterator[Any]:
        """Yield pushed items (JSON values or bytes) until the client ends its input."""
        while True:
            item = await self.inbox.get()
            if item is END_OF_INPUT:
                return
            yield item


class Skip:
    """The chunks a restarted stream makes again without sending: `Skip(n)()` is True for the first n calls."""

    __slots__ = ("left",)

    def __init__(self, n: int) -> None:
        self.left = n

    def __call__(self) -> bool:
        """Whether the next chunk is one the client already has."""
        if self.left:
            self.left -= 1
            return True
        return False


async def skip_first(chunks: AsyncIterator[Any], n: int) -> AsyncIterator[Any]:
    """`chunks` from the n-th on (an unpaced channel going on elsewhere: the first n are made again, not sent)."""
    async with aclosing(as_generator(chunks)) as produced:
        skip = Skip(n)
        async for chunk in produced:
            if not skip():
                yield chunk


def as_generator(chunks: AsyncIterator[Any]) -> AsyncGenerator[Any, None]:
    """A channel's stream as the async generator it is, so that `contextlib.aclosing` can close it."""
    return cast("AsyncGenerator[Any, None]", chunks)


Status = Literal["available", "loading", "unavailable"]


@dataclass(frozen=True)
class ChannelStatus:
    """Whether a channel can serve now, and why not."""

    state: Status
    reason: str | None = None
    retry_after: float | None = None
    """Seconds a refused client should wait (a `loading` channel: 5 s unless set)."""


AVAILABLE = ChannelStatus("available")


def model_status(engine: Engine | None, family: str) -> ChannelStatus:
    """A model channel's status: that of its engine family's default model."""
    if engine is None:
        return ChannelStatus("unavailable", "the model engine is not running")
    state, reason = engine.family_state(family)
    if state == "ready":
        return AVAILABLE
    return ChannelStatus("loading", f"the {family} model is loading") if state == "loading" else ChannelStatus("unavailable", reason)


class Channel(ABC):
    """One kind of content. Subclasses set the class attributes and implement `stream`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Params: ClassVar[type[ParamsModel]]
    lossy: ClassVar[bool] = False
    accepts_push: ClassVar[bool] = False
    media: ClassVar[bool] = False  # its content travels in binary frames; HTTP answers it as raw bytes by default
    admin: ClassVar[bool] = False
    """It shows other clients' data (addresses, session ids, key labels): only a key scoped `admin`, or naming it, may use it."""
    restartable: ClassVar[bool] = False
    """Its `stream()` yields the same chunks for the same params and honours `StreamContext.start`, so another node
    can go on with a stream whose node died (see docs/protocol.md#resume-across-nodes); `restarts` may narrow it per params."""
    needs_positions: ClassVar[bool] = False
    """It yields `Checkpoint`s and, going on elsewhere, needs the positions of every chunk delivered before."""
    saves_state: ClassVar[bool] = False
    """It records its state with `StreamContext.save` and, going on elsewhere, starts from the last one saved
    (`StreamContext.saved`), making again without sending the chunks between it and `StreamContext.start`."""
    remote: ClassVar[bool] = False
    """Its streams can run on a model worker (`remote_channels`): its input is its params and pushed JSON values, its
    chunks are JSON, and `stream()` goes on from `StreamContext.start` (a worker claiming a dead worker's job does)."""
    engine_families: ClassVar[tuple[str, ...]] = ()
    """The engine families (`chat`, `embedding`, ...) its streams use: a node that hands the channel to model workers
    loads none of their models, and a model worker loads only those of the channels it serves."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.settings = services.settings

    async def start(self) -> None:
        """Called once at server start (load models here, in the background)."""

    async def stop(self) -> None:
        """Called once at server stop."""

    def status(self) -> ChannelStatus:
        """Whether the channel can take subscriptions now."""
        return AVAILABLE

    def parse(self, raw: dict[str, Any]) -> ParamsModel:
        """Validate subscribe params; raise ChannelError(invalid_params, ...) with field details."""
        try:
            params = self.Params.model_validate(raw)
        except ValidationError as exc:
            raise ChannelError(ErrorCode.INVALID_PARAMS, f"invalid params for channel {self.name!r}", validation_details(exc)) from None
        self.check(params)
        return params

    def check(self, params: Any) -> None:
        """Checks beyond the schema (files exist, paths stay inside their folder); raise ChannelError."""

    def acks_input(self, params: Any) -> bool:
        """Whether the server acknowledges this stream's pushed input (binary frames), so that the client keeps what
        follows the last `ack` and sends it again after a resume (see docs/protocol.md#pushed-input-across-a-resume)."""
        return False

    def restarts(self, params: Any) -> bool:
        """Whether a stream with these (parsed) params can go on on another node: `restartable`, unless these params'
        output is not the same from one run to the next (a URL source, a model whose chunking follows timing)."""
        return self.restartable

    @abstractmethod
    def stream(self, params: Any, ctx: StreamContext) -> AsyncIterator[Any]:
        """Yield chunks: JSON-serialisable data, or Binary for media."""
