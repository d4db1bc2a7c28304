"""The published manifest's LoRA entries load with `HF_HUB_OFFLINE=1` from a cache laid out as the hub's: the tiny
models stand in for the hub repos, each LoRA is a file of the published name and key layout (`unet.<module>.lora.
down/up.weight`, no alpha: scale 1), and the fused UNet moves by exactly up @ down."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from service.contracts.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = ROOT / "deploy" / "manifests" / "spo-published.yaml"
COMMIT = "0123456789abcdef0123456789abcdef01234567"

LOAD = """
import json, sys, torch
from service.contracts.manifest import load_manifest
from service.worker.model_runner import ModelRunner
out = {}
for name in sys.argv[2:]:
    spec = load_manifest(sys.argv[1]).get(name).model_copy(update={"device": "cpu", "dtype": "float32"})
    unet = ModelRunner(spec).load().pipe.unet
    out[name] = {k: v.tolist() for k, v in unet.state_dict().items() if k.endswith("attn1.to_q.weight")}
print(json.dumps(out))
"""


def _repo(cache: Path, repo_id: str, source: Path | None = None) -> Path:
    """An empty (or `source`-filled) snapshot of `repo_id` in the hub cache layout, `refs/main` pointing at it."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = folder / "snapshots" / COMMIT
    if source is not None:
        shutil.copytree(source, snapshot, copy_function=os.symlink, ignore=shutil.ignore_patterns("eval", "*.png",
                                                                                                   "*.jsonl"))
    snapshot.mkdir(parents=True, exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    return snapshot


def _published_lora(base: Path, file: Path, rank: int = 2) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A LoRA in the published layout on every attention to_q/to_k/to_v/to_out.0; returns module -> (down, up)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    g = torch.Generator().manual_seed(0)
    layers, tensors = {}, {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")):
            down = torch.randn(rank, module.in_features, generator=g) * 0.1
            up = torch.randn(module.out_features, rank, generator=g) * 0.1
            layers[name] = (down, up)
            tensors[f"unet.{name}.lora.down.weight"] = down
            tensors[f"unet.{name}.lora.up.weight"] = up
    save_file(tensors, file)
    return layers


def test_published_lora_entries_load_offline_from_a_hub_layout_cache(tmp_path):
    manifest = load_manifest(PUBLISHED)
    cache = tmp_path / "hub"
    loras = {}
    tiny = ROOT / "models"
    for name, base in (("spo-sd15-lora", tiny / "spo-tiny"), ("spo-sdxl-lora", tiny / "spo-tiny-xl")):
        spec = manifest.get(name)
        assert spec.lora is not None and spec.weight_name is not None
        _repo(cache, spec.base, base)
        snapshot = _repo(cache, spec.lora)
        loras[name] = (base, _published_lora(base, snapshot / spec.weight_name))
        if spec.vae:
            _repo(cache, spec.vae, base / "vae")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, "-c", LOAD, str(PUBLISHED), *loras], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    fused = json.loads(done.stdout.strip().splitlines()[-1])
    from diffusers import UNet2DConditionModel

    for name, (base, layers) in loras.items():
        plain = UNet2DConditionModel.from_pretrained(base / "unet").state_dict()
        checked = 0
        for key, value in fused[name].items():
            module = key.removesuffix(".weight")
            down, up = layers[module]
            torch.testing.assert_close(torch.tensor(value), plain[key] + up @ down, rtol=0, atol=1e-5)
            checked += 1
        assert checked >= 2, name


def test_weight_name_needs_a_lora_and_a_file_name(tmp_path):
    import pytest
    import yaml

    from service.contracts.manifest import ManifestError

    entry = {"name": "m", "kind": "sd15", "base": "org/model", "sizes": ["64x64"],
             "defaults": {"size": "64x64"}, "weight_name": "lora.safetensors"}
    for changes, message in (({}, "give lora too"), ({"lora": "org/lora", "weight_name": "a/b.safetensors"},
                                                      "must be a .safetensors or .bin file name")):
        path = tmp_path / "m.yaml"
        path.write_text(yaml.safe_dump({"models": [{**entry, **changes}]}))
        with pytest.raises(ManifestError, match=message):
            load_manifest(path)
