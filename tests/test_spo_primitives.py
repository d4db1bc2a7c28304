"""SPO's primitives against hand-computed values and against diffusers' own DDIM step."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from training.spo import compare, ddim_step, ddim_step_log_prob, previous_timestep, spo_loss


def _scheduler(spacing="leading", steps=20):
    s = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing=spacing)
    s.set_timesteps(steps)
    return s


def _expected(scheduler, t, prev_t, noise, eta):
    """Gaussian log-density of a DDIM step whose injected noise we know, averaged over elements, by hand."""
    a = scheduler.alphas_cumprod
    a_t = float(a[t])
    a_prev = float(a[prev_t]) if prev_t >= 0 else float(scheduler.final_alpha_cumprod)
    std = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    return (-(noise.double() ** 2) / 2).mean(dim=(1, 2, 3)) - math.log(std) - 0.5 * math.log(2 * math.pi)


@pytest.mark.parametrize(("spacing", "steps", "index"), [("leading", 20, 5), ("trailing", 30, 7), ("linspace", 30, 11),
                                                          ("trailing", 20, 19)])
def test_log_prob_of_a_step_with_known_noise(spacing, steps, index):
    sch = _scheduler(spacing, steps)
    t = int(sch.timesteps[index])
    prev_t = int(sch.timesteps[index + 1]) if index + 1 < len(sch.timesteps) else -1
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    prev = ddim_step(sch, eps, t, x, eta=1.0, noise=noise)
    got = ddim_step_log_prob(sch, eps, torch.full((3,), t), x, prev, eta=1.0)
    assert got.shape == (3,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _expected(sch, t, prev_t, noise, 1.0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_step_equals_diffusers_ddim_where_its_formula_holds(eta):
    """With leading spacing diffusers' `t - 1000 // N` is the list's previous timestep: both steps must agree."""
    sch = _scheduler("leading", 20)
    t = int(sch.timesteps[6])
    x, eps, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ours = ddim_step(sch, eps, t, x, eta=eta, noise=noise)
    theirs = sch.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_previous_timestep_reads_the_list_not_a_formula():
    sch = _scheduler("linspace", 30)
    ts = sch.timesteps
    got = previous_timestep(sch, ts[:-1].clone())
    assert torch.equal(got, ts[1:])
    assert any(int(a) - int(b) != 1000 // 30 for a, b in zip(ts[:-1], ts[1:], strict=True))  # the reference's bug
    assert int(previous_timestep(sch, ts[-1:])[0]) == -1
    with pytest.raises(ValueError):
        previous_timestep(sch, torch.tensor([12345]))


def test_log_prob_is_highest_at_the_mean_and_needs_eta():
    sch = _scheduler()
    t = int(sch.timesteps[3])
    x = torch.randn(2, 4, 8, 8)
    eps = torch.randn(2, 4, 8, 8)
    mean = sch.step(eps, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
    at_mean = ddim_step_log_prob(sch, eps, t, x, mean, eta=1.0)
    off = ddim_step_log_prob(sch, eps, t, x, mean + 0.05, eta=1.0)
    assert (at_mean > off).all()
    with pytest.raises(ValueError, match="eta"):
        ddim_step_log_prob(sch, eps, t, x, mean, eta=0.0)


def test_log_prob_is_fp32_for_half_inputs():
    sch = _scheduler()
    t = int(sch.timesteps[2])
    x, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    prev = sch.step(eps, t, x, eta=1.0, generator=torch.Generator().manual_seed(0)).prev_sample
    full = ddim_step_log_prob(sch, eps, t, x, prev, 1.0)
    half = ddim_step_log_prob(sch, eps.half(), t, x.half(), prev.half(), 1.0)
    assert half.dtype == torch.float32
    assert torch.allclose(full, half, atol=0.05)


def test_compare_picks_best_and_worst_and_drops_near_ties():
    scores = torch.tensor([[1.0, 5.0, 20.00],
                           [3.0, 0.0, 20.05],
                           [2.0, 0.1, 20.01]])
    idx, keep = compare(scores, threshold=0.3)
    assert idx.tolist() == [[1, 0, 1], [0, 1, 0]]
    # gaps: tanh(1) = 0.76, tanh(2.5) = 0.99, tanh(0.025) = 0.025
    assert keep.tolist() == [True, True, False]
    _, keep_strict = compare(scores, threshold=0.8)
    assert keep_strict.tolist() == [False, True, False]
    with pytest.raises(ValueError):
        compare(torch.zeros(1, 3), 0.3)


def test_spo_loss_hand_computed():
    lw, lrw = torch.tensor([0.05]), torch.tensor([0.0])  # ratio e^0.05 = 1.051, inside the clamp
    ll, lrl = torch.tensor([-0.2]), torch.tensor([0.0])  # ratio e^-0.2 = 0.819, clamped to 0.9
    expected = math.log1p(math.exp(-10 * (0.05 - math.log(0.9))))
    got = spo_loss(lw, lrw, ll, lrl, beta=10.0, eps=0.1)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # Equal ratios: log 2, whatever their value.
    assert spo_loss(torch.tensor([0.3]), torch.tensor([0.3]), torch.tensor([-1.0]), torch.tensor([-1.0]),
                    10.0, 0.1).item() == pytest.approx(math.log(2))
    # Batched, no reduction.
    per = spo_loss(torch.tensor([0.05, 0.0]), torch.zeros(2), torch.tensor([-0.2, 0.0]), torch.zeros(2), 10.0, 0.1,
                   reduction="none")
    assert per.shape == (2,) and per[0].item() == pytest.approx(expected, rel=1e-6)


def test_spo_loss_gradient_pushes_win_up_and_lose_down():
    lw = torch.tensor([0.0], requires_grad=True)
    ll = torch.tensor([0.0], requires_grad=True)
    spo_loss(lw, torch.zeros(1), ll, torch.zeros(1), beta=10.0, eps=0.1).backward()
    assert lw.grad.item() < 0 < ll.grad.item()


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_predicted_x0_recovers_the_clean_latent(kind):
    """Noise a known x0, give each parametrisation its exact target, and get x0 back."""
    from training.spo import predicted_x0

    sch = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        prediction_type=kind)
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([300, 700])
    a = sch.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = {"epsilon": noise, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0, "sample": x0}[kind]
    torch.testing.assert_close(predicted_x0(sch, target, t, x_t), x0, rtol=1e-4, atol=1e-4)
