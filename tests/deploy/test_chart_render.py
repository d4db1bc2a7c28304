"""The Helm chart rendered by `helm template` with its defaults, each values file of ci/ and targeted overrides:
valid YAML objects that fit together (selectors, ports, volumes, names), the contracts of
docs/architecture.md#kubernetes (GPU workers, probes that wait for the model, drain time, engine cache, Redis bundled
or from a Secret, API keys from a Secret, ServiceMonitor, dashboard ConfigMap, PrometheusRule, KEDA, PDBs),
and the names the service and the monitoring files expect (stream keys, scrape job names, SPO_* settings)."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from deploy_paths import DASHBOARD, DEPLOY, RULES
from helm_render import CASES, NAMESPACE, Helm, HelmError, case_id
from keda_scaling import desired_replicas, trigger_key

from service.contracts.config import Settings
from service.contracts.queue import Keys

KNOWN_ENV = {f"SPO_{name.upper()}" for name in Settings.model_fields} | {"SPO_LOG_LEVEL", "SPO_ENGINE_CACHE"}


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def component(docs: list[dict], kind: str, name: str) -> list[dict]:
    return [d for d in of_kind(docs, kind) if d["metadata"]["labels"].get("app.kubernetes.io/component") == name]


@pytest.fixture(scope="module", params=CASES, ids=case_id)
def case(request, helm: Helm) -> tuple[dict, list[dict]]:
    """(the values helm computed, the objects it rendered)."""
    rendered = helm.template(request.param)
    return rendered.values, rendered.docs


def test_objects_are_well_formed(case):
    _, docs = case
    seen = set()
    for doc in docs:
        meta = doc["metadata"]
        assert doc["apiVersion"] and doc["kind"] and meta["name"], doc
        assert len(meta["name"]) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", meta["name"]), meta
        assert meta.get("namespace") in (NAMESPACE, "monitoring"), meta
        key = (doc["kind"], meta["name"])
        assert key not in seen, f"duplicate {key}"
        seen.add(key)
        for k, v in meta.get("labels", {}).items():
            assert isinstance(v, str) and len(v) <= 63, (k, v)


def test_workloads_fit_together(case):
    """Selectors match pod labels, probes and Services name real ports, mounts name real volumes, claims and
    ConfigMaps exist, env names are settings the service reads."""
    _, docs = case
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    workloads = of_kind(docs, "Deployment") + of_kind(docs, "Job")
    for workload in workloads:
        pod = workload["spec"]["template"]
        if workload["kind"] == "Deployment":
            selector = workload["spec"]["selector"]["matchLabels"]
            assert selector.items() <= pod["metadata"]["labels"].items(), workload["metadata"]["name"]
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        for container in pod["spec"]["containers"]:
            ports = {p["name"] for p in container.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                port = container.get(probe, {}).get("httpGet", {}).get("port")
                assert port is None or port in ports, (container["name"], probe, port)
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, (container["name"], mount)
            for env in container.get("env", []):
                if env["name"].startswith("SPO_"):
                    assert env["name"] in KNOWN_ENV, env
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume and not volume["persistentVolumeClaim"]["claimName"].startswith(
                    "existing"):
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names, volume
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in names, volume
    for service in of_kind(docs, "Service"):
        pods = [w["spec"]["template"] for w in of_kind(docs, "Deployment")
                if service["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert pods, f"Service {service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            for pod in pods:
                assert port["targetPort"] in {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert any(selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
                   for w in of_kind(docs, "Deployment")), pdb["metadata"]["name"]


def test_workers_per_model_on_gpus(case):
    values, docs = case
    workers = component(docs, "Deployment", "worker")
    assert len(workers) == len(values["models"])
    for model, worker in zip(values["models"], workers, strict=True):
        pod = worker["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["args"][:3] == ["worker", "--model", model["name"]]
        assert "--metrics-port" in container["args"]
        gpu = model.get("gpu", values["worker"]["gpu"])
        limits = container["resources"].get("limits", {})
        assert limits.get("nvidia.com/gpu", 0) == gpu
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["SPO_MODELS"] == model["name"] and env["SPO_ENGINE_CACHE"] == "/cache/engines"
        assert int(env["SPO_MAX_BATCH"]) == model.get("maxBatch", values["worker"]["maxBatch"])
        # Probes wait for the metrics port, which opens after model load, warm-up and engine build.
        startup = container["startupProbe"]
        assert startup["httpGet"]["port"] == "metrics"
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600 or gpu == 0
        assert container["readinessProbe"]["httpGet"]["port"] == "metrics"
        # A drain finishes the claimed batch: the grace period must not cut it short.
        assert pod["terminationGracePeriodSeconds"] == values["worker"]["terminationGracePeriodSeconds"] >= 30
        cache = next(v for v in pod["volumes"] if v["name"] == "cache")
        persistent = values["worker"]["engineCache"]["persistence"]["enabled"]
        assert ("persistentVolumeClaim" in cache) == persistent
        assert {"name": "cache", "mountPath": "/cache"} in container["volumeMounts"]
        if "replicas" in worker["spec"]:
            assert worker["spec"]["replicas"] == model.get("replicas", 1)
        assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_api(case):
    values, docs = case
    (api,) = component(docs, "Deployment", "api")
    pod = api["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["SPO_MODELS"]["value"] == ",".join(m["name"] for m in values["models"])
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {}), "the API runs on CPU nodes"
    keys = values["auth"]["existingSecret"]
    if keys:
        assert env["SPO_API_KEYS_FILE"]["value"] == f"/etc/spo-keys/{values['auth']['keysKey']}"
        secret = next(v for v in pod["volumes"] if v["name"] == "api-keys")
        assert secret["secret"]["secretName"] == keys
    else:
        assert "SPO_API_KEYS_FILE" not in env
    assert pod["terminationGracePeriodSeconds"] >= values["config"]["syncTimeoutS"]


def test_redis_bundled_or_external(case):
    values, docs = case
    redis_url = [e for w in of_kind(docs, "Deployment") for c in w["spec"]["template"]["spec"]["containers"]
                 for e in c.get("env", []) if e["name"] == "SPO_REDIS_URL"]
    assert len(redis_url) == 1 + len(values["models"])
    if values["redis"]["bundled"]["enabled"]:
        assert component(docs, "Deployment", "redis") and component(docs, "Service", "redis")
        host = component(docs, "Service", "redis")[0]["metadata"]["name"]
        assert all(e["value"] == f"redis://{host}:6379/0" for e in redis_url)
    else:
        assert not component(docs, "Deployment", "redis")
        ref = {"name": values["redis"]["external"]["existingSecret"], "key": values["redis"]["external"]["urlKey"]}
        assert all(e["valueFrom"]["secretKeyRef"] == ref for e in redis_url)


def test_monitoring_objects(case):
    values, docs = case
    monitors = of_kind(docs, "ServiceMonitor")
    assert bool(monitors) == values["metrics"]["serviceMonitor"]["enabled"]
    scrape_jobs = {j["job_name"] for j in yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
                   ["scrape_configs"]}
    for monitor in monitors:
        label = monitor["spec"]["jobLabel"]
        services = [s for s in of_kind(docs, "Service") if label in s["metadata"]["labels"]]
        assert {s["metadata"]["labels"][label] for s in services} == scrape_jobs, "job names the alerts use"
        ports = {p["name"] for s in services for p in s["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} == ports
    rules = of_kind(docs, "PrometheusRule")
    assert bool(rules) == values["metrics"]["prometheusRule"]["enabled"]
    for rule in rules:
        assert rule["spec"]["groups"] == yaml.safe_load(RULES[0].read_text())["groups"]
    dashboards = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert bool(dashboards) == values["metrics"]["dashboard"]["enabled"]
    for cm in dashboards:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(cm["data"]["spo-diffusion.json"]) == json.loads(DASHBOARD.read_text())


def test_autoscaling_targets_the_real_queue(case):
    """KEDA's Redis triggers name the streams service/contracts/queue.py writes (one per priority)."""
    values, docs = case
    keda = values["worker"]["autoscaling"]["keda"]
    scaled = of_kind(docs, "ScaledObject")
    assert len(scaled) == (len(values["models"]) if keda["enabled"] else 0)
    workers = {w["metadata"]["name"] for w in component(docs, "Deployment", "worker")}
    for model, obj in zip(values["models"] if keda["enabled"] else [], scaled, strict=True):
        assert obj["spec"]["scaleTargetRef"]["name"] in workers
        streams = [t["metadata"]["stream"] for t in obj["spec"]["triggers"] if t["type"] == "redis-streams"]
        assert streams == Keys(values["redis"]["keyPrefix"]).streams(model["name"])
        for trigger in obj["spec"]["triggers"]:
            assert re.fullmatch(r"[^:/\s]+:\d+", trigger["metadata"]["address"])
            if "authenticationRef" in trigger:
                assert ("TriggerAuthentication", trigger["authenticationRef"]["name"]) in {
                    (d["kind"], d["metadata"]["name"]) for d in docs}
        # Scaled workers leave replicas to KEDA.
        assert all("replicas" not in w["spec"] for w in component(docs, "Deployment", "worker"))


def test_engine_build_jobs(case):
    values, docs = case
    jobs = of_kind(docs, "Job")
    build = values["engineBuild"]
    if not build["enabled"]:
        assert not jobs
        return
    expected = sum(len(g.get("models") or build["models"] or values["models"]) for g in build["gpuTypes"])
    assert len(jobs) == expected
    workers = component(docs, "Deployment", "worker")
    worker_cache = workers[0]["spec"]["template"]["spec"]["volumes"]
    for job in jobs:
        pod = job["spec"]["template"]["spec"]
        args = pod["containers"][0]["args"]
        assert args[0] == "export" and "tensorrt" in args and "/cache/engines" in args
        assert next(v for v in pod["volumes"] if v["name"] == "cache") == next(
            v for v in worker_cache if v["name"] == "cache"), "engines land in the volume the workers read"
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["nodeSelector"], "pinned to its GPU type"


@pytest.mark.parametrize(("overrides", "message"), [
    ({"redis": {"bundled": {"enabled": False}}}, "redis.external.existingSecret is required"),
    ({"worker": {"autoscaling": {"keda": {"enabled": True}, "hpa": {"enabled": True}}}},
     "worker.autoscaling.keda.enabled and worker.autoscaling.hpa.enabled are both true"),
    ({"redis": {"bundled": {"enabled": False}, "external": {"existingSecret": "r"}},
      "worker": {"autoscaling": {"keda": {"enabled": True}}}}, "redis.external.address"),
    ({"engineBuild": {"enabled": True, "gpuTypes": [{"name": "a100"}]},
      "worker": {"engineCache": {"persistence": {"enabled": False}}}}, "engines must outlive the Job"),
])
def test_misconfigurations_fail_with_a_message(overrides, message, helm):
    with pytest.raises(HelmError, match=re.escape(message)):
        helm.template(overrides=overrides)


def test_options_render(helm):
    """Options off by default render valid objects too: inline manifest, HPA instead of KEDA, Prometheus-sourced
    KEDA, persistence for the bundled Redis, API autoscaling, CPU-only workers."""
    docs = helm.template(overrides={"manifest": {"inline": "models: []\n"}, "api": {"autoscaling": {"enabled": True}},
                                    "redis": {"bundled": {"persistence": {"enabled": True}}},
                                    "worker": {"gpu": 0, "autoscaling": {"hpa": {"enabled": True}}},
                                    "models": [{"name": "a", "gpu": 1}, {"name": "b"}]}).docs
    hpas = of_kind(docs, "HorizontalPodAutoscaler")
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas} == {
        d["metadata"]["name"] for d in of_kind(docs, "Deployment") if d["metadata"]["name"].rsplit("-", 1)[-1]
        in ("api", "a", "b")}
    worker_limits = [w["spec"]["template"]["spec"]["containers"][0]["resources"].get("limits", {})
                     for w in component(docs, "Deployment", "worker")]
    assert [lim.get("nvidia.com/gpu") for lim in worker_limits] == [1, None]
    assert any(d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"].endswith("-redis") for d in docs)
    manifest = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-manifest"))
    assert manifest["data"]["models.yaml"] == "models: []\n"
    keda = {"enabled": True, "source": "prometheus"}
    prom = helm.template(overrides={"worker": {"autoscaling": {"keda": keda}}}).docs
    (scaled,) = of_kind(prom, "ScaledObject")
    assert scaled["spec"]["triggers"][0]["metadata"]["query"] == \
        f'max(spo_queue_depth{{namespace="{NAMESPACE}", model="spo-sdxl"}})'


@pytest.mark.parametrize("source", ["redis", "prometheus"])
def test_keda_scales_on_the_whole_queue(helm, source, report):
    """6 + 6 + 6 jobs queued on the three priority streams, 6 jobs per worker: KEDA must ask for 3 workers (the HPA
    behind it follows the largest of its metrics, so the streams must reach it as one sum)."""
    overrides = {"worker": {"autoscaling": {"keda": {"enabled": True, "source": source, "jobsPerWorker": 6,
                                                     "maxReplicas": 8}}},
                 "models": [{"name": "spo-sdxl"}, {"name": "spo-tiny", "minReplicas": 0}]}
    scaled = {d["spec"]["scaleTargetRef"]["name"].rsplit("-worker-", 1)[1]: d
              for d in of_kind(helm.template(overrides=overrides).docs, "ScaledObject")}
    queued = {"high": 6, "normal": 6, "low": 6}
    if source == "redis":
        names = {t["name"]: t["metadata"]["stream"] for t in scaled["spo-sdxl"]["spec"]["triggers"]}
        assert names == {p: f"spo:queue:spo-sdxl:{p}" for p in queued}

    def load(counts: dict[str, int]) -> dict[str, float]:
        """What each trigger reads: a stream's length, or spo_queue_depth (every priority of the model summed)."""
        return {trigger_key(t): counts[t["name"]] if source == "redis" else sum(counts.values())
                for obj in scaled.values() for t in obj["spec"]["triggers"]}

    replicas = desired_replicas(scaled["spo-sdxl"], load(queued))
    report(f"KEDA ({source}): 6 + 6 + 6 queued jobs at 6 per worker -> {replicas} workers")
    assert replicas == 3
    assert desired_replicas(scaled["spo-sdxl"], load({"high": 0, "normal": 0, "low": 0})) == 1, "minReplicaCount 1"
    assert desired_replicas(scaled["spo-sdxl"], load({"high": 100, "normal": 0, "low": 0})) == 8, "maxReplicaCount"
    # A model with minReplicas 0 scales to zero on an empty queue and back to one on the first job.
    assert scaled["spo-tiny"]["spec"]["minReplicaCount"] == 0
    assert desired_replicas(scaled["spo-tiny"], load({"high": 0, "normal": 0, "low": 0})) == 0
    assert desired_replicas(scaled["spo-tiny"], load({"high": 0, "normal": 0, "low": 1})) == 1


def test_keda_semantics_take_the_largest_trigger_without_modifiers():
    """The model of KEDA used above has teeth: three separate stream triggers size for the longest stream alone."""
    triggers = [{"type": "redis-streams", "name": p, "metadata": {"stream": p, "streamLength": "6"}}
                for p in ("high", "normal", "low")]
    separate = {"spec": {"minReplicaCount": 1, "maxReplicaCount": 8, "triggers": triggers}}
    assert desired_replicas(separate, {"high": 6, "normal": 6, "low": 6}) == 1
    summed = {"spec": {**separate["spec"], "advanced": {"scalingModifiers": {"formula": "high + normal + low",
                                                                             "target": "6"}}}}
    assert desired_replicas(summed, {"high": 6, "normal": 6, "low": 6}) == 3
