"""The chart rendered by the real `helm` (pinned; tests/deploy/install-helm.sh installs it): manifests and the values
helm computed for them (its own merge of values.yaml, the values files and the overrides), shared by the chart tests.

The computed values come from a copy of the chart with one extra template that prints `.Values` as JSON, so the tests
compare the objects against exactly what helm merged, and no merge is re-implemented here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from deploy_paths import CHART

HELM_VERSION = "v4.1.4"  # the one tests/deploy/install-helm.sh installs
TOOLS_DIR = Path(os.environ.get("SPO_TOOLS_DIR", Path.home() / ".cache" / "spo-diffusion"))
VALUES_FILES = sorted((CHART / "ci").glob("*.yaml"))
# The chart's own defaults (no -f) and every values file of ci/: the cases every chart test runs.
CASES: list[Path | None] = [None, *VALUES_FILES]
RELEASE, NAMESPACE = "spo-diffusion", "spo"
_VALUES_KIND = "SpoComputedValues"  # the probe template's document, never part of the chart
_PROBE = f"apiVersion: test/v1\nkind: {_VALUES_KIND}\nvalues: {{{{ toJson .Values }}}}\n"


def case_id(path: Path | None) -> str:
    return path.name if path else "defaults"


def find_helm() -> str | None:
    """SPO_HELM, then the install script's folder, then PATH."""
    for candidate in (os.environ.get("SPO_HELM"), TOOLS_DIR / f"helm-{HELM_VERSION}" / "helm", shutil.which("helm")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


class HelmError(AssertionError):
    """helm refused the chart or the values; the message is helm's stderr."""


@dataclass
class Rendered:
    docs: list[dict[str, Any]]
    values: dict[str, Any]


class Helm:
    def __init__(self, path: str) -> None:
        self.path = path
        self._probe_chart = Path(tempfile.mkdtemp(prefix="spo-chart-")) / CHART.name
        shutil.copytree(CHART, self._probe_chart)
        (self._probe_chart / "templates" / "zz-computed-values.yaml").write_text(_PROBE)

    def close(self) -> None:
        shutil.rmtree(self._probe_chart.parent, ignore_errors=True)

    def version(self) -> str:
        return self._run(["version", "--short"]).strip()

    def _run(self, args: list[str]) -> str:
        result = subprocess.run([self.path, *args], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise HelmError(f"helm {' '.join(args)} failed:\n{result.stderr.strip()}")
        return result.stdout

    def _values_args(self, values_file: Path | None, overrides: dict | None, tmp: Path) -> list[str]:
        args = ["-f", str(values_file)] if values_file else []
        if overrides:
            path = tmp / "overrides.yaml"
            path.write_text(yaml.safe_dump(overrides))
            args += ["-f", str(path)]
        return args

    def lint(self, values_file: Path | None = None, overrides: dict | None = None) -> str:
        """`helm lint --strict` of the chart itself (not the probe copy)."""
        with tempfile.TemporaryDirectory() as tmp:
            return self._run(["lint", "--strict", str(CHART), *self._values_args(values_file, overrides, Path(tmp))])

    def template(self, values_file: Path | None = None, overrides: dict | None = None, *,
                 release: str = RELEASE, namespace: str = NAMESPACE) -> Rendered:
        """`helm template` with a values file and then overrides (as a second -f, merged by helm)."""
        with tempfile.TemporaryDirectory() as tmp:
            out = self._run(["template", release, str(self._probe_chart), "-n", namespace,
                             *self._values_args(values_file, overrides, Path(tmp))])
        docs, values = [], None
        for doc in yaml.safe_load_all(out):
            if not doc:
                continue
            if doc.get("kind") == _VALUES_KIND:
                values = doc["values"] if isinstance(doc["values"], dict) else json.loads(doc["values"])
            else:
                docs.append(doc)
        assert values is not None, "the probe template did not render"
        return Rendered(docs, values)

    def manifests_text(self, values_file: Path | None = None, overrides: dict | None = None) -> str:
        """What `helm template` prints for the chart itself, as YAML text."""
        with tempfile.TemporaryDirectory() as tmp:
            return self._run(["template", RELEASE, str(CHART), "-n", NAMESPACE,
                              *self._values_args(values_file, overrides, Path(tmp))])
