"""End to end: a client that stops reading, lossy drops, constant memory on big sources, and shutdown."""

from __future__ import annotations

import asyncio
import json
import signal

import websockets

from tests.server.test_ws import closed_with
from tests.serverproc import collect, connect, recv, send, start_server

MiB = 1 << 20


async def test_stalled_reader_is_closed_4009_with_bounded_memory(tmp) -> None:
    docs = tmp / "docs"
    docs.mkdir()
    (docs / "big.txt").write_text(("streamplex " * 100 + "\n") * 200_000)  # ~220 MB
    srv = start_server(tmp, documents_dir=docs, slow_consumer_timeout=2, outbox_bytes=65536)
    try:
        rss_before = srv.rss
        other = await connect(srv)
        await send(other, op="subscribe", id="m", channel="metrics", params={"interval_ms": 200})
        staller = await connect(srv, max_queue=4, compression=None)
        await send(staller, op="subscribe", id="t", channel="text", params={"document": "big.txt", "unit": "bytes", "chunk_size": 60000})
        seen_metrics = 0
        async with asyncio.timeout(30):
            while seen_metrics < 15:  # ~3 s: the staller's send stays blocked past its timeout meanwhile
                frame = await recv(other)
                seen_metrics += frame["op"] == "chunk"
        async with asyncio.timeout(20):
            while srv.metric("streamplex_closes_total", 'code="4009"') < 1:
                await asyncio.sleep(0.1)
        assert srv.rss - rss_before < 60 * MiB, "server buffered a stalled client's stream"
        # The close frame waits behind the data in flight; a client that reads again in time sees it.
        assert await closed_with(staller, timeout=20) == 4009
        frame = await recv(other)
        assert frame["op"] == "chunk" and frame["id"] == "m"
        await other.close()
    finally:
        srv.stop()


async def test_big_dataset_streams_in_constant_memory(tmp) -> None:
    data = tmp / "data"
    data.mkdir()
    line = json.dumps({"id": 0, "name": "row", "payload": "x" * 180}) + "\n"
    with (data / "big.jsonl").open("w") as f:
        for _ in range(8):
            f.write(line * 50_000)  # 400k rows, ~90 MB
    srv = start_server(tmp, data_dir=data)
    try:
        rss_before = srv.rss
        ws = await connect(srv, max_size=None)
        await send(ws, op="subscribe", id="d", channel="data", params={"dataset": "big.jsonl", "format": "csv", "chunk_size": 2000})
        peak, rows, first = 0, 0, True
        while True:
            frame = await recv(ws, timeout=30)
            if frame["op"] == "end":
                assert frame["reason"] == "complete", frame
                break
            if frame["op"] == "chunk":
                text = frame["data"]
                if first:
                    assert text.startswith("id,name,payload\r\n")
                    text, first = text.split("\r\n", 1)[1], False
                rows += text.count("\r\n")
                if rows % 40_000 == 0:
                    peak = max(peak, srv.rss - rss_before)
        assert rows == 400_000
        assert peak < 80 * MiB
        await ws.close()
    finally:
        srv.stop()


async def test_sigterm_ends_streams_with_shutdown_and_closes_1001(tmp) -> None:
    srv = start_server(tmp)
    ws = await connect(srv)
    await send(ws, op="subscribe", id="t", channel="text", params={"text": "a" * 100000, "chunk_size": 1, "interval_ms": 50})
    await send(ws, op="subscribe", id="m", channel="metrics", params={"interval_ms": 100})
    await recv(ws)
    srv.proc.send_signal(signal.SIGTERM)
    ends = {}
    try:
        while True:
            frame = await recv(ws)
            if frame["op"] == "end":
                ends[frame["id"]] = frame["reason"]
    except websockets.ConnectionClosed as exc:
        assert exc.rcvd is not None and exc.rcvd.code == 1001
    assert ends == {"t": "shutdown", "m": "shutdown"}
    assert srv.proc.wait(20) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean drain
    assert "draining 1 connection" in srv.log()


async def test_logs_channel_serves_the_servers_own_records(server) -> None:
    ws = await connect(server)
    async with websockets.connect(server.url, additional_headers={"X-API-Key": "warm-up"}):  # a record for the backlog
        pass
    await send(ws, op="subscribe", id="l", channel="logs", params={"lines": 5, "level": "INFO", "follow": False})
    backlog, end = await collect(ws, "l")
    assert end["reason"] == "complete" and 1 <= len(backlog) <= 5
    assert any("authentication failed" in c["data"]["message"] for c in backlog)
    assert all(c["data"]["level"] in {"INFO", "WARNING", "ERROR", "CRITICAL"} for c in backlog)
    await send(ws, op="subscribe", id="live", channel="logs", params={"lines": 0, "level": "WARNING"})
    await recv(ws)
    async with websockets.connect(server.url, additional_headers={"X-API-Key": "wrong"}):
        pass
    frame = await recv(ws)
    assert frame["id"] == "live" and frame["data"]["level"] == "WARNING" and "authentication failed" in frame["data"]["message"]
    assert "wrong" not in frame["data"]["message"]
    await ws.close()
