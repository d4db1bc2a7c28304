"""Paths of the deployment files under test (a module of its own: `from conftest import ...` would resolve to
whichever conftest.py pytest imported first)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = ROOT / "k8s" / "spo-diffusion"
RULES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "spo-diffusion.json"
