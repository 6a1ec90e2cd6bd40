"""Two server processes sharing a real redis-server on loopback: every node's logs and metrics, shared per-key limits, Redis going away and back."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import websockets

from streamplex.server.session_store import digest
from tests.redisproc import RedisProc, running_redis
from tests.serverproc import PLAIN, ServerProc, connect, free_port, recv, send, start_server

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed (scripts/packages/apt-test.txt)")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProc]:
    with running_redis(tmp_path_factory.mktemp("redis")) as proc:
        yield proc


def _pair(tmp: Path, redis_server: RedisProc, prefix: str, **settings: object) -> tuple[ServerProc, ServerProc]:
    settings = {"activity_log_interval": 0.5, **settings}  # a connection shows in the next activity line (INFO) within 0.5 s
    a = start_server(tmp, node="node-a", redis_url=redis_server.url, redis_prefix=prefix, **settings)
    try:
        b = start_server(tmp, node="node-b", redis_url=redis_server.url, redis_prefix=prefix, **settings)
    except BaseException:
        a.stop()
        raise
    return a, b


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisProc) -> Iterator[tuple[ServerProc, ServerProc]]:
    a, b = _pair(tmp_path_factory.mktemp("nodes"), redis_server, "sp-feeds")
    yield a, b
    a.stop()
    b.stop()


async def _wait_for_node_records(ws: websockets.ClientConnection, other: ServerProc, node: str, timeout: float = 30) -> set[str]:
    """Poke `other` (each connection counts in its next activity line) until `ws` has seen a logs chunk and a metrics chunk from `node`."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while seen != {"l", "m"}:
        assert time.monotonic() < deadline, f"no logs/metrics from {node} within {timeout} s (seen: {seen})"
        async with websockets.connect(other.url, additional_headers={"X-API-Key": other.key}) as poke:
            await recv(poke)
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            try:
                frame = await recv(ws, timeout=0.5)
            except TimeoutError:
                continue
            if frame["op"] == "chunk" and frame["data"].get("node") == node:
                seen.add(frame["id"])
    return seen


async def test_subscriber_on_one_node_sees_the_other_nodes_logs_and_metrics(nodes: tuple[ServerProc, ServerProc]) -> None:
    a, b = nodes
    ws = await connect(a)
    assert ws.ready["node"] == "node-a"  # type: ignore[attr-defined]
    await send(ws, op="subscribe", id="l", channel="logs", params={"lines": 0})
    await send(ws, op="subscribe", id="m", channel="metrics", params={"interval_ms": 200})
    await _wait_for_node_records(ws, b, "node-b")
    own = {"l": False, "m": False}
    async with websockets.connect(a.url, additional_headers={"X-API-Key": a.key}) as poke:
        await recv(poke)
    end = time.monotonic() + 10
    while not all(own.values()) and time.monotonic() < end:
        frame = await recv(ws)
        if frame["op"] == "chunk" and frame["data"].get("node") == "node-a":
            own[frame["id"]] = True
    assert all(own.values()), "the node's own records must still come through, labelled with it"
    await ws.close()


async def test_a_keys_limits_are_shared_across_nodes(tmp, redis_server: RedisProc) -> None:
    a, b = _pair(tmp, redis_server, "sp-limits", key_max_connections=2, key_rate=2, key_burst=6)
    try:
        first, second = await connect(a), await connect(b)
        async with websockets.connect(a.url, additional_headers={"X-API-Key": a.key}) as third:
            with pytest.raises(websockets.ConnectionClosed) as info:
                await recv(third)
            assert info.value.rcvd is not None and info.value.rcvd.code == 4008
            assert "connections" in info.value.rcvd.reason
        await second.close()
        deadline = time.monotonic() + 10
        while True:  # the slot comes back once node B has seen the close
            async with websockets.connect(a.url, additional_headers={"X-API-Key": a.key}) as again:
                try:
                    assert (await recv(again))["op"] == "ready"
                    break
                except websockets.ConnectionClosed:
                    assert time.monotonic() < deadline, "the released slot never came back"
                    await asyncio.sleep(0.2)

        second = await connect(b)
        for ws in (first, second):  # 12 pings across the two nodes against one burst of 6
            for _ in range(6):
                await send(ws, op="ping")
        frames = [await recv(ws) for ws in (first, second) for _ in range(6)]
        pongs = sum(f["op"] == "pong" for f in frames)
        refused = [f for f in frames if f["op"] == "error"]
        assert all(f["code"] == "rate_limited" and "API key" in f["message"] and f["retry_after"] > 0 for f in refused)
        assert 6 <= pongs <= 8 and len(refused) == 12 - pongs, frames
        await first.close()
        await second.close()
    finally:
        a.stop()
        b.stop()


async def test_a_keys_http_streams_are_capped_across_nodes(tmp, redis_server: RedisProc) -> None:
    a, b = _pair(tmp, redis_server, "sp-http", http_key_max_streams=2, http_rate_limit=0)
    key = {"X-API-Key": a.key}
    try:
        async with httpx.AsyncClient(timeout=30) as http, contextlib.AsyncExitStack() as held:

            async def open_metrics(node: ServerProc, stack: contextlib.AsyncExitStack) -> int:
                resp = await stack.enter_async_context(http.stream("GET", f"{node.http}/api/v1/stream/metrics", params={"interval_ms": 200}, headers=key))
                if resp.status_code == 200:
                    resp.lines = resp.aiter_lines()  # type: ignore[attr-defined]  # kept open
                    await anext(resp.lines)  # type: ignore[attr-defined]
                return resp.status_code

            assert await open_metrics(a, held) == 200
            async with contextlib.AsyncExitStack() as on_b:
                assert await open_metrics(b, on_b) == 200
                assert await open_metrics(a, held) == 429, "node A counts node B's stream"
            deadline = time.monotonic() + 10
            while await open_metrics(a, held) != 200:  # B's slot comes back once B has seen its client leave
                assert time.monotonic() < deadline, "the released slot never came back"
                await asyncio.sleep(0.2)
    finally:
        a.stop()
        b.stop()


async def test_redis_stopped_and_restarted_while_a_stream_flows(nodes: tuple[ServerProc, ServerProc], redis_server: RedisProc) -> None:
    a, b = nodes
    ws = await connect(a)
    total = 400
    await send(ws, op="subscribe", id="t", channel="data", params={"records": [{"i": i} for i in range(total)], "chunk_size": 1, "interval_ms": 25})
    await send(ws, op="subscribe", id="l", channel="logs", params={"lines": 0, "level": "WARNING"})
    seqs: list[int] = []
    records: list[int] = []

    async def read_until(predicate, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out; got {len(records)} records"
            frame = await recv(ws)
            if frame["op"] == "end":
                assert frame["id"] == "t" and frame["reason"] == "complete", frame
                end_seen.append(frame)
            elif frame["op"] == "chunk" and frame["id"] == "t":
                seqs.append(frame["seq"])
                records.extend(orjson.loads(line)["i"] for line in frame["data"].splitlines())

    end_seen: list[dict] = []
    await read_until(lambda: len(records) >= 20, 30)
    redis_server.stop()
    await read_until(lambda: "unreachable" in a.log() and "unreachable" in b.log(), 30)
    await read_until(lambda: len(records) >= 120, 60)
    redis_server.start()
    await read_until(lambda: "reachable again" in a.log() and "reachable again" in b.log(), 60)
    await read_until(lambda: bool(end_seen), 90)
    assert records == list(range(total)) and seqs == list(range(len(seqs))), "the stream must neither lose nor repeat anything"
    assert a.log().count("unreachable") == 1, "one warning per outage"
    await ws.close()
    # Sharing works again after the restart: node B's logs reach a subscriber on node A.
    ws = await connect(a)
    await send(ws, op="subscribe", id="l", channel="logs", params={"lines": 0})
    await send(ws, op="subscribe", id="m", channel="metrics", params={"interval_ms": 200})
    await _wait_for_node_records(ws, b, "node-b")
    await ws.close()


async def test_unreachable_redis_at_start_serves_node_locally_with_local_limits(tmp) -> None:
    srv = start_server(tmp, node="alone", redis_url=f"redis://127.0.0.1:{free_port()}/0", key_max_connections=1)
    try:
        ws = await connect(srv)
        await send(ws, op="subscribe", id="l", channel="logs", params={"lines": 50, "level": "WARNING"})
        frame = await recv(ws)
        while frame["op"] != "chunk":
            frame = await recv(ws)
        assert frame["data"]["node"] == "alone" and "unreachable" in frame["data"]["message"]
        async with websockets.connect(srv.url, additional_headers={"X-API-Key": srv.key}) as second:
            with pytest.raises(websockets.ConnectionClosed) as info:
                await recv(second)
        assert info.value.rcvd is not None and info.value.rcvd.code == 4008, "the cap holds in memory while Redis is away"
        await asyncio.sleep(1.5)  # reconnect attempts go on quietly
        assert srv.log().count("unreachable") == 1
        assert srv.metric("streamplex_redis_up") == 0
        await ws.close()
    finally:
        srv.stop()


async def test_a_taken_over_session_never_opens_a_channel_its_key_may_not_use(tmp, redis_server: RedisProc) -> None:
    """A session record in Redis naming an admin channel (written by hand, or by a node with other scopes) does not
    give a plain key that channel when another node takes the session over."""
    a, b = _pair(tmp, redis_server, "sp-scope", resume_window=20)
    r = redis_server.client()
    try:
        ws = await websockets.connect(a.url, additional_headers={"X-API-Key": PLAIN})
        token = (await recv(ws))["resume"]["token"]
        await send(ws, op="subscribe", id="d", channel="data", params={"records": [{"i": i} for i in range(500)], "chunk_size": 1, "interval_ms": 20})
        seqs = [f["seq"] for f in [await recv(ws) for _ in range(6)] if f["op"] == "chunk"]
        a.stop(signal.SIGKILL)
        (sess_key,) = [k for k in r.scan_iter("sp-scope:sess:*") if k.decode().endswith(digest(token))]
        r.hset(sess_key, "s:d", orjson.dumps({"channel": "logs", "params": {"lines": 50}}))
        async with websockets.connect(b.url, additional_headers={"X-API-Key": PLAIN}) as again:
            assert (await recv(again))["op"] == "ready"
            await send(again, op="resume", token=token, streams={"d": seqs[-1]})
            assert (await recv(again))["op"] == "resumed"
            frames = []
            while not (frames and frames[-1]["op"] == "end"):
                frames.append(await recv(again))
            assert frames[-1]["reason"] == "producer_lost", frames
            assert not [f for f in frames if f["op"] == "chunk" and "logger" in str(f.get("data"))], "log records reached a plain key"
        assert "its API key may not use that channel" in b.log()
    finally:
        r.close()
        a.stop()
        b.stop()


async def test_a_failed_call_beside_a_working_listener_does_not_leave_the_node_local(tmp, redis_server: RedisProc) -> None:
    """Redis holds the node's writes past its socket timeout while its pub/sub connection stays: the call fails and
    the node goes node-local; a ping brings it back, though the listener never reconnected."""

    async def until(condition, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, srv.log()[-2000:]
            await asyncio.sleep(0.1)

    srv = start_server(tmp, node="blip", redis_url=redis_server.url, redis_prefix="sp-blip")
    try:
        await until(lambda: srv.metric("streamplex_redis_up") == 1, 60)
        client = redis_server.client()
        try:
            client.execute_command("CLIENT", "PAUSE", 4000, "WRITE")  # the node's socket timeout is 2 s
        finally:
            client.close()
        async with websockets.connect(srv.url, additional_headers={"X-API-Key": srv.key}, open_timeout=30) as ws:
            await recv(ws, timeout=30)  # the key's connection count is a write to Redis
        await until(lambda: "unreachable" in srv.log(), 60)
        await until(lambda: "reachable again" in srv.log() and srv.metric("streamplex_redis_up") == 1, 60)
    finally:
        srv.stop()
