"""The dashboard in real headless chromium (playwright-core) against the live server with its models: every panel shows real output."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from tests.serverproc import ROOT, ServerProc

SPEECH = ROOT / "samples" / "media" / "speech.wav"  # 16-bit PCM: chromium's fake capture plays it as the microphone


def test_every_panel_shows_real_output(models_server: ServerProc, tmp_path: Path) -> None:
    assert shutil.which("chromium") == "/usr/bin/chromium"
    done = subprocess.run(
        ["node", str(ROOT / "tests" / "client_js" / "dashboard.mjs"), models_server.http, models_server.key, str(tmp_path), str(SPEECH)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    (tmp_path / "report.json").write_text(json.dumps(report, indent=1))
    panels = report["panels"]
    assert report["settled"], {name: (p["state"], p["chunks"], p["message"]) for name, p in panels.items()}
    assert report["stored_key"] and report["console"] == []
    assert set(panels) >= {"text", "data", "logs", "metrics", "chat", "audio", "video", "transcription", "translation", "analysis"}
    assert report["unavailable"] == [], report["unavailable"]
    for name, panel in panels.items():
        assert panel["state"] in ("done", "running", "stopped"), (name, panel)
        assert panel["chunks"] > 0, (name, panel)
    assert "Streamplex multiplexes many streams over one socket." in panels["text"]["text"]
    assert panels["data"]["rows"] == 3 and "Lagos" in panels["data"]["text"]
    assert panels["metrics"]["charts"] >= 4 and "connections" in panels["metrics"]["text"]
    assert report["logs_filter"]
    assert "Paris" in report["chat_turns"][0] and "Rome" in report["chat_turns"][1], report["chat_turns"]
    assert panels["chat"]["state"] == "stopped" and "Rome" in panels["chat"]["text"]
    assert panels["audio"]["seconds"] > 5  # speech.wav lasts 7.2 s, all of it scheduled in Web Audio
    assert panels["video"]["frames"] >= 30  # counter.mp4 lasts 4 s at 10 fps
    assert "gato" in panels["translation"]["text"]
    assert "Obama" in panels["analysis"]["text"] and "positive" in panels["analysis"]["text"]
    # the microphone run replaced the file run's transcript: both heard the same speech
    assert 8.5 <= report["mic_seconds_before_stop"] < 20
    for heard in (report["file_transcript"], panels["transcription"]["text"]):
        assert "streaming media from the server" in heard.lower(), heard
    for name in panels:
        assert (tmp_path / f"panel-{name}.png").stat().st_size > 1000
    assert (tmp_path / "dashboard.png").exists()
