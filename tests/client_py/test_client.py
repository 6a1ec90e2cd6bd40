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
    opened = server.metric("streamplex_connections_accepted_total")
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
    assert server.metric("streamplex_connections_accepted_total") == opened + 1


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
        await _eventually(lambda: sub.reason == "unsubscribed")


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


@pytest.fixture(scope="module")
def rate_limited_server(tmp_path_factory: pytest.TempPathFactory):
    """A server whose API key may send 2 ops per second, bursts of 1: a second subscribe right after the first is refused."""
    srv = start_server(tmp_path_factory.mktemp("keyrate"), key_rate=2, key_burst=1)
    yield srv
    srv.stop()


async def test_rate_limited_subscribes_are_retried_after_retry_after(rate_limited_server: ServerProc) -> None:
    refused_before = rate_limited_server.metric("streamplex_rate_limited_total")
    async with streamplex.connect(rate_limited_server.url, api_key=rate_limited_server.key) as client:
        subs = [client.subscribe("text", text=TEXT, unit="words", chunk_size=4) for _ in range(3)]
        started = time.monotonic()

        async def read(sub: streamplex.Subscription) -> list[str]:
            return [c.data async for c in sub]

        results = await asyncio.gather(*map(read, subs))
        took = time.monotonic() - started
    assert all("".join(words) == TEXT for words in results)
    assert sum(sub.retries for sub in subs) >= 2 and all(sub.retry_waited <= 60 for sub in subs)
    assert rate_limited_server.metric("streamplex_rate_limited_total") - refused_before >= 2
    assert took >= 0.5, "the retries waited for the key's bucket (2 ops/s), as retry_after said"


async def test_retry_is_capped_and_can_be_turned_off(rate_limited_server: ServerProc) -> None:
    for retry in (None, streamplex.Retry(max_attempts=0), streamplex.Retry(max_wait=0.01)):
        await asyncio.sleep(1.1)  # the key's bucket refills between rounds
        async with streamplex.connect(rate_limited_server.url, api_key=rate_limited_server.key, retry=retry) as client:
            first = client.subscribe("text", text=TEXT, unit="words")
            second = client.subscribe("text", text=TEXT, unit="words")
            await first.open()
            with pytest.raises(streamplex.RateLimited) as refused:
                await second.open()
            assert refused.value.retry_after is not None and refused.value.retry_after > 0 and second.retries == 0, retry
            assert [c.data async for c in first], retry


async def test_overloaded_subscribes_are_retried(tmp_path) -> None:
    # One subscription admitted per second, none may wait: a second one right after the first is refused `overloaded`.
    srv = start_server(tmp_path, subscribe_rate=1, subscribe_burst=1, subscribe_max_wait=0, overload_retry_after=0.5)
    try:
        async with streamplex.connect(srv.url, api_key=srv.key) as client:
            subs = [client.subscribe("text", text=TEXT, unit="words") for _ in range(2)]
            texts = await asyncio.gather(*(_words(sub) for sub in subs))
        assert texts == [TEXT, TEXT] and sum(sub.retries for sub in subs) >= 1
        assert srv.metric("streamplex_errors_total", 'code="overloaded"') >= 1
    finally:
        srv.stop()


async def _words(sub: streamplex.Subscription) -> str:
    return "".join([c.data async for c in sub])
