"""Dockerfile.cuda and compose.yaml, checked statically (no Docker engine runs here): hadolint, the compose-spec JSON schema, and what each must say."""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from streamplex.server.config import Settings
from tests.serverproc import ROOT

BIN = Path(sys.executable).parent
DOCKERFILE = ROOT / "Dockerfile.cuda"
COMPOSE = ROOT / "compose.yaml"


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert path, f"{name} is not installed (pyproject.toml's test extra)"
    return path


def test_dockerfile_passes_hadolint() -> None:
    run = subprocess.run([_tool("hadolint"), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_hadolint_does_catch_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\nUSER root\n")
    assert subprocess.run([_tool("hadolint"), "--no-color", str(bad)], capture_output=True).returncode != 0


def test_dockerfile_says_what_the_image_needs() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:\S+", text, re.M), "a CUDA base image by default"
    assert re.search(r"^ARG TORCH_INDEX=\S+/whl/cu\d+", text, re.M), "the CUDA build of torch by default"
    assert "--build-arg BASE_IMAGE=ubuntu:24.04 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text, "the CPU variant"
    assert re.search(r"^USER 10001:10001$", text, re.M) and "useradd --system --uid 10001" in text, "a non-root user"
    assert "scripts/prepare_models.py" in text and "HF_HUB_OFFLINE=1" in text, "models prepared at build time, offline at run time"
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD .*/health", text, re.M), "a health check on /health"
    assert (ROOT / "scripts" / "prepare_models.py").exists()


def _validate_compose(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)], capture_output=True, text=True)


def test_compose_matches_the_compose_spec_schema(tmp_path: Path) -> None:
    run = _validate_compose(COMPOSE)
    assert run.returncode == 0, run.stdout + run.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("stop_grace_period: 30s", "stop_grace_period: {seconds: 30}"))
    assert _validate_compose(broken).returncode != 0, "the schema check must be able to fail"


def test_compose_runs_server_redis_and_nginx_with_a_gpu_profile() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert {"redis", "nginx", "cpu-1", "cpu-2", "gpu-1", "gpu-2"} <= set(services)
    upstreams = set(re.findall(r"server (streamplex-\d):8000", (ROOT / "deploy/nginx/streamplex.conf").read_text()))
    for profile in ("cpu", "gpu"):
        members = {name: s for name, s in services.items() if s.get("profiles") == [profile]}
        aliases = {a for s in members.values() for a in s["networks"]["default"]["aliases"]}
        assert aliases == upstreams, f"profile {profile} must answer to every nginx upstream name"
        for s in members.values():
            assert s["environment"]["STREAMPLEX_REDIS_URL"] == "redis://redis:6379/0"
            assert s["environment"]["STREAMPLEX_REDIS_PASSWORD"] == "${REDIS_PASSWORD:?set REDIS_PASSWORD in .env}"
            assert set(s["networks"]) == {"default", "backend"}
            assert int(s["stop_grace_period"].rstrip("s")) > int(s["environment"]["STREAMPLEX_SHUTDOWN_TIMEOUT"])
            gpu = s.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
            assert bool(gpu) == (profile == "gpu")
            if gpu:
                assert gpu[0]["driver"] == "nvidia" and gpu[0]["capabilities"] == ["gpu"]
    assert "./deploy/nginx/streamplex.conf:/etc/nginx/conf.d/default.conf:ro" in services["nginx"]["volumes"]


def test_compose_tiered_profile_runs_two_edge_nodes_and_a_model_worker_on_the_gpu() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    members = {name: s for name, s in services.items() if s.get("profiles") == ["tiered"]}
    assert set(members) == {"edge-1", "edge-2", "model-1"}
    upstreams = set(re.findall(r"server (streamplex-\d):8000", (ROOT / "deploy/nginx/streamplex.conf").read_text()))
    edges = [members["edge-1"], members["edge-2"]]
    assert {a for s in edges for a in s["networks"]["default"]["aliases"]} == upstreams, "nginx reaches the edge nodes"
    model = members["model-1"]
    assert model["environment"]["STREAMPLEX_ROLE"] == "model" and model["networks"] == ["backend"], "the worker holds no client"
    assert model["image"] == "streamplex:cuda" and model["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for s in [*edges, model]:
        env = s["environment"]
        assert env["STREAMPLEX_REMOTE_CHANNELS"] == "chat,translation,analysis"
        assert env["STREAMPLEX_REDIS_PASSWORD"] == "${REDIS_PASSWORD:?set REDIS_PASSWORD in .env}"
        Settings(**{k.removeprefix("STREAMPLEX_").lower(): v for k, v in env.items() if "$" not in v})  # a valid configuration
    assert all(s["image"] == "streamplex:cpu" and "deploy" not in s for s in edges), "edge nodes need no GPU"
    assert {"edge-1", "edge-2"} <= set(services["nginx"]["depends_on"])


def test_compose_redis_requires_a_password_and_only_the_servers_reach_it() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    redis = services["redis"]
    command = redis["command"]
    password = command[command.index("--requirepass") + 1]
    assert password == "${REDIS_PASSWORD:?set REDIS_PASSWORD in .env}", "the password comes from .env and must be set"
    assert redis["environment"]["REDISCLI_AUTH"] == password, "the health check authenticates"
    assert redis["networks"] == ["backend"] and compose["networks"]["backend"] == {"internal": True}
    on_backend = {name for name, s in services.items() if "backend" in s.get("networks", ())}
    assert on_backend == {"redis", "cpu-1", "cpu-2", "gpu-1", "gpu-2", "edge-1", "edge-2", "model-1"}, "nginx must not reach Redis"
    assert "STREAMPLEX_WORKERS" in services["cpu-1"]["environment"]


def test_the_shipped_configs_trust_exactly_the_proxy_in_front() -> None:
    """compose trusts nginx's fixed address alone; the image trusts no one; uvicorn's FORWARDED_ALLOW_IPS is gone."""
    compose = yaml.safe_load(COMPOSE.read_text())
    nginx = compose["services"]["nginx"]["networks"]["default"]["ipv4_address"]
    (subnet,) = [c["subnet"] for c in compose["networks"]["default"]["ipam"]["config"]]
    assert ipaddress.ip_address(nginx) in ipaddress.ip_network(subnet)
    servers = [s for s in compose["services"].values() if s.get("profiles") in (["cpu"], ["gpu"])]
    assert servers and all(s["environment"]["STREAMPLEX_TRUSTED_PROXIES"] == nginx for s in servers)
    for path in (COMPOSE, DOCKERFILE, ROOT / "deploy/gke/base/kustomization.yaml"):
        assert "FORWARDED_ALLOW_IPS" not in path.read_text(), path
    assert "STREAMPLEX_TRUSTED_PROXIES" not in DOCKERFILE.read_text().split("# No proxy is trusted")[0], "the image trusts no proxy"
    conf = (ROOT / "deploy/nginx/streamplex.conf").read_text()
    assert re.search(r"^\s*proxy_set_header X-Forwarded-For\s+\$remote_addr;", conf, re.M) and not re.search(
        r"^\s*proxy_set_header X-Forwarded-For\s+\$proxy_add", conf, re.M
    )
