"""The monitoring profile: compose wires Prometheus and Grafana to the shipped files; promtool accepts the Prometheus
config; a real Prometheus scrapes a live server with it and answers every query of the Grafana dashboard."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from tests.serverproc import ROOT, ServerProc, collect, connect, free_port, send

COMPOSE = ROOT / "compose.yaml"
PROMETHEUS_CONFIG = ROOT / "deploy/prometheus/prometheus.yml"
DASHBOARD = ROOT / "deploy/grafana/streamplex.json"


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed (scripts/packages/apt-test.txt lists the prometheus package)"
    return path


def expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_compose_monitoring_profile_mounts_the_shipped_files() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"], f"{name} runs only with --profile monitoring"
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the repository"
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    targets = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"][0]["static_configs"][0]["targets"]
    upstreams = set(re.findall(r"server (streamplex-\d):8000", (ROOT / "deploy/nginx/streamplex.conf").read_text()))
    assert {t.removesuffix(":8000") for t in targets} == upstreams, "Prometheus scrapes every server instance nginx knows"
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"][0]
    uids = {t["datasource"]["uid"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p.get("targets", [])}
    assert uids == {datasource["uid"]} and datasource["url"] == "http://prometheus:9090"


def test_promtool_accepts_the_config_and_rejects_a_broken_one(tmp_path: Path) -> None:
    run = subprocess.run([_tool("promtool"), "check", "config", "--syntax-only", str(PROMETHEUS_CONFIG)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    broken = tmp_path / "prometheus.yml"
    broken.write_text(PROMETHEUS_CONFIG.read_text().replace("scrape_interval: 5s", "scrape_interval: soon"))
    assert subprocess.run([_tool("promtool"), "check", "config", "--syntax-only", str(broken)], capture_output=True).returncode != 0


def test_dashboard_names_only_metrics_the_server_exports(server: ServerProc) -> None:
    exported = {line.split()[2] for line in server.get("/metrics")[1].decode().splitlines() if line.startswith("# TYPE ")}
    samples = exported | {f"{name}{suffix}" for name in exported for suffix in ("_bucket", "_sum", "_count")}
    named = {m for expr in expressions() for m in re.findall(r"\b((?:streamplex|process)_[a-z_]+)\b", expr)}
    assert named and named <= samples, f"not exported: {sorted(named - samples)}"


@pytest.fixture
def prometheus(server: ServerProc, tmp_path: Path) -> Iterator[str]:
    """Prometheus with the shipped config, its targets pointed at the test server."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"]["scrape_interval"] = "1s"
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{server.port}"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with (tmp_path / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                _tool("prometheus"),
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def query(base: str, expr: str, **params: Any) -> dict[str, Any]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr, **params})
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:  # a bad query's answer is JSON; "not ready yet" during start-up is plain text
        body = exc.read()
        return orjson.loads(body) if body.startswith(b"{") else {"status": "error", "error": body.decode(errors="replace")}


async def test_prometheus_scrapes_the_server_and_answers_every_dashboard_query(server: ServerProc, prometheus: str) -> None:
    ws = await connect(server)
    await send(ws, op="subscribe", id="t", channel="text", params={"text": "scraped by a real Prometheus", "unit": "words", "chunk_size": 1})
    _, end = await collect(ws, "t")
    assert end["reason"] == "complete"
    deadline = time.monotonic() + 60
    while True:  # two scrapes at least, so rates have two points
        try:
            result = query(prometheus, 'count_over_time(up{job="streamplex"}[1m])').get("data", {}).get("result", [])
        except OSError:  # not listening yet
            result = []
        if result and float(result[0]["value"][1]) >= 3:
            break
        assert time.monotonic() < deadline, "Prometheus did not scrape the server"
        time.sleep(0.5)
    assert float(query(prometheus, 'up{job="streamplex"}')["data"]["result"][0]["value"][1]) == 1
    for expr in expressions():
        concrete = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
        answer = query(prometheus, concrete)
        assert answer["status"] == "success", (expr, answer)
    await ws.close()
    frames = query(prometheus, 'sum(streamplex_frames_total{direction="out"})')["data"]["result"]
    assert frames and float(frames[0]["value"][1]) > 0
