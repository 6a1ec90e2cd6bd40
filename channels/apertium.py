"""Apertium, the rule-based translation engine: installed pairs, and one persistent pipeline process per pair.

A pair's `.mode` file lists the stages of its pipeline (analyser, tagger, transfer, generator, ...).
`apertium -z` keeps them running but does not flush per NUL-terminated block (its text deformatter and
`lt-proc -b`/`-g` buffer their output), so a persistent process would hold a sentence back until more
input arrives. Instead the stages come from `apertium-wblank-mode -z` (the same pipeline in null-flush
mode) and each runs under `stdbuf -o0`; text is escaped into Apertium's stream format here (the job of
`apertium-destxt`) and unescaped on the way back (`apertium-retxt`). Measured here: the first sentence
costs ~0.3-0.9 s (the stages load their transducers), later ones 1-10 ms, against ~0.2 s for each
one-shot `apertium eng-spa`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# ISO 639-1 codes to the ISO 639-3 codes Apertium names its pairs with (three-letter codes pass through).
ISO_639_1 = {
    "af": "afr", "an": "arg", "ar": "ara", "be": "bel", "bg": "bul", "br": "bre", "bs": "bos", "ca": "cat", "cs": "ces",
    "cy": "cym", "da": "dan", "de": "deu", "el": "ell", "en": "eng", "eo": "epo", "es": "spa", "eu": "eus", "fi": "fin",
    "fr": "fra", "ga": "gle", "gl": "glg", "he": "heb", "hi": "hin", "hr": "hrv", "id": "ind", "is": "isl", "it": "ita",
    "kk": "kaz", "mk": "mkd", "ms": "msa", "mt": "mlt", "nb": "nob", "nl": "nld", "nn": "nno", "oc": "oci", "pl": "pol",
    "pt": "por", "ro": "ron", "ru": "rus", "sc": "srd", "sk": "slk", "sl": "slv", "sr": "srp", "sv": "swe", "tr": "tur",
    "tt": "tat", "uk": "ukr", "ur": "urd",
}  # fmt: skip

PAIR_NAME = re.compile(r"^([a-z]{2,3})-([a-z]{2,3}(?:_[A-Za-z0-9_]+)?)$")
RESERVED = set("\\[]{}^$/@<>")
EXCHANGE_TIMEOUT = 30.0


class ApertiumError(Exception):
    """The pipeline failed or stalled; it is restarted on the next request."""


def code3(lang: str) -> str:
    """`en` -> `eng`, `ca_valencia` / `ca-valencia` -> `cat_valencia`; unknown codes pass through lower-cased."""
    base, _, variant = lang.strip().replace("-", "_").partition("_")
    base = ISO_639_1.get(base.lower(), base.lower())
    return f"{base}_{variant}" if variant else base


@dataclass(frozen=True)
class Pair:
    """One installed direction, e.g. `eng-spa` or the variant `eng-cat_valencia`."""

    name: str
    source: str
    target: str
    mode: Path


def discover(apertium_dir: Path) -> dict[str, Pair]:
    """The pairs installed under `apertium_dir/modes`, by name (`eng-spa`)."""
    pairs = {}
    for mode in sorted((apertium_dir / "modes").glob("*.mode")):
        match = PAIR_NAME.match(mode.stem)
        if match:
            pairs[mode.stem] = Pair(mode.stem, match[1], match[2], mode)
    return pairs


def escape(text: str) -> str:
    """Plain text into Apertium's stream format: reserved characters escaped, `~` kept as a blank, a final blank."""
    out = []
    for ch in text.replace("\0", ""):
        if ch in RESERVED:
            out.append("\\" + ch)
        elif ch == "~":
            out.append("[~]")  # the generator treats a bare or escaped ~ as a post-generation mark
        else:
            out.append(ch)
    return "".join(out) + "[]"  # without a trailing blank the last punctuation mark is held back


def unescape(stream: str) -> str:
    """Apertium's text output back to plain text: escapes resolved, superblank brackets removed."""
    out, chars = [], iter(stream)
    for ch in chars:
        if ch == "\\":
            out.append(next(chars, ""))
        elif ch not in "[]":
            out.append(ch)
    return "".join(out).strip()


def pipeline_command(mode: Path) -> str:
    """The pair's pipeline in null-flush mode, each stage unbuffered, without unknown-word marks."""
    stages = subprocess.run(["apertium-wblank-mode", "-z", str(mode)], check=True, capture_output=True, text=True, timeout=10).stdout.strip()
    stages = stages.replace("$1", "-n").replace("$2", "")
    return " | ".join(f"stdbuf -o0 {stage.strip()}" for stage in stages.split("|"))


class Pipeline:
    """One pair's pipeline process, kept running; one block (sentence) in flight at a time."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        self.proc: asyncio.subprocess.Process | None = None
        self.lock = asyncio.Lock()
        self._stderr: asyncio.Task[None] | None = None
        self.blocks = 0

    async def translate(self, text: str) -> str:
        """Translate one sentence. The exchange is shielded: a cancelled caller never leaves a reply unread in the pipe."""
        return await asyncio.shield(asyncio.ensure_future(self._exchange(text)))

    async def _exchange(self, text: str) -> str:
        async with self.lock:
            if self.proc is None or self.proc.returncode is not None:
                await self._spawn()
            assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
            try:
                self.proc.stdin.write(escape(text).encode() + b"\0")
                await self.proc.stdin.drain()
                reply = await asyncio.wait_for(self.proc.stdout.readuntil(b"\0"), EXCHANGE_TIMEOUT)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError) as exc:
                await self.close()
                raise ApertiumError(f"the {self.pair.name} pipeline failed ({type(exc).__name__}); it restarts on the next request") from None
            self.blocks += 1
            return unescape(reply[:-1].decode(errors="replace"))

    async def _spawn(self) -> None:
        try:
            command = await asyncio.to_thread(pipeline_command, self.pair.mode)
            self.proc = await asyncio.create_subprocess_exec(
                "bash", "-c", command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, limit=1 << 20
            )
        except (OSError, subprocess.SubprocessError) as exc:
            log.exception("apertium %s: the pipeline could not start", self.pair.name)
            raise ApertiumError(f"the {self.pair.name} pipeline could not start: {exc}") from None
        self._stderr = asyncio.create_task(self._log_stderr(self.proc), name=f"apertium-{self.pair.name}-stderr")
        log.info("apertium %s pipeline started (pid %d)", self.pair.name, self.proc.pid)

    async def _log_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            log.warning("apertium %s: %s", self.pair.name, line.decode(errors="replace").rstrip())

    async def close(self) -> None:
        """Stop the process group (bash and every stage)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        if self._stderr is not None:
            self._stderr.cancel()
            self._stderr = None
        log.info("apertium %s pipeline stopped after %d blocks", self.pair.name, self.blocks)


class Apertium:
    """The installed pairs and their pipelines (started on first use, kept until `close`)."""

    def __init__(self, apertium_dir: Path) -> None:
        self.pairs = discover(apertium_dir)
        self.pipelines: dict[str, Pipeline] = {}

    def find(self, source: str, target: str) -> Pair | None:
        return self.pairs.get(f"{code3(source)}-{code3(target)}")

    def pipeline(self, pair: Pair) -> Pipeline:
        if pair.name not in self.pipelines:
            self.pipelines[pair.name] = Pipeline(pair)
        return self.pipelines[pair.name]

    async def close(self) -> None:
        for pipeline in self.pipelines.values():
            await pipeline.close()
        self.pipelines.clear()
