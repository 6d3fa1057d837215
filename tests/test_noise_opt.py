"""ReNO / DOODL noise optimisation on toy denoisers (CPU, fixed seeds)."""
import os
import sys

import pytest
import torch

from rewardlab.noise.optimise import (DOODL_PAPER, chi_regulariser, doodl, noise_gradient, noise_norms,
                                      optimise_noise, reno)

sys.path.insert(0, os.path.dirname(__file__))   # pytest runs with --import-mode=importlib
from _noise_fixtures import (BrightnessReward, Ensemble, TargetReward, TextReward, noise, toy_chain)


def rerender(chain, eps):
    """What a user's sampler does with the returned NOISE: the same chain, a fresh no-grad run."""
    with torch.no_grad():
        latent = chain.run(eps).x
        return latent, chain.images(latent)


def ensemble():
    return Ensemble([(1.0, TargetReward()), (0.1, BrightnessReward())])


def test_reno_improves_ensemble_and_returns_best_iterate():
    chain = toy_chain("eps", steps=1, cfg=3.0)
    res = reno(chain, ensemble(), noise(), iterations=20)
    h = res.history[:, 0]
    assert len(h) == 20 and res.calls == 20
    assert res.reward.item() == pytest.approx(h.max().item())
    assert res.reward.item() > h[0].item() + 0.05           # a real gain over the starting noise
    # The returned noise reproduces the returned image and reward (the NOISE contract, see below).
    _, images = rerender(chain, res.noise)
    assert torch.allclose(images, res.images, atol=1e-4)


def test_best_iterate_is_returned_not_the_last():
    # An oversized step without clipping makes the iterates overshoot, so the last one is not the best.
    chain = toy_chain("eps", steps=1)
    res = optimise_noise(chain, TargetReward(), noise(), iterations=8, lr=3e4, grad_clip=0, momentum=0,
                         reg_weight=0)
    h = res.history[:, 0]
    assert h[-1] < h.max()
    assert res.reward.item() == pytest.approx(h.max().item())
    assert torch.equal(res.best_so_far()[:, 0], h.cummax(0).values)
    assert res.best_so_far()[-1, 0] > h[0]


@pytest.mark.parametrize("kind,step,cfg", [("eps", "euler_ancestral", 3.0), ("v", "dpmpp_2m", 2.0),
                                           ("flow", "euler", 4.0)])
def test_noise_contract_reproduces_image_and_reward(kind, step, cfg):
    """Feeding the returned noise into the same sampler/sigmas (same ancestral seed) reproduces the image."""
    chain = toy_chain(kind, steps=3, step=step, cfg=cfg, batch=2, seed=7)
    reward = TargetReward()
    res = reno(chain, reward, noise(2), iterations=6, checkpoint_steps=True, checkpoint_reward=True)
    latent, images = rerender(chain, res.noise)
    assert (images - res.images).abs().max() <= 1e-4
    assert (latent - res.latent).abs().max() <= 1e-4
    assert torch.allclose(reward(images), res.reward, atol=1e-4)
    assert (res.reward > res.history[0]).all()


def test_regulariser_keeps_norm_on_the_chi_shell_and_without_it_the_norm_drifts():
    chain = toy_chain("eps", steps=1)
    sqrt_d = noise()[0].numel() ** 0.5
    kept = reno(chain, BrightnessReward(), noise(), iterations=50)
    drift = reno(chain, BrightnessReward(), noise(), iterations=50, reg_weight=0.0)
    assert abs(kept.norms[-1, 0] - sqrt_d) < 0.5
    assert drift.norms[-1, 0] - sqrt_d > 4.0
    # the regulariser's minimum is the typical shell √(d−1)
    z = noise()
    shell = z / z.norm() * (z[0].numel() - 1) ** 0.5
    assert chi_regulariser(shell) < chi_regulariser(shell * 1.05)
    assert chi_regulariser(shell) < chi_regulariser(shell * 0.95)


def _reference_gradient(chain, eps, reward, detach_before=0):
    """Plain autograd over a hand-written Euler chain (ε model, max-denoise noise scaling)."""
    eps = eps.clone().requires_grad_(True)
    s = chain.sigmas
    x = eps * (s[0] ** 2 + 1) ** 0.5
    for i in range(len(s) - 1):
        d = chain.model(x, s[i].expand(x.shape[0]))
        if i < detach_before:
            d = d.detach()
        x = x + (x - d) / s[i] * (s[i + 1] - s[i])
    (g,) = torch.autograd.grad(reward(chain.images(x)).sum(), eps)
    return g


@pytest.mark.parametrize("checkpointing", [False, True])
def test_multistep_gradient_matches_plain_autograd(checkpointing):
    chain = toy_chain("eps", steps=3)
    eps, reward = noise(), TargetReward()
    got = noise_gradient(chain, reward, eps, checkpoint_steps=checkpointing, checkpoint_reward=checkpointing)
    assert torch.allclose(got, _reference_gradient(chain, eps, reward), rtol=1e-4, atol=1e-7)


def test_grad_last_keeps_the_linear_path_to_the_noise():
    chain = toy_chain("eps", steps=3)
    eps, reward = noise(), TargetReward()
    got = noise_gradient(chain, reward, eps, grad_last=1)
    ref = _reference_gradient(chain, eps, reward, detach_before=2)
    assert got.abs().max() > 0
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(got, noise_gradient(chain, reward, eps), rtol=1e-2)


def test_regulariser_gradient_is_included():
    chain = toy_chain("eps", steps=1)
    eps, reward = noise() * 2, TargetReward()
    diff = noise_gradient(chain, reward, eps, reg_weight=0.01) - noise_gradient(chain, reward, eps)
    n, d = eps.norm(), eps.numel()
    assert torch.allclose(diff, -0.01 * (n - (d - 1) / n) * eps / n, rtol=1e-4, atol=1e-6)


def test_batch_rows_are_independent_problems():
    chain2 = toy_chain("eps", steps=1, cfg=2.0, batch=2)
    both = reno(chain2, TargetReward(), noise(2), iterations=5)
    chain1 = toy_chain("eps", steps=1, cfg=2.0, batch=1)
    for b in range(2):
        chain1.model.cond = {"cond": chain2.model.cond["cond"][b:b + 1]}
        alone = reno(chain1, TargetReward(), noise(2)[b:b + 1], iterations=5)
        assert torch.allclose(alone.noise[0], both.noise[b], atol=1e-5)


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_optional_optimizers_improve_within_the_evaluation_budget(optimizer):
    chain = toy_chain("eps", steps=1)
    res = optimise_noise(chain, TargetReward(), noise(), iterations=12, optimizer=optimizer,
                         lr=0.05 if optimizer == "adam" else 1.0)
    assert len(res.history) <= 12
    assert res.reward.item() > res.history[0, 0].item()


def test_doodl_renormalises_and_perturbs_reproducibly():
    chain = toy_chain("v", steps=3, step="euler_ancestral", seed=3)
    a = doodl(chain, TargetReward(), noise(), iterations=5, lr=1.0, grad_last=2)
    b = doodl(chain, TargetReward(), noise(), iterations=5, lr=1.0, grad_last=2)
    assert torch.allclose(a.norms, a.norms[:1].expand_as(a.norms), rtol=1e-5)
    assert torch.equal(a.noise, b.noise) and torch.equal(a.history, b.history)
    assert a.history[-1, 0] != a.history[0, 0]


def test_doodl_defaults_are_doodls_update_and_return_the_last_iterate():
    """DOODL's gen(): g = clip(∇(−r), ±1e-3) element-wise; b = 0.9·b + g (heavy ball, no Nesterov); z ← z − b;
    z ← z + 1e-4·n; z ← z·‖z0‖/‖z‖; the result is the last iterate (not the best)."""
    chain = toy_chain("v", steps=3, step="euler", seed=3)
    reward, z0 = TargetReward(), noise()
    res = doodl(chain, reward, z0, iterations=4)
    assert DOODL_PAPER["optimizer"] == "sgd_momentum" and DOODL_PAPER["keep"] == "last"
    z, b, norm0 = z0.clone(), None, z0.norm()
    kicks = torch.Generator().manual_seed(chain.seed + 1)
    for _ in range(3):                                        # 4 evaluations, 3 updates
        g = (-noise_gradient(chain, reward, z)).clamp(-1e-3, 1e-3)
        b = g if b is None else 0.9 * b + g
        z = z - 1.0 * b
        z = z + torch.randn(z.shape, generator=kicks) * 1e-4
        z = z * norm0 / z.norm()
    torch.testing.assert_close(res.noise, z, rtol=1e-5, atol=1e-6)
    assert res.reward.item() == pytest.approx(res.history[-1, 0].item())      # the last iterate, not the best
    assert (res.noise - z0).abs().max() > 1e-4


def test_value_clip_bounds_every_element_and_norm_clip_the_sample_norm():
    from rewardlab.noise.optimise import clip_gradient
    g = torch.randn(2, 3, 4, 4) * 5
    v = g.clone()
    clip_gradient(v, 1e-3, "value")
    assert v.abs().max() <= 1e-3 and torch.equal(v, g.clamp(-1e-3, 1e-3))
    n = g.clone()
    clip_gradient(n, 0.1, "norm")
    assert torch.allclose(n.flatten(1).norm(dim=1), torch.full((2,), 0.1), atol=1e-5)


def test_reno_weights_its_rewards_as_the_paper():
    from rewardlab.rewards.ensemble import RewardEnsemble
    from rewardlab.rewards.losses import reno_weighted
    from rewardlab.rewards.simple import build

    def named(name):
        return build(name, {"kind": "brightness"})
    members = [named(n) for n in ("hps-v2.1", "imagereward", "pickscore", "clipscore-vit-h-14")]
    weighted = reno_weighted(RewardEnsemble(members, [1.0] * 4))
    assert weighted.weights == [5.0, 1.0, 0.05, 0.01]
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(weighted(images), 6.06 * members[0](images))
    assert reno_weighted(named("hps-v2")).weights == [5.0]
    with pytest.raises(ValueError, match="no weight for the reward 'brightness'"):
        reno_weighted(build("brightness", {"kind": "brightness"}))
    with pytest.raises(ValueError, match="normalise to 'none'"):
        reno_weighted(RewardEnsemble(members, None, "range"))


def test_cancel_returns_best_so_far():
    chain = toy_chain("eps", steps=1)
    seen = []
    res = reno(chain, TargetReward(), noise(), iterations=50, callback=seen.append, cancel=lambda: len(seen) >= 3)
    assert res.cancelled and len(res.history) == 3
    assert res.reward.item() == pytest.approx(res.history[:, 0].max().item())
    assert seen[-1]["best_images"].shape == res.images.shape


def test_wrong_channel_count_is_a_clear_error():
    chain = toy_chain("eps", steps=1)
    with pytest.raises(ValueError, match="channels"):
        reno(chain, TargetReward(), torch.randn(1, 3, 8, 8), iterations=2)


def test_text_reward_without_prompt_is_a_clear_error():
    chain = toy_chain("eps", steps=1)
    with pytest.raises(ValueError, match="needs the prompt"):
        reno(chain, TextReward(), noise(), iterations=2)
    res = reno(chain, TextReward(), noise(), prompts="a red square", iterations=2)
    assert len(res.history) == 2


def test_zero_iterations_is_a_clear_error():
    with pytest.raises(ValueError, match="iterations"):
        reno(toy_chain("eps", steps=1), TargetReward(), noise(), iterations=0)


def test_out_of_memory_names_the_settings_to_change():
    class Hungry(TargetReward):
        def __call__(self, images, prompts=None):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with pytest.raises(RuntimeError, match="checkpoint_steps and checkpoint_reward"):
        reno(toy_chain("eps", steps=1), Hungry(), noise(), iterations=2)


def test_norm_helper_is_per_sample():
    z = noise(3)
    assert torch.allclose(noise_norms(z), torch.stack([z[i].norm() for i in range(3)]))


def test_the_largest_seed_a_node_accepts_works():
    """Seeds go up to 2**64 - 1 in the nodes; the perturbation generator used seed + 1, which overflowed."""
    chain = toy_chain("eps", steps=1)
    chain.seed = 2**64 - 1
    res = doodl(chain, TargetReward(), noise(), iterations=2)
    assert len(res.history) == 2 and res.seed == 2**64 - 1


def test_a_nan_first_reward_is_replaced_by_the_first_real_one():
    """BestTracker compared with '>', so a NaN first evaluation was never replaced."""
    from rewardlab.noise.chain import BestTracker

    best = BestTracker()
    x = torch.zeros(2, 1)
    best.offer(x, x, x, torch.tensor([float("nan"), 1.0]))
    best.offer(x + 1, x + 1, x + 1, torch.tensor([0.5, float("nan")]))
    assert best.reward.tolist() == [0.5, 1.0] and best.noise[:, 0].tolist() == [1.0, 0.0]


@pytest.mark.parametrize("preset", ["ReNO (paper)", "DOODL (paper)"])
def test_reno_node_presets_run_the_published_settings(monkeypatch, preset):
    """The node's preset replaces its widgets (a toy chain stands in for the ComfyUI host)."""
    from rewardlab.nodes import noise_nodes
    from rewardlab.noise import DOODL_PAPER, RENO_PAPER
    from rewardlab.rewards.simple import build
    seen = {}

    def fake_host(model, positive, negative, cfg, vae, latent, steps, sampler, scheduler, seed, batch, method, **kw):
        chain = toy_chain("eps", steps=2)
        seen["result"] = method(chain, noise())
        return seen["result"], (None, None, None)
    monkeypatch.setattr(noise_nodes, "run_noise_method", fake_host)
    captured = {}
    real = noise_nodes.optimise_noise

    def spy(chain, reward, noise_, prompts=None, **kw):
        captured.update(kw, reward=reward)
        return real(chain, TargetReward(), noise_, prompts, **{**kw, "iterations": 3})
    monkeypatch.setattr(noise_nodes, "optimise_noise", spy)
    reward = build("hps-v2.1", {"kind": "brightness"})
    noise_nodes.RewardLabReNOOptimiseNoise().optimise(
        None, None, None, None, None, reward, 2, "euler", "karras", 1.0, 0, 1, iterations=7, lr=0.3, reg_weight=0.5,
        preset=preset, optimizer="adam", grad_clip=9.0, clip="norm", keep="best", perturbation=0.3)
    paper = RENO_PAPER if preset == "ReNO (paper)" else DOODL_PAPER
    for key, value in paper.items():
        assert captured[key] == value, key
    if preset == "ReNO (paper)":
        assert captured["reward"].weights == [5.0]                  # the HPS member gets ReNO's weight
    assert len(seen["result"].history) == 3
