"""The model tier with real processes: a redis-server, one edge node whose chat is `remote` (it loads no torch), two
model workers (`--role model`); a model worker SIGKILLed mid-generation, its job claimed by the other."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from streamplex.channels.analysis import AnalysisChannel
from streamplex.channels.chat import ChatChannel, ChatParams
from streamplex.channels.translation import TranslationChannel
from streamplex.server.broker import MemoryBroker
from streamplex.server.channel import Channel, ChannelError, Checkpoint, Services, StreamContext
from streamplex.server.config import Settings
from streamplex.server.hub import Hub
from streamplex.server.logbuffer import RingLogHandler
from streamplex.server.model_tier import BEAT, GROUP, Keys
from streamplex.server.registry import discover
from streamplex.server.remote import ModelClient, families, remote_capable
from tests.chatmodel import bundled_runner, engine_with
from tests.redisproc import RedisProc, running_redis
from tests.server.test_lean_start import MODEL_LIBRARIES, loaded
from tests.serverproc import ServerProc, collect, connect, recv, send, start_model_worker, start_server

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed (scripts/packages/apt-test.txt)")

PROMPT = {"message": "Tell me about the history of Rome.", "max_tokens": 32}
CLAIM_IDLE = 1.0


class Tier:
    """An edge node and two model workers on one Redis; the tests kill workers, so it is module-scoped and ordered."""

    def __init__(self, tmp: Path, redis_server: RedisProc) -> None:
        common = {"redis_url": redis_server.url, "redis_prefix": "sp-tier", "remote_channels": "chat,translation,analysis", "model_claim_idle": CLAIM_IDLE}
        device = os.environ.get("STREAMPLEX_TEST_DEVICE", "cpu")
        self.workers: list[ServerProc] = []
        self.edge: ServerProc | None = None
        self.other: ServerProc | None = None  # a second edge node, for a session taken over from the first
        try:
            for name in ("worker-a", "worker-b"):
                self.workers.append(start_model_worker(tmp, node=name, chat_model="smollm2-135m-instruct", device=device, dtype="float32", **common))
            self.edge = start_server(tmp, node="edge", **common)
            self.other = start_server(tmp, node="edge-b", **common)
            deadline = time.monotonic() + 300
            while self.ready("chat") != "available":
                assert time.monotonic() < deadline, "the model workers did not load the chat model"
                time.sleep(0.5)
            while self.edge.metric("streamplex_model_workers", 'channel="chat"') < 2:
                assert time.monotonic() < deadline, "the edge node does not see both workers"
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise

    def ready(self, channel: str) -> str:
        assert self.edge is not None
        return str(orjson.loads(self.edge.get("/ready")[1])["channels"][channel])

    def running(self, worker: ServerProc) -> float:
        return worker.metric("streamplex_model_worker_jobs")

    def stop(self) -> None:
        for proc in [*self.workers, *(p for p in (self.edge, self.other) if p is not None)]:
            proc.stop()


@pytest.fixture(scope="module")
def tier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tier]:
    tmp = tmp_path_factory.mktemp("tier")
    with running_redis(tmp) as redis_server:
        tier = Tier(tmp, redis_server)
        try:
            yield tier
        finally:
            tier.stop()


LOCAL: dict[str, str] = {}


async def local_reply() -> str:
    """The text a local chat channel replies to PROMPT (the bundled model in this process), made once."""
    if "text" not in LOCAL:
        async with engine_with(bundled_runner()) as engine:
            services = Services(Settings(), Hub(MemoryBroker()), RingLogHandler(10, "local"), dict, engine)
            stream = ChatChannel(services).stream(ChatParams(**PROMPT), StreamContext("l", asyncio.Queue()))
            LOCAL["text"] = text([c.data if isinstance(c, Checkpoint) else c async for c in stream])
    return LOCAL["text"]


async def local_chunks(cls: type[Channel], params: dict[str, Any]) -> list[Any]:
    """The chunks a local channel (no engine model) yields for `params`, without their timings."""
    channel = cls(Services(Settings(embedding_model=""), Hub(MemoryBroker()), RingLogHandler(10, "local"), dict))
    await channel.start()
    try:
        return [untimed(c) async for c in channel.stream(channel.parse(params), StreamContext("l", asyncio.Queue()))]
    finally:
        await channel.stop()


def untimed(chunk: Any) -> Any:
    return {k: v for k, v in chunk.items() if k != "duration_ms"} if isinstance(chunk, dict) else chunk


def text(chunks: list[Any]) -> str:
    return "".join(c.get("delta", "") for c in chunks)


async def test_a_remote_chat_reply_equals_a_local_one_and_the_edge_loads_no_torch(tier: Tier) -> None:
    assert tier.edge is not None
    ws = await connect(tier.edge)
    await send(ws, op="subscribe", id="c", channel="chat", params=PROMPT)
    chunks, end = await collect(ws, "c", timeout=120)
    await ws.close()
    assert end["reason"] == "complete", end
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    remote = [c["data"] for c in chunks]
    assert remote[-1]["finish_reason"] == "length" and remote[-1]["usage"]["completion_tokens"] == PROMPT["max_tokens"]
    assert text(remote) == await local_reply() and len(text(remote)) > 20
    libraries = [path for path in loaded(tier.edge.proc.pid) if any(name in path for name in MODEL_LIBRARIES)]
    assert libraries == [], libraries


async def test_translation_and_analysis_run_remote_as_they_run_locally(tier: Tier) -> None:
    assert tier.edge is not None
    translation = {"text": "The cat is black. I like apples.\nWhere is the station?", "source_lang": "en", "target_lang": "es"}
    analysis = {"content": "I love this city. The trains are terrible. Paris is in France.", "analysis_type": "sentiment"}
    ws = await connect(tier.edge)
    await send(ws, op="subscribe", id="t", channel="translation", params=translation)
    t_chunks, t_end = await collect(ws, "t", timeout=60)
    await send(ws, op="subscribe", id="a", channel="analysis", params=analysis)
    a_chunks, a_end = await collect(ws, "a", timeout=60)
    # checked by the worker (the edge node checks only the schema): the stream ends with the worker's refusal
    await send(ws, op="subscribe", id="bad", channel="translation", params={**translation, "target_lang": "xx"})
    bad, bad_end = await collect(ws, "bad", timeout=60)
    await ws.close()
    assert t_end["reason"] == a_end["reason"] == "complete"
    assert [untimed(c["data"]) for c in t_chunks] == await local_chunks(TranslationChannel, translation)
    assert [untimed(c["data"]) for c in a_chunks] == await local_chunks(AnalysisChannel, analysis)
    assert bad == [] and bad_end["reason"] == "error" and bad_end["error"]["code"] == "invalid_params", bad_end
    assert "no Apertium pair eng-xx" in bad_end["error"]["message"]


async def test_pushed_turns_reach_the_worker(tier: Tier) -> None:
    assert tier.edge is not None
    ws = await connect(tier.edge)
    await send(ws, op="subscribe", id="c", channel="chat", params={"message": "Hi.", "max_tokens": 3, "keep_open": True})
    finals: list[Any] = []
    while len(finals) < 1:
        frame = await recv(ws, 60)
        if frame["op"] == "chunk" and "finish_reason" in frame["data"]:
            finals.append(frame["data"])
    await send(ws, op="push", id="c", data={"message": "And then?"})
    await send(ws, op="push", id="c", end=True)
    chunks, end = await collect(ws, "c", timeout=60)
    await ws.close()
    assert end["reason"] == "complete", end
    finals += [c["data"] for c in chunks if "finish_reason" in c["data"]]
    assert [f["turn"] for f in finals] == [0, 1]
    assert finals[1]["usage"]["prompt_tokens"] > finals[0]["usage"]["prompt_tokens"]  # the second turn's prompt holds the first


async def test_unsubscribing_stops_the_generation_on_the_worker(tier: Tier) -> None:
    assert tier.edge is not None
    ws = await connect(tier.edge)
    await send(ws, op="subscribe", id="c", channel="chat", params={**PROMPT, "max_tokens": 2000})
    deltas = 0
    while deltas < 3:
        frame = await recv(ws, 60)
        deltas += frame.get("op") == "chunk" and "delta" in frame["data"]
    assert sum(tier.running(w) for w in tier.workers) == 1
    await send(ws, op="unsubscribe", id="c")
    deadline = time.monotonic() + 10
    while sum(tier.running(w) for w in tier.workers):
        assert time.monotonic() < deadline, "the worker still runs the job its client left"
        await asyncio.sleep(0.1)
    await ws.close()
    assert any("stops: its client left" in w.log() for w in tier.workers)


async def test_a_worker_killed_mid_generation_is_replaced_without_a_gap_or_a_duplicate(tier: Tier) -> None:
    assert tier.edge is not None
    expected = await local_reply()
    ws = await connect(tier.edge)
    await send(ws, op="subscribe", id="c", channel="chat", params=PROMPT)
    got: dict[int, Any] = {}
    while sum("delta" in d for d in got.values()) < 6:
        frame = await recv(ws, 60)
        if frame["op"] == "chunk":
            assert frame["seq"] not in got
            got[frame["seq"]] = frame["data"]
    busy = [w for w in tier.workers if tier.running(w)]
    assert len(busy) == 1
    busy[0].stop(signal.SIGKILL)
    rest, end = await collect(ws, "c", timeout=120)
    await ws.close()
    for frame in rest:
        assert frame["seq"] not in got, "a chunk came twice"
        got[frame["seq"]] = frame["data"]
    assert end["reason"] == "complete", end
    assert sorted(got) == list(range(len(got)))
    assert text([got[i] for i in sorted(got)]) == expected
    assert got[max(got)]["usage"]["completion_tokens"] == PROMPT["max_tokens"]
    survivor = next(w for w in tier.workers if w is not busy[0])
    assert "claimed from a worker that stopped" in survivor.log()
    assert survivor.metric("streamplex_model_worker_jobs_claimed_total") == 1


async def test_a_remote_stream_goes_on_when_its_edge_node_dies(tier: Tier) -> None:
    """The session moves to another edge node, which queues a new job from the delivered chunks' positions; the workers
    stop the dead node's job."""
    assert tier.edge is not None and tier.other is not None
    expected = await local_reply()
    ws = await connect(tier.edge)
    token = ws.ready["resume"]["token"]  # type: ignore[attr-defined]
    await send(ws, op="subscribe", id="c", channel="chat", params=PROMPT)
    got: dict[int, Any] = {}
    while sum("delta" in d for d in got.values()) < 6:
        frame = await recv(ws, 60)
        if frame["op"] == "chunk":
            got[frame["seq"]] = frame["data"]
    tier.edge.stop(signal.SIGKILL)
    ws = await connect(tier.other)
    await send(ws, op="resume", token=token, streams={"c": max(got)})
    resumed = await recv(ws)
    assert resumed["op"] == "resumed" and resumed["streams"]["c"]["resumed"], resumed
    rest, end = await collect(ws, "c", timeout=120)
    await ws.close()
    for frame in rest:
        assert frame["seq"] not in got, "a chunk came twice"
        got[frame["seq"]] = frame["data"]
    assert end["reason"] == "complete" and sorted(got) == list(range(len(got)))
    assert text([got[i] for i in sorted(got)]) == expected
    deadline = time.monotonic() + 15  # the dead node's job stops once its sign of life is 5 s old (if it has not finished by then)
    while sum(tier.running(w) for w in tier.workers if w.proc.poll() is None):
        assert time.monotonic() < deadline, "the dead edge node's job still runs"
        await asyncio.sleep(0.2)
    tier.edge = tier.other


async def test_with_no_worker_alive_a_remote_channel_is_unavailable(tier: Tier) -> None:
    assert tier.edge is not None
    for worker in tier.workers:
        worker.stop(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while tier.ready("chat") != "unavailable":
        assert time.monotonic() < deadline, "the edge node still sees a worker"
        await asyncio.sleep(0.2)
    ws = await connect(tier.edge)
    await send(ws, op="subscribe", id="c", channel="chat", params=PROMPT)
    frame = await recv(ws)
    await ws.close()
    assert frame["op"] == "error" and frame["code"] == "unavailable", frame
    assert frame["retry_after"] > 0 and "no model worker" in frame["message"]
    assert tier.edge.metric("streamplex_model_workers", 'channel="chat"') == 0


async def test_a_deep_queue_refuses_new_streams_and_shows_in_the_metrics(tmp_path: Path) -> None:
    with running_redis(tmp_path) as redis_server:
        settings = Settings(redis_url=redis_server.url, redis_prefix="sp-queue", remote_channels="chat", model_max_queue=2, node="edge-q")
        client = ModelClient(settings, ["chat"])
        keys = Keys("sp-queue")
        try:
            await client.redis.xgroup_create(keys.jobs("chat"), GROUP, id="0", mkstream=True)
            # a worker's heartbeat as one writes it, for a worker that takes no job
            await client.redis.register_script(BEAT)(keys=[keys.workers, keys.info], args=["w", orjson.dumps({"channels": {"chat": "available"}}), 3000])
            await client.refresh()
            client.fresh = True
            assert client.status("chat").state == "available"
            for _ in range(2):
                await client.submit("chat", PROMPT, StreamContext("s", asyncio.Queue()))
            await client.refresh()
            status = client.status("chat")
            assert status.state == "unavailable" and status.retry_after == settings.model_retry_after
            assert status.reason == "2 jobs wait for a model worker (model_max_queue)"
            gauges = {(m.name, s.labels["channel"]): s.value for m in client.families() for s in m.samples}
            assert gauges[("streamplex_model_queue_depth", "chat")] == 2 and gauges[("streamplex_model_jobs_pending", "chat")] == 0
            assert gauges[("streamplex_model_workers", "chat")] == 1
        finally:
            await client.close()


def test_only_channels_that_can_run_on_a_model_worker_may_be_remote() -> None:
    classes = discover()
    assert sorted(remote_capable(classes, {"chat", "translation", "analysis"})) == ["analysis", "chat", "translation"]
    assert families(remote_capable(classes, {"chat", "analysis"})) == {"chat", "embedding"}
    with pytest.raises(ValueError, match=r"transcription cannot run on a model worker \(the channels that can: analysis, chat, translation\)"):
        remote_capable(classes, {"chat", "transcription"})
    with pytest.raises(ValueError, match="no channel nope"):
        remote_capable(classes, {"nope"})


async def test_a_result_entry_that_no_worker_wrote_ends_the_stream_and_is_never_forwarded(tmp_path: Path) -> None:
    with running_redis(tmp_path) as redis_server:
        settings = Settings(redis_url=redis_server.url, redis_prefix="sp-forged", remote_channels="chat", node="edge-f")
        client = ModelClient(settings, ["chat"])
        keys = Keys("sp-forged")
        try:
            job, entry = await client.submit("chat", PROMPT, StreamContext("s", asyncio.Queue()))
            out = keys.out(job)
            await client.redis.xadd(out, {"k": "c", "s": 0, "d": orjson.dumps({"delta": "real"}), "p": b"null"})
            await client.redis.xadd(out, {"k": "c", "s": 1, "d": b"{not json", "p": b"null"})
            got = []
            with pytest.raises(ChannelError) as refused:
                async for chunk in client.results("chat", job, entry, 0):
                    got.append(chunk.data)
            assert got == [{"delta": "real"}]
            assert refused.value.code == "internal" and "malformed" in refused.value.message
            for forged in ({"k": "e", "r": "error", "c": "not_a_code", "m": "x"}, {"k": "e", "r": "weird"}, {"k": "x"}):
                job, entry = await client.submit("chat", PROMPT, StreamContext("s", asyncio.Queue()))
                await client.redis.xadd(keys.out(job), forged)
                with pytest.raises(ChannelError, match="malformed"):
                    async for _ in client.results("chat", job, entry, 0):
                        pass
        finally:
            await client.close()
