"""The Python SDK against the live server: many streams on one socket, leaving a loop unsubscribes, typed errors, reconnect."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest
import streamplex

from tests.serverproc import ServerProc, start_server

TEXT = "One socket carries many streams. Each has its own sequence. Leaving a loop cancels it."


async def _eventually(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_many_streams_share_one_socket(server: ServerProc) -> None:
    opened = server.metric("streamplex_connections_total")
    async with streamplex.connect(server.url, api_key=server.key) as client:
        assert {"text", "data", "metrics"} <= set(client.channels)

        async def text(unit: str) -> list[streamplex.Chunk]:
            return [c async for c in client.subscribe("text", text=TEXT, unit=unit, chunk_size=2)]

        async def metrics() -> list[streamplex.Chunk]:
            out = []
            async for chunk in client.subscribe("metrics", interval_ms=150):
                out.append(chunk)
                if len(out) == 3:
                    break
            return out

        words, chars, samples = await asyncio.gather(text("words"), text("chars"), metrics())
        assert "".join(c.data for c in words) == TEXT == "".join(c.data for c in chars)
        assert [c.seq for c in chars] == list(range(len(chars)))
        assert all("cpu" in s.data and not s.binary for s in samples)
        assert await client.ping() < 5
    assert server.metric("streamplex_connections_total") == opened + 1


async def test_leaving_the_loop_unsubscribes(server: ServerProc) -> None:
    # Baselines: a session an earlier test dropped may still hold streams while it waits to be resumed.
    metrics, logs = server.metric("streamplex_streams", 'channel="metrics"'), server.metric("streamplex_streams", 'channel="logs"')
    async with streamplex.connect(server.url, api_key=server.key) as client:
        async for chunk in client.subscribe("metrics", interval_ms=100):
            assert "memory" in chunk.data
            break
        await _eventually(lambda: server.metric("streamplex_streams", 'channel="metrics"') <= metrics)
        async with client.subscribe("logs", lines=0) as sub:
            assert not sub.ended
        await _eventually(lambda: server.metric("streamplex_streams", 'channel="logs"') <= logs)
    assert "ended: unsubscribed" in server.log()


async def test_typed_errors(server: ServerProc) -> None:
    async with streamplex.connect(server.url, api_key=server.key) as client:
        with pytest.raises(streamplex.InvalidParams) as info:
            await client.subscribe("text", text="x", unit="lines").open()
        assert info.value.details[0]["field"] == "unit"
        with pytest.raises(streamplex.UnknownChannel):
            await client.subscribe("nope").open()
        with pytest.raises(streamplex.Unavailable):
            await client.subscribe("chat", message="hi").open()
        with pytest.raises(streamplex.BadSource):  # an error ending a running stream
            [c async for c in client.subscribe("data", records=[{"c": "\x01"}], format="xml")]
        async with client.subscribe("metrics", id="m1", interval_ms=1000) as sub:
            with pytest.raises(streamplex.DuplicateId):
                client.subscribe("metrics", id="m1")
            await sub.push({"x": 1})
            await sub.push(b"\x00\x01")
            await _eventually(lambda: len(sub.push_errors) == 2)
            assert all(isinstance(e, streamplex.BadRequest) for e in sub.push_errors)
        assert await client.ping() < 5  # the connection lives on


async def test_wrong_key_is_an_authentication_error(server: ServerProc) -> None:
    with pytest.raises(streamplex.AuthenticationError) as info:
        async with streamplex.connect(server.url, api_key="wrong"):
            pass
    assert info.value.code == 4001


async def test_reconnects_and_resubscribes_after_a_restart(tmp) -> None:
    srv = start_server(tmp)
    replacement = None
    try:
        async with streamplex.connect(srv.url, api_key=srv.key, backoff=(0.2, 1.0)) as client:
            sub = client.subscribe("metrics", interval_ms=150)
            seen = 0
            async for chunk in sub:
                seen += 1
                if seen == 2:
                    await asyncio.to_thread(srv.stop)  # the stream ends with reason `shutdown`, the socket closes with 1001
                    replacement = subprocess.Popen(srv.proc.args, cwd=tmp, env=srv.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                if sub.restarts == 1:
                    assert "cpu" in chunk.data
                    break
            assert client.reconnects == 1
            assert await client.ping() < 5
    finally:
        srv.stop()
        if replacement is not None:
            replacement.terminate()
            replacement.wait(30)


async def test_a_dropped_connection_resumes_without_loss(server: ServerProc) -> None:
    words = " ".join(f"w{i}" for i in range(60))
    async with streamplex.connect(server.url, api_key=server.key, backoff=(0.1, 1.0)) as client:
        sub = client.subscribe("text", text=words, unit="words", chunk_size=1, interval_ms=20)
        got = []
        async for chunk in sub:
            got.append(chunk)
            if len(got) == 10:
                client._ws.transport.abort()  # the TCP connection drops without a close frame
        assert "".join(c.data for c in got) == words
        assert [c.seq for c in got] == list(range(60))  # nothing lost, nothing twice
        assert (client.reconnects, client.resumes, sub.restarts) == (1, 1, 0)


async def test_no_reconnect_ends_streams_with_an_error(tmp) -> None:
    srv = start_server(tmp)
    try:
        async with streamplex.connect(srv.url, api_key=srv.key, reconnect=False) as client:
            with pytest.raises(streamplex.StreamEnded):
                async for _ in client.subscribe("metrics", interval_ms=150):
                    await asyncio.to_thread(srv.stop)
    finally:
        srv.stop()


def test_sync_facade(server: ServerProc) -> None:
    with streamplex.connect_sync(server.url, api_key=server.key) as client:
        assert client.ready["op"] == "ready"
        assert "".join(c.data for c in client.subscribe("text", text=TEXT, unit="sentences")) == TEXT
        for chunk in client.subscribe("metrics", interval_ms=100):
            assert "cpu" in chunk.data
            break
        assert client.ping() < 5
