"""The chart's values files and Helm's way of merging them, shared by the chart tests."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml
from deploy_paths import CHART

VALUES_FILES = [CHART / "values.yaml", *sorted((CHART / "ci").glob("*.yaml"))]


def load_values(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def merged(overrides: dict, base: dict | None = None) -> dict:
    """values.yaml with overrides, merged as Helm does (maps deep, everything else replaced)."""
    out = copy.deepcopy(base if base is not None else load_values(CHART / "values.yaml"))
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(value, out[key])
        else:
            out[key] = value
    return out
