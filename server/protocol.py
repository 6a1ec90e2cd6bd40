"""Protocol v1: the wire envelope, op names, error and close codes, the binary frame header.

Pure: no I/O. docs/protocol.md is the reference this module implements.
"""

from __future__ import annotations

import contextlib
import struct
from enum import IntEnum, StrEnum
from typing import Annotated, Any, Literal

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

PROTOCOL_VERSION = 1
MAX_ID_BYTES = 128


class ErrorCode(StrEnum):
    """Every `code` an `error` op (or an `end` with reason `error`) may carry."""

    BAD_REQUEST = "bad_request"
    UNKNOWN_OP = "unknown_op"
    UNKNOWN_CHANNEL = "unknown_channel"
    INVALID_PARAMS = "invalid_params"
    DUPLICATE_ID = "duplicate_id"
    UNKNOWN_ID = "unknown_id"
    RATE_LIMITED = "rate_limited"
    FORBIDDEN = "forbidden"
    TOO_MANY_STREAMS = "too_many_streams"
    UNAVAILABLE = "unavailable"
    OVERLOADED = "overloaded"
    OVER_BUDGET = "over_budget"
    BAD_SOURCE = "bad_source"
    RESUME_FAILED = "resume_failed"
    INTERNAL = "internal"


class CloseCode(IntEnum):
    """Every WebSocket close code the server sends."""

    NORMAL = 1000
    GOING_AWAY = 1001
    INVALID_UTF8 = 1007
    MESSAGE_TOO_BIG = 1009
    INTERNAL = 1011
    TRY_AGAIN_LATER = 1013
    UNAUTHORIZED = 4001
    AUTH_TIMEOUT = 4002
    AUTH_THROTTLED = 4003
    RATE_LIMITED = 4008
    SLOW_CONSUMER = 4009
    SESSION_MOVED = 4010


class EndReason(StrEnum):
    """Why a stream ended (the `reason` of an `end` op)."""

    COMPLETE = "complete"
    UNSUBSCRIBED = "unsubscribed"
    ERROR = "error"
    SHUTDOWN = "shutdown"
    RESUME_GAP = "resume_gap"
    PRODUCER_LOST = "producer_lost"
    INPUT_LOST = "input_lost"


class ProtocolError(Exception):
    """A client frame that gets an `error` reply; the connection lives on."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        id: str | None = None,
        details: list[dict[str, Any]] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id
        self.details = details
        self.retry_after = retry_after

    def frame(self) -> dict[str, Any]:
        """The `error` op that reports this error."""
        return error_frame(self.code, self.message, id=self.id, details=self.details, retry_after=self.retry_after)


def _id_fits_binary_header(value: str) -> str:
    if len(value.encode("utf-8")) > MAX_ID_BYTES:
        raise ValueError(f"stream id must be at most {MAX_ID_BYTES} bytes of UTF-8")
    return value


StreamIdStr = Annotated[str, Field(min_length=1), AfterValidator(_id_fits_binary_header)]


class _Op(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Auth(_Op):
    op: Literal["auth"]
    api_key: str = Field(max_length=1024)


class Subscribe(_Op):
    op: Literal["subscribe"]
    id: StreamIdStr
    channel: str = Field(max_length=64)
    params: dict[str, Any] = Field(default_factory=dict)


class Push(_Op):
    op: Literal["push"]
    id: StreamIdStr
    data: Any = None
    end: bool = False


class Unsubscribe(_Op):
    op: Literal["unsubscribe"]
    id: StreamIdStr


class Ping(_Op):
    op: Literal["ping"]


class Resume(_Op):
    op: Literal["resume"]
    token: str = Field(max_length=256)
    streams: dict[StreamIdStr, int] = Field(default_factory=dict, max_length=4096)
    inputs: dict[StreamIdStr, Annotated[int, Field(ge=0)]] = Field(default_factory=dict, max_length=4096)


ClientOp = Auth | Subscribe | Push | Unsubscribe | Ping | Resume
CLIENT_OPS: dict[str, type[_Op]] = {"auth": Auth, "subscribe": Subscribe, "push": Push, "unsubscribe": Unsubscribe, "ping": Ping, "resume": Resume}


def decode_text(text: str) -> ClientOp:
    """Parse one client text frame; raise ProtocolError for anything not in protocol v1."""
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"frame is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "frame must be a JSON object")
    frame_id = obj.get("id") if isinstance(obj.get("id"), str) else None
    op = obj.get("op")
    if not isinstance(op, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "frame needs a string 'op'", id=frame_id)
    model = CLIENT_OPS.get(op)
    if model is None:
        raise ProtocolError(ErrorCode.UNKNOWN_OP, f"unknown op {op[:64]!r}; expected one of {sorted(CLIENT_OPS)}", id=frame_id)
    try:
        return model.model_validate(obj)  # type: ignore[return-value]
    except ValidationError as exc:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"malformed {op!r} frame", id=frame_id, details=validation_details(exc)) from None


def frame_id(message: str | bytes) -> str | None:
    """The stream id a client frame names, if it can be read (for refusing it without processing it), else None."""
    if isinstance(message, bytes):
        n = message[0] if message else 0
        with contextlib.suppress(UnicodeDecodeError):
            return message[1 : 1 + n].decode("utf-8") if 0 < n < len(message) else None
        return None
    try:
        obj = orjson.loads(message)
    except orjson.JSONDecodeError:
        return None
    value = obj.get("id") if isinstance(obj, dict) else None
    return value if isinstance(value, str) else None


def subscribe_id(text: str) -> str | None:
    """The stream id of a `subscribe` frame whose `op` and `id` come before its `params`, read without decoding the
    params (so that a large subscribe can be refused cheaply); None when that cannot be told."""
    end = text.find('"params"')
    if end < 0:
        return None
    head = text[:end].rstrip()
    if not head.endswith(","):
        return None
    try:
        obj = orjson.loads(head[:-1] + "}")
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("op") != "subscribe" or not isinstance(obj.get("id"), str):
        return None
    return obj["id"]


def validation_details(exc: ValidationError) -> list[dict[str, Any]]:
    """Field-level details of a pydantic error, safe to send to a client."""
    return [
        {"field": ".".join(str(p) for p in err["loc"]), "message": err["msg"], "type": err["type"]}
        for err in exc.errors(include_url=False, include_input=False)
    ]


def decode_binary(data: bytes) -> tuple[str, bytes]:
    """Split a client binary frame (`u8 n`, `n` bytes of UTF-8 stream id, payload) into (id, payload)."""
    if not data:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "empty binary frame")
    n = data[0]
    if n == 0 or len(data) < 1 + n:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "binary frame header is truncated or names an empty stream id")
    try:
        stream_id = data[1 : 1 + n].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "binary frame stream id is not UTF-8") from None
    return stream_id, data[1 + n :]


_SEQ = struct.Struct(">I")


def encode_binary(stream_id: str, seq: int, payload: bytes) -> bytes:
    """Build a server binary frame: `u8 n`, the stream id, `u32 seq` big-endian, the payload."""
    raw_id = stream_id.encode("utf-8")
    return b"".join((bytes((len(raw_id),)), raw_id, _SEQ.pack(seq & 0xFFFFFFFF), payload))


def parse_server_binary(data: bytes) -> tuple[str, int, bytes]:
    """Split a server binary frame into (id, seq, payload); the inverse of encode_binary."""
    n = data[0]
    return data[1 : 1 + n].decode("utf-8"), _SEQ.unpack_from(data, 1 + n)[0], data[1 + n + 4 :]


def encode(frame: dict[str, Any]) -> str:
    """Serialise a server frame as the text of one WebSocket message."""
    return orjson.dumps(frame).decode("utf-8")


def chunk_prefix(stream_id: str) -> str:
    """The fixed start of every `chunk` frame of one stream, for `encode_chunk`."""
    return encode({"op": "chunk", "id": stream_id})[:-1]


def encode_chunk(prefix: str, seq: int, data_json: str, dropped: int = 0) -> str:
    """A `chunk` frame around data already encoded as JSON text: the text `encode` gives for the same frame."""
    tail = f',"dropped":{dropped}}}' if dropped else "}"
    return f'{prefix},"seq":{seq},"data":{data_json}{tail}'


def error_frame(
    code: ErrorCode,
    message: str,
    *,
    id: str | None = None,
    details: list[dict[str, Any]] | None = None,
    retry_after: float | None = None,
) -> dict[str, Any]:
    """An `error` op."""
    frame: dict[str, Any] = {"op": "error", "id": id, "code": str(code), "message": message}
    if details is not None:
        frame["details"] = details
    if retry_after is not None:
        frame["retry_after"] = round(retry_after, 3)
    return frame


def end_frame(stream_id: str, reason: EndReason, error: dict[str, Any] | None = None) -> dict[str, Any]:
    """An `end` op; `error` ({code, message}) accompanies reason `error`."""
    frame: dict[str, Any] = {"op": "end", "id": stream_id, "reason": str(reason)}
    if error is not None:
        frame["error"] = error
    return frame
