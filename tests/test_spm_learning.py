"""Learnability of the tiny SPM: the model and PickScore loss must learn a clear preference.

Clean shapes-world renders against blurred or noisy copies of the same render (what the rater scores lower on
crispness / uniformity), fed at t = 0 straight to the SPM (no diffusion noising), on held-out combinations. A model
whose scores collapse to equal values (the symptom of an SPM that learns nothing: loss ln 2, agreement 0.5) stays at
50%.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from scipy import ndimage

from training.presets import SPM_PRESETS as PRESETS
from training.shapes import HELD_OUT, TRAIN_COMBOS, render, sample_scene
from training.spm import build_spm
from training.train_spm import pair_losses


def _pairs(n: int, seed: int, combos) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
    """[images_0; images_1] in [0, 1], label_0, captions: one clean render and one corrupted copy, random order."""
    rng, r = np.random.default_rng(seed), random.Random(seed)
    first, second, captions, label_0 = [], [], [], []
    for i in range(n):
        scene = sample_scene(r, combos)
        clean = render(scene)
        if i % 2:
            bad = ndimage.gaussian_filter(clean.astype(np.float32), sigma=(1.5, 1.5, 0))
        else:
            bad = clean + rng.normal(0.0, 15.0, clean.shape)
        bad = np.clip(np.rint(bad), 0, 255).astype(np.uint8)
        clean_first = rng.random() < 0.5
        first.append(clean if clean_first else bad)
        second.append(bad if clean_first else clean)
        captions.append(scene.caption)
        label_0.append(float(clean_first))
    images = torch.from_numpy(np.stack(first + second)).permute(0, 3, 1, 2).float() / 255.0
    return images, torch.tensor(label_0), captions, torch.tensor(label_0)


@pytest.mark.parametrize("time_conditioning", [True, False])
def test_tiny_spm_learns_a_clear_preference_on_cpu(time_conditioning):
    torch.manual_seed(0)
    preset = PRESETS["tiny"]
    spm = build_spm("tiny", time_conditioning=time_conditioning)
    spm.train()
    decay = [q for q in spm.parameters() if q.ndim >= 2]
    no_decay = [q for q in spm.parameters() if q.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": preset.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=preset.lr)
    train_x, train_l0, train_caps, _ = _pairs(512, 1, TRAIN_COMBOS)
    test_x, test_l0, test_caps, _ = _pairs(128, 2, HELD_OUT)
    batch, steps, warmup = 16, 70, 10
    vision_grad = 0.0
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = preset.lr * min(1.0, (step + 1) / warmup)
        idx = torch.arange(step * batch, (step + 1) * batch) % len(train_caps)
        x = torch.cat([train_x[idx], train_x[idx + len(train_caps)]])
        s0, s1 = spm(x, spm.tokenize([train_caps[i] for i in idx]), 0).chunk(2)
        loss = pair_losses(s0, s1, train_l0[idx], 1 - train_l0[idx]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:  # the gradient reaches the image tower (which the preference is about)
            vision_grad = sum(float(p.grad.norm()) for n, p in spm.named_parameters()
                              if "vision_model" in n and p.grad is not None)
        torch.nn.utils.clip_grad_norm_(spm.parameters(), preset.max_grad_norm)
        opt.step()
    assert vision_grad > 1e-3
    spm.eval()
    with torch.no_grad():
        s0, s1 = spm(test_x, spm.tokenize(test_caps), 0).chunk(2)
    accuracy = ((s0 > s1) == (test_l0 > 0.5)).float().mean().item()
    assert accuracy >= 0.9, f"held-out accuracy {accuracy:.3f} after {steps} steps"
    assert (s0 - s1).abs().mean() > 1.0  # scores separate, they did not collapse to equal values
