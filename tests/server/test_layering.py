"""The core never imports a channel (no import of streamplex.channels in server/; test_plugins.py checks it at run
time too); channels use only the core's channel interface, config, protocol and engine, never Starlette, the
session or the connection."""

from __future__ import annotations

import ast
from pathlib import Path

from streamplex.server.channel import Channel

ROOT = Path(__file__).resolve().parents[2]
CHANNEL_MAY_IMPORT = ("streamplex.server.channel", "streamplex.server.config", "streamplex.server.protocol", "streamplex.server.engine")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in `path`, relative ones resolved against its package."""
    package = ["streamplex", *path.relative_to(ROOT).parent.parts]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            out += [(node.lineno, f"{module}.{alias.name}" if node.module is None else module) for alias in node.names]
    return out


def test_no_server_module_imports_a_channel() -> None:
    modules = sorted((ROOT / "server").rglob("*.py"))
    assert len(modules) > 40
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path in modules
        for line, name in _imports(path)
        if name.split(".")[0] == "channels" or name == "streamplex.channels" or name.startswith("streamplex.channels.")
    ]
    assert not bad, "the core must find channels by entry points, never import them"


def test_channels_import_only_the_channel_interface_of_the_core() -> None:
    bad = []
    for path in sorted((ROOT / "channels").glob("*.py")):
        for line, name in _imports(path):
            core = name.startswith("streamplex.server") and not name.startswith(CHANNEL_MAY_IMPORT)
            if core or name.split(".")[0] in {"starlette", "uvicorn", "server"}:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {name}")
    assert not bad


def test_the_interface_is_the_core_s() -> None:
    assert Channel.__module__ == "streamplex.server.channel"
    assert not (ROOT / "channels" / "base.py").exists()
