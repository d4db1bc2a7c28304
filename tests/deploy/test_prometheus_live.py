"""The dashboard and the alert rules against a real Prometheus scraping the real service.

The service runs as it is deployed (docker-compose, Helm): `spo api` and `spo worker --metrics-port` as separate
processes sharing Redis, scraped as the jobs `spo-api` and `spo-worker` of deploy/prometheus/prometheus.yml (only
its discovery is swapped for static localhost targets and its intervals for 1 s). After a load with successes, a
cancelled job, a failed job and rejected requests, every PromQL expression of the dashboard must return data, every
rule must be valid and loaded healthy, and every metric the rules select must exist. The expressions are read from
the shipped files, so renaming a metric anywhere breaks this test.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import redis
import yaml
from deploy_paths import DASHBOARD, DEPLOY, RULES
from processes import MODEL, Proc, wait_for
from promql_sources import (
    all_values,
    dashboard_queries,
    job_names,
    metric_names,
    rules,
    substitute,
    template_queries,
)
from service_harness import PROMPT, free_port


def prometheus_config(api_port: int, worker_port: int) -> dict:
    """deploy/prometheus/prometheus.yml with static localhost targets, 1 s intervals and absolute rule paths."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    ports = {"spo-api": api_port, "spo-worker": worker_port}
    assert {job["job_name"] for job in config["scrape_configs"]} == set(ports)
    for job in config["scrape_configs"]:
        job.pop("dns_sd_configs")
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
        job["scrape_interval"] = "1s"
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str((DEPLOY / "prometheus" / pattern).resolve()) for pattern in config["rule_files"]]
    return config


class PromClient:
    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=10)

    def query(self, expr: str) -> dict:
        """Instant query; returns Prometheus' `data` (asserting the query itself succeeded)."""
        reply = self.http.get("/api/v1/query", params={"query": expr})
        body = reply.json()
        assert reply.status_code == 200 and body["status"] == "success", f"{expr!r}: {body}"
        return body["data"]

    def samples(self, expr: str) -> list[float]:
        data = self.query(expr)
        if data["resultType"] == "scalar":
            return [float(data["result"][1])]
        return [float(item["value"][1]) for item in data["result"]]


def test_dashboard_and_alert_queries_against_real_prometheus(prometheus_bin, redis_url, prefix, manifest, tmp_path):
    api_port, worker_port, prom_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPO_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(SPO_REDIS_URL=redis_url, SPO_KEY_PREFIX=prefix, SPO_MANIFEST=str(manifest), SPO_MODELS=MODEL,
               SPO_TORCH_THREADS="1", OMP_NUM_THREADS="1", SPO_HEARTBEAT_INTERVAL_S="0.5",
               SPO_MAX_ATTEMPTS="1", SPO_MAX_BATCH="4", SPO_MAX_WAIT_MS="50", SPO_LOG_LEVEL="WARNING")
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(api_port, worker_port)))
    procs: list[Proc] = []
    try:
        prom = Proc("prometheus", [prometheus_bin, f"--config.file={config}", f"--storage.tsdb.path={tmp_path}/tsdb",
                                   f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                    os.environ.copy(), tmp_path)
        api = Proc("api", [sys.executable, "-m", "service.cli", "api", "--host", "127.0.0.1", "--port",
                           str(api_port)], env, tmp_path)
        procs += [prom, api]
        url = f"http://127.0.0.1:{api_port}"
        prom_url = f"http://127.0.0.1:{prom_port}"
        client = httpx.Client(base_url=url, timeout=60)
        wait_for("the API", lambda: client.get("/healthz").status_code == 200, procs, 60)

        # Before any worker runs: a job whose earlier claims all died (attempts at SPO_MAX_ATTEMPTS) fails with
        # reason attempts_exhausted when the worker claims it; a queued job cancelled now is skipped.
        body = {"model": MODEL, "prompt": PROMPT, "size": "64x64", "seed": 1}
        doomed = client.post("/v1/jobs", json=body).json()["id"]
        redis.Redis.from_url(redis_url).hset(f"{prefix}:job:{doomed}", "attempts", 1)
        cancelled = client.post("/v1/jobs", json={**body, "seed": 2}).json()["id"]
        assert client.post(f"/v1/jobs/{cancelled}/cancel").status_code == 200

        worker = Proc("worker", [sys.executable, "-m", "service.cli", "worker", "--model", MODEL, "--metrics-port",
                                 str(worker_port)], env, tmp_path)
        procs.append(worker)
        wait_for("the worker (model loaded)", lambda: client.get("/readyz").status_code == 200, procs, 120)
        wait_for("the doomed job to fail",
                 lambda: client.get(f"/v1/jobs/{doomed}").json()["status"] == "failed", procs, 30)

        # One job first, and Prometheus must have scraped its series (queue wait, latency, ...) before the load: a
        # series whose first scrape already holds all its observations has rate() 0 over any window (seen on a
        # loaded CI machine, where scrapes of the busy worker can come late).
        prom_api = PromClient(prom_url)
        assert client.post("/v1/images/generations", json={**body, "seed": 99}).status_code == 200
        wait_for("Prometheus to scrape the first job", lambda: prom_api.samples(
            f'sum(spo_queue_wait_seconds_count{{model="{MODEL}"}})') == [1.0], procs, 30)

        # Load: sync generations of 1 and 2 images from 4 clients (so batches form), async jobs, bad requests.
        def generate(i: int) -> int:
            return client.post("/v1/images/generations",
                               json={**body, "seed": 100 + i, "n": 1 + i % 2}).status_code

        with ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(generate, range(8)))
        assert statuses == [200] * 8
        jobs = [client.post("/v1/jobs", json={**body, "seed": 200 + i}).json()["id"] for i in range(2)]
        for job in jobs:
            wait_for(f"job {job}", lambda job=job: client.get(f"/v1/jobs/{job}").json()["status"] == "succeeded",
                     procs, 60)
        assert client.post("/v1/images/generations", json={**body, "size": "65x65"}).status_code == 400
        assert client.post("/v1/images/generations", json={**body, "model": "nope"}).status_code == 404
        load_end = time.time()

        # Two scrapes of both jobs after the load, so that rate() has two samples of every series it created.
        wait_for("Prometheus to scrape the load", lambda: prom_api.samples(
            f'sum(spo_jobs_total{{model="{MODEL}", status="succeeded"}})') == [11.0]
            and prom_api.samples('min(timestamp(up{job=~"spo-api|spo-worker"} == 1))') > [load_end + 2.5]
            and len(prom_api.samples('up{job=~"spo-api|spo-worker"} == 1')) == 2, procs, 30)

        assert prom_api.samples("min(spo_redis_up)") == [1.0]

        # Every rule is loaded and evaluates without error.
        def rules_healthy():
            groups = prom_api.http.get("/api/v1/rules").json()["data"]["groups"]
            loaded = [r for g in groups for r in g["rules"]]
            return len(loaded) == len(rules(RULES)) and all(r["health"] == "ok" for r in loaded) and loaded

        loaded = wait_for("the rules to evaluate", rules_healthy, procs, 15)
        assert {r["name"] for r in loaded} == {r.get("alert") or r.get("record") for r in rules(RULES)}

        # A healthy service under load trips no alert (not even pending). The one failed job may make the error
        # ratio alert pending, if a scrape saw its counters before the failure (rate() needs a rise).
        alerts = {a["labels"]["alertname"] for a in prom_api.http.get("/api/v1/alerts").json()["data"]["alerts"]}
        assert alerts <= {"SpoJobErrorRateHigh"}, alerts

        # Every dashboard expression returns data: for all models ($model = .*), and in the per-model row.
        # Namespace, job and instance at Grafana's "All" (their allValue); compose has no namespace label.
        queries = dashboard_queries(DASHBOARD)
        assert len(queries) >= 20
        every = all_values(DASHBOARD)
        empty = []
        for model in (".*", MODEL):
            for where, expr in queries:
                values = prom_api.samples(substitute(expr, model, every))
                if not any(math.isfinite(v) for v in values):
                    empty.append(f"{where} [$model={model}]: {substitute(expr, model, every)} -> {values}")
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)

        # The variables list what is there: the served model, both scrape jobs, both targets.
        expected = {"model": {MODEL}, "job": {"spo-api", "spo-worker"},
                    "instance": {f"127.0.0.1:{api_port}", f"127.0.0.1:{worker_port}"}, "namespace": set()}
        for name, query in template_queries(DASHBOARD):
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert match, query
            selector, label = substitute(match.group(1), ".*", every), match.group(2)
            values = prom_api.http.get(f"/api/v1/label/{label}/values", params={"match[]": selector}).json()["data"]
            assert set(values) == expected[name], f"variable {name}: {query} -> {values}"

        # Alert and recording expressions are valid queries, and every metric and scrape job they name exists
        # (an alert on a renamed metric would otherwise stay silently quiet).
        scrape_jobs = {job["job_name"] for job in yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml")
                                                                  .read_text())["scrape_configs"]}
        for rule in rules(RULES):
            prom_api.query(rule["expr"])
            for metric in metric_names(rule["expr"]):
                assert prom_api.samples(f'count({{__name__="{metric}"}})'), f"{rule}: no series {metric}"
            assert job_names(rule["expr"]) <= scrape_jobs, rule

        # The check has teeth: the same query on a renamed metric is empty.
        where, expr = next(q for q in queries if "spo_job_latency_seconds_bucket" in q[1])
        renamed = substitute(expr, ".*", every).replace("spo_job_latency_seconds_bucket", "spo_job_latency_secs_bucket")
        assert prom_api.samples(renamed) == []
    finally:
        for proc in reversed(procs):
            proc.stop()
