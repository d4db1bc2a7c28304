"""The committed models load with plain diffusers, offline, and draw what they are asked for."""

import pytest

from tests.conftest import ROOT


def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize(("folder", "cls"), [("spo-tiny", "StableDiffusionPipeline"),
                                             ("spo-tiny-xl", "StableDiffusionXLPipeline")])
def test_committed_model_loads_with_plain_diffusers(folder, cls, monkeypatch):
    import diffusers

    path = ROOT / "models" / folder
    assert (path / "model_index.json").is_file(), f"models/{folder} is committed and must be present"
    _offline(monkeypatch)
    pipe = getattr(diffusers, cls).from_pretrained(path)
    assert pipe.vae_scale_factor == 8 and type(pipe.scheduler).__name__ == "DDIMScheduler"
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert total <= 25 * 2**20, f"{folder} is {total / 2**20:.1f} MiB"


def test_spo_tiny_follows_prompts(tiny_model):
    """A small fixed-seed sample of training combinations: the full report is `spo eval base` (README)."""
    from service.worker.pipeline import load_pipeline
    from training.evaluate import eval_items, generate_and_rate, summarise

    pipe = load_pipeline(str(tiny_model))
    _, records = generate_and_rate(pipe, eval_items(24, 0), batch=24)
    s = summarise(records)["train"]
    assert s["background"] >= 0.85 and s["colour"] >= 0.75 and s["all_right"] >= 0.6, s


def test_models_dir_has_no_stray_files():
    for path in (ROOT / "models").rglob("*"):
        assert not path.name.endswith((".onnx", ".engine", ".plan", ".ckpt", ".bin.tmp")), path
