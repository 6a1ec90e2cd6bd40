"""The `streamplex` console script against the live server, and `streamplex serve` with and without the server installed."""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
import wave
from pathlib import Path

from tests.serverproc import ROOT, ServerProc, free_port

CLI = str(Path(sys.executable).parent / "streamplex")


def run(server: ServerProc, *args: str, key: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"STREAMPLEX_API_KEY": key or server.key, "STREAMPLEX_URL": server.url}
    return subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_data_csv_to_stdout(server: ServerProc) -> None:
    rows = [{"id": str(i), "name": f'n{i}, "q"'} for i in range(250)]
    with (server.data_dir / "people.csv").open("w", newline="") as f:  # type: ignore[attr-defined]
        writer = csv.DictWriter(f, ["id", "name"])
        writer.writeheader()
        writer.writerows(rows)
    done = run(server, "data", "--dataset", "people.csv", "--format", "csv")
    assert done.returncode == 0, done.stderr
    assert list(csv.DictReader(io.StringIO(done.stdout))) == rows


def test_text_metrics_logs_and_channels(server: ServerProc) -> None:
    assert run(server, "text", "Hello there. Bye now.", "--unit", "sentences").stdout == "Hello there. Bye now."
    metrics = run(server, "metrics", "--count", "2", "--interval-ms", "200")
    assert metrics.returncode == 0 and len(metrics.stdout.splitlines()) == 2 and "cpu" in metrics.stdout
    logs = run(server, "logs", "--level", "INFO", "--lines", "5", "--no-follow")
    lines = logs.stdout.splitlines()
    assert logs.returncode == 0 and 1 <= len(lines) <= 5 and all(" INFO " in line or " WARNING " in line or " ERROR " in line for line in lines)
    listing = run(server, "channels").stdout
    assert "text" in listing and "available" in listing
    streamed = run(server, "stream", "text", "-p", "text=a b c", "-p", "unit=words", "-p", "chunk_size=1")
    assert streamed.stdout.splitlines() == ['{"seq":0,"data":"a "}', '{"seq":1,"data":"b "}', '{"seq":2,"data":"c"}']


def test_binary_chunks_to_a_file(server: ServerProc, tmp_path: Path) -> None:
    out = tmp_path / "speech.wav"
    done = run(
        server, "stream", "audio", "-p", "source=speech.wav", "-p", "format=wav", "-p", "sample_rate=16000", "-p", "realtime=false", "--binary-out", str(out)
    )
    assert done.returncode == 0, done.stderr
    assert '"sample_rate":16000' in done.stdout.splitlines()[0] and '"done":true' in done.stdout.splitlines()[-1]
    with wave.open(str(out)) as wav:  # the header frame says "unknown length"; the samples follow it
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
    assert abs((out.stat().st_size - 44) / 2 / 16000 - 7.2) < 0.05


def test_errors_are_plain(server: ServerProc) -> None:
    chat = run(server, "chat", "hello")
    assert chat.returncode == 1 and "unavailable" in chat.stderr and "Traceback" not in chat.stderr
    wrong = run(server, "channels", key="wrong")
    assert wrong.returncode == 1 and "4001" in wrong.stderr
    env = {k: v for k, v in os.environ.items() if k != "STREAMPLEX_API_KEY"}
    missing = subprocess.run([CLI, "--url", server.url, "channels"], env=env, capture_output=True, text=True, timeout=30)
    assert missing.returncode == 2 and "STREAMPLEX_API_KEY" in missing.stderr


def test_ctrl_c_ends_cleanly(server: ServerProc) -> None:
    env = os.environ | {"STREAMPLEX_API_KEY": server.key, "STREAMPLEX_URL": server.url}
    before = server.metric("streamplex_streams", 'channel="metrics"')  # a dropped session of an earlier test may hold some
    proc = subprocess.Popen([CLI, "metrics", "--interval-ms", "100"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert "cpu" in proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130 and err == ""
    deadline = time.monotonic() + 10
    while server.metric("streamplex_streams", 'channel="metrics"') > before:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_serve_hands_over_to_the_server() -> None:
    done = subprocess.run([CLI, "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "usage: streamplex serve" in done.stdout and "--port" in done.stdout


def test_serve_runs_the_server(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMPLEX_")} | {
        "STREAMPLEX_API_KEYS": "k",
        "STREAMPLEX_CHAT_MODEL": "",
        "STREAMPLEX_ASR_MODEL": "",
        "STREAMPLEX_EMBEDDING_MODEL": "",
    }
    proc = subprocess.Popen(
        [CLI, "serve", "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        done = subprocess.run([CLI, "--url", f"ws://127.0.0.1:{port}/ws", "--api-key", "k", "text", "served"], capture_output=True, text=True, timeout=30)
        assert done.stdout == "served"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_serve_without_the_server_says_so(tmp_path: Path) -> None:
    # What the streamplex-client distribution installs: the SDK's modules without the server and channels subpackages.
    # Without site processing the editable install is invisible; only that copy and the dependencies are on the path.
    sdk = tmp_path / "sdk" / "streamplex"
    sdk.mkdir(parents=True)
    for module in (ROOT / "client_py" / "streamplex").glob("*.py"):
        shutil.copy(module, sdk)
    path = os.pathsep.join([str(sdk.parent), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    code = "import sys; from streamplex.cli import main; main(sys.argv[1:])"
    done = subprocess.run([sys.executable, "-S", "-c", code, "serve"], cwd=tmp_path, env={"PYTHONPATH": path}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "server, which is not installed" in done.stderr


def test_translate_and_analyze(server: ServerProc) -> None:
    translated = run(server, "translate", "The cat is black. I like apples.")
    assert translated.returncode == 0, translated.stderr
    assert translated.stdout == "El gato es negro. Me gustan las manzanas.\n"
    analysed = run(server, "analyze", "I love this wonderful city. The food was terrible.", "--type", "sentiment")
    assert analysed.returncode == 0, analysed.stderr
    lines = analysed.stdout.splitlines()
    assert lines[0].startswith("#0 [positive") and lines[1].startswith("#1 [negative") and lines[-1].startswith("overall:")
