"""/metrics by Prometheus convention: one name per quantity with labels, counters ending in `_total`, the process
collector, and the frame send delay histogram (fed only by frames that had to queue)."""

from __future__ import annotations

import asyncio
import time

from prometheus_client.parser import text_string_to_metric_families

from streamplex.server.outbox import Outbox
from streamplex.server.telemetry import Activity, SendDelay, Stats
from tests.serverproc import ServerProc, collect, connect, send, start_server


def parse(server: ServerProc) -> dict[str, tuple[str, dict[tuple[tuple[str, str], ...], float]]]:
    """Each family's type and samples (by sample name and labels, `le` included) from one scrape."""
    out: dict[str, tuple[str, dict[tuple[tuple[str, str], ...], float]]] = {}
    for family in text_string_to_metric_families(server.get("/metrics")[1].decode()):
        assert family.name not in out, f"family {family.name} exposed twice"
        out[family.name] = (family.type, {(s.name, *sorted(s.labels.items())): s.value for s in family.samples})
    return out


async def test_queued_frames_report_their_wait_and_direct_ones_count_as_zero() -> None:
    delays = SendDelay()
    box = Outbox(max_bytes=1000, delays=delays)
    await box.put("a")
    await box.put("b")  # no hooks attached: both queue
    await asyncio.sleep(0.03)
    assert box.next() == "a" and box.next() == "b" and box.next() is None
    assert delays.observed == 2 and delays.sum >= 0.06
    family = delays.family(frames_out=7)  # 5 more frames were sent at once by the direct path
    samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert samples[("streamplex_frame_send_delay_seconds_bucket", "0.001")] == 5
    assert samples[("streamplex_frame_send_delay_seconds_bucket", "0.025")] == 5
    assert samples[("streamplex_frame_send_delay_seconds_bucket", "+Inf")] == samples[("streamplex_frame_send_delay_seconds_count", None)] == 7


async def test_exposition_follows_the_conventions(server: ServerProc) -> None:
    ws = await connect(server)
    await send(ws, op="subscribe", id="t", channel="text", params={"text": "one two three", "chunk_size": 1, "unit": "words"})
    chunks, end = await collect(ws, "t")
    assert end["reason"] == "complete" and chunks
    await ws.close()
    families = parse(server)
    for name, (kind, samples) in families.items():
        if kind == "counter":
            assert all(sample[0].endswith(("_total", "_created")) for sample in samples), name
    assert families["streamplex_connections"][0] == "gauge" and families["streamplex_connections_accepted"][0] == "counter"
    assert families["streamplex_streams_opened"][1][("streamplex_streams_opened_total", ("channel", "text"))] >= 1
    frames = families["streamplex_frames"][1]
    assert frames[("streamplex_frames_total", ("direction", "out"))] > 0 and frames[("streamplex_frames_total", ("direction", "in"))] > 0
    kind, delay = families["streamplex_frame_send_delay_seconds"]
    assert kind == "histogram" and delay[("streamplex_frame_send_delay_seconds_count",)] == frames[("streamplex_frames_total", ("direction", "out"))]
    for standard in ("process_resident_memory_bytes", "process_cpu_seconds", "process_open_fds", "python_gc_collections"):
        assert standard in families, standard
    for engine in ("streamplex_engine_time_to_first_token_seconds", "streamplex_engine_inter_token_latency_seconds", "streamplex_engine_queue_wait_seconds"):
        assert families[engine][0] == "histogram"
    assert not any("minilm" in name or "smollm" in name for name in families), "model names belong in labels"


async def test_frames_behind_a_slow_reader_show_their_wait(tmp) -> None:
    docs = tmp / "docs"
    docs.mkdir()
    (docs / "big.txt").write_text("streamplex " * 2_000_000)  # 22 MB: more than the socket buffers hold
    srv = start_server(tmp, documents_dir=docs, outbox_bytes=65536)
    try:
        ws = await connect(srv, max_queue=2, compression=None, max_size=None)
        await send(ws, op="subscribe", id="t", channel="text", params={"document": "big.txt", "unit": "bytes", "chunk_size": 60000})
        time.sleep(1.5)  # not reading (nor letting the client's loop run): the server's sends back up into the outbox
        _, end = await collect(ws, "t", timeout=60)
        assert end["reason"] == "complete"
        await ws.close()
        buckets = parse(srv)["streamplex_frame_send_delay_seconds"][1]
        waited_over_half_a_second = (
            buckets[("streamplex_frame_send_delay_seconds_count",)] - buckets[("streamplex_frame_send_delay_seconds_bucket", ("le", "0.5"))]
        )
        assert waited_over_half_a_second >= 1
    finally:
        srv.stop()


def test_activity_sums_up_what_changed_since_the_last_line() -> None:
    stats = Stats()
    activity = Activity(stats)
    assert activity.line() is None  # a quiet interval logs nothing
    stats.connections, stats.connections_total = 3, 3
    stats.streams["text"] = 2
    stats.streams_total["text"] = 5
    stats.errors["overloaded"] = 4
    stats.errors["invalid_params"] = 1
    stats.dropped["metrics"] = 7
    assert activity.line() == (
        "3 connections opened, 5 streams opened, 4 subscribes refused overloaded, 1 other errors, 7 lossy chunks dropped (now 3 connections, 2 streams)"
    )
    stats.streams_total["text"] += 1
    assert activity.line() == "1 streams opened (now 3 connections, 2 streams)"
