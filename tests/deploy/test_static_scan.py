"""Static checks of the container and compose files (no Docker engine runs here): checkov on the Dockerfile and on
the chart's rendered manifests, where every finding must be fixed or skipped inline with a reason, plus the
properties the deployment relies on (two targets, non-root, health checks, volumes, drain time)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from deploy_paths import DEPLOY, ROOT
from helm_render import CASES, Helm, case_id

DOCKERFILE = ROOT / "Dockerfile"


def checkov_report(checkov: str, args: list[str]) -> list[dict]:
    """checkov's JSON reports (one per framework), offline (--skip-download: no policy or guideline download)."""
    result = subprocess.run([checkov, *args, "--skip-download", "--output", "json"], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode in (0, 1), result.stderr[-3000:]
    report = json.loads(result.stdout)
    return report if isinstance(report, list) else [report]


def assert_clean(reports: list[dict]) -> int:
    """No failed check; every skipped one carries a justification. Returns the number of passed checks."""
    failed, unjustified, passed = [], [], 0
    for report in reports:
        results = report.get("results", {})
        passed += len(results.get("passed_checks", []))
        failed += [f"{c['check_id']} {c['check_name']} ({c['resource']}, {c.get('file_path')}:"
                   f"{c.get('file_line_range')})" for c in results.get("failed_checks", [])]
        for check in results.get("skipped_checks", []):
            comment = (check.get("check_result") or {}).get("suppress_comment") or ""
            if len(comment.strip()) < 15:
                unjustified.append(f"{check['check_id']} on {check['resource']}: {comment!r}")
        assert not report.get("summary", {}).get("parsing_errors"), report["summary"]
    assert not failed, "checkov findings (fix them, or skip inline with the reason):\n" + "\n".join(failed)
    assert not unjustified, "checkov skips without a reason:\n" + "\n".join(unjustified)
    return passed


def test_checkov_dockerfile(checkov):
    passed = assert_clean(checkov_report(checkov, ["--file", str(DOCKERFILE), "--framework", "dockerfile"]))
    assert passed > 50


@pytest.mark.parametrize("values_file", CASES, ids=case_id)
def test_checkov_rendered_chart(checkov, helm: Helm, values_file, tmp_path):
    """The chart rendered by `helm template` and scanned as Kubernetes manifests; the chart's justified skips are
    `checkov.io/skipN` annotations on its objects."""
    (tmp_path / "rendered.yaml").write_text(helm.manifests_text(values_file))
    passed = assert_clean(checkov_report(checkov, ["--directory", str(tmp_path), "--framework", "kubernetes"]))
    assert passed > 100


def stages(text: str) -> dict[str, str]:
    """Dockerfile stage name -> its instructions."""
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", text, flags=re.M | re.I)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def test_dockerfile_targets():
    text = DOCKERFILE.read_text()
    found = stages(text)
    assert {"api", "worker"} <= set(found)
    for name in ("api", "worker"):
        stage = found[name]
        user = re.findall(r"^USER\s+(\d+)", stage, re.M)
        assert user and int(user[-1]) >= 10000, f"{name}: runs as a numeric non-root user"
        assert re.search(r"^HEALTHCHECK\s", stage, re.M), f"{name}: HEALTHCHECK"
        assert re.search(r'^VOLUME \["/models", "/cache"\]', stage, re.M), f"{name}: model and cache volumes"
        assert 'ENTRYPOINT ["tini", "--", "spo"]' in stage, f"{name}: tini forwards SIGTERM so workers drain"
        assert "COPY --from=" in stage, f"{name}: copies its venv from a build stage (multi-stage)"
    installs = re.findall(r"pip install ([^\n]*)", found["api"] + found["api-build"])
    assert installs == ['".[serve]"'], f"the API image installs the serve extra only (no torch): {installs}"
    for package in ("torch==", ".[infer,serve,tensorrt]", "onnxruntime-gpu"):
        assert package in found["worker-build"], package
    assert "SPO_ENGINE_CACHE=/cache/engines" in found["worker"]
    assert "--metrics-port" in found["worker"] and "9100" in found["worker"]


def test_dockerfile_copies_what_the_images_need():
    """Every COPY source exists and is not excluded by .dockerignore."""
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for source in re.findall(r"^COPY\s+(?:--chown=\S+\s+)?(?!--from)(\S+(?:\s+\S+)*?)\s+\S+$",
                             DOCKERFILE.read_text(), re.M):
        for path in source.split():
            assert (ROOT / path).exists(), path
            assert path not in ignored, f"{path} is copied but .dockerignore excludes it"
    for must in (".git", ".venv", "tests", "runs"):
        assert must in ignored, f".dockerignore should exclude {must}"
    # The images default to the baked-in manifest; it and the production one must be in the build context.
    assert (ROOT / "models" / "models.yaml").is_file() and (ROOT / "deploy" / "manifests" / "spo-published.yaml")\
        .is_file()


def test_compose_file():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "api", "worker", "prometheus", "grafana"}
    assert services["api"]["build"]["target"] == "api" and services["worker"]["build"]["target"] == "worker"
    grace = services["worker"]["stop_grace_period"]
    assert re.fullmatch(r"\d+m", grace) and int(grace[:-1]) >= 5, "worker stop grace covers a batch drain"
    for name, service in services.items():
        image = service.get("image", "")
        assert ":" in image and not image.endswith(":latest"), f"{name}: pinned image tag"
    mounts = {m.split(":")[0]: m.split(":")[1] for m in services["prometheus"]["volumes"]}
    assert mounts["./prometheus"] == "/etc/prometheus"
    for source in ("./grafana/provisioning", "./grafana/dashboards"):
        assert (DEPLOY / source).is_dir(), source
    # Prometheus' service discovery names are the compose service names.
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    for job in prometheus["scrape_configs"]:
        for sd in job["dns_sd_configs"]:
            assert set(sd["names"]) <= set(services), sd
    # Grafana's dashboard provider reads the folder compose mounts the dashboards into.
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "spo-diffusion.yml")
                              .read_text())["providers"][0]
    grafana_mounts = {m.split(":")[0]: m.split(":")[1] for m in services["grafana"]["volumes"]}
    assert provider["options"]["path"] == grafana_mounts["./grafana/dashboards"]
    gpu = yaml.safe_load((DEPLOY / "docker-compose.gpu.yml").read_text())["services"]["worker"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_compose_env_names_are_service_settings():
    """Every SPO_* variable the compose files set is one the service reads."""
    from service.contracts.config import Settings

    known = {f"SPO_{name.upper()}" for name in Settings.model_fields} | {"SPO_LOG_LEVEL", "SPO_ENGINE_CACHE"}
    for path in (DEPLOY / "docker-compose.yml", DEPLOY / "docker-compose.gpu.yml"):
        names = set(re.findall(r"^\s+(SPO_\w+):", Path(path).read_text(), re.M))
        assert names and names <= known, names - known
