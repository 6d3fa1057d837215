"""Guidance terms (PAG, SLG), LinearAG and reward-guidance self-recurrence, against their formulas on toy models."""
import os
import sys

import pytest
import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from rewardlab.rewards.simple import brightness
from rewardlab.samplers import noise_scaling, sample
from rewardlab.samplers.guidance import (CFG, GuidanceSpec, GuidedDenoiser, LinearAG, RewardGuidance, RunInfo,
                                         fit_affine, pag, perturbed_modules, slg)

sys.path.insert(0, os.path.dirname(__file__))   # pytest runs with --import-mode=importlib
from _guidance_fixtures import GaussianDenoiser, means, noise, sd_sigmas  # noqa: E402

C = 8


class ToyDiT(nn.Module):
    """x0 = x + mid-block self-attention + a stack of residual blocks, on (B, C, 4, 4) tokens; conditioned by a mean."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mid_block = nn.Module()
        self.mid_block.attn1 = Attention(query_dim=C, heads=2, dim_head=4)
        self.transformer_blocks = nn.ModuleList(nn.Linear(C, C) for _ in range(3))
        self.calls = 0

    def forward(self, x, sigma, mean):
        self.calls += 1
        h = (x + mean).flatten(2).transpose(1, 2)                    # (B, tokens, C)
        h = h + self.mid_block.attn1(h)
        for block in self.transformer_blocks:
            h = block(h)
        return (h.transpose(1, 2).reshape(x.shape) / (1 + sigma.view(-1, 1, 1, 1) ** 2)).contiguous()


def toy_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    cond, uncond = ({"mean": torch.randn(2, C, 4, 4, generator=g)} for _ in range(2))
    return torch.randn(2, C, 4, 4, generator=g), cond, uncond


def test_pag_replaces_self_attention_by_its_values_and_restores_it():
    net = ToyDiT()
    h = torch.randn(2, 16, C)
    attn = net.mid_block.attn1
    normal = attn(h)
    with perturbed_modules(net, pag()):
        identity = attn(h)
    torch.testing.assert_close(identity, attn.to_out[1](attn.to_out[0](attn.to_v(h))))   # softmax map -> identity
    assert not torch.allclose(identity, normal)
    torch.testing.assert_close(attn(h), normal)                                          # hooks removed on exit


def test_slg_skips_the_named_blocks():
    net = ToyDiT()
    x, cond, _ = toy_inputs()
    sigma = torch.full((2,), 2.0)
    with perturbed_modules(net, slg(layers=("transformer_blocks.1",))):
        skipped = net(x, sigma, **cond)
    block1 = net.transformer_blocks[1]
    net.transformer_blocks[1] = nn.Identity()
    torch.testing.assert_close(skipped, net(x, sigma, **cond))
    net.transformer_blocks[1] = block1
    with pytest.raises(ValueError, match="found no module"):
        with perturbed_modules(net, slg(layers=("nonexistent.3",))):
            pass


@pytest.mark.parametrize("term", [pag(scale=2.5), slg(scale=2.8, layers=("transformer_blocks.0",), start=0.0,
                                                       stop=0.5)])
def test_terms_add_scale_times_cond_minus_perturbed_inside_their_window(term):
    net = ToyDiT()
    x, cond, uncond = toy_inputs()
    sigmas = sd_sigmas(6)
    guided = GuidedDenoiser(net, cond, uncond, GuidanceSpec(scale=4.0, terms=(term,)), kind="eps")
    run = guided.run(sigmas)
    info = RunInfo(sigmas, "eps")
    for i in range(6):
        s = sigmas[i].expand(2)
        got = run(x, s)
        c, u = net(x, s, **cond), net(x, s, **uncond)
        with perturbed_modules(net, term):
            k = net(x, s, **cond)
        ctx = info.ctx(step=i)
        inside = (0 < i / 6 < 0.5) if term.kind == "slg" else True
        weight = term.scale(ctx) if inside else 0.0
        torch.testing.assert_close(got, u + 4.0 * (c - u) + weight * (c - k), rtol=1e-5, atol=1e-6)
    assert run.evaluations == 6 * 2 + (6 if term.kind == "pag" else 2)      # one extra conditional call per active step


def test_pag_weight_follows_a_schedule_and_runs_in_the_sampler():
    from rewardlab.samplers.guidance import Linear
    net = ToyDiT()
    x, cond, uncond = toy_inputs()
    sigmas = sd_sigmas(5)
    plain = GuidedDenoiser(net, cond, uncond, GuidanceSpec(scale=3.0), kind="eps")
    ramped = GuidedDenoiser(net, cond, uncond, GuidanceSpec(scale=3.0, terms=(pag(scale=Linear(0.0, 4.0)),)),
                            kind="eps")
    a, _ = plain.sample(noise_scaling(sigmas[0], x), sigmas)
    b, run = ramped.sample(noise_scaling(sigmas[0], x), sigmas)
    assert not torch.allclose(a.x, b.x)
    assert run.evaluations == 5 * 2 + 4                  # the first step has weight 0: no extra call there


# --- LinearAG ---------------------------------------------------------------------------------------------------

def test_fit_affine_recovers_coefficients():
    g = torch.Generator().manual_seed(0)
    r = [torch.randn(2, 3, 4, 4, generator=g) for _ in range(3)]
    y = 0.7 * r[0] - 0.2 * r[1] + 0.4 * r[2]
    assert fit_affine(y, r) == pytest.approx([0.7, -0.2, 0.4], abs=1e-6)      # y is float32


def test_linear_ag_calibrates_then_replaces_uncond_calls_by_the_affine_estimate():
    sigmas = sd_sigmas(10)
    cond, uncond = means()
    den = GaussianDenoiser()
    gate = LinearAG(every=2, until=0.5)
    guided = GuidedDenoiser(den, cond, uncond, GuidanceSpec(scale=5.0, gates=(gate,)))
    x = noise_scaling(sigmas[0], noise())
    full, run1 = guided.sample(x, sigmas)                              # calibration: every branch runs
    assert run1.evaluations == 20 and sorted(gate.coefficients[10]) == [1, 3]      # steps 1, 3 (p < 0.5)
    fast, run2 = guided.sample(x, sigmas)
    assert run2.evaluations == 18                                      # two uncond evaluations replaced
    plain = sample(GuidedDenoiser(GaussianDenoiser(), cond, uncond, GuidanceSpec(scale=5.0)).run(sigmas), x, sigmas)
    assert torch.equal(full.x, plain.x)                                # calibration changes nothing
    rel = (fast.x - full.x).norm() / full.x.norm()
    assert 0 < rel < 0.02, rel                                         # the estimate stays close to real CFG

    # the estimate is the formula: ε_u(t) = a·ε_c(t) + b·ε_c(t−1) + c·ε_u(t−1) with the fitted scalars (ε = (x − D)/σ)
    run3, xs = guided.run(sigmas), [x]
    for i in range(3):
        D = run3(xs[-1], sigmas[i].expand(2))
        xs.append(xs[-1] + (xs[-1] - D) / sigmas[i] * (sigmas[i + 1] - sigmas[i]))
    got = run3(xs[3], sigmas[3].expand(2))
    s3, s2 = sigmas[3], sigmas[2]

    def eps(xx, sig, c):
        return (xx - den(xx, sig.expand(2), **c)) / sig
    a, b, c = gate.coefficients[10][3]
    eu = a * eps(xs[3], s3, cond) + b * eps(xs[2], s2, cond) + c * eps(xs[2], s2, uncond)
    Dc, Du = den(xs[3], s3.expand(2), **cond), xs[3] - s3 * eu
    torch.testing.assert_close(got, Du + 5.0 * (Dc - Du), rtol=1e-5, atol=1e-6)


# --- reward guidance: self-recurrence ----------------------------------------------------------------------------

def decode(x):
    return (x * 0.5 + 0.5).clamp(0, 1)


def test_self_recurrence_steps_renoises_and_guides_again_k_times():
    sigmas = sd_sigmas(6)
    cond, uncond = means()
    x = noise_scaling(sigmas[0], noise())
    k = 3
    kw = dict(decode=decode, strength=20.0, through_model=False, end=1.0)
    recur = GuidedDenoiser(GaussianDenoiser(), cond, uncond, GuidanceSpec(
        scale=3.0, reward=RewardGuidance(brightness, recurrence=k, seed=4, **kw)))
    with torch.no_grad():
        out, _ = recur.sample(x, sigmas)
    once = GuidedDenoiser(GaussianDenoiser(), cond, uncond, GuidanceSpec(
        scale=3.0, reward=RewardGuidance(brightness, **kw))).run(sigmas)
    g = torch.Generator().manual_seed(4)
    ref = x
    for i in range(6):                                  # Algorithm 1: k × (guided step, re-noise), last step kept
        s, s1 = sigmas[i], sigmas[i + 1]
        for n in range(k):
            D = once(ref, s.expand(2))
            nxt = ref + (ref - D) / s * (s1 - s)
            if n < k - 1:
                ref = nxt + (s**2 - s1**2).sqrt() * torch.randn(nxt.shape, generator=g)
        ref = nxt
    torch.testing.assert_close(out.x, ref, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        plain, _ = GuidedDenoiser(GaussianDenoiser(), cond, uncond, GuidanceSpec(
            scale=3.0, reward=RewardGuidance(brightness, **kw))).sample(x, sigmas)
    assert not torch.allclose(plain.x, out.x)


def test_guidance_terms_need_a_host_that_can_perturb():
    from rewardlab.samplers.guidance import guided_step
    info = RunInfo(sd_sigmas(4), "eps")
    spec = GuidanceSpec(scale=2.0, combiner=CFG(), terms=(pag(),))
    x = torch.zeros(1, 3, 2, 2)
    with pytest.raises(ValueError, match="perturbed-branch evaluator"):
        guided_step(spec, info.ctx(step=1), x, torch.ones(1), lambda need: (x, x))
