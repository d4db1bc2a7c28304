"""The reliability suite (`-m reliability`, not in the default run): chaos with worker SIGKILLs, Redis outages on a
Redis of its own, and schemathesis against the live OpenAPI document. Each test prints its counts.

Sizes come from the environment, bounded by default (a few minutes in all on 2 CPU cores); the long run of the README
sets them up: SPO_CHAOS_JOBS / SPO_CHAOS_KILLS / SPO_CHAOS_WORKERS, SPO_OUTAGE_ROUNDS, SPO_FUZZ_MAX_EXAMPLES.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))  # service_harness

ROOT = Path(__file__).resolve().parents[2]


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


@pytest.fixture(scope="session")
def manifest_path(tmp_path_factory) -> Path:
    """spo-tiny with the test suite's limits (sizes 64 and 128, max_n 4, 60 steps)."""
    path = tmp_path_factory.mktemp("manifest") / "models.yaml"
    spec = {"name": "spo-tiny", "kind": "sd15", "base": str(ROOT / "models" / "spo-tiny"),
            "defaults": {"steps": 4, "guidance": 5.0, "size": "64x64"}, "sizes": ["64x64", "128x128"],
            "max_n": 4, "max_steps": 60, "guidance_range": [0.0, 20.0], "backend": "torch", "device": "cpu"}
    path.write_text(yaml.safe_dump({"models": [spec]}))
    return path
