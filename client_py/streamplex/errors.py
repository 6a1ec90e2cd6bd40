"""Typed exceptions: one class per protocol error code, and one per way a connection ends."""

from __future__ import annotations

from typing import Any


class StreamplexError(Exception):
    """Base of every error this client raises."""


class ProtocolError(StreamplexError):
    """The server refused a frame (`error` op) or ended a stream with an error (`end` with reason `error`)."""

    code = "protocol_error"

    def __init__(self, message: str, *, id: str | None = None, details: list[dict[str, Any]] | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.id = id
        self.details = details
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = f" (stream {self.id!r})" if self.id is not None else ""
        return f"{self.code}: {self.message}{where}"


class BadRequest(ProtocolError):
    code = "bad_request"


class UnknownOp(ProtocolError):
    code = "unknown_op"


class UnknownChannel(ProtocolError):
    code = "unknown_channel"


class InvalidParams(ProtocolError):
    code = "invalid_params"


class DuplicateId(ProtocolError):
    code = "duplicate_id"


class UnknownId(ProtocolError):
    code = "unknown_id"


class RateLimited(ProtocolError):
    code = "rate_limited"


class Forbidden(ProtocolError):
    code = "forbidden"


class TooManyStreams(ProtocolError):
    code = "too_many_streams"


class Unavailable(ProtocolError):
    code = "unavailable"


class Overloaded(ProtocolError):
    code = "overloaded"


class OverBudget(ProtocolError):
    code = "over_budget"


class ResumeFailed(ProtocolError):
    code = "resume_failed"


class BadSource(ProtocolError):
    code = "bad_source"


class InternalError(ProtocolError):
    code = "internal"


ERRORS: dict[str, type[ProtocolError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        UnknownOp,
        UnknownChannel,
        InvalidParams,
        DuplicateId,
        UnknownId,
        RateLimited,
        Forbidden,
        TooManyStreams,
        Unavailable,
        Overloaded,
        OverBudget,
        BadSource,
        ResumeFailed,
        InternalError,
    )
}


def protocol_error(frame: dict[str, Any]) -> ProtocolError:
    """The exception for an `error` frame (or the `error` object of an `end` frame, given its stream id)."""
    cls = ERRORS.get(str(frame.get("code")), ProtocolError)
    err = cls(str(frame.get("message", "")), id=frame.get("id"), details=frame.get("details"), retry_after=frame.get("retry_after"))
    if cls is ProtocolError:
        err.code = str(frame.get("code"))
    return err


class ConnectionClosed(StreamplexError):
    """The connection ended and was not (or could not be) re-established."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"connection closed ({code}): {reason}" if reason else f"connection closed ({code})")
        self.code = code
        self.reason = reason


class AuthenticationError(ConnectionClosed):
    """Close 4001 (wrong key) or 4002 (no auth in time): retrying with the same key is pointless."""


class AuthThrottled(ConnectionClosed):
    """Close 4003: too many failed authentications from this address; `reason` says when to retry."""


class StreamEnded(StreamplexError):
    """A stream was ended by the server's shutdown or a lost connection and could not be resumed."""

    def __init__(self, id: str, reason: str) -> None:
        super().__init__(f"stream {id!r} ended: {reason}")
        self.id = id
        self.reason = reason
