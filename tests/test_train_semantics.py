"""Each trainer method's LoRA gradient equals a hand-written plain-autograd reference of its paper's algorithm
on a 5-step CFG chain (toy ε-network, fixed seeds). The trainer runs with per-step checkpointing; the
references do not, so checkpointing is checked too."""
import os
import sys

import pytest
import torch

from rewardlab.training.draft import DraftConfig, Trainer, drtune_steps, lora_scale

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
    through them stays differentiable (DRTune), otherwise x is cut there (DRaFT-K)."""
    b = x.shape[0]
    d = None
    for i in range(len(sigmas) - 1 if upto is None else upto):
        s, s1 = sigmas[i], sigmas[i + 1]
        if i in grad_steps:
            d = den(x.detach() if i in stopgrad else x, s.expand(b))
            x = euler(x, d, s, s1)
        else:
            with torch.no_grad():
                d = den(x, s.expand(b))
            x = euler(x, d, s, s1) if keep_path else euler(x.detach(), d, s, s1).detach()
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


def test_draft_lv_renoises_the_detached_final_sample():
    tr = make("draft_lv", lv_n=2)
    plan, den, sig, x = setup(tr)
    with torch.no_grad():
        x0 = chain(den, x, sig, set())[0]
    s1 = sig[-2]
    losses = []
    for eps in plan.lv_noise:
        xi = x0 + s1 * eps                               # x_1^i = x0 + σ1·ε_i, then one denoising step with grad
        losses.append(rloss(tr.bundle.decode(den(xi, s1.expand(3))), plan))
    ref = torch.stack(losses).mean()
    assert len(plan.lv_noise) == 2 and not torch.equal(plan.lv_noise[0], plan.lv_noise[1])
    assert_same(trainer_grads(tr, plan), grads(ref, tr))


@pytest.mark.parametrize("prefix", ["no_grad", "detach"])
def test_alignprop_draws_one_k_per_trajectory(prefix):
    tr = make("alignprop", k=N, k_min=1, alignprop_prefix=prefix)
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
    tr = make("refl", refl_range=(1, 3))
    ms = {tr.plan(s).m for s in range(12)}
    assert ms == {1, 2, 3}
    plan, den, sig, x = setup(tr, step=next(s for s in range(12) if tr.plan(s).m == 2))
    xm, _ = chain(den, x, sig, set(), upto=plan.m)                # no-grad to step m
    d = den(xm, sig[plan.m].expand(3))                            # one call with grad: x̂0(x_m)
    ref = rloss(tr.bundle.decode(d), plan)
    assert_same(trainer_grads(tr, plan), grads(ref, tr))


def test_drtune_stop_grad_input_at_sparse_steps():
    tr = make("drtune", k=2)
    steps = set(drtune_steps(N, 2))
    assert steps == {0, 4}
    plan, den, sig, x = setup(tr)
    ref = rloss(tr.bundle.decode(chain(den, x, sig, steps, stopgrad=steps, keep_path=True)[0]), plan)
    g_ref = grads(ref, tr)
    assert_same(trainer_grads(tr, plan), g_ref)
    # without stop-grad the UNet Jacobian of step 4 would carry step 0's gradient: a different answer
    full = rloss(tr.bundle.decode(chain(den, x, sig, steps, keep_path=True)[0]), plan)
    assert not torch.allclose(g_ref[0], grads(full, tr)[0])


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


def test_config_rejects_bad_settings_with_a_fix():
    with pytest.raises(ValueError, match="lower K"):
        DraftConfig(method="draft_k", k=30, steps=20).validate()
    with pytest.raises(ValueError, match="unknown method"):
        DraftConfig(method="ddpo").validate()


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
