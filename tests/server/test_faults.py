"""Faults against the real server: a model that fails to load, clients that vanish, sources that break mid-stream."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson

from tests.serverproc import ROOT, ServerProc, collect, connect, recv, send, start_server


async def wait_for(condition, timeout: float) -> float:  # type: ignore[no-untyped-def]
    """Poll `condition` until true; the seconds it took (AssertionError after `timeout`)."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def test_model_that_fails_to_load_reports_unavailable_while_others_serve(tmp: Path) -> None:
    broken, missing = tmp / "broken-model", tmp / "missing-model"
    broken.mkdir()
    (broken / "config.json").write_text("{this is not json")
    srv = start_server(tmp, chat_model=f"{broken},{missing}")
    try:
        await wait_for(lambda: orjson.loads(srv.get("/ready")[1])["channels"]["chat"] != "loading", 120)
        channels = orjson.loads(srv.get("/ready")[1])["channels"]
        assert channels["chat"] == "unavailable" and all(channels[c] == "available" for c in ("text", "data", "logs", "metrics")), channels
        ws = await connect(srv)
        chat = next(c for c in ws.ready["channels"] if c["name"] == "chat")  # type: ignore[attr-defined]
        assert chat["status"] == "unavailable" and "broken-model" in chat["reason"]
        await send(ws, op="subscribe", id="c", channel="chat", params={"message": "hi"})
        reply = await recv(ws)
        assert reply["op"] == "error" and reply["code"] == "unavailable" and reply["id"] == "c"
        await send(ws, op="subscribe", id="t", channel="text", params={"text": "still serving", "unit": "words", "chunk_size": 1})
        chunks, end = await collect(ws, "t")
        assert "".join(c["data"] for c in chunks) == "still serving" and end["reason"] == "complete"
        await ws.close()
        # chat is unavailable once its default (first) model failed; the second may still be loading then
        await wait_for(lambda: "loading chat/broken-model failed" in srv.log() and "loading chat/missing-model failed" in srv.log(), 60)
        assert srv.proc.poll() is None
    finally:
        srv.stop()


CLIENT = """
import asyncio, sys, orjson, websockets
async def main():
    async with websockets.connect(sys.argv[1], additional_headers={"X-API-Key": sys.argv[2]}, ping_interval=None) as ws:
        await ws.recv()
        await ws.send(orjson.dumps({"op": "subscribe", "id": "m", "channel": "metrics", "params": {"interval_ms": 200}}).decode())
        await ws.send(orjson.dumps({"op": "subscribe", "id": "t", "channel": "text", "params": {"text": "z" * 100000, "chunk_size": 1, "interval_ms": 20}}).decode())
        print("subscribed", flush=True)
        while True:
            await ws.recv()
asyncio.run(main())
"""


def client_process(srv: ServerProc) -> subprocess.Popen[bytes]:
    """A client in its own process, with two open streams, reading everything."""
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, srv.url, srv.key], cwd=ROOT, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"subscribed\n"
    return proc


def open_streams(srv: ServerProc) -> float:
    return srv.metric("streamplex_streams", 'channel="metrics"') + srv.metric("streamplex_streams", 'channel="text"')


async def test_vanished_clients_are_reaped_within_the_heartbeat_bound(tmp: Path) -> None:
    # A slow-consumer close needs 60 s of a blocked send here: only the heartbeat can reap the frozen client in time.
    # A dropped session waits `resume_window` for a resume before its streams end: the bound is heartbeat + resume window.
    srv = start_server(tmp, heartbeat_interval=1, heartbeat_timeout=1, slow_consumer_timeout=60, resume_window=1)
    try:
        baseline_tasks = srv.metric("streamplex_tasks")
        killed = client_process(srv)
        await wait_for(lambda: open_streams(srv) == 2, 20)
        killed.kill()  # the process dies: its kernel closes the socket, no close frame
        killed.wait()
        await wait_for(lambda: srv.metric("streamplex_connections") == 0 and open_streams(srv) == 0, 10)

        frozen = client_process(srv)
        await wait_for(lambda: open_streams(srv) == 2, 20)
        frozen.send_signal(signal.SIGSTOP)  # the socket stays open but nothing answers: only the heartbeat can tell
        try:
            took = await wait_for(lambda: srv.metric("streamplex_connections") == 0 and open_streams(srv) == 0, 30)
            # pings every 1 s, 1 s to answer, 1 s to resume: gone after about 3 s; generous for a loaded machine
            assert took < 12, took
        finally:
            frozen.kill()
            frozen.wait()
        await wait_for(lambda: srv.metric("streamplex_tasks") <= baseline_tasks, 10)
        assert "Traceback" not in srv.log()
    finally:
        srv.stop()


async def test_sources_that_break_mid_stream_end_with_bad_source(tmp: Path) -> None:
    docs, data = tmp / "documents", tmp / "data"
    docs.mkdir()
    data.mkdir()
    text = "".join(f"line {i:07d} of a document that will change under the reader\n" for i in range(40_000))  # ~2.5 MB
    for name in ("truncated.txt", "deleted.txt"):
        (docs / name).write_text(text)
    (docs / "bad-utf8.txt").write_bytes(text[:300_000].encode() + b"\xff\xfe" + b"tail")
    rows = [json.dumps({"i": i, "v": "x" * 50}) for i in range(20_000)]
    (data / "bad-row.jsonl").write_text("\n".join([*rows[:3000], "{not json", *rows[3000:]]) + "\n")
    (data / "truncated.jsonl").write_text("\n".join(rows) + "\n")
    srv = start_server(tmp, documents_dir=docs, data_dir=data)
    try:
        ws = await connect(srv, max_size=None)
        paced = {"unit": "bytes", "chunk_size": 4096, "interval_ms": 10}

        await send(ws, op="subscribe", id="trunc", channel="text", params={"document": "truncated.txt", **paced})
        assert (await recv(ws))["op"] == "subscribed"
        first = (await recv(ws))["data"]
        os.truncate(docs / "truncated.txt", 1000)
        chunks, end = await collect(ws, "trunc")
        assert end["reason"] == "error" and end["error"]["code"] == "bad_source" and "truncated" in end["error"]["message"], end
        assert len(first) + sum(len(c["data"]) for c in chunks) < len(text)

        await send(ws, op="subscribe", id="del", channel="text", params={"document": "deleted.txt", **paced})
        assert (await recv(ws))["op"] == "subscribed"
        first = (await recv(ws))["data"]
        (docs / "deleted.txt").unlink()  # POSIX keeps an open file's data: the stream is the file as it was
        chunks, end = await collect(ws, "del", timeout=60)
        assert end["reason"] == "complete" and first + "".join(c["data"] for c in chunks) == text

        await send(ws, op="subscribe", id="utf", channel="text", params={"document": "bad-utf8.txt", "unit": "bytes", "chunk_size": 65536})
        chunks, end = await collect(ws, "utf")
        assert end["reason"] == "error" and end["error"]["code"] == "bad_source" and "not UTF-8" in end["error"]["message"], end
        assert chunks, "the good part was streamed before the bad byte"

        await send(ws, op="subscribe", id="row", channel="data", params={"dataset": "bad-row.jsonl", "chunk_size": 100})
        chunks, end = await collect(ws, "row")
        assert end["reason"] == "error" and end["error"]["code"] == "bad_source" and "line 3001" in end["error"]["message"], end
        assert 0 < sum(c["data"].count("\n") for c in chunks) <= 3000

        await send(ws, op="subscribe", id="dtrunc", channel="data", params={"dataset": "truncated.jsonl", "chunk_size": 50, "interval_ms": 10})
        assert (await recv(ws))["op"] == "subscribed"
        assert (await recv(ws))["op"] == "chunk"
        with (data / "truncated.jsonl").open("r+") as f:
            f.truncate(len("\n".join(rows[:5000])) + 1)  # cut cleanly at a line: only the size shows the change
        chunks, end = await collect(ws, "dtrunc", timeout=60)
        assert end["reason"] == "error" and end["error"]["code"] == "bad_source" and "truncated" in end["error"]["message"], end

        await send(ws, op="subscribe", id="after", channel="text", params={"text": "fine"})
        chunks, end = await collect(ws, "after")
        assert end["reason"] == "complete" and chunks[0]["data"] == "fine"
        await ws.close()
        assert "Traceback" not in srv.log()
    finally:
        srv.stop()
