"""What an operator relies on: every setting in .env.example and passed by compose,
TLS, disruption budgets, network policies that keep Flower and the metrics ports
private, queue-depth autoscaling, alert rules and a dashboard that name real metrics."""

from __future__ import annotations

import json
import re
from typing import Any

import yaml
from pydantic import BaseModel

from backend.config import Settings
from tests.deploy.test_manifests import compose, k8s_documents
from tests.support.paths import ROOT

MONITORING = ROOT / "k8s" / "monitoring"


def setting_names(model: type[BaseModel] = Settings, prefix: str = "") -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            names += setting_names(kind, f"{prefix}{name.upper()}__")
        else:
            names.append(f"{prefix}{name.upper()}")
    return names


def docs(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in k8s_documents() if d["kind"] == kind]


def monitoring(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((MONITORING / name).read_text())
    return loaded


def test_env_example_lists_every_setting() -> None:
    text = (ROOT / "docker" / ".env.example").read_text()
    listed = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=", text, re.M))
    missing = [n for n in setting_names() if n not in listed]
    assert not missing, f".env.example lacks {missing}"
    assert {"OTEL_EXPORTER_OTLP_ENDPOINT", "FORWARDED_ALLOW_IPS"} <= listed


def test_compose_passes_what_features_need() -> None:
    services = compose()["services"]
    for name in ("api", "worker"):
        env = services[name]["environment"]
        for key in ("ANTHROPIC__API_KEY", "STORAGE__BACKEND", "STORAGE__S3_BUCKET",
                    "STORAGE__S3_SECRET_ACCESS_KEY", "METRICS__TOKEN",
                    "OTEL_EXPORTER_OTLP_ENDPOINT", "FORWARDED_ALLOW_IPS"):  # fmt: skip
            assert key in env, (name, key)
        assert env["STORAGE__LOCAL_ROOT"] == "/data/files"
        assert "files:/data/files" in services[name]["volumes"]
    # Forwarded headers are trusted from named proxies only, never from everyone.
    assert "*" not in services["api"]["environment"]["FORWARDED_ALLOW_IPS"]
    assert "files" in compose()["volumes"]


def test_ingress_terminates_tls() -> None:
    (ingress,) = docs("Ingress")
    tls = ingress["spec"]["tls"][0]
    assert tls["secretName"] and set(tls["hosts"]) == {r["host"] for r in ingress["spec"]["rules"]}


def test_disruption_budgets_for_api_and_worker() -> None:
    components = {
        d["metadata"]["labels"]["app.kubernetes.io/component"] for d in docs("PodDisruptionBudget")
    }
    assert components == {"api", "worker"}


def test_flower_and_metrics_ports_are_private() -> None:
    policies = {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in docs("NetworkPolicy")
    }
    assert set(policies) == {"api", "worker", "flower"}
    for component, port in (("flower", 5555), ("worker", "metrics"), ("api", "metrics")):
        rules = [r for r in policies[component]["spec"]["ingress"]
                 if any(p["port"] == port for p in r.get("ports", []))]  # fmt: skip
        assert rules, (component, port)
        for rule in rules:
            # Reachable only from named namespaces, never from anywhere.
            assert rule.get("from"), (component, port)
            for peer in rule["from"]:
                assert "namespaceSelector" in peer and peer["namespaceSelector"]["matchLabels"]


def test_files_work_with_a_read_only_root_filesystem() -> None:
    (config,) = docs("ConfigMap")
    root = config["data"]["STORAGE__LOCAL_ROOT"]
    claims = {d["metadata"]["name"] for d in docs("PersistentVolumeClaim")}
    for deployment in docs("Deployment"):
        component = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        if component not in ("api", "worker"):
            continue
        spec = deployment["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volume = next(v for v in spec["volumes"] if v["name"] == mounts[root])
        assert volume["persistentVolumeClaim"]["claimName"] in claims


def test_secret_template_carries_model_storage_and_metrics_keys() -> None:
    (secret,) = docs("Secret")
    for key in ("ANTHROPIC__API_KEY", "STORAGE__S3_ACCESS_KEY_ID",
                "STORAGE__S3_SECRET_ACCESS_KEY", "METRICS__TOKEN"):  # fmt: skip
        assert key in secret["stringData"], key


def test_workers_scale_on_queue_depth() -> None:
    scaled = monitoring("keda-scaledobject.yaml")
    assert scaled["kind"] == "ScaledObject"
    assert scaled["spec"]["scaleTargetRef"]["name"] == "orchestration-studio-worker"
    queues = {t["metadata"]["listName"] for t in scaled["spec"]["triggers"] if t["type"] == "redis"}
    assert queues == {"high_priority", "default", "low_priority"}
    workers = [
        d for d in docs("Deployment") if d["metadata"]["name"] == "orchestration-studio-worker"
    ]
    assert workers and scaled["spec"]["minReplicaCount"] >= 1


def _metric_names() -> set[str]:
    from backend.observability import metrics

    names = set()
    for value in vars(metrics).values():
        name = getattr(value, "_name", None)
        if isinstance(name, str) and name.startswith("orch_"):
            names.add(name)
    return names | {"orch_queue_depth", "orch_db_pool_in_use"}


def _used(expr: str) -> set[str]:
    found = set(re.findall(r"\b(orch_[a-z_]+)", expr))
    return {re.sub(r"_(bucket|count|sum|total)$", "", n) for n in found}


def test_alert_rules_cover_the_seed_alerts_on_real_metrics() -> None:
    rules = monitoring("prometheus-rules.yaml")
    assert rules["kind"] == "PrometheusRule"
    alerts = {r["alert"]: r for g in rules["spec"]["groups"] for r in g["rules"]}
    assert {"StudioHighErrorRate", "StudioHighLatencyP95", "StudioQueueBacklog",
            "StudioWorkerDown", "StudioCostSpike"} <= set(alerts)  # fmt: skip
    known = {re.sub(r"_total$", "", n) for n in _metric_names()}
    for name, rule in alerts.items():
        assert _used(rule["expr"]) <= known | {"orch_"}, (name, _used(rule["expr"]) - known)
        assert rule["labels"]["severity"] in ("warning", "critical")


def test_service_monitor_scrapes_the_metrics_ports() -> None:
    monitor = monitoring("servicemonitor.yaml")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    services = [
        d for d in docs("Service") if any(p["name"] == "metrics" for p in d["spec"]["ports"])
    ]
    components = {s["metadata"]["labels"]["app.kubernetes.io/component"] for s in services}
    assert components == {"api", "worker"}
    for service in services:
        labels = service["metadata"]["labels"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_grafana_dashboard_loads_and_names_real_metrics() -> None:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    known = {re.sub(r"_total$", "", n) for n in _metric_names()}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    for expr in exprs:
        assert _used(expr) <= known, expr


def test_monitoring_files_are_all_checked() -> None:
    assert {p.name for p in MONITORING.iterdir()} == {
        "keda-scaledobject.yaml", "servicemonitor.yaml", "prometheus-rules.yaml",
        "grafana-dashboard.json",
    }  # fmt: skip
