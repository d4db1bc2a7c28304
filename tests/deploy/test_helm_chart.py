"""The Helm chart without the `helm` binary (it cannot be installed on this project's machines): values files
against values.schema.json, every `.Values` path the templates use against values.yaml (and every value used),
balanced template blocks, files the templates read, inline manifests the service accepts, and a strict YAML lint of
every non-template YAML file of k8s/ and deploy/. Where `helm` is on PATH, `helm lint` and `helm template` run too.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from chart_values import VALUES_FILES, load_values, merged
from deploy_paths import CHART, DASHBOARD, DEPLOY, ROOT
from promql_sources import panels

TEMPLATES = sorted((CHART / "templates").glob("*"))


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("path", VALUES_FILES, ids=lambda p: p.name)
def test_values_files_match_schema(path, validator):
    values = merged(load_values(path))
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(values)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize(("overrides", "why"), [
    ({"worker": {"gpuu": 1}}, "a misspelt key"),
    ({"models": []}, "no model to serve"),
    ({"models": [{"name": "has space"}]}, "a model name Kubernetes names cannot carry"),
    ({"redis": {"bundled": {"enabled": False}}}, "external Redis without the Secret of its URL"),
    ({"worker": {"autoscaling": {"keda": {"enabled": True}, "hpa": {"enabled": True}}}}, "KEDA and HPA at once"),
    ({"worker": {"autoscaling": {"keda": {"source": "kafka"}}}}, "an unknown KEDA source"),
    ({"config": {"maxAttempts": 0}}, "a setting the service would reject"),
    ({"manifest": {"path": "relative.yaml", "inline": ""}}, "a manifest path that is not absolute"),
    ({"worker": {"engineCache": {"persistence": {"accessModes": ["ReadWriteSometimes"]}}}}, "a bad access mode"),
])
def test_schema_rejects_bad_values(overrides, why, validator):
    assert list(validator.iter_errors(merged(overrides))), f"schema accepted {why}: {overrides}"


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


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_template_blocks_are_balanced(path):
    text = re.sub(r"\{\{-?\s*/\*.*?\*/\s*-?\}\}", "", path.read_text(), flags=re.S)  # comments
    actions = re.findall(r"\{\{-?\s*(\w+)", text)
    opened = sum(a in ("if", "range", "with", "define") for a in actions)
    assert opened == actions.count("end"), f"{opened} blocks opened, {actions.count('end')} closed"


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


@pytest.mark.parametrize("path", VALUES_FILES, ids=lambda p: p.name)
def test_inline_manifests_load_in_the_service(path, tmp_path):
    from service.contracts.manifest import load_manifest

    values = merged(load_values(path))
    if not values["manifest"]["inline"]:
        return
    (tmp_path / "models.yaml").write_text(values["manifest"]["inline"])
    manifest = load_manifest(tmp_path / "models.yaml")
    for model in values["models"]:
        manifest.get(model["name"])  # every served model is in the manifest


def test_default_manifest_path_serves_the_default_models():
    """manifest.path points into the image; the image copies deploy/manifests/ and models/ from the repository."""
    from service.contracts.manifest import load_manifest

    for path in VALUES_FILES:
        values = merged(load_values(path))
        if values["manifest"]["inline"]:
            continue
        local = ROOT / Path(values["manifest"]["path"]).relative_to("/app")
        manifest = load_manifest(local)
        for model in values["models"]:
            manifest.get(model["name"])


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


def _without_checksums(doc: dict) -> dict:
    for meta in (doc.get("metadata", {}), doc.get("spec", {}).get("template", {}).get("metadata", {})):
        for key in [k for k in meta.get("annotations") or {} if k.startswith("checksum/")]:
            del meta["annotations"][key]
    return doc


@pytest.mark.parametrize("values_file", VALUES_FILES, ids=lambda p: p.name)
def test_helm_lint_and_template(values_file):
    """Where helm exists: `helm lint`, and `helm template` gives the objects tests/deploy/gotemplate.py renders."""
    helm = shutil.which("helm")
    if helm is None:
        pytest.skip("`helm` is not installed here (no package of it on PyPI or Debian's archive); "
                    "test_chart_render.py renders the chart with tests/deploy/gotemplate.py instead")
    from gotemplate import Chart

    subprocess.run([helm, "lint", str(CHART), "-f", str(values_file)], check=True, capture_output=True, timeout=60)
    out = subprocess.run([helm, "template", "spo-diffusion", str(CHART), "-n", "spo", "-f", str(values_file)],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    by_helm = sorted((_without_checksums(d) for d in yaml.safe_load_all(out) if d), key=lambda d: (d["kind"],
                                                                                               d["metadata"]["name"]))
    ours = sorted((_without_checksums(d) for d in Chart(CHART, merged(load_values(values_file)), "spo-diffusion",
                                                          "spo").manifests()),
                  key=lambda d: (d["kind"], d["metadata"]["name"]))
    assert by_helm == ours
