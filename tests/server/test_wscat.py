"""wscat (npm) drives the README's session against the real server: header auth, subscribe, chunks arriving."""

from __future__ import annotations

import json
import subprocess
import time

from tests.serverproc import ROOT, ServerProc

WSCAT = ROOT / "node_modules" / ".bin" / "wscat"


def _session(server: ServerProc, lines: list[str], seconds: float, *extra: str) -> list[dict]:
    proc = subprocess.Popen([str(WSCAT), "-c", server.url, *extra], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.5)  # connected and `ready` printed; stdin stays open so wscat keeps the connection
    assert proc.stdin is not None
    for line in lines:
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
        time.sleep(0.3)
    time.sleep(seconds)
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    frames = []
    for raw in out.splitlines():
        raw = raw.strip().lstrip(">").strip()
        if raw.startswith("< "):
            raw = raw[2:]
        if raw.startswith("{"):
            frames.append(json.loads(raw))
    return frames


def test_wscat_session_with_header_auth(server: ServerProc) -> None:
    frames = _session(
        server,
        ['{"op":"subscribe","id":"t1","channel":"text","params":{"text":"Hello from streamplex. Streams interleave on one socket.","unit":"words","chunk_size":3}}', '{"op":"ping"}'],
        1.0,
        "-H",
        f"X-API-Key: {server.key}",
    )
    ops = [f["op"] for f in frames]
    assert ops[0] == "ready" and "subscribed" in ops and {"op": "pong"} in frames
    chunks = [f for f in frames if f["op"] == "chunk"]
    assert "".join(c["data"] for c in chunks) == "Hello from streamplex. Streams interleave on one socket."
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    assert {"op": "end", "id": "t1", "reason": "complete"} in frames


def test_wscat_first_frame_auth(server: ServerProc) -> None:
    frames = _session(server, [json.dumps({"op": "auth", "api_key": server.key}), '{"op":"subscribe","id":"m","channel":"metrics","params":{"interval_ms":200}}'], 1.0)
    assert frames[0]["op"] == "ready"
    assert any(f["op"] == "chunk" and f["id"] == "m" and "cpu" in f["data"] for f in frames)
