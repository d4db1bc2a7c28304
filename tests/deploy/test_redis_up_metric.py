"""spo_redis_up, the metric behind the SpoRedisDown alert: 0 while the API cannot reach Redis, 1 once it can. (The
queue gauges keep their last values during an outage, so without it Prometheus could not tell.)"""

from __future__ import annotations

import re

import httpx
from deploy_paths import ROOT
from service_harness import ApiServer, free_port, make_settings


def redis_up(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return float(re.search(r"^spo_redis_up (\S+)$", text, re.M).group(1))


def test_redis_up_follows_reachability(redis_url, prefix):
    manifest = ROOT / "models" / "models.yaml"
    down = ApiServer(make_settings(f"redis://127.0.0.1:{free_port()}/0", prefix, manifest,
                                   models=["spo-tiny"])).start()
    try:
        assert redis_up(down.url) == 0
    finally:
        down.stop()
    up = ApiServer(make_settings(redis_url, prefix, manifest, models=["spo-tiny"])).start()
    try:
        assert redis_up(up.url) == 1
    finally:
        up.stop()
