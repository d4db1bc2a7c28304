"""promtool on the shipped Prometheus files: the rules parse (`check rules`), the alerts fire on the situations
they are for and stay quiet below them (`test rules`), and the compose scrape config is valid (`check config`).
The Helm chart embeds copies of the rules and the dashboard; they must not drift from deploy/."""

from __future__ import annotations

import subprocess

from deploy_paths import CHART, DASHBOARD, DEPLOY, RULES


def run(cmd: list[str]) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=DEPLOY / "prometheus")
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def test_promtool_check_rules(promtool):
    assert RULES
    out = run([promtool, "check", "rules", *map(str, RULES)])
    assert "SUCCESS" in out


def test_promtool_test_rules(promtool):
    tests = sorted((DEPLOY / "prometheus" / "tests").glob("*.yml"))
    assert tests
    out = run([promtool, "test", "rules", *map(str, tests)])
    assert "SUCCESS" in out


def test_every_alert_has_a_unit_test():
    import yaml

    alerts = {r["alert"] for path in RULES for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]
              if "alert" in r}
    tested = set()
    for path in (DEPLOY / "prometheus" / "tests").glob("*.yml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            tested |= {t["alertname"] for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    assert alerts == tested, f"alerts never shown firing in a promtool test: {alerts - tested}"


def test_promtool_check_config(promtool):
    out = run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")])
    assert "is valid prometheus config file syntax" in out


def test_chart_copies_match_deploy():
    assert (CHART / "files" / "spo-alerts.yml").read_bytes() == (DEPLOY / "prometheus" / "rules" /
                                                                 "spo-alerts.yml").read_bytes(), \
        "copy deploy/prometheus/rules/spo-alerts.yml to k8s/spo-diffusion/files/"
    assert (CHART / "files" / "spo-diffusion.json").read_bytes() == DASHBOARD.read_bytes(), \
        "copy deploy/grafana/dashboards/spo-diffusion.json to k8s/spo-diffusion/files/"


def _anchors(markdown: str) -> dict[str, str]:
    """Heading anchor (as Markdown renderers make them: lower case, spaces to dashes) -> the section's text."""
    import re

    parts = re.split(r"^#{1,6} +(.+)$", markdown, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", title).strip().lower().replace(" ", "-"): body
            for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def test_every_alert_links_its_runbook():
    """runbook_url names a section of the chart README that exists and says something."""
    import yaml

    sections = _anchors((CHART / "README.md").read_text())
    alerts = [r for path in RULES for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]
              if "alert" in r]
    assert alerts
    for alert in alerts:
        url = alert["annotations"].get("runbook_url", "")
        path, _, anchor = url.partition("#")
        assert path == "k8s/spo-diffusion/README.md" and anchor == alert["alert"].lower(), (alert["alert"], url)
        assert len(sections.get(anchor, "").split()) >= 20, f"runbook section for {alert['alert']} is missing"


def test_chart_makes_runbook_links_absolute(helm):
    base = "https://git.example.com/spo/blob/main/k8s/spo-diffusion/README.md"
    for overrides, prefix in (({}, "k8s/spo-diffusion/README.md#"),
                              ({"metrics": {"prometheusRule": {"runbookBaseUrl": base}}}, base + "#")):
        (rule,) = [d for d in helm.template(overrides=overrides).docs if d["kind"] == "PrometheusRule"]
        urls = [r["annotations"]["runbook_url"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
        assert urls and all(u.startswith(prefix) and u.count("#") == 1 for u in urls), urls
