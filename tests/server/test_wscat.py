"""wscat (npm) drives the README's session against the real server: header auth, subscribe, chunks arriving."""

from __future__ import annotations

import json
import queue
import re
import subprocess
import threading
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


def _readme_session() -> list[tuple[str | None, list[str]]]:
    """The README's wscat session as steps: a `>` line to type (None first) and the `<` lines it brings."""
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## Try it with wscat") :].split("```")[1]
    steps: list[tuple[str | None, list[str]]] = [(None, [])]
    for line in block.splitlines():
        if line.startswith("> "):
            steps.append((line[2:], []))
        elif line.startswith("< "):
            steps[-1][1].append(line[2:])
    return steps


def _matches(expected: str, frame: dict) -> bool:
    """A README line shortened with `...` matches on op, id and seq; a whole one must equal the frame."""
    if "..." not in expected:
        return json.loads(expected) == frame
    keys = {k: v for k, v in re.findall(r'"(op|id)":"([^"]*)"', expected[:80])}
    seq = re.search(r'"seq":(\d+)', expected)
    return all(frame.get(k) == v for k, v in keys.items()) and (seq is None or frame.get("seq") == int(seq.group(1)))


def test_wscat_replays_the_readme_session(server: ServerProc) -> None:
    """Type each `>` line of README's session into wscat (header auth) and wait for the `<` lines it shows."""
    proc = subprocess.Popen(
        [str(WSCAT), "-c", server.url, "-H", f"X-API-Key: {server.key}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    received: queue.Queue[dict] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            raw = raw.strip().lstrip(">").strip().removeprefix("< ")
            if raw.startswith("{"):
                received.put(json.loads(raw))

    threading.Thread(target=pump, daemon=True).start()
    try:
        assert proc.stdin is not None
        for typed, expected in _readme_session():
            if typed is not None:
                proc.stdin.write(typed + "\n")
                proc.stdin.flush()
            for line in expected:
                frame = received.get(timeout=15)
                while frame.get("op") == "chunk" and frame.get("id") == "m1" and not _matches(line, frame):
                    frame = received.get(timeout=15)  # a later metrics sample may arrive before the unsubscribe lands
                assert _matches(line, frame), (line, frame)
    finally:
        proc.terminate()
        proc.wait(10)


def test_wscat_first_frame_auth(server: ServerProc) -> None:
    frames = _session(
        server, [json.dumps({"op": "auth", "api_key": server.key}), '{"op":"subscribe","id":"m","channel":"metrics","params":{"interval_ms":200}}'], 1.0
    )
    assert frames[0]["op"] == "ready"
    assert any(f["op"] == "chunk" and f["id"] == "m" and "cpu" in f["data"] for f in frames)
