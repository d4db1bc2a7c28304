"""Every PromQL expression the deployment ships, read from the files themselves (never copied into a test), so a
metric renamed in service/contracts/metrics.py, the dashboard or the rules makes the live test fail."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

# Grafana variables the dashboard may use, and what the live test substitutes for them.
RATE_INTERVAL = "5m"  # longer than the whole live test: every observation it made counts


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """All panels, rows' nested panels included."""
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_queries(path: Path) -> list[tuple[str, str]]:
    """(where, expr) for every Prometheus target of every panel."""
    dashboard = json.loads(path.read_text())
    queries = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("hide"):
                continue
            queries.append((f"panel {panel['id']} {panel.get('title')!r} target {target.get('refId')}",
                            target["expr"]))
    return queries


def template_queries(path: Path) -> list[tuple[str, str]]:
    """(variable name, query) of the dashboard's query variables."""
    dashboard = json.loads(path.read_text())
    out = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            out.append((var["name"], query))
    return out


def all_values(path: Path) -> dict[str, str]:
    """Query variable -> the regex Grafana sends when "All" is selected (its allValue)."""
    dashboard = json.loads(path.read_text())
    return {v["name"]: v["allValue"] for v in dashboard["templating"]["list"] if v.get("type") == "query"}


def substitute(expr: str, model: str, variables: dict[str, str] | None = None) -> str:
    """Grafana's variables replaced as Grafana would ($model by `model`, the others by `variables`, e.g. their "All"
    values); anything left over is an unknown variable."""
    out = expr.replace("$__rate_interval", RATE_INTERVAL).replace("${__rate_interval}", RATE_INTERVAL)
    for name, value in {**(variables or {}), "model": model}.items():
        out = out.replace("${" + name + "}", value)
        out = re.sub(rf"\${name}\b", lambda _m, v=value: v, out)
    leftover = re.findall(r"\$\{?\w+", out)
    if leftover:
        raise ValueError(f"unknown dashboard variable(s) {leftover} in {expr!r}")
    return out


Matcher = tuple[str, str, str]  # (label, operator, value)
_SELECTOR = re.compile(r"(?<![\w:])(spo_[a-z0-9_]+|up)\s*(\{[^}]*\})?(?=\s*[\[\)\s,]|$)")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def selectors(expr: str) -> list[tuple[str, list[Matcher]]]:
    """The vector selectors of an expression that name a metric of the project (spo_*) or `up`, with their
    matchers (`by (...)` / `on (...)` label lists are not selectors and are skipped)."""
    out = []
    for match in _SELECTOR.finditer(expr):
        before = expr[:match.start()].rstrip()
        if re.search(r"\b(by|without|on|ignoring|group_left|group_right)\s*\($", before):
            continue
        out.append((match.group(1), _MATCHER.findall(match.group(2) or "")))
    return out


def matches(labels: dict[str, str], matchers: list[Matcher]) -> bool:
    """PromQL matcher semantics: regexes are anchored, and an absent label is the empty string."""
    for label, op, value in matchers:
        have = labels.get(label, "")
        if op == "=" and have != value or op == "!=" and have == value:
            return False
        if op in ("=~", "!~") and bool(re.fullmatch(value, have)) != (op == "=~"):
            return False
    return True


def rules(paths: list[Path]) -> list[dict[str, Any]]:
    """Every rule (alerting and recording) of the rule files."""
    out = []
    for path in paths:
        for group in yaml.safe_load(path.read_text())["groups"]:
            out.extend(group["rules"])
    return out


def metric_names(expr: str) -> set[str]:
    """The project's metric names (spo_*) and `up` that an expression selects."""
    names = set(re.findall(r"\b(spo_[a-z0-9_]+)\b", expr))
    if re.search(r"\bup\s*[{\[]", expr):
        names.add("up")
    return names


def job_names(expr: str) -> set[str]:
    """Scrape job names an expression filters on (job="a" or job=~"a|b")."""
    out: set[str] = set()
    for value in re.findall(r'\bjob\s*=~?\s*"([^"]+)"', expr):
        out.update(value.split("|"))
    return out
