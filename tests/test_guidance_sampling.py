"""The guided denoiser inside the core runner: exact CFG, real NFE savings, CADS, reward guidance, per-run state."""
import os
import sys

import pytest
import torch

from rewardlab.rewards.simple import brightness
from rewardlab.samplers import CFGDenoiser, noise_scaling, sample
from rewardlab.samplers.guidance import (APG, CADS, AdaptiveGuidance, CFGZeroStar, Constant, GuidanceSpec,
                                         GuidedDenoiser, Interval, Linear, RewardGuidance, RunInfo, cfg_denoiser_hooks)

sys.path.insert(0, os.path.dirname(__file__))   # pytest runs with --import-mode=importlib
from _guidance_fixtures import GaussianDenoiser, means, noise, sd_sigmas  # noqa: E402

STEPS = 12


def setup(**spec):
    den = GaussianDenoiser()
    cond, uncond = means()
    return den, GuidedDenoiser(den, cond, uncond, **spec), cond, uncond


def x_T(sigmas):
    return noise_scaling(sigmas[0], noise())


def test_constant_schedule_reproduces_plain_cfg_exactly():
    sigmas = sd_sigmas(STEPS)
    den, guided, cond, uncond = setup(scale=Constant(6.0))
    out, _ = guided.sample(x_T(sigmas), sigmas)
    ref = sample(CFGDenoiser(GaussianDenoiser(), cond, uncond, 6.0), x_T(sigmas), sigmas)
    assert torch.equal(out.x, ref.x)


def test_scheduled_weights_match_a_reference_loop():
    sigmas = sd_sigmas(STEPS)
    sched = Linear(1.5, 9.0)
    den, guided, cond, uncond = setup(scale=sched)
    out, _ = guided.sample(x_T(sigmas), sigmas, step="dpmpp_2m")
    info = RunInfo(sigmas, "eps")
    ref_den = GaussianDenoiser()

    def reference(x, sigma):
        w = sched(info.ctx(sigma=float(sigma[0])))
        c, u = ref_den(x, sigma, **cond), ref_den(x, sigma, **uncond)
        return u + w * (c - u)
    ref = sample(reference, x_T(sigmas), sigmas, step="dpmpp_2m")
    assert torch.allclose(out.x, ref.x, atol=1e-5)


def test_cfg_denoiser_hooks_match_guided_denoiser():
    sigmas = sd_sigmas(STEPS)
    spec = GuidanceSpec(scale=Linear(2.0, 8.0), combiner=APG(eta=0.0, momentum=-0.5, norm_threshold=5.0))
    den, guided, cond, uncond = setup(spec=spec)
    out, _ = guided.sample(x_T(sigmas), sigmas)
    scale, combine = cfg_denoiser_hooks(spec, sigmas)
    ref = sample(CFGDenoiser(GaussianDenoiser(), cond, uncond, scale, combine), x_T(sigmas), sigmas)
    assert torch.allclose(out.x, ref.x, atol=1e-5)


def test_adaptive_guidance_really_skips_uncond_calls():
    sigmas = sd_sigmas(STEPS)
    cfg_den, cfg_guided, _, _ = setup(scale=7.0)
    cfg_out, cfg_run = cfg_guided.sample(x_T(sigmas), sigmas)
    gate = AdaptiveGuidance(threshold=0.99)
    ag_den, ag_guided, _, _ = setup(scale=7.0, gates=(gate,))
    ag_out, ag_run = ag_guided.sample(x_T(sigmas), sigmas)
    latched = ag_run.state[("adaptive_guidance", id(gate))]
    assert 0 < latched < STEPS - 1                                 # crossed mid-run, not at once and not never
    trace = ag_run.state[("adaptive_guidance_trace", id(gate))]
    assert trace[-1][1] >= 0.99 and all(g < 0.99 for _, g in trace[:-1])
    # rows evaluated by the network: 2 per image per step until the latch (inclusive), 1 afterwards
    batch = 2
    assert cfg_den.rows == 2 * STEPS * batch
    assert ag_den.rows == batch * (2 * (latched + 1) + (STEPS - latched - 1))
    assert ag_run.evaluations == 2 * (latched + 1) + (STEPS - latched - 1)
    assert ag_den.rows < cfg_den.rows
    assert not torch.equal(ag_out.x, cfg_out.x)


def test_interval_schedule_skips_uncond_outside_and_returns_cond():
    sigmas = sd_sigmas(STEPS)
    sched = Interval(Constant(7.0), 0.28, 5.42)
    den, guided, cond, uncond = setup(scale=sched)
    info = RunInfo(sigmas, "eps")
    inside = sum(0.28 < c.sigma <= 5.42 for c in info.contexts())
    assert 0 < inside < STEPS
    out, _ = guided.sample(x_T(sigmas), sigmas)
    assert den.rows == 2 * (2 * inside + (STEPS - inside))
    ref_den = GaussianDenoiser()                  # outside the interval the prediction is D_c exactly
    run = guided.run(sigmas)
    x = x_T(sigmas)
    for i, c in enumerate(info.contexts()):
        s = sigmas[i].expand(2)
        got = run(x, s)
        if not 0.28 < c.sigma <= 5.42:
            assert torch.equal(got, ref_den(x, s, **cond))
        x = x + (x - got) / sigmas[i] * (sigmas[i + 1] - sigmas[i])


def test_cfg_zero_star_zero_init_calls_nothing():
    sigmas = torch.tensor([0.95, 0.8, 0.6, 0.4, 0.2, 0.0])
    den = GaussianDenoiser(flow=True)
    cond, uncond = means()
    guided = GuidedDenoiser(den, cond, uncond, scale=4.0, combiner=CFGZeroStar(zero_init_steps=2))
    assert guided.flow
    x = noise_scaling(sigmas[0], noise(), flow=True)
    run = guided.run(sigmas)
    assert torch.equal(run(x, sigmas[0].expand(2)), x)          # zero velocity: D = x, no network call
    assert den.rows == 0
    out = sample(run, x, sigmas, flow=True)
    assert den.rows == 2 * 2 * (5 - 2)
    assert torch.isfinite(out.x).all()


def test_cads_gamma_matches_the_ramp():
    cads = CADS(tau1=0.6, tau2=0.9)
    info = RunInfo(sd_sigmas(21), "eps")
    for c in info.contexts():
        t = 1 - c.p_step
        expected = 1.0 if t <= 0.6 else 0.0 if t >= 0.9 else (0.9 - t) / 0.3
        assert cads.gamma(c) == pytest.approx(expected)


def test_cads_noises_the_condition_with_rescale():
    info = RunInfo(sd_sigmas(10), "eps")
    y = torch.randn(2, 77, 16, generator=torch.Generator().manual_seed(3)) * 2 + 1
    early, late = info.ctx(step=0), info.ctx(step=9)
    assert CADS().gamma(early) == 0 and CADS().gamma(late) == 1
    assert torch.equal(CADS()({"c": y}, late)["c"], y)                       # clean after τ1
    noised = CADS(psi=1.0)({"c": y}, early)["c"]                           # pure scaled noise, rescaled to y's stats
    assert not torch.allclose(noised, y)
    assert noised.mean().item() == pytest.approx(y.mean().item(), abs=1e-4)   # the paper: scalars over the tensor
    assert noised.std().item() == pytest.approx(y.std().item(), abs=1e-4)
    per_row = CADS(psi=1.0, per_sample=True)({"c": y}, early)["c"]          # the option: per batch item
    assert torch.allclose(per_row.mean((1, 2)), y.mean((1, 2)), atol=1e-4)
    assert torch.allclose(per_row.std((1, 2)), y.std((1, 2)), atol=1e-4)
    raw = CADS(psi=0.0, noise_scale=0.25)({"c": y}, early)["c"]            # ψ = 0: ŷ = s·n
    assert raw.std().item() == pytest.approx(0.25, rel=0.05)


def test_cads_rescale_is_the_papers_listing_over_the_whole_batch():
    info = RunInfo(sd_sigmas(10), "eps")
    ctx = info.ctx(step=1)                                                  # inside the ramp: 0 < γ < 1
    y = torch.randn(2, 7, 5, generator=torch.Generator().manual_seed(4)) * torch.tensor([1.0, 3.0]).view(2, 1, 1)
    cads = CADS(tau1=0.1, tau2=0.95, noise_scale=0.3, psi=0.6, seed=5)
    gamma = cads.gamma(ctx)
    assert 0 < gamma < 1
    n = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    noised = gamma**0.5 * y + 0.3 * (1 - gamma) ** 0.5 * n                    # Eq. (2) + the listing's rescale:
    scaled = (noised - noised.mean()) / noised.std() * y.std() + y.mean()     # torch.mean(y), torch.std(y)
    expected = 0.6 * scaled + 0.4 * noised
    assert torch.allclose(cads({"c": y}, ctx)["c"], expected, atol=1e-5)


def test_interval_per_step_decides_off_grid_calls_by_their_step():
    info = RunInfo(sd_sigmas(10), "eps")
    grid = info.sigmas
    lo = (grid[3] + grid[4]) / 2                                           # boundary between steps 3 and 4
    call, step = Interval(Constant(5.0), lo, 100.0), Interval(Constant(5.0), lo, 100.0, decide="step")
    mid = info.ctx(sigma=(grid[3] * grid[4]) ** 0.5 * 0.97)                 # an off-grid call of step 3, below lo
    assert 3 < mid.step < 4 and mid.sigma_edm < lo
    assert call(mid) == 1.0 and step(mid) == 5.0                          # per call: outside; per step: step 3's
    for i in range(10):                                                   # on the grid both rules agree
        assert call(info.ctx(step=i)) == step(info.ctx(step=i))


def test_cads_changes_samples_and_is_reproducible_per_run():
    sigmas = sd_sigmas(STEPS)
    _, plain, _, _ = setup(scale=5.0)
    _, annealed, _, _ = setup(scale=5.0, cond_ops=(CADS(noise_scale=0.5, seed=7),))
    a, _ = plain.sample(x_T(sigmas), sigmas)
    b1, _ = annealed.sample(x_T(sigmas), sigmas)
    b2, _ = annealed.sample(x_T(sigmas), sigmas)
    assert not torch.allclose(a.x, b1.x)
    assert torch.equal(b1.x, b2.x)                     # each run restarts its own noise stream


def decode(x):
    return (x * 0.5 + 0.5).clamp(0, 1)


# Strengths differ per variant: a mean-luma reward has a tiny per-pixel gradient, and the forward variants scale it by
# σ² (times the denoiser Jacobian when it goes through the model).
@pytest.mark.parametrize("kw", [dict(strength=300.0), dict(strength=10.0, through_model=False),
                                dict(strength=0.0, backward_steps=3, backward_lr=50.0)])
def test_reward_guidance_raises_the_reward(kw):
    sigmas = sd_sigmas(STEPS)
    _, plain, cond, uncond = setup(scale=3.0)
    base, _ = plain.sample(x_T(sigmas), sigmas)
    reward = RewardGuidance(brightness, decode=decode, **kw)
    _, guided, _, _ = setup(scale=3.0, reward=reward)
    with torch.no_grad():                              # guidance enables grad itself where it needs it
        out, _ = guided.sample(x_T(sigmas), sigmas)
    before, after = brightness(decode(base.x)), brightness(decode(out.x))
    assert (after > before + 0.02).all(), (before, after)


def test_reward_guidance_window_and_strength_schedule():
    sigmas = sd_sigmas(STEPS)
    reward = RewardGuidance(brightness, decode=decode, strength=Linear(0.1, 0.0), start=0.2, end=0.5)
    info = RunInfo(sigmas, "eps")
    active = [reward.active(c) for c in info.contexts()]
    assert active == [0.2 <= c.p_step <= 0.5 for c in info.contexts()]
    assert not reward.active(info.ctx(step=STEPS - 1))


def test_state_is_per_run_and_never_shared():
    sigmas = sd_sigmas(STEPS)
    gate = AdaptiveGuidance(threshold=0.99)
    den, guided, _, _ = setup(scale=Linear(2.0, 8.0), combiner=APG(momentum=-0.5), gates=(gate,))
    out1, run1 = guided.sample(x_T(sigmas), sigmas)
    rows1 = den.rows
    out2, run2 = guided.sample(x_T(sigmas), sigmas)
    assert torch.equal(out1.x, out2.x) and den.rows == 2 * rows1
    assert run1.state is not run2.state
    # reusing a finished run's state would change the result: the AG latch and APG momentum carry over
    out3 = sample(run1, x_T(sigmas), sigmas)
    assert not torch.equal(out3.x, out1.x)


def test_unbound_guided_denoiser_explains_itself():
    _, guided, _, _ = setup(scale=3.0)
    with pytest.raises(RuntimeError, match="run\\(sigmas\\)"):
        guided(torch.zeros(1, 3, 8, 8), torch.ones(1))


def test_adaptive_guidance_space_decides_when_it_latches():
    """Why x̂0 is the default space (docs/methods.md §4.8): on the tiny model the ε-space cosine of cond and uncond
    is ≥ 0.99 already at the first step (ε̂ ≈ x/σ for both), so the paper's ε space latches at once; x̂0 latches later."""
    from rewardlab.samplers import sigma_schedule
    from rewardlab.tiny.model import load_tiny
    tiny = load_tiny()
    sigmas = sigma_schedule("karras", 12, tiny.model_sigmas)
    latched = {}
    for space in ("eps", "x0"):
        gate = AdaptiveGuidance(0.99, space)
        guided = GuidedDenoiser(tiny.denoiser, tiny.encode(["a red circle on a blue background"]), tiny.encode([""]),
                                GuidanceSpec(scale=3.0, gates=(gate,)))
        run = guided.run(sigmas)
        with torch.no_grad():
            sample(run, noise_scaling(sigmas[0], tiny.initial_noise(1, seed=0)), sigmas)
        latched[space] = run.state[("adaptive_guidance", id(gate))]
    print("adaptive guidance latches at step", latched)
    assert latched["eps"] == 0 and latched["x0"] >= 3, latched


@pytest.mark.parametrize("kw", [dict(strength=300.0), dict(strength=10.0, through_model=False),
                                dict(strength=0.0, backward_steps=3, backward_lr=50.0)])
def test_reward_guidance_leaves_a_sample_unguided_when_its_reward_gradient_is_nan(kw, caplog):
    """Issue 14 (left over): a reward whose gradient is NaN for one sample turned that whole image into NaN. Now that
    sample is left unguided (the same as without reward guidance), the others are guided, and a warning says so."""
    sigmas = sd_sigmas(STEPS)

    def nan_for_first(images, prompts=None):
        r = brightness(images)
        return torch.cat([r[:1] * torch.sqrt(-torch.ones(())), r[1:]])   # sqrt(-1): NaN value and gradient

    x = x_T(sigmas)                                                   # two samples
    _, plain, _, _ = setup(scale=3.0)
    base, _ = plain.sample(x, sigmas)
    _, guided, _, _ = setup(scale=3.0, reward=RewardGuidance(nan_for_first, decode=decode, **kw))
    with torch.no_grad(), caplog.at_level("WARNING", logger="rewardlab"):
        out, _ = guided.sample(x, sigmas)
    assert torch.isfinite(out.x).all()
    torch.testing.assert_close(out.x[:1], base.x[:1])               # the NaN sample: unguided
    assert (brightness(decode(out.x[1:])) > brightness(decode(base.x[1:])) + 0.02).all()
    assert "NaN/Inf for 1 of 2 samples" in caplog.text
