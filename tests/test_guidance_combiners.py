"""Combiners against their papers' formulas, in their declared spaces."""
import os
import sys

import pytest
import torch

from rewardlab.samplers.guidance import (APG, CFG, CFGRescale, CFGZeroStar, RunInfo, apply_combiner, from_space,
                                         make_combiner, to_space)

sys.path.insert(0, os.path.dirname(__file__))   # pytest runs with --import-mode=importlib
from _guidance_fixtures import sd_sigmas  # noqa: E402


def preds(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 6, 6, generator=g) * 3
    return x, torch.randn(batch, 4, 6, 6, generator=g), torch.randn(batch, 4, 6, 6, generator=g)


def ctx_of(kind="eps", step=3):
    sigmas = [0.9, 0.7, 0.5, 0.3, 0.1, 0.0] if kind == "const" else sd_sigmas(5).tolist()
    return RunInfo(sigmas, kind).ctx(step=step)


@pytest.mark.parametrize("kind", ["eps", "v", "const"])
@pytest.mark.parametrize("space", ["x0", "eps", "velocity", "v_pred"])
def test_space_round_trip(kind, space):
    x, D, _ = preds()
    ctx = ctx_of(kind)
    sigma = torch.full((2,), ctx.sigma)
    assert torch.allclose(from_space(to_space(D, x, sigma, kind, space), x, sigma, kind, space), D, atol=1e-5)


def test_space_definitions():
    x, D, _ = preds()
    s = 0.4
    sig = torch.full((2,), s)
    assert torch.allclose(to_space(D, x, sig, "const", "velocity"), (x - D) / s)                 # v = ε - x0
    assert torch.allclose(to_space(D, x, sig, "const", "eps"), (x - (1 - s) * D) / s)
    assert torch.allclose(to_space(D, x, sig, "eps", "eps"), (x - D) / s)
    vp = to_space(D, x, sig, "eps", "v_pred")                                                   # v = α ε - σ_vp x0
    eps = (x - D) / s
    assert torch.allclose(vp, (eps - s * D) / (1 + s * s) ** 0.5, atol=1e-5)


def test_cfg_is_the_plain_formula_in_any_space():
    x, c, u = preds()
    for kind in ("eps", "const"):
        ctx = ctx_of(kind)
        sigma = torch.full((2,), ctx.sigma)
        assert torch.allclose(apply_combiner(CFG(), c, u, x, sigma, ctx, 6.0), u + 6.0 * (c - u), atol=1e-5)


def apg_reference(c, u, w, eta, r, beta, prev=None):
    """Sadat et al. 2410.02416, Algorithm 1, written out per sample."""
    out, avg = [], []
    for i in range(c.shape[0]):
        d = c[i] - u[i]
        if beta:
            d = d + (beta * prev[i] if prev is not None else 0)
        avg.append(d)
        if r > 0:
            d = d * min(1.0, r / d.norm().item())
        unit = c[i] / c[i].norm()
        par = (d * unit).sum() * unit
        out.append(c[i] + (w - 1) * ((d - par) + eta * par))
    return torch.stack(out), torch.stack(avg)


def test_apg_matches_paper_at_scale_w():
    x, c, u = preds()
    ctx = ctx_of()
    sigma = torch.full((2,), ctx.sigma)
    apg = APG(eta=0.3, norm_threshold=4.0, momentum=-0.5)
    got1 = apply_combiner(apg, c, u, x, sigma, ctx, 5.0)
    ref1, avg = apg_reference(c, u, 5.0, 0.3, 4.0, -0.5)
    assert torch.allclose(got1, ref1, atol=1e-5)
    _, c2, u2 = preds(seed=1)
    got2 = apply_combiner(apg, c2, u2, x, sigma, ctx, 5.0)                 # momentum carries over inside the run
    ref2, _ = apg_reference(c2, u2, 5.0, 0.3, 4.0, -0.5, prev=avg)
    assert torch.allclose(got2, ref2, atol=1e-5)


def test_apg_neutral_parameters_give_cfg_at_w_not_w_plus_1():
    x, c, u = preds()
    ctx = ctx_of()
    sigma = torch.full((2,), ctx.sigma)
    got = apply_combiner(APG(eta=1.0, norm_threshold=0.0, momentum=0.0), c, u, x, sigma, ctx, 4.0)
    assert torch.allclose(got, u + 4.0 * (c - u), atol=1e-5)         # ComfyUI core's APG would give CFG at 5.0
    assert not torch.allclose(got, u + 5.0 * (c - u), atol=1e-3)


def test_cfg_zero_star_is_in_velocity_space():
    x, c, u = preds()
    ctx = ctx_of("const")
    s = ctx.sigma
    sigma = torch.full((2,), s)
    w = 4.0
    got = apply_combiner(CFGZeroStar(), c, u, x, sigma, ctx, w)
    vc, vu = (x - c) / s, (x - u) / s                               # flow velocities
    star = (vc * vu).flatten(1).sum(1) / (vu * vu).flatten(1).sum(1)
    star = star.view(-1, 1, 1, 1)
    expected = x - s * (star * vu + w * (vc - star * vu))
    assert torch.allclose(got, expected, atol=1e-4)
    # the same formula applied to D directly (ComfyUI core's post-CFG node) is off by (1-w)(1-s*)·x
    d_star = (c * u).flatten(1).sum(1).view(-1, 1, 1, 1) / (u * u).flatten(1).sum(1).view(-1, 1, 1, 1)
    in_d = d_star * u + w * (c - d_star * u)
    assert not torch.allclose(got, in_d, atol=1e-2)
    assert torch.allclose(got - (star * u + w * (c - star * u)), (1 - w) * (1 - star) * x, atol=1e-4)


def test_cfg_zero_star_zero_init_steps():
    z = CFGZeroStar(zero_init_steps=2)
    assert z.zero_step(ctx_of("const", step=1)) and not z.zero_step(ctx_of("const", step=2))


def test_cfg_zero_star_default_zeroes_the_first_step_as_the_reference():
    z = CFGZeroStar()                        # reference: `if i <= zero_steps` with zero_steps = 0 zeroes step 0 only
    assert z.zero_step(ctx_of("const", step=0)) and not z.zero_step(ctx_of("const", step=1))
    assert not CFGZeroStar(zero_init_steps=0).zero_step(ctx_of("const", step=0))


def test_apg_defaults_are_the_papers_values_and_the_preset_restores_them():
    a = APG()
    assert (a.eta, a.norm_threshold, a.momentum) == (0.0, 15.0, -0.5)
    custom = make_combiner("apg", apg_eta=1.0, apg_norm_threshold=0.0, apg_momentum=0.0)
    assert (custom.eta, custom.norm_threshold, custom.momentum) == (1.0, 0.0, 0.0)
    paper = make_combiner("apg", apg_eta=1.0, apg_norm_threshold=0.0, apg_momentum=0.0, preset="paper")
    assert (paper.eta, paper.norm_threshold, paper.momentum) == (0.0, 15.0, -0.5)
    assert make_combiner("cfg_zero_star", zero_init_steps=0, preset="paper").zero_init_steps == 1
    with pytest.raises(ValueError, match="preset"):
        make_combiner("apg", preset="published")


def test_cfg_rescale_formula():
    x, c, u = preds()
    ctx = ctx_of()
    sigma = torch.full((2,), ctx.sigma)
    w, phi = 7.0, 0.7
    got = apply_combiner(CFGRescale(phi, space="x0"), c, u, x, sigma, ctx, w)
    cfg = u + w * (c - u)
    resc = cfg * c.std(dim=(1, 2, 3), keepdim=True) / cfg.std(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(got, phi * resc + (1 - phi) * cfg, atol=1e-5)
    # default space is v-prediction: differs from the x0-space result
    assert not torch.allclose(apply_combiner(CFGRescale(phi), c, u, x, sigma, ctx, w), got, atol=1e-3)


@pytest.mark.parametrize("combiner", [CFG(), APG(), CFGZeroStar(), CFGRescale()])
def test_weight_one_reduces_to_cond(combiner):
    x, c, u = preds()
    ctx = ctx_of()
    sigma = torch.full((2,), ctx.sigma)
    assert torch.allclose(apply_combiner(combiner, c, u, x, sigma, ctx, 1.0), c, atol=1e-5)


def test_bad_space_is_rejected():
    with pytest.raises(ValueError, match="space"):
        APG(space="latent")
