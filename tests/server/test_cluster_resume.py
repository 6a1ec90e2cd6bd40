"""Sessions outlive their node: three server processes on one real redis-server, the node holding a session
SIGKILLed mid-stream, the client resuming on another node (by hand and with the Python SDK by itself)."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import websockets

from streamplex import connect as sdk_connect
from streamplex.server.engine.asr import SAMPLE_RATE
from streamplex.server.protocol import parse_server_binary
from tests.channels.mediafiles import MEDIA, SPEECH, http_server
from tests.nginxproc import NGINX, running_nginx
from tests.redisproc import RedisProc, running_redis
from tests.serverproc import ROOT, ServerProc, collect, connect, recv, send, start_server

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed (scripts/packages/apt-test.txt)")

TEXT = "".join(f"line {i:03d} of a paced document that outlives the node it started on.\n" for i in range(60))
TEXT_PARAMS = {"text": TEXT, "unit": "words", "chunk_size": 4, "interval_ms": 15}
RECORDS = [{"id": i, "name": f"row {i}", "score": f"{i / 7:.4f}"} for i in range(400)]
DATA_PARAMS = {"records": RECORDS, "format": "csv", "chunk_size": 5, "interval_ms": 15}
CSV = "id,name,score\r\n" + "".join(f"{r['id']},{r['name']},{r['score']}\r\n" for r in RECORDS)


class Cluster:
    """Three nodes on one Redis; a node killed by a test is started again for the next one."""

    def __init__(self, tmp: Path, redis_server: RedisProc) -> None:
        self.tmp = tmp
        self.redis = redis_server
        self.nodes: list[ServerProc] = []
        for name in ("node-a", "node-b", "node-c"):
            self.nodes.append(self._start(name))

    def _start(self, name: str) -> ServerProc:
        # overload_lag 0: a loaded CI host must not refuse these tests' subscriptions (admission is tested elsewhere).
        node = start_server(
            self.tmp,
            node=name,
            redis_url=self.redis.url,
            redis_prefix="sp-resume",
            resume_window=20,
            overload_lag=0,
            media_allow_urls=True,
            media_url_allow="127.0.0.1/32",
        )
        node.name = name  # type: ignore[attr-defined]
        return node

    def revive(self) -> None:
        self.nodes = [n if n.proc.poll() is None else self._start(n.name) for n in self.nodes]  # type: ignore[attr-defined]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProc]:
    with running_redis(tmp_path_factory.mktemp("redis")) as proc:
        yield proc


@pytest.fixture(scope="module")
def cluster_proc(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisProc) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("cluster"), redis_server)
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster(cluster_proc: Cluster) -> Cluster:
    cluster_proc.revive()
    if cluster_proc.redis.proc is None or cluster_proc.redis.proc.poll() is not None:
        cluster_proc.redis.start()
    return cluster_proc


class Reader:
    """Every chunk and end of the streams read on one raw connection, checked for duplicates as they come."""

    def __init__(self) -> None:
        self.chunks: dict[str, dict[int, Any]] = {"t": {}, "d": {}}
        self.ends: dict[str, dict[str, Any]] = {}

    async def read(self, ws: websockets.ClientConnection, until: Any, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, f"timed out: {({k: len(v) for k, v in self.chunks.items()}, self.ends)}"
            frame = await recv(ws, timeout)
            if frame["op"] == "chunk":
                assert frame["seq"] not in self.chunks[frame["id"]], f"{frame['id']} seq {frame['seq']} delivered twice"
                self.chunks[frame["id"]][frame["seq"]] = frame["data"]
            elif frame["op"] == "end":
                self.ends[frame["id"]] = frame

    def last(self) -> dict[str, int]:
        return {sid: max(chunks, default=-1) for sid, chunks in self.chunks.items()}

    def text(self, sid: str) -> str:
        chunks = self.chunks[sid]
        assert sorted(chunks) == list(range(len(chunks))), f"{sid}: seqs not contiguous from 0"
        return "".join(chunks[i] for i in range(len(chunks)))


async def _open_both(node: ServerProc, interval_ms: int = 15) -> tuple[websockets.ClientConnection, str]:
    ws = await connect(node)
    await send(ws, op="subscribe", id="t", channel="text", params={**TEXT_PARAMS, "interval_ms": interval_ms})
    await send(ws, op="subscribe", id="d", channel="data", params={**DATA_PARAMS, "interval_ms": interval_ms * 2})
    return ws, ws.ready["resume"]["token"]  # type: ignore[attr-defined]


async def test_sigkilled_node_the_client_resumes_on_another_and_gets_everything_once(cluster: Cluster) -> None:
    a, b, _ = cluster.nodes
    ws, token = await _open_both(a)
    reader = Reader()
    await reader.read(ws, lambda: len(reader.chunks["t"]) >= 20 and len(reader.chunks["d"]) >= 10)
    a.stop(signal.SIGKILL)
    with pytest.raises(websockets.ConnectionClosed):
        await reader.read(ws, lambda: False, timeout=5)
    # Say the client had not processed its last 5 chunks of each: node B replays them from Redis.
    last = {sid: n - 5 for sid, n in reader.last().items()}
    for sid, chunks in reader.chunks.items():
        for seq in [s for s in chunks if s > last[sid]]:
            del chunks[seq]
    ws = await connect(b)
    await send(ws, op="resume", token=token, streams=last)
    resumed = await recv(ws)
    assert resumed["op"] == "resumed", resumed
    assert {sid: (s["resumed"], s["replayed"] > 0) for sid, s in resumed["streams"].items()} == {"t": (True, True), "d": (True, True)}, resumed
    await reader.read(ws, lambda: len(reader.ends) == 2)
    assert reader.ends["t"]["reason"] == reader.ends["d"]["reason"] == "complete", reader.ends
    assert reader.text("t") == TEXT
    assert reader.text("d") == CSV
    assert "taken over from node node-a" in b.log()
    await ws.close()


async def test_a_sigkilled_owner_is_taken_over_at_once_however_long_its_heartbeat_key_lives(cluster: Cluster) -> None:
    a, b, _ = cluster.nodes
    ws, token = await _open_both(a)
    reader = Reader()
    await reader.read(ws, lambda: len(reader.chunks["t"]) >= 10)
    a.stop(signal.SIGKILL)
    # Node A's heartbeat key says it is alive for 60 s more: only Redis's closed connection says it is gone.
    with cluster.redis.client() as admin:
        admin.set("sp-resume:node:node-a", "1", px=60_000)
    try:
        with pytest.raises(websockets.ConnectionClosed):
            await reader.read(ws, lambda: False, timeout=5)
        ws = await connect(b)
        await send(ws, op="resume", token=token, streams=reader.last())
        resumed = await recv(ws)
        assert resumed["op"] == "resumed" and all(s["resumed"] for s in resumed["streams"].values()), resumed
        await reader.read(ws, lambda: len(reader.ends) == 2)
        assert reader.text("t") == TEXT and reader.text("d") == CSV
        assert "taken over from node node-a, gone (its Redis connection closed)" in b.log()
        assert "did not hand session" not in b.log()
        await ws.close()
    finally:
        with cluster.redis.client() as admin:
            admin.delete("sp-resume:node:node-a")


async def test_a_node_restarted_under_its_name_takes_over_the_sessions_of_its_killed_process(cluster: Cluster) -> None:
    ws, token = await _open_both(cluster.nodes[0])
    reader = Reader()
    await reader.read(ws, lambda: len(reader.chunks["t"]) >= 10)
    cluster.nodes[0].stop(signal.SIGKILL)
    with pytest.raises(websockets.ConnectionClosed):
        await reader.read(ws, lambda: False, timeout=5)
    cluster.revive()  # node-a again, a new process
    a = cluster.nodes[0]
    ws = await connect(a)
    await send(ws, op="resume", token=token, streams=reader.last())
    resumed = await recv(ws)
    assert resumed["op"] == "resumed" and all(s["resumed"] for s in resumed["streams"].values()), resumed
    await reader.read(ws, lambda: len(reader.ends) == 2)
    assert reader.text("t") == TEXT and reader.text("d") == CSV
    assert "taken over from node node-a, an earlier process of this node" in a.log()
    await ws.close()


async def test_live_owner_hands_the_session_over_and_stops_its_streams(cluster: Cluster) -> None:
    a, _, c = cluster.nodes
    ws, token = await _open_both(a)
    reader = Reader()
    await reader.read(ws, lambda: len(reader.chunks["t"]) >= 10)
    ws.transport.abort()  # a lost network: node A keeps the session waiting, its streams going on
    await asyncio.sleep(0.3)
    ws = await connect(c)
    await send(ws, op="resume", token=token, streams=reader.last())
    resumed = await recv(ws)
    assert resumed["op"] == "resumed" and resumed["streams"]["t"]["replayed"] > 0, resumed
    await reader.read(ws, lambda: len(reader.ends) == 2)
    assert reader.text("t") == TEXT and reader.text("d") == CSV
    assert "handed over to another node" in a.log()
    await ws.close()


async def test_half_open_connection_on_the_same_node_is_closed_with_4010(cluster: Cluster) -> None:
    b = cluster.nodes[1]
    old, token = await _open_both(b)
    reader = Reader()
    await reader.read(old, lambda: len(reader.chunks["t"]) >= 5)
    ws = await connect(b)  # the old socket still looks alive to the server
    await send(ws, op="resume", token=token, streams=reader.last())
    assert (await recv(ws))["op"] == "resumed"
    with pytest.raises(websockets.ConnectionClosed) as info:
        while True:
            await old.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 4010
    await reader.read(ws, lambda: len(reader.ends) == 2)
    assert reader.text("t") == TEXT and reader.text("d") == CSV
    await ws.close()


AUDIO_PARAMS = {"source": SPEECH, "format": "wav", "chunk_ms": 50, "sample_rate": 8000, "start_ms": 4500}  # 2.7 s, paced


async def _media_chunks(ws: websockets.ClientConnection, sid: str, got: dict[int, Any], until: Any) -> dict[str, Any] | None:
    """Read `sid`'s chunks (JSON data or binary payloads by seq, none twice) until `until()` or its `end`, which it returns."""
    while not until():
        message = await asyncio.wait_for(ws.recv(), 20)
        if isinstance(message, bytes):
            frame_id, seq, data = parse_server_binary(message)
        elif (frame := orjson.loads(message)).get("id") != sid or frame["op"] not in ("chunk", "end"):
            continue
        elif frame["op"] == "end":
            return frame
        else:
            frame_id, seq, data = sid, frame["seq"], frame["data"]
        if frame_id == sid:
            assert seq not in got, f"seq {seq} delivered twice"
            got[seq] = data
    return None


async def test_a_paced_audio_stream_goes_on_on_another_node_as_an_uninterrupted_run(cluster: Cluster) -> None:
    a, b, c = cluster.nodes
    reference = await connect(c)
    await send(reference, op="subscribe", id="au", channel="audio", params=AUDIO_PARAMS)
    ws = await connect(a)
    token = ws.ready["resume"]["token"]  # type: ignore[attr-defined]
    await send(ws, op="subscribe", id="au", channel="audio", params=AUDIO_PARAMS)
    expected: dict[int, Any] = {}
    reading = asyncio.create_task(_media_chunks(reference, "au", expected, lambda: False))
    got: dict[int, Any] = {}
    await _media_chunks(ws, "au", got, lambda: len(got) >= 15)
    a.stop(signal.SIGKILL)
    last = max(got) - 3  # say the client had not processed its last 3 chunks: node B replays them from Redis
    got = {seq: data for seq, data in got.items() if seq <= last}
    ws = await connect(b)
    await send(ws, op="resume", token=token, streams={"au": last})
    resumed = await recv(ws)
    assert resumed["op"] == "resumed" and resumed["streams"]["au"]["resumed"] and resumed["streams"]["au"]["replayed"] > 0, resumed
    end = await _media_chunks(ws, "au", got, lambda: False)
    assert end is not None and end["reason"] == "complete", end
    assert (await reading)["reason"] == "complete"  # type: ignore[index]
    assert sorted(got) == list(range(len(got))) and got == expected
    assert "audio) goes on at chunk" in b.log()
    await ws.close()
    await reference.close()


async def test_a_stream_that_cannot_go_on_ends_with_producer_lost(cluster: Cluster) -> None:
    a, b, _ = cluster.nodes
    with http_server(MEDIA) as base:  # a URL may answer other bytes on another fetch: the stream cannot restart
        ws = await connect(a)
        token = ws.ready["resume"]["token"]  # type: ignore[attr-defined]
        await send(ws, op="subscribe", id="au", channel="audio", params={**AUDIO_PARAMS, "source": None, "audio_url": f"{base}/{SPEECH}"})
        got: dict[int, Any] = {}
        await _media_chunks(ws, "au", got, lambda: len(got) >= 6)
        a.stop(signal.SIGKILL)
        ws = await connect(b)
        await send(ws, op="resume", token=token, streams={"au": max(got)})
        assert (await recv(ws))["op"] == "resumed"
        end = await _media_chunks(ws, "au", got, lambda: False)
    assert end == {"op": "end", "id": "au", "reason": "producer_lost"}, end
    assert "may differ from run to run" in b.log()
    await ws.close()


async def read_text_and_data_killing(client: Any, victim: ServerProc) -> tuple[Any, Any, dict[str, list[str]]]:
    """Subscribe the SDK to the text and data streams and read both to their end, SIGKILLing `victim` after the 15th text chunk."""
    text = client.subscribe("text", id="t", **TEXT_PARAMS)
    data = client.subscribe("data", id="d", **DATA_PARAMS)
    got: dict[str, list[str]] = {"t": [], "d": []}

    async def read(sub: Any, sid: str) -> None:
        async for chunk in sub:
            got[sid].append(chunk.data)
            if sid == "t" and len(got["t"]) == 15:
                victim.stop(signal.SIGKILL)

    await asyncio.wait_for(asyncio.gather(read(text, "t"), read(data, "d")), 60)
    return text, data, got


async def test_the_sdk_resumes_on_another_node_by_itself_at_its_first_attempt(cluster: Cluster) -> None:
    a, b, c = cluster.nodes
    # A backoff longer than the test: the first attempt after the node's death must not wait it.
    async with sdk_connect([a.url, b.url, c.url], a.key, backoff=(90.0, 90.0), max_retries=20) as client:
        text, data, got = await read_text_and_data_killing(client, a)
        assert client.resumes == 1 and text.restarts == data.restarts == 0
        assert client.url != a.url
    assert "".join(got["t"]) == TEXT and "".join(got["d"]) == CSV
    assert text.reason == data.reason == "complete"


async def test_redis_restarted_mid_run_nodes_reconnect_and_sessions_resume_again(cluster: Cluster) -> None:
    a, b, _ = cluster.nodes
    ws, token = await _open_both(a, interval_ms=40)  # long enough to outlast the outage
    reader = Reader()
    await reader.read(ws, lambda: len(reader.chunks["t"]) >= 5)
    cluster.redis.stop()  # no persistence: every record and replay entry is lost
    await reader.read(ws, lambda: "Redis at" in a.log() and "unreachable" in a.log(), timeout=15)
    # While Redis is away, no other node can take the session over ...
    other = await connect(b)
    await send(other, op="resume", token=token, streams=reader.last())
    assert (await recv(other))["code"] == "resume_failed"
    await other.close()
    # ... while the node that holds it still resumes it from memory.
    ws.transport.abort()
    ws = await connect(a)
    await send(ws, op="resume", token=token, streams=reader.last())
    resumed = await recv(ws)
    assert resumed["op"] == "resumed" and all(s["resumed"] for s in resumed["streams"].values()), resumed
    cluster.redis.start()
    await reader.read(ws, lambda: "reachable again" in a.log() and "reachable again" in b.log(), timeout=30)
    await asyncio.sleep(1.0)  # node A's next heartbeat writes its sessions' records again
    # ... once it is back, node A has written the session again: it outlives A's death, and nothing is lost
    # (the chunks sent during the outage are regenerated: text and data restart at a position).
    assert a.metric("streamplex_redis_session_writes_dropped_total") > 0, "node A could not write while Redis was away"
    assert not reader.ends, "the streams must still be running"
    a.stop(signal.SIGKILL)
    with pytest.raises(websockets.ConnectionClosed):
        await reader.read(ws, lambda: False, timeout=5)
    ws = await connect(b)
    await send(ws, op="resume", token=token, streams=reader.last())
    resumed = await recv(ws)
    assert resumed["op"] == "resumed" and all(s["resumed"] for s in resumed["streams"].values()), resumed
    await reader.read(ws, lambda: len(reader.ends) == 2)
    assert reader.text("t") == TEXT and reader.text("d") == CSV
    await ws.close()


def _by_name(cluster: Cluster, name: str) -> ServerProc:
    return next(n for n in cluster.nodes if n.name == name)  # type: ignore[attr-defined]


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (scripts/packages/apt-test.txt)")
async def js_failover(cluster: Cluster, urls: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """tests/client_js/failover.mjs on `urls` reading the text and data streams, the node holding its session
    SIGKILLed a few chunks in: its first line (the node it reached) and its report, checked whole and complete."""
    proc = subprocess.Popen(
        ["node", str(ROOT / "tests" / "client_js" / "failover.mjs"), urls, cluster.nodes[0].key, json.dumps(TEXT_PARAMS), json.dumps(DATA_PARAMS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        first = json.loads(await asyncio.to_thread(proc.stdout.readline))
        await asyncio.sleep(0.3)  # a few chunks in
        _by_name(cluster, first["node"]).stop(signal.SIGKILL)
        out, err = await asyncio.to_thread(proc.communicate, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-4000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert report["text"] == TEXT and report["data"] == CSV and report["seqs_in_order"], report
    assert report["reasons"] == ["complete", "complete"] and report["resumes"] == 1 and report["restarts"] == 0, report
    return first, report


async def test_through_the_shipped_nginx_the_sdk_and_streamplex_js_resume_by_themselves(cluster: Cluster, tmp_path: Path) -> None:
    with running_nginx(tmp_path, [n.port for n in cluster.nodes]) as nginx:
        # The Python SDK, with the one URL a deployment gives its clients.
        async with sdk_connect(nginx.ws(), cluster.nodes[0].key, backoff=(0.1, 1.0), max_retries=20) as client:
            holder = _by_name(cluster, client.ready["node"])
            text, data, got = await read_text_and_data_killing(client, holder)
            assert client.resumes == 1 and text.restarts == data.restarts == 0
            assert client.ready["node"] != holder.name  # type: ignore[attr-defined]
        assert "".join(got["t"]) == TEXT and "".join(got["d"]) == CSV

    # streamplex.js under Node, through nginx again (over the revived node's new port).
    cluster.revive()
    js_dir = tmp_path / "js"
    js_dir.mkdir()
    with running_nginx(js_dir, [n.port for n in cluster.nodes]) as nginx:
        first, report = await js_failover(cluster, nginx.ws())
        assert report["node"] != first["node"]


async def test_streamplex_js_with_the_nodes_urls_resumes_on_another_node(cluster: Cluster) -> None:
    first, report = await js_failover(cluster, ",".join(n.url for n in cluster.nodes))
    assert first["node"] == cluster.nodes[0].name  # type: ignore[attr-defined]
    assert report["node"] == cluster.nodes[1].name  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def chat_nodes(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisProc) -> Iterator[list[ServerProc]]:
    """Two nodes with the bundled chat model, loaded."""
    tmp = tmp_path_factory.mktemp("chat")
    nodes: list[ServerProc] = []
    try:
        for name in ("chat-a", "chat-b"):
            nodes.append(start_server(tmp, node=name, redis_url=redis_server.url, redis_prefix="sp-chat", chat_model="smollm2-135m-instruct", overload_lag=0))
        deadline = time.monotonic() + 300
        while any(orjson.loads(n.get("/ready")[1])["channels"]["chat"] != "available" for n in nodes):
            assert time.monotonic() < deadline, "the chat model did not load"
            time.sleep(0.5)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


async def test_a_chat_reply_goes_on_on_another_node_as_an_uninterrupted_run(chat_nodes: list[ServerProc]) -> None:
    a, b = chat_nodes
    params = {"message": "Tell me about the history of Rome.", "max_tokens": 48}
    ws = await connect(b)
    await send(ws, op="subscribe", id="c", channel="chat", params=params)
    chunks, end = await collect(ws, "c", timeout=60)
    await ws.close()
    expected = "".join(c["data"].get("delta", "") for c in chunks)
    assert end["reason"] == "complete" and chunks[-1]["data"]["finish_reason"] == "length"

    ws = await connect(a)
    token = ws.ready["resume"]["token"]  # type: ignore[attr-defined]
    await send(ws, op="subscribe", id="c", channel="chat", params=params)
    got: dict[int, Any] = {}
    while sum("delta" in d for d in got.values()) < 6:
        frame = await recv(ws, 60)
        if frame["op"] == "chunk":
            got[frame["seq"]] = frame["data"]
    a.stop(signal.SIGKILL)
    ws = await connect(b)
    await send(ws, op="resume", token=token, streams={"c": max(got)})
    resumed = await recv(ws)
    assert resumed["op"] == "resumed" and resumed["streams"]["c"]["resumed"], resumed
    rest, end = await collect(ws, "c", timeout=60)
    await ws.close()
    for frame in rest:
        assert frame["seq"] not in got, "a chunk came twice"
        got[frame["seq"]] = frame["data"]
    assert end["reason"] == "complete" and sorted(got) == list(range(len(got)))
    assert "".join(got[i].get("delta", "") for i in sorted(got)) == expected
    assert got[max(got)]["usage"]["completion_tokens"] == 48


@pytest.fixture(scope="module")
def asr_nodes(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisProc) -> Iterator[list[ServerProc]]:
    """Two nodes with Whisper tiny.en, loaded."""
    tmp = tmp_path_factory.mktemp("asr")
    nodes: list[ServerProc] = []
    try:
        for name in ("asr-a", "asr-b"):
            nodes.append(_asr_node(tmp, redis_server.url, name))
        _wait_for_transcription(nodes)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def _asr_node(tmp: Path, redis_url: str, name: str) -> ServerProc:
    node = start_server(tmp, node=name, redis_url=redis_url, redis_prefix="sp-asr", asr_model="whisper-tiny.en", overload_lag=0, resume_window=20)
    node.name = name  # type: ignore[attr-defined]
    return node


def _wait_for_transcription(nodes: list[ServerProc]) -> None:
    deadline = time.monotonic() + 300
    while any(orjson.loads(n.get("/ready")[1])["channels"]["transcription"] != "available" for n in nodes):
        assert time.monotonic() < deadline, "the transcription model did not load"
        time.sleep(0.5)


def _speech_pcm() -> bytes:
    from tests.asrmodel import ENGLISH, speech  # the model helpers import torch: only for this test

    pause = np.zeros(SAMPLE_RATE // 2, dtype=np.float32)
    audio = np.concatenate([part for text in ENGLISH[:3] for part in (speech(text), pause)])
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


async def _transcribe_with_sdk(url: str, key: str, pcm: bytes, frame: int, pace: float, kill: Any = None) -> tuple[list[Any], Any, Any]:
    """Push `pcm` to a live transcription in `frame`-byte pushes at `pace` times real time (0: at once) and read every
    chunk; `kill(client)` is called once the first final came. The chunks' data, the subscription and the client."""
    async with sdk_connect(url, key, backoff=(0.1, 1.0), max_retries=20, input_buffer=1 << 20) as client:
        sub = client.subscribe("transcription", id="live", language="en")
        await sub.open()
        got: list[Any] = []
        held: list[int] = []

        async def push() -> None:
            started = time.monotonic()
            for i in range(0, len(pcm), frame):
                if pace:
                    await asyncio.sleep(max(0.0, started + i / 2 / SAMPLE_RATE / pace - time.monotonic()))
                await sub.push(pcm[i : i + frame])
                held.append(len(sub._input.data))  # type: ignore[union-attr]
            await sub.end_input()

        async def read() -> None:
            async for chunk in sub:
                got.append(chunk.data)
                if kill is not None and chunk.data["type"] == "final" and sum(d["type"] == "final" for d in got) == 1:
                    kill(client)

        await asyncio.wait_for(asyncio.gather(push(), read()), 180)
        assert max(held) <= 1 << 20, "the SDK holds at most `input_buffer` bytes of unacknowledged input"
        return got, sub, client


@pytest.mark.models
async def test_a_live_transcription_taken_over_needs_the_clients_input_from_its_saved_state(asr_nodes: list[ServerProc]) -> None:
    """Handed over from a live node: the `resumed` report says from which byte the client sends its audio again (at or
    before what it was acknowledged); a stream whose client no longer holds that byte ends with `input_lost`."""
    a, b = asr_nodes
    ws = await connect(a)
    token = ws.ready["resume"]["token"]  # type: ignore[attr-defined]
    for sid in ("ok", "lost"):
        await send(ws, op="subscribe", id=sid, channel="transcription", params={"language": "en"})
    silence = bytes(SAMPLE_RATE // 10 * 2)
    for _ in range(25):  # 2.5 s each: a state is saved every second of audio, silence too
        for sid in ("ok", "lost"):
            await ws.send(bytes([len(sid)]) + sid.encode() + silence)
    acks: dict[str, int] = {}
    subscribed = []
    while len(acks) < 2 or min(acks.values()) < SAMPLE_RATE * 2:
        frame = await recv(ws, 10)
        if frame["op"] == "subscribed":
            subscribed.append(frame)
        elif frame["op"] == "ack":
            assert frame["input"] > acks.get(frame["id"], 0) and frame["input"] % 2 == 0, frame
            acks[frame["id"]] = frame["input"]
    assert subscribed == [{"op": "subscribed", "id": sid, "channel": "transcription", "ack": True} for sid in ("ok", "lost")]
    other = await connect(b)
    await send(other, op="resume", token=token, streams={"ok": 0, "lost": 0}, inputs={"ok": acks["ok"], "lost": acks["lost"] + 2})
    resumed = await recv(other)
    assert resumed["op"] == "resumed" and resumed["streams"]["ok"]["input"] >= acks["ok"], resumed
    assert await recv(other) == {"op": "end", "id": "lost", "reason": "input_lost"}
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await recv(ws, 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4010
    position = resumed["streams"]["ok"]["input"]
    await other.send(bytes([2]) + b"ok" + bytes(25 * len(silence) - position))  # the rest of the 2.5 s of silence
    await send(other, op="push", id="ok", end=True)
    chunks, end = await collect(other, "ok", timeout=30)
    assert end["reason"] == "complete" and chunks[-1]["data"]["duration_s"] == 2.5, chunks
    assert "needs the client's input from byte" in b.log()
    await other.close()


@pytest.mark.models
async def test_a_file_transcription_handed_over_goes_on_as_an_uninterrupted_run(asr_nodes: list[ServerProc]) -> None:
    """A file read at real pace, its session handed over after the first final: the other node reads the file again from
    the saved state's buffer and every chunk equals a run read at full speed on one node."""
    a, b = asr_nodes
    params = {"source": "speech.wav", "language": "en"}
    ws = await connect(b)
    await send(ws, op="subscribe", id="f", channel="transcription", params=params)
    expected, end = await collect(ws, "f", timeout=60)
    await ws.close()
    assert end["reason"] == "complete" and sum(c["data"]["type"] == "final" for c in expected) >= 2, expected

    ws = await connect(a)
    token = ws.ready["resume"]["token"]  # type: ignore[attr-defined]
    await send(ws, op="subscribe", id="f", channel="transcription", params={**params, "realtime": True})
    got: dict[int, Any] = {}
    while not any(d["type"] == "final" for d in got.values()):
        frame = await recv(ws, 30)
        if frame["op"] == "chunk":
            got[frame["seq"]] = frame["data"]
    went_on = b.log().count("(transcription) goes on at chunk")
    other = await connect(b)
    await send(other, op="resume", token=token, streams={"f": max(got)})
    resumed = await recv(other)
    assert resumed["op"] == "resumed" and resumed["streams"]["f"]["resumed"] and "input" not in resumed["streams"]["f"], resumed
    rest, end = await collect(other, "f", timeout=60)
    await other.close()
    for frame in rest:
        assert frame["seq"] not in got, "a chunk came twice"
        got[frame["seq"]] = frame["data"]
    assert end["reason"] == "complete" and got[max(got)]["type"] == "transcript"
    assert [got[i] for i in sorted(got)] == [c["data"] for c in expected]
    assert sorted(got) == list(range(len(expected)))
    assert b.log().count("(transcription) goes on at chunk") == went_on + 1


@pytest.mark.models
async def test_a_live_transcription_goes_on_on_another_node_through_nginx_as_an_uninterrupted_run_sdk_and_streamplex_js(
    asr_nodes: list[ServerProc], tmp_path: Path
) -> None:
    """The node holding a live transcription is SIGKILLed after its first final: the SDK resumes through nginx on the
    other node, sends its audio again from the last acknowledged position, and every chunk (partials, finals, the
    transcript) equals a run without the kill, whose audio was pushed all at once (decoding follows the audio only)."""
    pcm = _speech_pcm()
    a, b = asr_nodes
    expected, _, _ = await _transcribe_with_sdk(b.url, b.key, pcm, SAMPLE_RATE, 0)
    assert expected[-1]["type"] == "transcript" and expected[-1]["segments"] >= 2, expected

    def kill(client: Any) -> None:
        holder = next(n for n in asr_nodes if n.name == client.ready["node"])  # type: ignore[attr-defined]
        killed.append(holder)
        holder.stop(signal.SIGKILL)

    killed: list[ServerProc] = []
    with running_nginx(tmp_path, [n.port for n in asr_nodes]) as nginx:
        got, sub, client = await _transcribe_with_sdk(nginx.ws(), a.key, pcm, SAMPLE_RATE // 10 * 2, 2.0, kill)
    assert killed and client.resumes == 1 and sub.restarts == 0 and sub.reason == "complete"
    survivor = next(n for n in asr_nodes if n is not killed[0])
    assert "goes on at chunk" in survivor.log()
    assert [d["type"] for d in got] == [d["type"] for d in expected]
    assert got == expected

    # streamplex.js under Node, through nginx again (the killed node started again).
    asr_nodes[asr_nodes.index(killed[0])] = _asr_node(killed[0].log_path.parent, a.env["STREAMPLEX_REDIS_URL"], killed[0].name)  # type: ignore[attr-defined]
    _wait_for_transcription(asr_nodes)
    pcm_file = tmp_path / "speech.pcm"
    pcm_file.write_bytes(pcm)
    js_dir = tmp_path / "js"
    js_dir.mkdir()
    with running_nginx(js_dir, [n.port for n in asr_nodes]) as nginx:
        proc = subprocess.Popen(
            ["node", str(ROOT / "tests" / "client_js" / "transcribe_failover.mjs"), nginx.ws(), a.key, str(pcm_file)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        try:
            assert proc.stdout is not None
            first = json.loads(await asyncio.to_thread(proc.stdout.readline))
            assert json.loads(await asyncio.to_thread(proc.stdout.readline)) == {"final": 1}
            next(n for n in asr_nodes if n.name == first["node"]).stop(signal.SIGKILL)  # type: ignore[attr-defined]
            out, err = await asyncio.to_thread(proc.communicate, timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err[-4000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert report["reason"] == "complete" and report["resumes"] == 1 and report["restarts"] == 0 and report["node"] != first["node"], report
    assert report["max_held"] <= 1 << 20
    assert report["chunks"] == expected
