"""The binary frame header of protocol v1 (docs/protocol.md, "Binary frames")."""

from __future__ import annotations

import struct

_SEQ = struct.Struct(">I")


def encode_push(stream_id: str, payload: bytes) -> bytes:
    """A client binary frame: `u8 n`, the stream id in `n` bytes of UTF-8, the payload."""
    raw = stream_id.encode("utf-8")
    if not 1 <= len(raw) <= 255:
        raise ValueError("a binary frame's stream id must be 1 to 255 bytes of UTF-8")
    return bytes((len(raw),)) + raw + payload


def decode_chunk(frame: bytes) -> tuple[str, int, bytes]:
    """Split a server binary frame (`u8 n`, id, `u32 seq` big-endian, payload) into (id, seq, payload)."""
    if not frame or len(frame) < 1 + frame[0] + 4:
        raise ValueError("truncated binary frame from the server")
    n = frame[0]
    return frame[1 : 1 + n].decode("utf-8"), _SEQ.unpack_from(frame, 1 + n)[0], frame[5 + n :]
