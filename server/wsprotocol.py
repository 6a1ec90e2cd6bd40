"""uvicorn's WebSocket protocol with a synchronous send for data frames, offered to the app in the ASGI scope.

uvicorn's ASGI `send` is a coroutine per frame: it waits for writability, encodes the text, has
websockets frame it and writes. `DirectProtocol.try_send` does the same at once when nothing needs
waiting for, framing the message itself when no extension (permessage-deflate) was negotiated, and
says when it cannot: the app then falls back to the ASGI `send`, which waits or raises on a disconnect.
The app finds it at `scope["extensions"][TRY_SEND]`; under any other ASGI server the key is absent.
"""

from __future__ import annotations

import struct

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import OPEN

TRY_SEND = "streamplex.try_send"
"""The scope extension: a callable `(payload: str | bytes) -> bool`."""

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


class DirectProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol (its "auto" choice) plus `try_send` (pass as `uvicorn.Config(ws=...)`)."""

    paused = False  # the transport's buffer is past its high-water mark (uvicorn's `writable` is clear)

    def pause_writing(self) -> None:
        self.paused = True
        super().pause_writing()

    def resume_writing(self) -> None:
        self.paused = False
        super().resume_writing()

    async def run_asgi(self) -> None:
        self.scope["extensions"][TRY_SEND] = self.try_send  # type: ignore[index]
        await super().run_asgi()

    def try_send(self, payload: str | bytes) -> bool:
        """Write one message (str: text, bytes: binary) now if the socket takes it without waiting; False if not.

        False while writing is paused by flow control, the connection is not open (handshake not done,
        a close sent or received) or the client is gone: the ASGI `send` then waits for writability or raises.
        """
        conn = self.conn
        if self.paused or self.disconnected or conn.state is not OPEN:
            return False
        if isinstance(payload, str):
            data, first = payload.encode(), _TEXT
        else:
            data, first = payload, _BINARY
        if conn.extensions:  # permessage-deflate: websockets compresses and frames (the state check above rules out InvalidState)
            if first == _TEXT:
                conn.send_text(data)
            else:
                conn.send_binary(data)
            self.transport.write(b"".join(conn.data_to_send()))
        else:
            self.transport.write(frame_header(first, len(data)) + data)
        return True
