"""The hash-pinned lock files of scripts/setup: complete, every line hashed, and enforced by pip."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ROOT / "scripts" / "packages"
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")


def _entries(lock: Path) -> dict[str, tuple[Requirement, list[str]]]:
    """Each requirement of a lock file (continuation lines joined) with its hashes, by canonical name."""
    text = re.sub(r"\\\n\s*", " ", lock.read_text())
    out: dict[str, tuple[Requirement, list[str]]] = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        spec, _, rest = line.partition(" --hash=")
        req = Requirement(spec.strip())
        out[canonicalize_name(req.name)] = (req, HASH.findall("--hash=" + rest) if rest else [])
    return out


def _listed(name: str) -> list[str]:
    return [line.split("#", 1)[0].strip() for line in (PACKAGES / name).read_text().splitlines() if line.split("#", 1)[0].strip()]


def _project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    client = tomllib.loads((ROOT / "client_py" / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + project["optional-dependencies"]["models"] + project["optional-dependencies"]["test"] + client["dependencies"]
    return [Requirement(spec) for spec in specs]


@pytest.mark.parametrize("lock", ["requirements.lock", "pip-nodeps.lock"])
def test_every_locked_line_is_pinned_with_a_hash(lock: str) -> None:
    entries = _entries(PACKAGES / lock)
    assert entries, f"{lock} is empty"
    for name, (req, hashes) in entries.items():
        pins = [s for s in req.specifier if s.operator == "=="]
        assert len(pins) == 1 and len(req.specifier) == 1, f"{lock}: {name} is not pinned to one version ({req})"
        assert hashes, f"{lock}: {name} has no sha256 hash"


def test_the_lock_covers_every_dependency_of_the_project_and_the_client() -> None:
    entries = _entries(PACKAGES / "requirements.lock")
    for req in [*_project_requirements(), Requirement("pip"), Requirement("setuptools>=68")]:
        name = canonicalize_name(req.name)
        assert name in entries, f"{req} (pyproject.toml) is missing from requirements.lock: run scripts/lock"
        version = next(iter(entries[name][0].specifier)).version
        assert req.specifier.contains(version, prereleases=True), f"requirements.lock pins {name}=={version}, outside {req.specifier}: run scripts/lock"


def test_the_model_lock_holds_exactly_the_no_deps_packages() -> None:
    listed = {canonicalize_name(Requirement(spec).name) for spec in _listed("pip-nodeps.txt")}
    assert set(_entries(PACKAGES / "pip-nodeps.lock")) == listed, "pip-nodeps.lock differs from pip-nodeps.txt: run scripts/lock"


def test_setup_installs_only_from_the_locks_with_hashes_required() -> None:
    setup = (ROOT / "scripts" / "setup").read_text()
    installs = [line for line in setup.splitlines() if "pip install" in line or line.strip().startswith('"${pip[@]}"')]
    assert "pip=(.venv/bin/python -m pip install -q --require-hashes --no-deps)" in setup
    for lock in ("requirements.lock", "pip-nodeps.lock"):
        assert f'"${{pip[@]}}" -r scripts/packages/{lock}' in setup
    editable = [line for line in installs if " -e " in line]
    assert editable and all("--no-deps" in line and "--no-build-isolation" in line for line in editable), "the editable installs must fetch nothing"


def test_pip_refuses_a_file_whose_hash_is_not_the_locked_one(tmp_path: Path) -> None:
    """A changed upload: the same pinned release with another hash does not install."""
    unconditional = [entry for entry in _entries(PACKAGES / "requirements.lock").values() if entry[0].marker is None]
    req, hashes = min(unconditional, key=lambda entry: len(entry[1]))
    good = tmp_path / "good.txt"
    good.write_text(f"{req} " + " ".join(hashes) + "\n")
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{req} --hash=sha256:{'0' * 64}\n")
    pip = [sys.executable, "-m", "pip", "download", "-q", "--require-hashes", "--no-deps", "--only-binary=:all:"]
    ok = subprocess.run([*pip, "-d", str(tmp_path / "ok"), "-r", str(good)], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run([*pip, "-d", str(tmp_path / "refused"), "-r", str(bad)], capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "DO NOT MATCH THE HASHES" in refused.stderr, refused.stderr
