"""SIGTERM drains: /ready turns 503, new clients are turned away with 1001, open streams end with `shutdown`, all within the grace period."""

from __future__ import annotations

import asyncio
import signal
import time

import orjson
import pytest
import websockets

from tests.serverproc import connect, recv, send, start_server

GRACE = 4.0


async def test_sigterm_turns_new_clients_away_and_ends_every_stream_within_the_grace_period(tmp) -> None:
    data = tmp / "data"
    data.mkdir()
    (data / "big.jsonl").write_bytes(b"".join(orjson.dumps({"i": i, "pad": "x" * 50_000}) + b"\n" for i in range(400)))
    # Two subscribes at once, then one per 20 s: the live client's second subscribe is still waiting for its turn at SIGTERM.
    srv = start_server(
        tmp,
        data_dir=data,
        shutdown_timeout=GRACE,
        slow_consumer_timeout=60,
        per_message_deflate=False,
        subscribe_burst=2,
        subscribe_rate=0.05,
        subscribe_max_wait=60,
    )
    try:
        # A client that stops reading keeps the drain waiting on its outbox for the whole grace period.
        stalled = await connect(srv, max_queue=1, compression=None)
        await send(stalled, op="subscribe", id="big", channel="data", params={"dataset": "big.jsonl", "chunk_size": 1})
        live = await connect(srv)
        await send(live, op="subscribe", id="m", channel="metrics", params={"interval_ms": 100})
        assert (await recv(live))["op"] == "subscribed"
        await send(live, op="subscribe", id="w", channel="metrics", params={"interval_ms": 100})
        await asyncio.sleep(1.0)

        started = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        ends: dict[str, str] = {}
        opened: set[str] = set()
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                frame = await recv(live)
                if frame["op"] == "end":
                    ends[frame["id"]] = frame["reason"]
                elif frame["op"] == "subscribed":
                    opened.add(frame["id"])
        assert ends == {"m": "shutdown", "w": "shutdown"} and not opened, "the waiting subscribe is told too, and never opened"
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001 and "reconnect" in closed.value.rcvd.reason

        # Still draining (the stalled client): not ready, and a newcomer is sent elsewhere at once.
        assert srv.get("/ready")[0] == 503
        async with websockets.connect(srv.url, additional_headers={"X-API-Key": srv.key}) as newcomer:
            with pytest.raises(websockets.ConnectionClosed) as refused:
                await recv(newcomer)
        assert refused.value.rcvd is not None and refused.value.rcvd.code == 1001 and "reconnect elsewhere" in refused.value.rcvd.reason
        assert time.monotonic() - started < GRACE, "the checks above must run while the server drains"

        assert srv.proc.wait(GRACE + 15) in (0, -signal.SIGTERM)
        assert time.monotonic() - started < GRACE + 10, "the drain must end within the grace period (plus uvicorn's own close)"
        log = srv.log()
        assert "draining 2 connection(s)" in log
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await asyncio.wait_for(stalled.recv(), 10)
    finally:
        srv.stop()
