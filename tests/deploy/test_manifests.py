"""Docker and Kubernetes files, checked statically (no Docker engine or cluster here):
structure, schemas, and that every Procfile process has a counterpart in each."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.support.paths import ROOT

# Procfile process -> compose service / k8s component.
COUNTERPART = {
    "web": "api",
    "worker": "worker",
    "beat": "beat",
    "flower": "flower",
    "release": "migrate",
}


def procfile() -> dict[str, str]:
    entries = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, command = line.split(":", 1)
            entries[name.strip()] = command.strip()
    return entries


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker" / "docker-compose.yml").read_text())
    return loaded


def k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted((ROOT / "k8s").glob("*.yaml")):
        docs += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def test_procfile_has_every_process() -> None:
    entries = procfile()
    assert set(entries) == set(COUNTERPART)
    assert entries["web"].startswith("uvicorn backend.main:app")
    assert "${PORT:-8000}" in entries["web"]
    assert entries["release"] == "alembic upgrade head"
    for queue in ("high_priority", "default", "low_priority"):
        assert queue in entries["worker"]


def test_compose_services_health_and_order() -> None:
    services = compose()["services"]
    expected = {"postgres", "redis", *COUNTERPART.values()}
    assert set(services) == expected
    for name, service in services.items():
        if name != "migrate":
            assert "test" in service.get("healthcheck", {}), f"{name} has no healthcheck"
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker", "beat"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["redis"]["condition"] == "service_healthy", name
    assert services["api"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["beat"]["deploy"]["replicas"] == 1


def test_compose_requires_real_secrets() -> None:
    env = compose()["services"]["api"]["environment"]
    for key in (
        "SECURITY__SECRET_KEY",
        "SECURITY__ENCRYPTION_KEY",
        "FLOWER__PASSWORD",
        "SMTP__HOST",
    ):
        assert re.fullmatch(r"\$\{" + key + r":\?.+\}", env[key]), key


def test_dockerfile_is_multistage_nonroot_with_healthcheck() -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    assert "uv sync --frozen --no-dev" in text
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and not user[-1].startswith(("root", "0"))
    assert re.search(r"^HEALTHCHECK ", text, re.M)


@pytest.mark.parametrize(
    ("path", "doc"),
    k8s_documents(),
    ids=lambda v: (
        v.name if isinstance(v, Path) else v.get("kind", "?") if isinstance(v, dict) else "?"
    ),
)
def test_k8s_manifest_matches_the_schema(path: Path, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_k8s_has_every_piece() -> None:
    kinds: dict[str, set[str]] = {}
    for _, doc in k8s_documents():
        component = doc["metadata"].get("labels", {}).get("app.kubernetes.io/component", "")
        kinds.setdefault(doc["kind"], set()).add(component)
    assert {"api", "worker", "beat", "flower"} <= kinds["Deployment"]
    assert (
        "api" in kinds["Service"]
        and "api" in kinds["Ingress"]
        and "api" in kinds["HorizontalPodAutoscaler"]
    )
    assert "migrate" in kinds["Job"]
    assert "ConfigMap" in kinds and "Secret" in kinds
    for process, component in COUNTERPART.items():
        found = {c for cs in kinds.values() for c in cs}
        assert component in found, f"Procfile process {process!r} has no k8s counterpart"


def test_beat_runs_once_and_is_recreated_not_rolled() -> None:
    beat = next(
        d
        for _, d in k8s_documents()
        if d["kind"] == "Deployment"
        and d["metadata"]["labels"]["app.kubernetes.io/component"] == "beat"
    )
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"]["type"] == "Recreate"


def test_pods_run_as_non_root() -> None:
    for _, doc in k8s_documents():
        if doc["kind"] in ("Deployment", "Job"):
            spec = doc["spec"]["template"]["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True, doc["metadata"]["name"]
            for container in spec["containers"]:
                assert container["securityContext"]["allowPrivilegeEscalation"] is False
