"""Every shell and Python example of README.md, docs/*.md and client_py/README.md, run against a live server.

Each command of a ```sh block and each ```python block is one test. What a new user would type is run as
written, with only what cannot be written in a document put in: the test server's port for 8000 (and
127.0.0.1 for 0.0.0.0), its API key for `sk-...` (and in STREAMPLEX_API_KEY/STREAMPLEX_URL, which the
client README tells the user to set). They run in a scratch folder holding the repository's `samples`,
`client_py` and `.venv` (as links), against servers using the shipped sample folders. Examples that need a
model run against the models server; a few cannot run here and say why in SKIP. An example found in the
documents but in none of these tables fails the collection: no example goes unrun silently.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.serverproc import KEY, ROOT, ServerProc, free_port, start_server

DOCUMENTS = [ROOT / "README.md", ROOT / "client_py" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
VENV_BIN = Path(sys.executable).parent

# Examples that need a model (chat, Whisper, MiniLM, spaCy): run against the models server.
MODELS = (
    'streamplex chat "hello"',
    'streamplex analyze "I love Paris."',
    "streamplex transcribe samples/media/speech.wav",
    "/api/v1/stream/chat",
    "/api/v1/stream/transcription",
    'client.subscribe("chat"',
    "build_engine(settings)",
)
# Examples that cannot run here, and why.
SKIP = {
    "./scripts/serve": "runs scripts/setup (installs into .venv) before the server: CI runs scripts/setup itself, and the server it starts is what every other example talks to",
    "STREAMPLEX_API_KEYS=my-key ./scripts/serve": "runs scripts/setup (installs into .venv) before the server, as ./scripts/serve",
    "./scripts/test": "the test suite itself",
    "docker build": "no Docker engine here (docs/deploy.md, What was run here)",
    "STREAMPLEX_REDIS_URL=redis://127.0.0.1:6379/0": "needs a Redis with a password on 6379; tests/server/test_workers.py runs `serve --workers` with a real Redis",
}
# Commands that stream until interrupted: they pass when they are still streaming output after LIVE_SECONDS.
LIVE = ("streamplex metrics ", "streamplex logs --level WARNING", "/api/v1/stream/metrics?")
LIVE_SECONDS = 4.0


@dataclass(frozen=True)
class Example:
    document: Path
    line: int
    language: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line}"

    def matches(self, needles: tuple[str, ...] | dict[str, str]) -> str | None:
        return next((n for n in needles if (self.code + "\n").startswith(n) or n in self.code), None)


def examples() -> Iterator[Example]:
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for block in re.finditer(r"^( *)```(sh|python)\n(.*?)^\1```", text, re.S | re.M):
            indent, language, body = block.group(1), block.group(2), block.group(3)
            code = "\n".join(line.removeprefix(indent) for line in body.splitlines())
            first = text.count("\n", 0, block.start()) + 2
            if language == "python":
                yield Example(document, first, language, code)
                continue
            lines = code.splitlines()
            i = 0
            while i < len(lines):
                start, command = i, lines[i]
                while command.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    command = command[:-1] + " " + lines[i].strip()
                i += 1
                if command.strip() and not command.lstrip().startswith("#"):
                    yield Example(document, first + start, language, command.strip())


ALL = list(examples())
PLAIN = [e for e in ALL if not e.matches(MODELS) and not e.matches(SKIP)]
WITH_MODELS = [e for e in ALL if e.matches(MODELS) and not e.matches(SKIP)]
SKIPPED = [e for e in ALL if e.matches(SKIP)]


def test_every_example_is_run_or_skipped_with_a_reason() -> None:
    assert len(ALL) >= 30, [e.id for e in ALL]
    assert {e.id for e in ALL} == {e.id for e in PLAIN + WITH_MODELS + SKIPPED}
    for needle in (*SKIP, *MODELS):
        assert any(e.matches((needle,)) for e in ALL), f"{needle!r} names no example any more"


@pytest.fixture(scope="module")
def examples_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """A server with the default (shipped) samples folders, as a fresh clone has them."""
    srv = start_server(tmp_path_factory.mktemp("examples"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def cwd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for all the examples, as one shell for a user: a file one command writes, a later one reads."""
    folder = tmp_path_factory.mktemp("user")
    for name, target in (("samples", ROOT / "samples"), ("client_py", ROOT / "client_py"), ("scripts", ROOT / "scripts")):
        (folder / name).symlink_to(target)
    (folder / ".venv").symlink_to(VENV_BIN.parent)
    return folder


def put_in(code: str, server: ServerProc, port: int) -> str:
    return (
        code.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
        .replace("--port 8000", f"--port {port}")
        .replace("--host 0.0.0.0", "--host 127.0.0.1")
        .replace("sk-...", server.key)
    )


def environment(server: ServerProc) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMPLEX_")}
    env |= {"PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", "STREAMPLEX_API_KEY": server.key, "STREAMPLEX_URL": server.url, "KEY": server.key}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "client_py"), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def run_server(command: str, port: int, cwd: Path, env: dict[str, str]) -> None:
    """A command that starts a server: it must answer /health, then stop on SIGTERM."""
    env = env | {"STREAMPLEX_API_KEYS": KEY, "STREAMPLEX_CHAT_MODEL": "", "STREAMPLEX_ASR_MODEL": "", "STREAMPLEX_EMBEDDING_MODEL": ""}
    proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")[-3000:] if proc.stdout else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not answer /health"
            time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn drains, then re-raises the signal it caught


def run(example: Example, server: ServerProc, cwd: Path, tmp: Path) -> None:
    port = free_port()
    env = environment(server)
    code = put_in(example.code, server, port)
    if example.language == "python":
        if "await " in code and "async def" not in code:  # a fragment: inside a coroutine, with a connected client
            body = "\n".join("        " + line for line in code.splitlines())
            if "build_engine" in code:
                body = "\n".join("    " + line for line in code.splitlines())
                code = f"import asyncio\nfrom server.config import Settings\n\n\nasync def main() -> None:\n    settings = Settings()\n{body}\n\n\nasyncio.run(main())\n"
            else:
                code = (
                    "import asyncio\nimport streamplex\n\n\nasync def main() -> None:\n"
                    f"    async with streamplex.connect({server.url!r}, api_key={server.key!r}) as client:\n{body}\n\n\nasyncio.run(main())\n"
                )
        done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert done.stdout.strip() or "print(" not in code, "the example printed nothing"
        return
    if re.search(r"(streamplex serve|-m streamplex.server)\b", code):
        run_server(code, port, cwd, env)
        return
    if code.startswith("pip install"):  # as written, in a fresh venv (its dependencies come from the package index)
        subprocess.run([sys.executable, "-m", "venv", str(tmp / "fresh")], check=True)
        env = {k: v for k, v in env.items() if k != "PYTHONPATH"} | {"PATH": f"{tmp / 'fresh' / 'bin'}{os.pathsep}{env['PATH']}"}
        done = subprocess.run(["bash", "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        check = subprocess.run([str(tmp / "fresh" / "bin" / "streamplex"), "channels"], env=env, capture_output=True, text=True, timeout=60)
        assert check.returncode == 0 and "text" in check.stdout, check.stderr
        return
    proc = subprocess.Popen(["bash", "-c", code], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    if example.matches(LIVE):
        try:
            out, err = proc.communicate(timeout=LIVE_SECONDS)
            assert proc.returncode == 0 and out.strip(), err[-3000:]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)
            out, err = proc.communicate(timeout=30)
            assert out.strip() or not err.strip(), f"still running after {LIVE_SECONDS} s, with errors: {err[-3000:]}"  # logs may have no warning to show
        return
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}: {err[-3000:]}"
    if re.fullmatch(r"\w+=\S+", code):  # a variable for the commands that follow
        return
    written = re.findall(r"(?:>|-o|--binary-out) (\S+)", code)
    for name in written:
        assert (cwd / name).stat().st_size > 0, f"{name} is empty"
    assert out.strip() or written, "the example printed nothing"


@pytest.mark.parametrize("example", PLAIN, ids=lambda e: e.id)
def test_example(example: Example, examples_server: ServerProc, cwd: Path, tmp_path: Path) -> None:
    run(example, examples_server, cwd, tmp_path)


@pytest.mark.parametrize("example", WITH_MODELS, ids=lambda e: e.id)
def test_example_with_models(example: Example, models_server: ServerProc, cwd: Path, tmp_path: Path) -> None:
    run(example, models_server, cwd, tmp_path)


@pytest.mark.parametrize("example", SKIPPED, ids=lambda e: e.id)
def test_example_that_cannot_run_here(example: Example) -> None:
    pytest.skip(SKIP[next(k for k in SKIP if example.matches((k,)))])
