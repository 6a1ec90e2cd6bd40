"""The distributions as a user gets them: the `streamplex` wheel built from a copy of the repository (offline, with this
environment's setuptools), installed into a bare folder, then imported and served from there with its console script; and the
SDK-only `streamplex-client` wheel, which must not carry the server."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from tests.serverproc import ROOT, free_port

PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "server", "channels", "client_js", "samples", "client_py"]


def _source_copy(tmp: Path) -> Path:
    """The files a build reads, copied (symlinks kept as symlinks): the build writes build/ and *.egg-info beside them."""
    src = tmp / "src"
    src.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "build", "*.egg-info", "dist")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, symlinks=True, ignore=skip)
        else:
            shutil.copy(path, src / name)
    assert (src / "client_py" / "streamplex" / "server").is_symlink()
    return src


def _wheel(source: Path, out: Path) -> Path:
    run = subprocess.run(
        [*PIP, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out), str(source)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout + run.stderr
    (wheel,) = out.glob("*.whl")
    return wheel


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("package")
    return tmp, _source_copy(tmp)


def test_the_wheel_installs_imports_and_serves(built: tuple[Path, Path]) -> None:
    tmp, src = built
    wheel = _wheel(src, tmp / "dist")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "streamplex/__init__.py",
        "streamplex/cli.py",
        "streamplex/server/app.py",
        "streamplex/server/channel.py",
        "streamplex/server/engine/engine.py",
    } <= names
    assert {
        "streamplex/channels/text.py",
        "streamplex/client_js/index.html",
        "streamplex/client_js/streamplex.js",
        "streamplex/samples/documents/gettysburg.txt",
    } <= names
    assert not [n for n in names if n.startswith(("server/", "channels/", "client_py/", "tests/"))], "only the streamplex package"
    eps = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert (
        "[console_scripts]\nstreamplex = streamplex.cli:main" in eps and "[streamplex.channels]" in eps and "text = streamplex.channels.text:TextChannel" in eps
    )

    site = tmp / "site"
    run = subprocess.run([*PIP, "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert not (site / "streamplex" / "server").is_symlink()
    # The installed copy, not the checkout: the wheel's folder first on the path, run from elsewhere, HOME for the cache.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMPLEX_", "PYTHON"))} | {"PYTHONPATH": str(site), "HOME": str(tmp)}
    code = (
        "import streamplex, streamplex.server.app, streamplex.channels.text\n"
        "from importlib.metadata import distribution\n"
        "from streamplex.server.config import Settings\n"
        "from streamplex.server.registry import discover\n"
        "print(streamplex.server.app.__file__, streamplex.channels.text.__file__, distribution('streamplex').locate_file(''))\n"
        "print(' '.join(discover()))\n"
        "print(Settings().cache_dir, Settings().documents_dir)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    files, channels, dirs = run.stdout.splitlines()
    assert all(Path(p).resolve().is_relative_to(site) for p in files.split()), files
    assert channels.split() == ["analysis", "audio", "chat", "data", "logs", "metrics", "text", "transcription", "translation", "video"]
    assert dirs.split() == [str(tmp / ".cache" / "streamplex"), str(site / "streamplex" / "samples" / "documents")]

    cli = site / "bin" / "streamplex"
    port = free_port()
    settings = {"STREAMPLEX_API_KEYS": "k", "STREAMPLEX_CHAT_MODEL": "", "STREAMPLEX_ASR_MODEL": "", "STREAMPLEX_EMBEDDING_MODEL": ""}
    proc = subprocess.Popen([str(cli), "serve", "--port", str(port)], cwd=tmp, env=env | settings, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode() if proc.stdout and proc.poll() is not None else "not ready"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2):
                    break
            except OSError:
                time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
            assert b"streamplex" in resp.read()  # the dashboard, from the wheel's package data
        url = f"ws://127.0.0.1:{port}/ws"
        done = subprocess.run(
            [str(cli), "--url", url, "--api-key", "k", "text", "--document", "gettysburg.txt"], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == (src / "samples" / "documents" / "gettysburg.txt").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_the_client_wheel_is_the_sdk_alone(built: tuple[Path, Path]) -> None:
    tmp, src = built
    wheel = _wheel(src / "client_py", tmp / "client-dist")
    names = zipfile.ZipFile(wheel).namelist()
    assert wheel.name.startswith("streamplex_client-")
    assert sorted(n for n in names if not n.startswith("streamplex_client-")) == sorted(
        f"streamplex/{p.name}" for p in (ROOT / "client_py" / "streamplex").glob("*.py")
    )
