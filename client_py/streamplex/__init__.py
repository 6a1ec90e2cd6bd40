"""streamplex: the Python SDK of the streamplex server (protocol v1 over one WebSocket).

async with streamplex.connect("ws://127.0.0.1:8000/ws", api_key=KEY) as client:
    async for chunk in client.subscribe("text", text="Hello world.", unit="words"):
        print(chunk.data)
"""

from streamplex.client import Chunk, Client, Retry, Subscription, connect
from streamplex.errors import (
    AuthenticationError,
    AuthThrottled,
    BadRequest,
    BadSource,
    ConnectionClosed,
    DuplicateId,
    Forbidden,
    InternalError,
    InvalidParams,
    OverBudget,
    Overloaded,
    ProtocolError,
    RateLimited,
    ResumeFailed,
    StreamEnded,
    StreamplexError,
    TooManyStreams,
    Unavailable,
    UnknownChannel,
    UnknownId,
    UnknownOp,
)
from streamplex.sync import SyncClient, connect_sync

__all__ = [
    "AuthThrottled",
    "AuthenticationError",
    "BadRequest",
    "BadSource",
    "Chunk",
    "Client",
    "ConnectionClosed",
    "DuplicateId",
    "Forbidden",
    "InternalError",
    "InvalidParams",
    "OverBudget",
    "Overloaded",
    "ProtocolError",
    "RateLimited",
    "ResumeFailed",
    "Retry",
    "StreamEnded",
    "StreamplexError",
    "Subscription",
    "SyncClient",
    "TooManyStreams",
    "Unavailable",
    "UnknownChannel",
    "UnknownId",
    "UnknownOp",
    "connect",
    "connect_sync",
]
