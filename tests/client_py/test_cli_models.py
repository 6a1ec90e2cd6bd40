"""`streamplex chat` and `streamplex transcribe` against a live server with its chat and Whisper models."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import time

from tests.client_py.test_cli import CLI
from tests.serverproc import ROOT, ServerProc

SPEECH = ROOT / "samples" / "media" / "speech.wav"  # 7.2 s of espeak-ng: "... streaming media from the server, one chunk at a time."


def run(server: ServerProc, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = os.environ | {"STREAMPLEX_API_KEY": server.key, "STREAMPLEX_URL": server.url}
    start = time.monotonic()
    done = subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=300)
    return done, time.monotonic() - start


def test_chat_streams_the_reply(models_server: ServerProc) -> None:
    done, _ = run(models_server, "chat", "What is the capital of France?", "--max-tokens", "24")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout and done.stdout.endswith("\n")


def test_transcribe_at_real_time_pace_with_partials_in_place(models_server: ServerProc) -> None:
    # On a terminal (a pty here) partials rewrite the current line; finals print on their own lines with times.
    primary, secondary = pty.openpty()
    env = os.environ | {"STREAMPLEX_API_KEY": models_server.key, "STREAMPLEX_URL": models_server.url}
    start = time.monotonic()
    proc = subprocess.Popen([CLI, "transcribe", str(SPEECH), "--full"], env=env, stdout=secondary, stderr=subprocess.PIPE)
    os.close(secondary)
    out = b""
    while True:
        try:
            piece = os.read(primary, 65536)
        except OSError:  # EIO once the child has closed the terminal
            break
        if not piece:
            break
        out += piece
    proc.wait(60)
    elapsed = time.monotonic() - start
    os.close(primary)
    text = out.decode()
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    assert "\r\x1b[K... " in text, text  # a partial, drawn in place
    assert re.search(r"\[\s*\d+\.\d+ ->\s*\d+\.\d+\] \S", text), text  # a final with its times
    assert "streaming media from the server" in text.lower()
    assert elapsed >= 7.0  # the 7.2 s clip is pushed at its real pace


def test_transcribe_fast_without_a_terminal(models_server: ServerProc) -> None:
    done, _ = run(models_server, "transcribe", str(SPEECH), "--fast", "--full")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "\x1b" not in done.stdout and all(line.startswith("[") for line in lines[:-1])
    assert "streaming media from the server" in lines[-1].lower()
