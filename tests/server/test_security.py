"""Security guarantees against the real server (docs/security.md lists each with the test that holds it)."""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from tests.serverproc import ServerProc, collect, connect, recv, send, start_server


async def first_message_is_a_close(ws: websockets.ClientConnection) -> int:
    """The server's very first message must be its close frame: no data before authentication. The close code."""
    with pytest.raises(ConnectionClosed) as info:
        message = await asyncio.wait_for(ws.recv(), 10)
        raise AssertionError(f"data before authentication: {message!r}")
    assert info.value.rcvd is not None, "closed without a close frame"
    return info.value.rcvd.code


async def test_no_data_before_authentication_on_any_refusal(tmp: Path) -> None:
    srv = start_server(tmp, auth_timeout=0.5, auth_fail_limit=6)
    try:
        async with websockets.connect(srv.url) as ws:
            assert await first_message_is_a_close(ws) == 4002
        for header in ({"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
            async with websockets.connect(srv.url, additional_headers=header) as ws:
                assert await first_message_is_a_close(ws) == 4001
        first_frames: list[str | bytes] = [
            json.dumps({"op": "auth", "api_key": "wrong"}),
            json.dumps({"op": "subscribe", "id": "s", "channel": "logs", "params": {}}),
            b"\x01s" + json.dumps({"op": "auth", "api_key": srv.key}).encode(),
            "not json " + srv.key,
        ]
        for frame in first_frames:
            async with websockets.connect(srv.url) as ws:
                await ws.send(frame)
                assert await first_message_is_a_close(ws) == 4001, frame
        async with websockets.connect(srv.url, additional_headers={"X-API-Key": srv.key}) as ws:
            assert await first_message_is_a_close(ws) == 4003, "six failures: even the right key is refused, before anything is read"
    finally:
        srv.stop()


SECRET = "SECRETKEYMATERIAL"


async def test_keys_never_appear_in_the_server_log_or_the_logs_channel(tmp: Path) -> None:
    good, scoped = f"sk-{SECRET}-good", f"sk-{SECRET}-scoped"
    srv = start_server(tmp, api_keys=f"{good}:admin,{scoped}:metrics|logs", log_level="DEBUG")
    srv.key = good
    try:
        for how in ({"additional_headers": {"X-API-Key": good}}, {"additional_headers": {"Authorization": f"Bearer {good}"}}):
            async with websockets.connect(srv.url, **how) as ws:
                assert json.loads(await ws.recv())["op"] == "ready"
        for headers in ({"X-API-Key": f"sk-{SECRET}-wrong-header"}, {"Authorization": f"Bearer sk-{SECRET}-wrong-bearer"}):
            async with websockets.connect(srv.url, additional_headers=headers) as ws:
                await first_message_is_a_close(ws)
        async with websockets.connect(srv.url) as ws:
            await ws.send(json.dumps({"op": "auth", "api_key": f"sk-{SECRET}-wrong-frame"}))
            await first_message_is_a_close(ws)
        async with websockets.connect(srv.url, additional_headers={"X-API-Key": scoped}) as ws:
            assert json.loads(await ws.recv())["op"] == "ready"
            await send(ws, op="subscribe", id="t", channel="text", params={"text": "x"})
            assert (await recv(ws))["code"] == "forbidden"
        async with httpx.AsyncClient(base_url=srv.http, timeout=30) as http:
            assert (await http.post("/api/v1/stream/text", json={"text": "hi"}, headers={"X-API-Key": good})).status_code == 200
            assert (await http.post("/api/v1/stream/text", json={"text": "hi"}, headers={"X-API-Key": f"sk-{SECRET}-wrong-http"})).status_code == 403
            assert (await http.post("/api/v1/stream/text", json={"text": "hi"}, headers={"X-API-Key": scoped})).status_code == 403
        ws = await connect(srv)
        await send(ws, op="subscribe", id="l", channel="logs", params={"lines": 100_000, "level": "DEBUG", "follow": False})
        records, end = await collect(ws, "l")
        await ws.close()
        assert end["reason"] == "complete" and any("authentication failed" in r["data"]["message"] for r in records)
        assert not [r for r in records if SECRET in json.dumps(r)]
        log = srv.log()
        assert "authentication failed" in log and " DEBUG " in log, "the server logged at DEBUG level"
        assert SECRET not in log, [line for line in log.splitlines() if SECRET in line][:5]
    finally:
        srv.stop()


async def test_a_generated_key_is_logged_once_to_the_console_and_never_to_the_logs_channel(tmp: Path) -> None:
    srv = start_server(tmp, api_keys="")
    try:
        found = re.findall(r"generated one for this run: (sk-\S+)", srv.log())
        assert len(found) == 1
        srv.key = found[0]
        ws = await connect(srv)
        await send(ws, op="subscribe", id="l", channel="logs", params={"lines": 100_000, "level": "DEBUG", "follow": False})
        records, _ = await collect(ws, "l")
        await ws.close()
        assert records and not [r for r in records if srv.key in json.dumps(r)]
        assert srv.log().count(srv.key) == 1
    finally:
        srv.stop()


async def test_the_logs_channel_needs_an_admin_grant(tmp: Path) -> None:
    srv = start_server(tmp, api_keys="sk-root:admin,sk-plain,sk-reader:logs", auth_fail_limit=3)
    try:
        names = {}
        for key in ("sk-root", "sk-plain", "sk-reader"):
            async with websockets.connect(srv.url, additional_headers={"X-API-Key": key}) as ws:
                names[key] = {c["name"] for c in (await recv(ws))["channels"]}
                await send(ws, op="subscribe", id="l", channel="logs", params={"lines": 5, "follow": False})
                reply = await recv(ws)
                assert (reply["op"] == "subscribed") == (key != "sk-plain"), (key, reply)
                if key == "sk-plain":
                    assert reply["code"] == "forbidden" and "scoped `admin`" in reply["message"], reply
                else:
                    _, end = await collect(ws, "l")
                    assert end["reason"] == "complete"
        everything = set(json.loads(srv.get("/ready")[1])["channels"])
        assert "logs" in everything and names["sk-root"] == everything
        assert names["sk-plain"] == everything - {"logs"}, "an unscoped key: every channel but the admin ones, and ready says so"
        assert names["sk-reader"] == {"logs"}
        async with httpx.AsyncClient(base_url=srv.http, timeout=30) as http:
            assert (await http.post("/api/v1/stream/logs", json={"follow": False}, headers={"X-API-Key": "sk-plain"})).status_code == 403
            assert (await http.post("/api/v1/stream/logs", json={"follow": False}, headers={"X-API-Key": "sk-root"})).status_code == 200
            for path in ("/ready", "/channels"):
                plain = (await http.get(path, headers={"X-API-Key": "sk-plain"})).json()["channels"]
                root = (await http.get(path, headers={"Authorization": "Bearer sk-root"})).json()["channels"]
                listed = set(plain) if path == "/ready" else {c["name"] for c in plain}
                assert listed == everything - {"logs"} and len(root) == len(everything), path
            assert {c["name"]: c["admin"] for c in (await http.get("/channels")).json()["channels"]}["logs"] is True
            # A wrong key on /ready or /channels is a failed authentication like any other.
            assert [(await http.get("/ready", headers={"X-API-Key": "sk-wrong"})).status_code for _ in range(4)] == [403, 403, 403, 429]
    finally:
        srv.stop()


async def test_symlinks_out_of_the_folders_are_forbidden(server: ServerProc) -> None:
    docs, data = server.documents_dir, server.data_dir  # type: ignore[attr-defined]
    for folder, name in ((docs, "escape.txt"), (data, "escape.csv")):
        link = folder / name
        if not link.is_symlink():
            os.symlink("/etc/hostname", link)
    ws = await connect(server)
    await send(ws, op="subscribe", id="t", channel="text", params={"document": "escape.txt"})
    await send(ws, op="subscribe", id="d", channel="data", params={"dataset": "escape.csv"})
    await send(ws, op="subscribe", id="n", channel="text", params={"document": "sub/../../escape.txt"})
    replies = [await recv(ws) for _ in range(3)]
    assert [(r["id"], r["code"]) for r in replies] == [("t", "forbidden"), ("d", "forbidden"), ("n", "forbidden")]
    assert all("/etc" not in r["message"] for r in replies), "the refusal does not reveal where the link points"
    await ws.close()


async def test_params_are_bounded(server: ServerProc) -> None:
    ws = await connect(server)
    deep = '{"op":"subscribe","id":"deep","channel":"data","params":{"data":{"x":' + "[" * 5000 + "]" * 5000 + "}}}"
    await ws.send(deep)
    reply = await recv(ws)
    assert reply["op"] == "error" and reply["code"] == "bad_request", reply
    await send(ws, op="subscribe", id="many", channel="data", params={"records": [0] * 100_001})
    reply = await recv(ws)
    assert reply["code"] == "invalid_params" and reply["details"][0]["field"] == "records"
    await send(ws, op="subscribe", id="long", channel="text", params={"text": "x" * 1_000_001})
    reply = await recv(ws)
    assert reply["code"] == "invalid_params" and reply["details"][0]["field"] == "text"
    await send(ws, op="subscribe", id="i" * 129, channel="text", params={"text": "x"})
    assert (await recv(ws))["code"] == "bad_request"
    await send(ws, op="ping")
    assert await recv(ws) == {"op": "pong"}
    await ws.close()


async def test_http_json_bodies_are_bounded(server: ServerProc) -> None:
    key = {"X-API-Key": server.key}
    limit = 1_048_576  # max_frame_bytes
    async with httpx.AsyncClient(base_url=server.http, timeout=60) as http:
        big = await http.post("/api/v1/stream/text", content=b'{"text": "' + b"x" * limit + b'"}', headers=key | {"Content-Type": "application/json"})
        assert big.status_code == 413 and big.json()["error"]["code"] == "bad_request"

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the server must stop reading at the limit
            yield b'{"text": "'
            for _ in range(64):
                yield b"x" * 65536
            yield b'"}'

        streamed = await http.post("/api/v1/stream/text", content=chunked(), headers=key | {"Content-Type": "application/json"})
        assert streamed.status_code == 413
        fits = await http.post("/api/v1/stream/text", json={"text": "x" * 1000}, headers=key)
        assert fits.status_code == 200
