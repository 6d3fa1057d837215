"""Each trainer method's LoRA gradient equals a hand-written plain-autograd reference of its paper's algorithm
on a 5-step CFG chain (toy ε-network, fixed seeds). The trainer runs with per-step checkpointing; the
references do not, so checkpointing is checked too."""
import os
import sys

import pytest
import torch

from rewardlab.training.draft import DraftConfig, Trainer, drtune_steps, lora_scale
from rewardlab.training.options import PRESETS, config_from_options

sys.path.insert(0, os.path.dirname(__file__))   # pytest runs with --import-mode=importlib
from _train_fixtures import TARGETS, reward, toy_bundle

N = 5


def make(method, **kw):
    cfg = DraftConfig(method=method, steps=N, batch_size=3, cfg=2.0, rank=2, targets=TARGETS, scheduler="karras",
                      seed=3, **kw)
    tr = Trainer(toy_bundle(), reward, cfg, prompts=["a red", "a blue", "a green", "a cat"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():                     # up = 0 at init would zero every down-gradient: randomise it
        for a in tr.adapters.values():
            a.up.copy_(torch.randn(a.up.shape, generator=g) * 0.3)
    return tr


def euler(x, d, s, s1):
    return x + (x - d) / s * (s1 - s)


def chain(den, x, sigmas, grad_steps, stopgrad=(), keep_path=False, upto=None):
    """Plain DDIM(η=0)/Euler loop. Steps outside grad_steps run under no_grad; with keep_path the latent path
    through them stays differentiable (DRTune: in ε form x' = x + (σ' − σ)·ε̂ with ε̂ = sg(ε̂)), otherwise x is
    cut there (DRaFT-K). At ``stopgrad`` steps the network sees sg(x): ε̂ = ε_θ(sg(x)), D = x − σ·ε̂."""
    b = x.shape[0]
    d = None
    for i in range(len(sigmas) - 1 if upto is None else upto):
        s, s1 = sigmas[i], sigmas[i + 1]
        if i in grad_steps:
            if i in stopgrad:
                eps = (x.detach() - den(x.detach(), s.expand(b))) / s
                x = x + (s1 - s) * eps
            else:
                d = den(x, s.expand(b))
                x = euler(x, d, s, s1)
        else:
            with torch.no_grad():
                eps = (x - den(x, s.expand(b))) / s
            x = x + (s1 - s) * eps if keep_path else (x + (s1 - s) * eps).detach()
    return x, d


def setup(tr, step=0):
    plan = tr.plan(step)
    den = tr.bundle.denoiser(tr.bundle.encode(plan.prompts), tr.cfg.cfg)
    sig = tr.sigmas
    x = plan.noise * (sig[0] ** 2 + 1) ** 0.5
    return plan, den, sig, x


def grads(loss, tr):
    return torch.autograd.grad(loss, tr.params)


def trainer_grads(tr, plan):
    return grads(tr.loss(plan)[0], tr)


def assert_same(a, b):
    for ga, gb in zip(a, b):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)
    assert max(float(g.abs().max()) for g in a) > 1e-6          # a real, non-zero gradient


def rloss(img, plan):
    return -reward(img, plan.prompts).mean()


def test_draft_full_backprop_matches_reference():
    tr = make("draft")
    plan, den, sig, x = setup(tr)
    ref = rloss(tr.bundle.decode(chain(den, x, sig, set(range(N)))[0]), plan)
    assert_same(trainer_grads(tr, plan), grads(ref, tr))


def test_draft_k_only_last_k_calls_contribute():
    tr = make("draft_k", k=2)
    plan, den, sig, x = setup(tr)
    net = tr.bundle.lora_root
    net.calls.clear()
    loss = tr.loss(plan)[0]
    assert [g for _, g in net.calls] == [False, False, False, True, True]     # one batched CFG call per step
    ref = rloss(tr.bundle.decode(chain(den, x, sig, {3, 4})[0]), plan)
    g_ref = grads(ref, tr)
    assert_same(grads(loss, tr), g_ref)
    other = rloss(tr.bundle.decode(chain(den, x, sig, {4})[0]), plan)      # K=1 is a different gradient
    assert not torch.allclose(g_ref[0], grads(other, tr)[0])


def test_draft_lv_sums_the_rewards_of_the_renoised_copies():
    tr = make("draft_lv", lv_n=2)
    plan, den, sig, x = setup(tr)
    with torch.no_grad():
        x0 = chain(den, x, sig, set())[0]
    s1 = sig[-2]
    losses = []
    for eps in plan.lv_noise:
        xi = x0 + s1 * eps                               # x_1^i = x0 + σ1·ε_i, then one denoising step with grad
        losses.append(rloss(tr.bundle.decode(den(xi, s1.expand(3))), plan))
    ref = torch.stack(losses).sum()                      # Algorithm 2: g = Σ_i ∇ r(x̂0^i), not the mean
    assert len(plan.lv_noise) == 2 and not torch.equal(plan.lv_noise[0], plan.lv_noise[1])
    g_ref = grads(ref, tr)
    assert_same(trainer_grads(tr, plan), g_ref)
    mean = make("draft_lv", lv_n=2, lv_reduction="mean")         # the old behaviour, kept as an option: 1/n of it
    assert_same(trainer_grads(mean, plan), [g / 2 for g in g_ref])


def test_alignprop_defaults_draw_k_uniformly_over_the_whole_chain():
    tr = make("alignprop")                                        # no K settings: the paper's K ~ U{1..T}
    ks = [tr.plan(s).k for s in range(60)]
    assert set(ks) == set(range(1, N + 1))
    assert abs(sum(ks) / len(ks) - (N + 1) / 2) < 0.6


def test_alignprop_draws_one_k_per_trajectory():
    tr = make("alignprop", k_min=1, k_max=N)
    ks = {tr.plan(s).k for s in range(12)}
    assert len(ks) >= 3 and ks <= set(range(1, N + 1))            # K varies between trajectories...
    plan, den, sig, x = setup(tr, step=next(s for s in range(12) if 1 < tr.plan(s).k < N))
    net = tr.bundle.lora_root
    net.calls.clear()
    loss = tr.loss(plan)[0]
    flags = [g for _, g in net.calls]
    assert flags == [False] * (N - plan.k) + [True] * plan.k      # ...but is one contiguous suffix within one
    ref = rloss(tr.bundle.decode(chain(den, x, sig, set(range(N - plan.k, N)))[0]), plan)
    assert_same(grads(loss, tr), grads(ref, tr))


def test_refl_rewards_the_one_step_x0_at_the_drawn_step():
    tr = make("refl", refl_first=1, refl_last=3)
    ms = {tr.plan(s).m for s in range(12)}
    assert ms == {1, 2, 3}
    plan, den, sig, x = setup(tr, step=next(s for s in range(12) if tr.plan(s).m == 2))
    xm, _ = chain(den, x, sig, set(), upto=plan.m)                # no-grad to step m
    d = den(xm, sig[plan.m].expand(3))                            # one call with grad: x̂0(x_m)
    ref = rloss(tr.bundle.decode(d), plan)
    assert_same(trainer_grads(tr, plan), grads(ref, tr))


def test_refl_hinge_and_loss_scale():
    tr = make("refl", refl_first=1, refl_last=3, loss="hinge", reward_cap=-0.05, loss_scale=1e-3)
    r = torch.tensor([-0.2, 0.1, -0.05])
    torch.testing.assert_close(tr.reward_loss(r), 1e-3 * torch.relu(-0.05 - r).mean())   # ReLU(cap − r)·scale
    plan, den, sig, x = setup(tr, step=next(s for s in range(12) if tr.plan(s).m == 2))
    xm, _ = chain(den, x, sig, set(), upto=plan.m)
    img = tr.bundle.decode(den(xm, sig[plan.m].expand(3)))
    ref = 1e-3 * torch.relu(-0.05 - reward(img, plan.prompts)).mean()
    assert_same(trainer_grads(tr, plan), grads(ref, tr))


def test_drtune_steps_are_evenly_spaced_with_a_random_offset():
    assert drtune_steps(50, 5, offset=3) == [3, 13, 23, 33, 43]
    assert drtune_steps(N, 2) == [2, 4]                            # the fixed set ends at the last step
    tr = make("drtune", k=2)
    subsets = {tr.plan(s).steps for s in range(30)}
    assert subsets == {(0, 2), (1, 3), (2, 4)}                    # every step gets trained over iterations


def test_drtune_stop_grad_input_at_sparse_steps():
    tr = make("drtune", k=2)
    plan, den, sig, x = setup(tr, step=next(s for s in range(30) if tr.plan(s).steps == (0, 2)))
    steps = set(plan.steps)
    ref = rloss(tr.bundle.decode(chain(den, x, sig, steps, stopgrad=steps, keep_path=True)[0]), plan)
    g_ref = grads(ref, tr)
    assert_same(trainer_grads(tr, plan), g_ref)
    # without stop-grad the UNet Jacobian of step 2 would carry step 0's gradient: a different answer
    full = rloss(tr.bundle.decode(chain(den, x, sig, steps, keep_path=True)[0]), plan)
    assert not torch.allclose(g_ref[0], grads(full, tr)[0])
    # and the gradient does reach the early trained step: with only step 0 trained it is not zero
    early = make("drtune", k=2)
    only0 = rloss(early.bundle.decode(chain(den, x, sig, {0}, stopgrad={0}, keep_path=True)[0]), plan)
    assert max(float(g.abs().max()) for g in grads(only0, tr)) > 1e-6


def test_draft_plus_penalty_to_the_frozen_base_at_grad_steps():
    tr = make("draft_k", k=2, kl_weight=0.5)
    plan, den, sig, x = setup(tr)
    b, xt, pens = 3, x, []
    for i in range(N):
        s, s1 = sig[i], sig[i + 1]
        if i >= N - 2:
            d = den(xt, s.expand(b))
            with torch.no_grad(), lora_scale(tr.adapters, 0.0):
                base = den(xt, s.expand(b))
            pens.append(((d - base) / s).square().mean())
            xt = euler(xt, d, s, s1)
        else:
            with torch.no_grad():
                xt = euler(xt, den(xt, s.expand(b)), s, s1)
    ref = rloss(tr.bundle.decode(xt), plan) + 0.5 * torch.stack(pens).mean()
    loss, info = tr.loss(plan)
    assert info["kl"] > 0
    assert_same(grads(loss, tr), grads(ref, tr))


@pytest.mark.parametrize("method", sorted(PRESETS))
def test_paper_preset_overrides_every_published_value(method):
    user = dict(method=method, steps=7, cfg=3.3, lr=0.5, batch_size=9, rank=2, k=1, loss_scale=7.0)
    config = DraftConfig(preset="paper", **user)
    for name, value in PRESETS[method].items():
        assert getattr(config, name) == value, name
    custom = DraftConfig(preset="custom", **user)
    assert (custom.steps, custom.cfg, custom.lr) == (7, 3.3, 0.5)


def test_paper_presets_hold_the_reference_recipes():
    refl, align = DraftConfig(method="refl", preset="paper"), DraftConfig(method="alignprop", preset="paper")
    assert (refl.steps, refl.refl_span(), refl.cfg, refl.loss, refl.reward_cap, refl.loss_scale) == \
        (40, (30, 39), 1.0, "hinge", 2.0, 1e-3)
    assert refl.sampler == "euler_ancestral" and refl.lr == 1e-5 and refl.batch_size * refl.grad_accum == 64
    assert align.alignprop_span() == (1, 50) and align.lr == 1e-3 and align.batch_size * align.grad_accum == 128
    node = config_from_options({"method": "ReFL", "preset": "paper", "steps": 20, "cfg": 7.5},
                               sampler="euler", scheduler="normal")
    assert (node.steps, node.cfg, node.sampler, node.scheduler) == (40, 1.0, "euler_ancestral", "ddim_uniform")


def test_config_rejects_bad_settings_with_a_fix():
    with pytest.raises(ValueError, match="lower K"):
        DraftConfig(method="draft_k", k=30, steps=20).validate()
    with pytest.raises(ValueError, match="unknown method"):
        DraftConfig(method="ddpo").validate()
    with pytest.raises(ValueError, match="k_max to 0"):
        DraftConfig(method="alignprop", k_min=3, k_max=2, steps=20).validate()
    with pytest.raises(ValueError, match="preset must be one of"):
        DraftConfig(preset="published")


def test_compiled_no_grad_prefix_keeps_the_eager_gradient():
    eager = make("draft_k", k=2)
    fast = make("draft_k", k=2, compile_prefix="inductor")
    compiled, calls = fast.bundle._fast.fast, []

    def counting(*a, **k):
        calls.append(torch.is_grad_enabled())
        return compiled(*a, **k)
    fast.bundle._fast.fast = counting
    plan = eager.plan(0)
    g_eager, g_fast = trainer_grads(eager, plan), trainer_grads(fast, plan)
    for a, b in zip(g_eager, g_fast):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert calls == [False] * (N - 2)          # the no-grad prefix ran the compiled module, the grad steps did not
