"""Every series the dashboard and the alert rules select exists on a fresh `spo serve` before any job, at 0.

A labelled counter that appears only with its first event (a failure reason, a job outcome, an HTTP 503) leaves a
dashboard panel on "No data", and `rate()` cannot see the first failures: the first sample Prometheus takes of the
series already holds them. So the service creates every label set it knows up front (service/contracts/metrics.py),
and this test reads the selectors from the shipped dashboard and rule files and matches them against one /metrics
of a just-started `spo serve` (API and worker processes, one exposition). Matchers on the labels Prometheus adds at
scrape time (job, instance, namespace) are left out; so is `up`, Prometheus' own series.
"""

from __future__ import annotations

import sys

import httpx
from deploy_paths import DASHBOARD, RULES
from processes import MODEL, Proc, service_env, wait_for
from prometheus_client.parser import text_string_to_metric_families
from promql_sources import all_values, dashboard_queries, matches, rules, selectors, substitute
from service_harness import free_port

TARGET_LABELS = {"job", "instance", "namespace"}


def shipped_selectors() -> list[tuple[str, str, list]]:
    """(where, metric, matchers) of every selector of the dashboard (variables at "All", $model the served model)
    and of the rules."""
    every = all_values(DASHBOARD)
    out = []
    for where, expr in dashboard_queries(DASHBOARD):
        for model in (".*", MODEL):
            out += [(where, name, m) for name, m in selectors(substitute(expr, model, every))]
    for rule in rules(RULES):
        out += [(rule.get("alert") or rule["record"], name, m) for name, m in selectors(rule["expr"])]
    return [(where, name, [x for x in m if x[0] not in TARGET_LABELS]) for where, name, m in out if name != "up"]


def test_every_selected_series_exists_before_any_job(redis_url, prefix, manifest, tmp_path, report):
    port = free_port()
    env = service_env(SPO_REDIS_URL=redis_url, SPO_KEY_PREFIX=prefix, SPO_TORCH_THREADS="1", OMP_NUM_THREADS="1",
                      SPO_HEARTBEAT_INTERVAL_S="0.5", SPO_LOG_LEVEL="WARNING")
    serve = Proc("serve", [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                           "--manifest", str(manifest), "--model", MODEL], env, tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for("spo serve ready", lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200, [serve], 180)
        text = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        serve.stop()
    series = [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text)
              for s in family.samples]
    assert not any(v for name, _, v in series if name == "spo_jobs_total"), "no job has run yet"

    wanted = shipped_selectors()
    missing = sorted({f"{where}: {name}{{{', '.join(f'{k}{op}{v!r}' for k, op, v in m)}}}"
                      for where, name, m in wanted
                      if not any(n == name and matches(labels, m) for n, labels, _ in series)})
    distinct = {(name, tuple(m)) for _, name, m in wanted}
    report(f"fresh spo serve: {len(distinct)} distinct selectors of the dashboard and rules, "
          f"{len(distinct) - len({m.split(': ', 1)[1] for m in missing})} with series, "
          f"{len(series)} samples exposed")
    assert not missing, "selected by the dashboard or the rules but absent before the first job:\n" + "\n".join(
        missing)
    failures = [labels["reason"] for name, labels, _ in series if name == "spo_job_failures_total"]
    assert {"attempts_exhausted", "inference_error"} <= set(failures)
