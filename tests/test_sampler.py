"""The multi-sample DDIM loop with the step-wise resampler, driven by toy noise predictors and scorers."""

import pytest
import torch
from diffusers import DDIMScheduler

from training.sampler import Scorer, spo_sample


def _scheduler():
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def eps_fn(x, t, prompt_index):
    return 0.5 * x + 0.01 * prompt_index.float().reshape(-1, 1, 1, 1)


def _by_mean(x0, prompt_index, t):
    return x0.float().mean(dim=(1, 2, 3)) * 100


score_by_mean = Scorer(_by_mean)


def _run(**kw):
    args = dict(num_steps=20, num_candidates=4, divert_start_step=4, threshold=-1.0,
                generator=torch.Generator().manual_seed(0))
    args.update(kw)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    return spo_sample(_scheduler(), eps_fn, args.pop("score_fn", score_by_mean), latents, **args)


def test_pairs_share_their_parent_and_follow_the_schedule():
    res = _run()
    p = res.pairs
    assert res.compared == 16 * 3 and res.kept == res.compared  # threshold -1 keeps every comparison
    assert torch.equal(p.x_t_win, p.x_t_lose)
    assert not torch.equal(p.x_prev_win, p.x_prev_lose)
    sch = _scheduler()
    sch.set_timesteps(20)
    assert sorted(set(p.timestep.tolist()), reverse=True) == sch.timesteps[4:].tolist()
    assert p.prompt_index.tolist() == [0, 1, 2] * 16


def test_winner_scores_higher_than_loser():
    res = _run(num_candidates=3)
    p = res.pairs
    # For the final step the score is the latent mean itself.
    last = p.timestep == p.timestep.min()
    assert (p.x_prev_win[last].mean(dim=(1, 2, 3)) >= p.x_prev_lose[last].mean(dim=(1, 2, 3))).all()


def test_resampler_continues_from_a_random_candidate_not_the_winner():
    res = _run(num_candidates=2, num_steps=40, divert_start_step=1)
    p = res.pairs
    chosen, best = torch.stack(res.chosen), torch.stack(res.best)  # (segments, B)
    frac_winner = (chosen == best).float().mean().item()
    assert 0.3 < frac_winner < 0.7, frac_winner  # K = 2: about half the time, by chance
    # The next segment's parent is exactly the chosen candidate's end state.
    b = 3
    for s in range(chosen.shape[0] - 1):
        rows = slice(s * b, (s + 1) * b)
        nxt = slice((s + 1) * b, (s + 2) * b)
        expect = torch.where((chosen[s] == best[s]).reshape(-1, 1, 1, 1), p.x_prev_win[rows], p.x_prev_lose[rows])
        assert torch.equal(p.x_t_win[nxt], expect)


def test_continue_from_winner_follows_the_best_candidate():
    res = _run(num_candidates=4, num_steps=20, divert_start_step=2, continue_from="winner")
    p = res.pairs
    chosen, best = torch.stack(res.chosen), torch.stack(res.best)
    assert torch.equal(chosen, best)
    b = 3
    for s in range(chosen.shape[0] - 1):  # each next parent is the previous segment's winner
        assert torch.equal(p.x_t_win[(s + 1) * b:(s + 2) * b], p.x_prev_win[s * b:(s + 1) * b])


def test_continue_from_must_be_named():
    with pytest.raises(ValueError, match="continue_from"):
        _run(continue_from="loser")


def test_threshold_drops_unclear_comparisons():
    def flat_scores(x0, prompt_index, t):
        return torch.zeros(x0.shape[0])

    res = _run(score_fn=Scorer(flat_scores), threshold=0.3)
    assert res.kept == 0 and res.pairs is None and res.keep_rate == 0.0
    assert res.final_latents.shape == (3, 4, 8, 8)


def test_inner_steps_branch_every_segment_and_chain_transitions():
    res = _run(num_candidates=2, inner_steps=3)
    p = res.pairs
    assert res.compared == 4 * 3  # branches at steps 4, 8, 12, 16
    assert len(p) == 4 * 4 * 3  # every transition of each kept segment
    b = 3
    # Within a segment, the win side's transitions chain: x_prev of step s is x_t of step s + 1.
    assert torch.equal(p.x_prev_win[0:b], p.x_t_win[b:2 * b])
    assert torch.equal(p.x_t_win[0:b], p.x_t_lose[0:b])  # the segment starts from one parent
    assert not torch.equal(p.x_t_win[b:2 * b], p.x_t_lose[b:2 * b])  # then the candidates run on their own


def test_same_generator_same_samples():
    a, b = _run(), _run()
    assert torch.equal(a.final_latents, b.final_latents) and torch.equal(a.pairs.x_prev_win, b.pairs.x_prev_win)


def test_per_prompt_generators_make_a_prompt_independent_of_its_batch():
    """Seeds independent of world size: prompt j's trajectory is the same in a batch of 3 or alone."""
    sch = _scheduler()
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    gens = [torch.Generator().manual_seed(100 + j) for j in range(3)]
    full = spo_sample(sch, eps_fn, score_by_mean, latents, threshold=-1.0, generator=gens)

    def eps_shifted(x, t, prompt_index):  # prompt 2 alone is prompt index 0 in its own batch
        return eps_fn(x, t, prompt_index + 2)

    alone = spo_sample(_scheduler(), eps_shifted, score_by_mean, latents[2:], threshold=-1.0,
                       generator=[torch.Generator().manual_seed(102)])
    torch.testing.assert_close(full.final_latents[2:], alone.final_latents)


def test_a_latent_scorer_gets_the_candidates_and_judges_the_recorded_transitions():
    """`Scorer(..., scores_latents=True)` (the lookahead scorer): the scorer sees each candidate x_{t-1} itself, not
    its x0 preview."""
    seen = []

    def by_latent_mean(latents, prompt_index, t):
        seen.append(latents.clone())
        return latents.float().mean(dim=(1, 2, 3)) * 100

    p = _run(score_fn=Scorer(by_latent_mean, scores_latents=True)).pairs
    assert (p.x_prev_win.mean(dim=(1, 2, 3)) > p.x_prev_lose.mean(dim=(1, 2, 3))).all()
    # The first comparison's winners (one per prompt) are among the very latents the scorer was given.
    assert all(any(torch.equal(candidate, win) for candidate in seen[0]) for win in p.x_prev_win[:3])
