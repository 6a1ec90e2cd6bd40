"""A few thousand hypothesis-generated frames against the live server, with a healthy connection streaming beside them.

Every reply must come from the documented set (ops, error codes, end reasons, close codes of
server/protocol.py); the server must not crash nor log an unhandled exception; the healthy connection
must get its whole stream, in order, throughout.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as sync_connect

from streamplex.server.protocol import CloseCode, EndReason, ErrorCode, parse_server_binary
from tests.serverproc import ServerProc, start_server

SERVER_OPS = {"subscribed", "chunk", "end", "error", "pong", "resumed"}
ERROR_CODES = {str(c) for c in ErrorCode}
END_REASONS = {str(r) for r in EndReason}
IDS = ["a", "b", "c", "s1", "ü", "x" * 128]
SENTINEL = "fuzz-sentinel"

JSON_SCALARS = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8)
ANY_ID = st.sampled_from(IDS) | st.text(min_size=1, max_size=12)
# names a client may try for a server file: traversal, absolute paths, NUL, over-long, odd characters
FILE_NAMES = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["../../etc/passwd", "/etc/hostname", "..", ".", "", "a\x00b", "x" * 300, "docs/../../x", "~/.ssh/id_rsa", "file:///etc/passwd"]),
    st.lists(st.sampled_from(["..", ".", "a", "", "x" * 255]), max_size=8).map("/".join),
)

PARAMS = st.one_of(
    st.tuples(
        st.just("text"),
        st.fixed_dictionaries(
            {"text": st.text(min_size=1, max_size=60)},
            optional={"unit": st.sampled_from(["chars", "words", "sentences", "bytes"]), "chunk_size": st.integers(1, 8), "interval_ms": st.integers(0, 5)},
        ),
    ),
    st.tuples(
        st.just("data"),
        st.fixed_dictionaries(
            {"records": st.lists(st.dictionaries(st.sampled_from(["a", "b", "c"]), JSON_SCALARS, max_size=3), min_size=1, max_size=8)},
            optional={"format": st.sampled_from(["ndjson", "json", "csv", "xml"]), "chunk_size": st.integers(1, 4)},
        ),
    ),
    st.tuples(st.just("metrics"), st.fixed_dictionaries({}, optional={"interval_ms": st.integers(100, 300)})),
    st.tuples(
        st.just("logs"),
        st.fixed_dictionaries({}, optional={"lines": st.integers(0, 5), "level": st.sampled_from(["DEBUG", "INFO", "WARNING"]), "follow": st.booleans()}),
    ),
    st.tuples(st.sampled_from(["text", "data", "metrics", "logs", "chat", "video", ""]), st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=3)),
    st.tuples(st.just("text"), st.fixed_dictionaries({"document": FILE_NAMES})),
    st.tuples(st.just("data"), st.fixed_dictionaries({"dataset": FILE_NAMES})),
)

VALID = st.one_of(
    st.builds(lambda i, cp: {"op": "subscribe", "id": i, "channel": cp[0], "params": cp[1]}, ANY_ID, PARAMS),
    st.builds(lambda i: {"op": "unsubscribe", "id": i}, ANY_ID),
    st.builds(lambda i, d, e: {"op": "push", "id": i, "data": d, "end": e}, ANY_ID, JSON_VALUES, st.booleans()),
    st.just({"op": "ping"}),
    st.builds(lambda k: {"op": "auth", "api_key": k}, st.text(max_size=20)),
    st.builds(lambda t, s: {"op": "resume", "token": t, "streams": s}, st.text(max_size=40), st.dictionaries(ANY_ID, st.integers(-5, 2**40), max_size=3)),
)


def _near(frame: dict[str, Any], how: int, key: str, value: Any) -> dict[str, Any]:
    """A frame one mutation away from valid: a field dropped, added, retyped, or the op renamed."""
    if how == 0 and len(frame) > 1:
        return {k: v for k, v in frame.items() if k != next(k for k in frame if k != "op")}
    if how == 1:
        return frame | {key or "extra": value}
    if how == 2:
        return frame | {next(iter(k for k in frame if k != "op"), "op"): value}
    return frame | {"op": key + frame["op"]}


NEAR_VALID = st.builds(_near, VALID, st.integers(0, 3), st.text(max_size=6), JSON_VALUES)
TEXT_FRAMES = st.one_of(
    VALID.map(lambda f: orjson.dumps(f).decode()),
    NEAR_VALID.map(lambda f: orjson.dumps(f).decode()),
    st.text(max_size=100),
    JSON_VALUES.map(lambda v: orjson.dumps(v).decode()),
    VALID.map(lambda f: orjson.dumps(f).decode()).flatmap(lambda s: st.integers(0, len(s)).map(lambda n: s[:n])),
)
BINARY_FRAMES = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda i, p: bytes((len(i.encode()),)) + i.encode() + p, st.sampled_from(IDS), st.binary(max_size=64)),
)
FRAMES = st.lists(st.one_of(TEXT_FRAMES, TEXT_FRAMES, TEXT_FRAMES, BINARY_FRAMES), min_size=60, max_size=150)


def check_reply(message: str | bytes) -> dict[str, Any] | None:
    """Assert that one server message is documented; the decoded frame (None for a binary frame)."""
    if isinstance(message, bytes):
        parse_server_binary(message)
        return None
    frame = orjson.loads(message)
    assert frame["op"] in SERVER_OPS, frame
    if frame["op"] == "error":
        assert frame["code"] in ERROR_CODES and frame["message"], frame
        assert frame["id"] is None or isinstance(frame["id"], str)
    elif frame["op"] == "end":
        assert frame["reason"] in END_REASONS, frame
        if frame["reason"] == "error":
            assert frame["error"]["code"] in ERROR_CODES, frame
    elif frame["op"] == "chunk":
        assert isinstance(frame["seq"], int) and frame["seq"] >= 0 and "data" in frame
    return frame


@dataclass
class Healthy:
    """A well-behaved client streaming text beside the fuzzer, in its own thread."""

    server: ServerProc
    words: list[str] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)
    end: dict[str, Any] | None = None
    failure: BaseException | None = None

    def run(self, stop: threading.Event) -> None:
        try:
            with sync_connect(self.server.url, additional_headers={"X-API-Key": self.server.key}) as ws:
                assert orjson.loads(ws.recv(10))["op"] == "ready"
                ws.send(
                    orjson.dumps(
                        {
                            "op": "subscribe",
                            "id": "h",
                            "channel": "text",
                            "params": {"text": "healthy " * 100_000, "unit": "words", "chunk_size": 1, "interval_ms": 5},
                        }
                    ).decode()
                )
                assert orjson.loads(ws.recv(10))["op"] == "subscribed"
                while not stop.is_set():
                    frame = orjson.loads(ws.recv(10))
                    assert frame["op"] == "chunk" and frame["id"] == "h", frame
                    self.words.append(frame["data"])
                    self.seqs.append(frame["seq"])
                ws.send(orjson.dumps({"op": "unsubscribe", "id": "h"}).decode())
                while (frame := orjson.loads(ws.recv(10)))["op"] == "chunk":
                    self.seqs.append(frame["seq"])
                self.end = frame
        except BaseException as exc:  # reported by the test thread
            self.failure = exc


async def exchange(server: ServerProc, frames: list[str | bytes]) -> int:
    """Send `frames` on one authenticated connection, check every reply, then end what they opened; the replies seen."""
    replies = 0
    async with websockets.connect(server.url, additional_headers={"X-API-Key": server.key}, max_size=None) as ws:
        assert orjson.loads(await ws.recv())["op"] == "ready"
        for frame in frames:
            await ws.send(frame)
        await ws.send(orjson.dumps({"op": "subscribe", "id": SENTINEL, "channel": "text", "params": {"text": "done"}}).decode())
        open_ids: set[str] = set()
        async with asyncio.timeout(30):
            while True:
                frame = check_reply(await ws.recv())
                replies += 1
                if frame is None:
                    continue
                if frame["op"] == "subscribed":
                    open_ids.add(frame["id"])
                elif frame["op"] == "end":
                    open_ids.discard(frame["id"])
                    if frame["id"] == SENTINEL:
                        break
            for stream_id in open_ids:
                await ws.send(orjson.dumps({"op": "unsubscribe", "id": stream_id}).decode())
            while open_ids:
                frame = check_reply(await ws.recv())
                replies += 1
                if frame is not None and frame["op"] == "end":
                    open_ids.discard(frame["id"])
            await ws.send('{"op":"ping"}')
            while (frame := check_reply(await ws.recv())) is None or frame["op"] != "pong":
                pass
    return replies


async def unauthenticated(server: ServerProc, first: str | bytes) -> int:
    """Send a fuzzed first frame without a key: the server must answer with a close frame only."""
    async with websockets.connect(server.url) as ws:
        await ws.send(first)
        with pytest.raises(ConnectionClosed) as info:
            message = await asyncio.wait_for(ws.recv(), 10)
            raise AssertionError(f"data before auth: {message!r}")
        assert info.value.rcvd is not None
        return info.value.rcvd.code


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    srv = start_server(tmp_path_factory.mktemp("fuzz"), auth_fail_limit=1_000_000)
    yield srv
    srv.stop()


def test_live_fuzz_gets_only_documented_replies_while_a_healthy_client_streams(fuzz_server: ServerProc) -> None:
    healthy = Healthy(fuzz_server)
    stop = threading.Event()
    thread = threading.Thread(target=healthy.run, args=(stop,), daemon=True)
    thread.start()
    sent: list[int] = []
    replies: list[int] = []
    closes: set[int] = set()

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(FRAMES, st.one_of(TEXT_FRAMES, BINARY_FRAMES))
    def one_connection(frames: list[str | bytes], first: str | bytes) -> None:
        replies.append(asyncio.run(exchange(fuzz_server, frames)))
        sent.append(len(frames))
        closes.add(asyncio.run(unauthenticated(fuzz_server, first)))
        assert healthy.failure is None, healthy.failure
        assert fuzz_server.proc.poll() is None, fuzz_server.log()[-3000:]

    try:
        one_connection()
    finally:
        stop.set()
        thread.join(30)
    assert healthy.failure is None, healthy.failure
    assert sum(sent) >= 2000 and sum(replies) >= sum(sent) // 2, (sum(sent), sum(replies))
    assert closes <= {CloseCode.UNAUTHORIZED}, closes
    assert healthy.end == {"op": "end", "id": "h", "reason": "unsubscribed"}
    assert len(healthy.words) > 100 and set(healthy.words) == {"healthy "}
    assert healthy.seqs == list(range(len(healthy.seqs)))
    log = fuzz_server.log()
    assert "Traceback" not in log and " ERROR " not in log and " CRITICAL " not in log, log[-5000:]
    for _ in range(100):
        if fuzz_server.metric("streamplex_connections") == 0:
            break
        time.sleep(0.1)
    assert fuzz_server.metric("streamplex_connections") == 0
