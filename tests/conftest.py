"""Shared fixtures. Heavy models are built once per session; tests use tiny ones so the suite runs on 2 CPU cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smoke_model(tmp_path_factory) -> Path:
    """A few-step SD1.5-architecture pipeline folder (random-ish weights, real classes)."""
    from training.train_base import train_base

    return train_base("smoke", tmp_path_factory.mktemp("smoke") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The committed spo-tiny model."""
    path = ROOT / "models" / "spo-tiny"
    if not (path / "model_index.json").is_file():
        pytest.skip("models/spo-tiny is not present (train it with `spo train base --preset tiny`)")
    return path
