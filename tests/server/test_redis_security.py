"""Redis as an untrusted, authenticated peer: password, ACL user and TLS with a real redis-server; malformed
messages and keys written into it are dropped or ignored while the node's streams go on."""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme
import websockets

from streamplex.server.session_store import digest
from tests.redisproc import RedisProc, running_redis
from tests.server.test_redis import _wait_for_node_records
from tests.serverproc import ServerProc, connect, free_port, recv, send, start_server

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed (scripts/packages/apt-test.txt)")

ADMIN_PASSWORD = "admin-secret-1"
NODE_PASSWORD = "node-secret-2"
# What a node needs (docs/deploy.md): its prefix's keys and channels, pub/sub, scripts (which read TIME), sorted sets,
# strings, hashes and streams (session records and replay).
NODE_ACL = (
    f"on >{NODE_PASSWORD} resetchannels ~sp-acl:* &sp-acl:* +@connection +@pubsub +@scripting +@sortedset +@string +@hash +@stream +@keyspace +time".split()
)


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProc]:
    """A redis-server whose default user needs a password, with an ACL user `streamplex` limited to the `sp-acl` prefix."""
    proc = RedisProc(free_port(), tmp_path_factory.mktemp("redis-acl") / "redis.log", password=ADMIN_PASSWORD)
    proc.start()
    client = proc.client()
    client.acl_setuser("streamplex", reset=True)
    client.execute_command("ACL", "SETUSER", "streamplex", *NODE_ACL)
    client.close()
    yield proc
    proc.stop()


def _wait_log(server: ServerProc, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.log():
        assert time.monotonic() < deadline, f"{text!r} never logged:\n{server.log()[-3000:]}"
        time.sleep(0.1)


async def test_nodes_share_through_an_acl_user_and_a_wrong_password_is_refused(tmp: Path, acl_redis: RedisProc) -> None:
    host = f"127.0.0.1:{acl_redis.port}/0"
    # One node names the user and password in settings, the other in the URL.
    a = start_server(
        tmp, node="acl-a", redis_url=f"redis://{host}", redis_username="streamplex", redis_password=NODE_PASSWORD, redis_prefix="sp-acl", key_max_connections=2
    )
    b = start_server(
        tmp, node="acl-b", redis_url=f"redis://streamplex:{NODE_PASSWORD}@{host}", redis_prefix="sp-acl", key_max_connections=2, activity_log_interval=0.5
    )
    wrong = start_server(
        tmp, node="acl-wrong", redis_url=f"redis://{host}", redis_username="streamplex", redis_password="not-the-password", redis_prefix="sp-acl"
    )
    try:
        for node in (a, b):
            _wait_log(node, "reachable; sharing with other nodes")
        ws = await connect(a)
        await send(ws, op="subscribe", id="l", channel="logs", params={"lines": 0})
        await send(ws, op="subscribe", id="m", channel="metrics", params={"interval_ms": 200})
        await _wait_for_node_records(ws, b, "acl-b")
        # The per-key cap is kept in Redis under the ACL user: with one connection on each node, node B refuses a third.
        held = await connect(b)
        async with websockets.connect(b.url, additional_headers={"X-API-Key": b.key}) as third:
            with pytest.raises(websockets.ConnectionClosed) as info:
                await recv(third)
        assert info.value.rcvd is not None and info.value.rcvd.code == 4008
        for text in ("unusable answer", "NOPERM", "no permissions"):
            assert text not in a.log() + b.log(), f"the ACL must allow every command the node sends ({text})"
        admin = acl_redis.client()
        assert any(admin.scan_iter("sp-acl:sess:*")), "session records are written under the ACL user"
        admin.close()
        await held.close()
        await ws.close()

        _wait_log(wrong, "unreachable")
        assert "WRONGPASS" in wrong.log() or "invalid username-password" in wrong.log()
        assert wrong.metric("streamplex_redis_up") == 0 and a.metric("streamplex_redis_up") == 1
        plain = await connect(wrong)  # it serves on its own
        await plain.close()
        for node in (a, b, wrong):
            assert NODE_PASSWORD not in node.log() and "not-the-password" not in node.log(), "a Redis password must never be logged"
    finally:
        for node in (a, b, wrong):
            node.stop()


async def test_an_acl_user_without_pubsub_numsub_takes_a_dead_nodes_session_once_its_heartbeat_lapses(tmp: Path, acl_redis: RedisProc) -> None:
    admin = acl_redis.client()
    admin.execute_command("ACL", "SETUSER", "sp-lean", *[a.replace("sp-acl", "sp-lean") for a in NODE_ACL], "-pubsub|numsub")
    admin.close()
    url = f"redis://sp-lean:{NODE_PASSWORD}@127.0.0.1:{acl_redis.port}/0"
    a, b = (start_server(tmp, node=name, redis_url=url, redis_prefix="sp-lean", resume_window=20) for name in ("lean-a", "lean-b"))
    try:
        for node in (a, b):
            _wait_log(node, "reachable; sharing with other nodes")
        ws = await connect(a)
        token = ws.ready["resume"]["token"]  # type: ignore[attr-defined]
        await send(ws, op="subscribe", id="d", channel="data", params={"records": [{"i": i} for i in range(60)], "chunk_size": 1, "interval_ms": 20})
        seqs = [(await recv(ws))["op"] for _ in range(6)]
        assert seqs.count("chunk") >= 5, seqs
        a.stop(signal.SIGKILL)
        ws = await connect(b)
        await send(ws, op="resume", token=token, streams={"d": 3})
        resumed = await recv(ws)
        assert resumed["op"] == "resumed" and resumed["streams"]["d"]["resumed"], resumed
        got = []
        while (frame := await recv(ws))["op"] != "end":
            got.append(frame["seq"])
        assert got == list(range(4, 60)) and frame["reason"] == "complete", (got, frame)
        assert "Redis refused PUBSUB NUMSUB" in b.log()
        assert "taken over from node lean-a, dead (its heartbeat lapsed)" in b.log()
        await ws.close()
    finally:
        for node in (a, b):
            node.stop()


async def test_tls_with_a_verified_server_and_a_client_certificate(tmp: Path) -> None:
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    client_cert = ca.issue_cert("streamplex-node")
    files = {name: tmp / f"{name}.pem" for name in ("ca", "server-cert", "server-key", "client-cert", "client-key")}
    ca.cert_pem.write_to_path(files["ca"])
    server_cert.cert_chain_pems[0].write_to_path(files["server-cert"])
    server_cert.private_key_pem.write_to_path(files["server-key"])
    client_cert.cert_chain_pems[0].write_to_path(files["client-cert"])
    client_cert.private_key_pem.write_to_path(files["client-key"])
    tls = ("--tls-cert-file", str(files["server-cert"]), "--tls-key-file", str(files["server-key"]))
    tls += ("--tls-ca-cert-file", str(files["ca"]), "--tls-auth-clients", "yes")
    admin = {"ssl": True, "ssl_ca_certs": str(files["ca"]), "ssl_certfile": str(files["client-cert"]), "ssl_keyfile": str(files["client-key"])}
    proc = RedisProc(free_port(), tmp / "redis-tls.log", tls=tls, admin=admin)
    try:
        proc.start()
    except RuntimeError as exc:
        if "tls" in str(exc).lower() and proc.proc is not None and proc.proc.poll() is not None:
            pytest.skip(f"this redis-server has no TLS: {exc}")
        raise
    client_files = {"redis_tls_cert_file": files["client-cert"], "redis_tls_key_file": files["client-key"]}
    good = start_server(tmp, node="tls-good", redis_url=proc.url, redis_prefix="sp-tls", redis_tls_ca_file=files["ca"], **client_files)
    # Another CA (the system's): the server's certificate does not verify, so nothing is sent to it.
    untrusted = start_server(tmp, node="tls-untrusted", redis_url=proc.url, redis_prefix="sp-tls", **client_files)
    try:
        _wait_log(good, "reachable; sharing with other nodes")
        _wait_log(untrusted, "unreachable")
        assert "certificate verify failed" in untrusted.log()
        assert good.metric("streamplex_redis_up") == 1 and untrusted.metric("streamplex_redis_up") == 0
        # The TLS link carries the feeds: a record published by this node reaches Redis subscribers.
        listener = proc.client().pubsub()
        listener.subscribe("sp-tls:demand")
        deadline = time.monotonic() + 10
        ws = await connect(good)
        await send(ws, op="subscribe", id="l", channel="logs", params={"lines": 0})
        announced = None
        while announced is None:
            assert time.monotonic() < deadline, "the node never announced its demand over TLS"
            message = listener.get_message(timeout=0.5)
            if message is not None and message["type"] == "message":
                announced = orjson.loads(message["data"])
        assert announced["node"] == "tls-good" and "logs" in announced["topics"]
        listener.close()
        await ws.close()
    finally:
        good.stop()
        untrusted.stop()
        proc.stop()


@pytest.fixture(scope="module")
def plain_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProc]:
    with running_redis(tmp_path_factory.mktemp("redis-plain")) as proc:
        yield proc


def _record(node: str, n: int, message: str, **extra: object) -> dict[str, object]:
    return {"time": "2026-01-01T00:00:00.000+00:00", "level": "WARNING", "levelno": 30, "logger": "x", "message": message, "node": node, "n": n, **extra}


def _sample(t: float) -> dict[str, object]:
    return {"node": "node-x", "t": t, "time": 1_700_000_000.0 + t, "cpu": {"busy": [[1.0 + t, 4.0 + 2 * t]], "load": [0.5, 0.4, 0.3]}}


MALFORMED_LOGS: list[bytes] = [
    b"not json",
    b"[1, 2, 3]",
    b'{"m": {}}',  # no node
    orjson.dumps({"node": 7, "m": _record("node-x", 1, "x")}),
    orjson.dumps({"node": "node-x"}),  # no record
    orjson.dumps({"node": "node-x", "m": "a string"}),
    orjson.dumps({"node": "node-x", "m": {"node": "node-x", "message": "no level"}}),
    orjson.dumps({"node": "node-x", "m": _record("node-x", 1, "x", levelno="high")}),
    orjson.dumps({"node": "node-x", "m": _record("node-x", 1, "x" * 100_000)}),
    b"{" * 2_000_000,  # over the size limit
]
MALFORMED_METRICS: list[bytes] = [
    orjson.dumps({"node": "node-x", "m": {"prev": 1}}),
    orjson.dumps({"node": "node-x", "m": [_sample(0.0)]}),
    orjson.dumps({"node": "node-x", "m": [_sample(0.0), {"node": "node-x", "time": 1.0}]}),  # no t
    orjson.dumps({"node": "node-x", "m": [_sample(0.0), {**_sample(1.0), "cpu": {"busy": [1, 2], "load": []}}]}),
]
MALFORMED_DEMAND: list[bytes] = [orjson.dumps({"node": "node-x", "topics": "logs"}), orjson.dumps({"node": "node-x", "topics": [{"a": 1}]})]


async def test_malformed_messages_from_redis_are_dropped_and_streams_go_on(tmp: Path, plain_redis: RedisProc) -> None:
    srv = start_server(tmp, node="victim", redis_url=plain_redis.url, redis_prefix="sp-bad", key_max_connections=5, key_rate=100, key_burst=100)
    publisher = plain_redis.client()
    try:
        _wait_log(srv, "reachable; sharing with other nodes")
        ws = await connect(srv)
        await send(ws, op="subscribe", id="l", channel="logs", params={"lines": 0, "level": "INFO"})
        await send(ws, op="subscribe", id="m", channel="metrics", params={"interval_ms": 200, "fields": ["cpu"]})
        own_metrics = 0
        while own_metrics < 2:  # both streams run
            frame = await recv(ws)
            own_metrics += frame["op"] == "chunk" and frame["id"] == "m"
        sent = 0
        for channel, messages in (("sp-bad:feed:logs", MALFORMED_LOGS), ("sp-bad:feed:metrics", MALFORMED_METRICS), ("sp-bad:demand", MALFORMED_DEMAND)):
            for message in messages:
                assert publisher.publish(channel, message) == 1, "the node must be subscribed"
                sent += 1
        # Well-formed messages after the garbage still come through, reduced to a record's fields.
        publisher.publish("sp-bad:feed:logs", orjson.dumps({"node": "node-x", "m": _record("node-x", 5, "hello from x", injected="<script>")}))
        publisher.publish("sp-bad:feed:metrics", orjson.dumps({"node": "node-x", "m": [_sample(0.0), _sample(1.0)]}))
        seen: dict[str, dict[str, object]] = {}
        warnings: list[str] = []
        deadline = time.monotonic() + 20
        while len(seen) < 2 or not warnings:
            assert time.monotonic() < deadline, f"seen {seen}, warnings {warnings}"
            frame = await recv(ws)
            assert frame["op"] == "chunk", f"a stream ended or failed: {frame}"
            data = frame["data"]
            if data.get("node") == "node-x":
                seen[frame["id"]] = data
            elif frame["id"] == "l" and "dropped a malformed message" in data["message"]:
                warnings.append(data["message"])
        assert seen["l"]["message"] == "hello from x" and "injected" not in seen["l"]
        assert seen["m"]["cpu"]["percent"] == 50.0 and seen["m"]["interval_s"] == 1.0
        assert "sp-bad:feed:logs" in warnings[0]
        deadline = time.monotonic() + 10
        while srv.metric("streamplex_redis_malformed_dropped_total") < sent:
            assert time.monotonic() < deadline, f"{srv.metric('streamplex_redis_malformed_dropped_total')} of {sent} counted"
            await asyncio.sleep(0.2)
        assert srv.metric("streamplex_redis_malformed_dropped_total") == sent
        assert srv.log().count("dropped a malformed message on Redis channel sp-bad:feed:logs") == 1, "one warning per channel per interval"

        # Keys of the per-key limits overwritten by hand: the limits fall back to the node's count, Redis stays in use.
        await send(ws, op="ping")
        for key in publisher.scan_iter("sp-bad:rate:*"):
            publisher.set(key, "garbage")
        for key in publisher.scan_iter("sp-bad:conn:*"):
            publisher.delete(key)
            publisher.set(key, "not a sorted set")
        assert any(True for _ in publisher.scan_iter("sp-bad:conn:*"))
        other = await connect(srv)
        await send(other, op="ping")
        assert (await recv(other))["op"] == "pong"
        await other.close()
        assert srv.metric("streamplex_redis_up") == 1
        _wait_log(srv, "unusable answer")
        await send(ws, op="unsubscribe", id="m")
        await send(ws, op="unsubscribe", id="l")
        await ws.close()
    finally:
        publisher.close()
        srv.stop()


async def test_malformed_session_records_and_replay_entries_are_dropped(tmp: Path, plain_redis: RedisProc) -> None:
    """A session record or replay entry written into Redis by hand: the entry is dropped (the stream regenerates
    from there), the record is taken as absent (resume_failed); the node goes on serving."""
    records = [{"i": i} for i in range(120)]
    params = {"records": records, "chunk_size": 4, "interval_ms": 20}
    a = start_server(tmp, node="sess-a", redis_url=plain_redis.url, redis_prefix="sp-sess", resume_window=20)
    b = start_server(tmp, node="sess-b", redis_url=plain_redis.url, redis_prefix="sp-sess", resume_window=20)
    r = plain_redis.client()
    try:
        sessions = []
        for _ in range(2):
            ws = await connect(a)
            await send(ws, op="subscribe", id="d", channel="data", params=params)
            seqs = []
            while len(seqs) < 8:
                frame = await recv(ws)
                if frame["op"] == "chunk":
                    seqs.append(frame["seq"])
            sessions.append((ws, ws.ready["resume"]["token"], seqs[-1]))  # type: ignore[attr-defined]
        a.stop(signal.SIGKILL)
        (_, first, _), (_, second, _) = sessions
        # First session: its replay entries 3 and 5 rewritten as frames of no stream and not JSON.
        (replay_key,) = [k for k in r.scan_iter("sp-sess:replay:*:d") if r.xrange(k, "3-1", "3-1") and _owner_of(r, k, first)]
        entries = r.xrange(replay_key)
        r.delete(replay_key)
        for entry_id, fields in entries:
            seq = int(entry_id.split(b"-")[0])
            if seq == 3:
                fields = {b"c": orjson.dumps({"op": "chunk", "id": "other", "seq": 3, "data": "forged"})}
            elif seq == 5:
                fields = {b"c": b"\xff not json"}
            r.xadd(replay_key, fields, id=entry_id)
        ws = await connect(b)
        await send(ws, op="resume", token=first, streams={"d": 1})
        resumed = await recv(ws)
        assert resumed["op"] == "resumed" and resumed["streams"]["d"]["replayed"] == 1, resumed  # entry 2, then the gap at 3
        got: dict[int, str] = {}
        while True:
            frame = await recv(ws)
            assert frame["id"] == "d", frame
            if frame["op"] == "end":
                break
            got[frame["seq"]] = frame["data"]
        assert frame["reason"] == "complete" and sorted(got) == list(range(2, 30)), "the stream regenerated past the dropped entries"
        assert "forged" not in "".join(got.values())
        assert "dropped a malformed replay entry" in b.log()
        await ws.close()

        # Second session: its record's stream spec is not JSON.
        (sess_key,) = [k for k in r.scan_iter("sp-sess:sess:*") if r.hget(k, "id") and k.decode().endswith(digest(second))]
        r.hset(sess_key, "s:d", b"{not json")
        ws = await connect(b)
        await send(ws, op="resume", token=second, streams={"d": 1})
        assert (await recv(ws))["code"] == "resume_failed"
        await send(ws, op="ping")
        assert (await recv(ws))["op"] == "pong"
        await ws.close()
        assert "is malformed" in b.log() and "Traceback" not in b.log()
    finally:
        r.close()
        a.stop()
        b.stop()


def _owner_of(r: Any, replay_key: bytes, token: str) -> bool:
    """Whether a replay stream belongs to the session of `token` (its key holds the session id)."""
    session_id = r.hget(f"sp-sess:sess:{digest(token)}", "id").decode()
    return replay_key.decode().startswith(f"sp-sess:replay:{session_id}:")
