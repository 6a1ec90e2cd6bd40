"""/docs in a real headless chromium against the live server: Swagger UI over /openapi.json, the AsyncAPI viewer over
/asyncapi.json, every asset served by the server from its PyPI packages (no request leaves it)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import orjson

from tests.serverproc import ROOT, ServerProc


def test_pages_and_assets_are_served(server: ServerProc) -> None:
    status, page = server.get("/docs")
    assert status == 200 and b"/docs/assets/swagger/swagger-ui-bundle.js" in page and b"//cdn" not in page and b"https://" not in page
    status, page = server.get("/docs/asyncapi")
    assert status == 200 and b'<asyncapi-viewer src="/asyncapi.json"' in page and b"https://" not in page
    for asset in ("/docs/assets/swagger/swagger-ui-bundle.js", "/docs/assets/swagger/swagger-ui.css", "/docs/assets/asyncapi/asyncapi-viewer.iife.js"):
        status, body = server.get(asset)
        assert status == 200 and len(body) > 100_000, asset
    assert server.get("/docs/assets/swagger/../../../server/config.py")[0] == 404


def test_pages_render_in_chromium(server: ServerProc, tmp_path: Path) -> None:
    assert shutil.which("chromium") == "/usr/bin/chromium"
    done = subprocess.run(
        ["node", str(ROOT / "tests" / "client_js" / "docs.mjs"), server.http, str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["foreign"] == [] and report["failed"] == [] and report["console"] == [], (report["foreign"], report["failed"], report["console"])
    openapi = orjson.loads(server.get("/openapi.json")[1])
    assert report["swagger"]["title"].startswith(openapi["info"]["title"])
    assert set(report["swagger"]["paths"]) == set(openapi["paths"]), report["swagger"]["paths"]
    assert report["asyncapi"]["outcome"] == "rendered" and report["asyncapi"]["hasTitle"] and report["asyncapi"]["hasWs"], report["asyncapi"]
