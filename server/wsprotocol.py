"""uvicorn's WebSocket protocol with a synchronous send for data frames, offered to the app in the ASGI scope,
and less memory per idle connection.

uvicorn's ASGI `send` is a coroutine per frame: it waits for writability, encodes the text, has
websockets frame it and writes. `DirectProtocol.try_send` does the same at once when nothing needs
waiting for, framing the message itself unless it is to be compressed, and says when it cannot: the
app then falls back to the ASGI `send`, which waits or raises on a disconnect. The app finds it at
`scope["extensions"][TRY_SEND]`; under any other ASGI server the key is absent.

Per connection, `DirectProtocol` also replaces uvicorn's receive `asyncio.Queue` and writability
`asyncio.Event` (four deques, ~3 KiB) with lighter equivalents, drops the handshake's request and
response once the connection is accepted, and makes permessage-deflate's zlib contexts on first use:
a compressor costs ~26 KiB of RSS once made (more once it has compressed), a decompressor ~4 KiB, and
a connection that is sent nothing compressed and sends nothing never makes them.
"""

from __future__ import annotations

import asyncio
import struct
import zlib
from collections.abc import Sequence
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.extensions.base import ExtensionParameter, ServerExtensionFactory
from websockets.extensions.permessage_deflate import PerMessageDeflate, ServerPerMessageDeflateFactory
from websockets.protocol import OPEN

from streamplex.server.outbox import Flag

TRY_SEND = "streamplex.try_send"
"""The scope extension: a callable `(payload: str | bytes, compress: bool = True) -> bool`."""

_TEXT, _BINARY = 0x81, 0x82  # FIN plus the opcode; a server's frames are not masked
_SHORT = {first: [bytes((first, n)) for n in range(126)] for first in (_TEXT, _BINARY)}
_MEDIUM = struct.Struct("!BBH").pack
_LONG = struct.Struct("!BBQ").pack


def frame_header(first: int, length: int) -> bytes:
    """The header of an unmasked frame (RFC 6455 section 5.2): `first` is FIN, RSV and opcode."""
    if length < 126:
        return _SHORT[first][length]
    if length < 65536:
        return _MEDIUM(first, 126, length)
    return _LONG(first, 127, length)


class LazyDeflate(PerMessageDeflate):
    """permessage-deflate as negotiated in `agreed`, its compressor and decompressor made when first used."""

    def __init__(self, agreed: PerMessageDeflate) -> None:
        # "no context takeover" on both sides makes the base class create no context; the real settings follow.
        super().__init__(True, True, agreed.remote_max_window_bits, agreed.local_max_window_bits, agreed.compress_settings)
        self.remote_no_context_takeover = agreed.remote_no_context_takeover
        self.local_no_context_takeover = agreed.local_no_context_takeover

    def __getattr__(self, name: str) -> Any:  # only for attributes not set yet
        if name == "encoder":
            self.encoder = zlib.compressobj(wbits=-self.local_max_window_bits, **self.compress_settings)
            return self.encoder
        if name == "decoder":
            self.decoder = zlib.decompressobj(wbits=-self.remote_max_window_bits)
            return self.decoder
        raise AttributeError(name)


class LazyDeflateFactory(ServerExtensionFactory):
    """Negotiates permessage-deflate as `factory` does; the extension it agrees on is a `LazyDeflate`."""

    def __init__(self, factory: ServerPerMessageDeflateFactory) -> None:
        self.factory = factory
        self.name = factory.name

    def process_request_params(self, params: Sequence[ExtensionParameter], accepted_extensions: Sequence[Any]) -> tuple[list[ExtensionParameter], LazyDeflate]:
        response, agreed = self.factory.process_request_params(params, accepted_extensions)
        return response, LazyDeflate(agreed)  # `agreed`'s zlib contexts are freed at once


class _Inbox:
    """What uvicorn uses of its receive `asyncio.Queue` (put_nowait, get, empty) for its one reader, without four deques."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)


class DirectProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol (its "auto" choice) plus `try_send` (pass as `uvicorn.Config(ws=...)`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = _Inbox()  # type: ignore[assignment]
        self.writable = Flag(True)  # type: ignore[assignment]
        extensions = self.conn.available_extensions or []
        self.conn.available_extensions = [LazyDeflateFactory(f) if isinstance(f, ServerPerMessageDeflateFactory) else f for f in extensions]

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.accept":
            self.request = self.response = None  # type: ignore[assignment]  # read only until the handshake's response is written

    async def run_asgi(self) -> None:
        self.scope["extensions"][TRY_SEND] = self.try_send  # type: ignore[assignment]  # uvicorn types extensions as dict[object, object]
        await super().run_asgi()

    def try_send(self, payload: str | bytes, compress: bool = True) -> bool:
        """Write one message (str: text, bytes: binary) now if the socket takes it without waiting; False if not.

        False while writing is paused by flow control, the connection is not open (handshake not done,
        a close sent or received) or the client is gone: the ASGI `send` then waits for writability or raises.
        With permessage-deflate, `compress=False` sends the message uncompressed (RFC 7692 allows either per message).
        """
        conn = self.conn
        if not self.writable.is_set() or self.disconnected or conn.state is not OPEN:  # writable: uvicorn's pause/resume_writing
            return False
        if isinstance(payload, str):
            data, first = payload.encode(), _TEXT
        else:
            data, first = payload, _BINARY
        if compress and conn.extensions:  # permessage-deflate: websockets compresses and frames (the state check rules out InvalidState)
            if first == _TEXT:
                conn.send_text(data)
            else:
                conn.send_binary(data)
            self.transport.write(b"".join(conn.data_to_send()))
        else:
            self.transport.write(frame_header(first, len(data)) + data)
        return True
