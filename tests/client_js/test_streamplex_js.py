"""client_js/streamplex.js under Node against the live server: first-frame auth, streams, typed errors, binary frames, pings, reconnect."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.serverproc import ROOT, ServerProc, start_server


def test_streamplex_js_against_the_server(server: ServerProc) -> None:
    done = subprocess.run(
        ["node", str(ROOT / "tests" / "client_js" / "client.mjs"), server.url, server.key], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    text = "One socket, many streams. Chunks keep their order."
    assert report["ready"] == "ready" and report["words"] == text == report["chars"] and report["seqs_in_order"]
    assert report["invalid"] == {"isTyped": True, "code": "invalid_params", "field": "unit"}
    assert report["audio"]["info"] == 16000 and report["audio"]["last"]["done"]
    assert report["audio"]["binaryBytes"] == 2 * report["audio"]["last"]["samples"]
    assert report["metrics_seen"] == 2
    assert report["push_errors"] == ["bad_request", "bad_request"]
    assert report["encoded"] == "02733100" + "01fffe"
    assert report["decoded"] == {"id": "a1", "seq": 5, "payload": "ffd8"}
    assert report["reconnect"] == {"intact": True, "restarts": 0, "reconnects": 1, "resumes": 1, "state": "open"}
    assert report["ping_ms"] < 5000 and report["state_after_heartbeats"] == "open"
    assert report["wrong_key"] == {"isAuth": True, "closeCode": 4001}


def test_streamplex_js_retries_refused_subscribes_after_retry_after(tmp_path: Path) -> None:
    server = start_server(tmp_path, key_rate=2, key_burst=1)  # a second subscribe right after the first is refused (rate_limited)
    try:
        done = subprocess.run(
            ["node", str(ROOT / "tests" / "client_js" / "retry.mjs"), server.url, server.key], capture_output=True, text=True, timeout=120, cwd=ROOT
        )
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["retried"]["complete"] and report["retried"]["retries"] >= 2 and report["retried"]["ms"] >= 500
    text = "Refused at first, sent again after retry_after, complete in the end."
    for refused in report["refused"]:  # retry off, no attempts allowed, too little total wait allowed
        assert refused["typed"] and refused["code"] == "rate_limited" and refused["retryAfter"] > 0 and refused["retries"] == 0, refused
        assert refused["first"] == text


def test_streamplex_js_holds_pushed_input_until_acknowledged() -> None:
    done = subprocess.run(["node", str(ROOT / "tests" / "client_js" / "held.mjs")], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["after_ack"] == {"base": 30, "end": 80, "first": 1, "length": 50}
    assert report["rewind_before_base"] is False and report["rewind"] is True
    assert report["piece"] == [1, 1, 1, 1, 1, 2] and report["piece_length"] == 45
    assert report["pieces"] == [32 * 1024, 32 * 1024, 10]
    assert report["waiting_before_ack"] and report["after_room"] == {"waited": True, "base": 70, "length": 10}
