"""The Helm chart checked by the real `helm` (pinned; tests/deploy/install-helm.sh): `helm lint --strict` with its
defaults and every values file of ci/, the schema refusing bad values, plus what helm cannot see: every `.Values`
path the templates use exists in values.yaml (and every value is used), the files the templates read, inline
manifests the service accepts, and a strict YAML lint of every non-template YAML file of k8s/ and deploy/.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from deploy_paths import CHART, DASHBOARD, DEPLOY, ROOT
from helm_render import CASES, Helm, HelmError, case_id
from promql_sources import panels

TEMPLATES = sorted((CHART / "templates").glob("*"))


def load_values(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


@pytest.mark.parametrize("values_file", CASES, ids=case_id)
def test_helm_lint_strict(values_file, helm: Helm, report):
    """Lint with --strict (warnings fail too); the values are checked against values.schema.json on the way."""
    out = helm.lint(values_file)
    report(f"{helm.version()}: helm lint --strict {case_id(values_file)}: {out.strip().splitlines()[-1]}")
    assert "0 chart(s) failed" in out and "[WARNING]" not in out, out


@pytest.mark.parametrize(("overrides", "where"), [
    ({"worker": {"gpuu": 1}}, "additional properties 'gpuu' not allowed"),
    ({"models": []}, "/models"),
    ({"models": [{"name": "has space"}]}, "/models/0/name"),
    ({"worker": {"autoscaling": {"keda": {"source": "kafka"}}}}, "/worker/autoscaling/keda/source"),
    ({"config": {"maxAttempts": 0}}, "/config/maxAttempts"),
    ({"manifest": {"path": "relative.yaml", "inline": ""}}, "/manifest/path"),
    ({"worker": {"engineCache": {"persistence": {"accessModes": ["ReadWriteSometimes"]}}}},
     "/worker/engineCache/persistence/accessModes/0"),
])
def test_schema_rejects_bad_values(overrides, where, helm: Helm):
    """helm refuses them at the schema, naming the value."""
    with pytest.raises(HelmError, match="don't meet the specifications of the schema") as err:
        helm.template(overrides=overrides)
    assert where in str(err.value), str(err.value)


def _template_text() -> str:
    return "\n".join(p.read_text() for p in TEMPLATES)


def _referenced_paths(alias_roots: bool = True) -> set[tuple[str, ...]]:
    """`.Values.a.b` paths used by the templates, with `$var := .Values.a` variables resolved (`$var.c` is a.c);
    `alias_roots`: count `a` itself as used (it is read, but only its fields used through `$var` matter)."""
    text = _template_text()
    loops = set(re.findall(r"range\s+\$(\w+)\s*:=", text))  # items of a list: checked against the schema
    aliases = {name: tuple(path.split(".")[1:]) for name, path in
               re.findall(r"\$(\w+)\s*:?=\s*\$?\.Values((?:\.\w+)+)", text) if name not in loops}
    paths = {tuple(p.split(".")[1:]) for p in re.findall(r"\$?\.Values((?:\.\w+)+)", text)}
    for name, prefix in aliases.items():
        paths |= {prefix + tuple(p.split(".")[1:]) for p in re.findall(rf"\${name}((?:\.\w+)+)", text)}
        used_whole = re.search(rf"\${name}(?![\w.])(?!\s*:?=)", text)  # e.g. `toYaml $resources`
        if not alias_roots and not used_whole:
            paths.discard(prefix)
    return paths


def _lookup(values: dict, path: tuple[str, ...]) -> bool:
    node = values
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def test_every_values_path_in_templates_exists():
    values = load_values(CHART / "values.yaml")
    paths = _referenced_paths()
    assert len(paths) > 40
    missing = sorted(".".join(p) for p in paths if not _lookup(values, p))
    assert not missing, f"templates use values that values.yaml does not define: {missing}"


def test_every_value_is_used():
    """A value no template reads would be a knob that silently does nothing."""
    values = load_values(CHART / "values.yaml")
    used = _referenced_paths(alias_roots=False)

    def leaves(node, path=()):
        if isinstance(node, dict) and node:
            for key, child in node.items():
                yield from leaves(child, (*path, key))
        else:
            yield path

    unused = [".".join(leaf) for leaf in leaves(values) if not any(leaf[:len(u)] == u for u in used)]
    assert not unused, f"values.yaml entries no template reads: {unused}"


@pytest.mark.parametrize(("var", "schema_path"), [("m", ("models", "items")),
                                                   ("gpuType", ("engineBuild", "properties", "gpuTypes", "items"))])
def test_list_item_fields_are_in_the_schema(var, schema_path):
    """Fields read from list items (`$m.maxBatch` of a models entry) must be declared for those items."""
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]
    node = schema
    for key in schema_path:
        node = node[key]
    fields = set(re.findall(rf"\${var}\.(\w+)", _template_text()))
    assert fields, var
    assert fields <= set(node["properties"]), fields - set(node["properties"])


def test_files_the_templates_read_exist():
    names = set(re.findall(r'\.Files\.Get\s+"([^"]+)"', _template_text()))
    assert names == {"files/spo-alerts.yml", "files/spo-diffusion.json"}
    for name in names:
        assert (CHART / name).is_file(), name


def test_chart_metadata():
    chart = load_values(CHART / "Chart.yaml")
    assert chart["apiVersion"] == "v2" and chart["name"] == "spo-diffusion"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"]), chart["version"]
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert chart["appVersion"] == version, "appVersion is the package version the images are built from"


@pytest.mark.parametrize("values_file", CASES, ids=case_id)
def test_served_models_are_in_the_manifest_the_pods_read(values_file, helm: Helm, tmp_path):
    """SPO_MANIFEST of every pod is the inline manifest's ConfigMap or a file the image copies from the repository
    (deploy/manifests/, models/), and it declares every model the pod serves."""
    from service.contracts.manifest import load_manifest

    docs = helm.template(values_file).docs
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    checked = 0
    for workload in (d for d in docs if d["kind"] == "Deployment"):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            if "SPO_MANIFEST" not in env:
                continue
            path = env["SPO_MANIFEST"]
            if path == "/etc/spo/models.yaml":
                (configmap,) = [c for name, c in configmaps.items() if name.endswith("-manifest")]
                local = tmp_path / "models.yaml"
                local.write_text(configmap["data"]["models.yaml"])
            else:
                local = ROOT / Path(path).relative_to("/app")
            manifest = load_manifest(local)
            for name in env["SPO_MODELS"].split(","):
                manifest.get(name)
            checked += 1
    assert checked >= 2, "the API and at least one worker read a manifest"


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML keeps the last one silently)."""


def _no_duplicates(loader, node, deep=False):
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"]
    dupes = {k for k in keys if keys.count(k) > 1}
    if dupes:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {dupes}", node.start_mark)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)
LINTED = sorted(p for p in [*DEPLOY.rglob("*.y*ml"), *(ROOT / "k8s").rglob("*.y*ml")]
                if "templates" not in p.parts)


@pytest.mark.parametrize("path", LINTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_lint(path):
    text = path.read_text()
    assert "\t" not in text, "tab characters"
    assert text.endswith("\n") and not text.endswith("\n\n"), "one final newline"
    long_lines = [i + 1 for i, line in enumerate(text.splitlines()) if len(line) > 120]
    assert not long_lines, f"lines over 120 characters: {long_lines}"
    trailing = [i + 1 for i, line in enumerate(text.splitlines()) if line != line.rstrip()]
    assert not trailing, f"trailing whitespace on lines {trailing}"
    documents = list(yaml.load_all(text, Loader=StrictLoader))
    assert documents and all(d is not None for d in documents)


def test_dashboard_structure():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["model"]["includeAll"]
    for panel in panels(dashboard):
        assert panel["gridPos"]["x"] >= 0 and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel.get("description"), f"panel {panel['title']!r} needs a description"
    repeated = [p for p in panels(dashboard) if p.get("repeat")]
    assert [p["repeat"] for p in repeated] == ["model"], "one row repeated per model"


def test_dashboard_keeps_releases_apart():
    """Grafana dashboard-linter's template and target rules: `job` and `instance` variables (multi, from
    $datasource, allValue .+), plus `namespace` (allValue .*: compose has none), and every selector of every target
    filtered by all three, so two releases in one cluster never mix their numbers."""
    from promql_sources import dashboard_queries, selectors

    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    for name, all_value in (("job", ".+"), ("instance", ".+"), ("namespace", ".*")):
        var = variables[name]
        assert var["type"] == "query" and var["multi"] and var["includeAll"] and var["allValue"] == all_value, var
        assert var["datasource"]["uid"] == "${datasource}" and var["query"]["query"].startswith("label_values("), var
    unscoped = []
    for where, expr in dashboard_queries(DASHBOARD):
        for metric, matchers in selectors(expr):
            have = {(label, op, value) for label, op, value in matchers}
            if not {("namespace", "=~", "$namespace"), ("job", "=~", "$job"), ("instance", "=~", "$instance")} <= have:
                unscoped.append(f"{where}: {metric}")
    assert not unscoped, unscoped
