"""Each schedule matches its formula at sampled points; context (step, progress, σ units) is right."""
import math
import os
import sys

import pytest
import torch

from rewardlab.samplers.guidance import (Add, Affine, ClampLinear, Constant, Cosine, Interval, Invert, Keyframes,
                                         Linear, Max, Min, Multiply, NormalizeMean, PerStep, PowerCosine, Remap,
                                         RunInfo, VShape, wang)
from rewardlab.samplers.guidance.context import sigma_edm, table_progress
from rewardlab.samplers.sigmas import scaled_linear_model_sigmas

sys.path.insert(0, os.path.dirname(__file__))   # pytest runs with --import-mode=importlib
from _guidance_fixtures import sd_sigmas  # noqa: E402

N = 11


@pytest.fixture
def run():
    return RunInfo(sd_sigmas(N), "eps", table_progress(scaled_linear_model_sigmas()))


def ps(run):
    return [c.p_step for c in run.contexts()]


def test_context_steps_and_progress(run):
    ctxs = run.contexts()
    assert [c.step for c in ctxs] == list(range(N))
    assert ctxs[0].p_step == 0 and ctxs[-1].p_step == 1
    assert ctxs[3].p_step == pytest.approx(3 / (N - 1))
    assert ctxs[3].sigma_next == pytest.approx(run.sigmas[4])
    # model progress increases from ~0 at σ_max to ~1 near σ_min, log-SNR = -2 log σ for ε models
    pm = [c.p_model for c in ctxs]
    assert pm == sorted(pm) and pm[0] < 0.01 and pm[-1] > 0.9
    assert ctxs[2].log_snr == pytest.approx(-2 * math.log(run.sigmas[2]))


def test_off_grid_sigma_interpolates_between_neighbours(run):
    lo, hi = run.sigmas[5], run.sigmas[4]
    mid = math.sqrt(lo * hi)                          # DPM++2S-style midpoint in log σ
    ctx = run.ctx(sigma=mid)
    assert ctx.step == pytest.approx(4.5) and ctx.sigma_next is None
    assert run.ctx(sigma=hi * 1.0000001).step == 4     # float noise still snaps to the grid


def test_flow_sigma_units():
    assert sigma_edm(0.5, "const") == pytest.approx(1.0)
    assert sigma_edm(0.8, "const") == pytest.approx(4.0)
    info = RunInfo([1.0, 0.75, 0.5, 0.0], "const")
    assert info.ctx(step=1).sigma_edm == pytest.approx(3.0)
    assert info.ctx(step=2).log_snr == pytest.approx(0.0)


@pytest.mark.parametrize("schedule, formula", [
    (Constant(5.0), lambda p: 5.0),
    (Linear(1.0, 13.0), lambda p: 1 + 12 * p),
    (Cosine(1.0, 13.0), lambda p: 1 + 12 * (1 - math.cos(math.pi * p)) / 2),
    (PowerCosine(1.0, 7.5, 2.0), lambda p: 1 + 6.5 * (1 - math.cos(math.pi * p**2)) / 2),
    (ClampLinear(7.5, floor=2.0), lambda p: max(2.0, 1 + 2 * 6.5 * p)),
    (VShape(8.0, 2.0, 0.5), lambda p: 8 - 6 * (p / 0.5 if p <= 0.5 else (1 - p) / 0.5)),
    (VShape(2.0, 8.0, 0.25), lambda p: 2 + 6 * (p / 0.25 if p <= 0.25 else (1 - p) / 0.75)),
])
def test_shapes_match_formulas(run, schedule, formula):
    for c in run.contexts():
        assert schedule(c) == pytest.approx(formula(c.p_step))


def test_wang_families_are_increasing_with_mean_cfg(run):
    for family in ("linear", "cosine"):
        vals = wang(family, 7.5).values(run)
        assert vals == sorted(vals) and vals[0] < vals[-1]           # direction: increasing over sampling
        assert sum(vals) / len(vals) == pytest.approx(7.5)           # mean = cfg0 (Wang et al. normalisation)
    inv = wang("inv-linear", 7.5).values(run)
    assert inv[0] > inv[-1]


def test_model_progress_axis(run):
    s = Linear(0.0, 1.0, axis="p_model")
    for c in run.contexts():
        assert s(c) == pytest.approx(c.p_model)


def test_interval_in_edm_sigma(run):
    s = Interval(Constant(7.0), 0.28, 5.42)
    for c in run.contexts():
        expected = 7.0 if 0.28 < c.sigma <= 5.42 else 1.0
        assert s(c) == expected
    assert {s(c) for c in run.contexts()} == {1.0, 7.0}


def test_interval_in_progress_is_closed(run):
    s = Interval(Linear(1, 11), 0.2, 0.6, axis="p_step", outside=1.5)
    for c in run.contexts():
        expected = 1 + 10 * c.p_step if 0.2 <= c.p_step <= 0.6 else 1.5
        assert s(c) == pytest.approx(expected)


def test_keyframes_interpolation(run):
    lin = Keyframes.parse("0:1, 0.5:9, 1:3")
    ease = Keyframes.parse("0:1, 1:9", interpolation="ease")
    step = Keyframes.parse("0:1, 0.5:9", interpolation="step")
    for c in run.contexts():
        p = c.p_step
        assert lin(c) == pytest.approx(1 + 16 * p if p <= 0.5 else 9 - 12 * (p - 0.5))
        assert ease(c) == pytest.approx(1 + 8 * (3 * p**2 - 2 * p**3))
        assert step(c) == (1 if p < 0.5 else 9)
    with pytest.raises(ValueError, match="position:value"):
        Keyframes.parse("0:1, oops")


def test_keyframes_on_sigma_axis(run):
    s = Keyframes(((0.5, 2.0), (10.0, 6.0)), axis="sigma")
    for c in run.contexts():
        x = min(max(c.sigma, 0.5), 10.0)
        assert s(c) == pytest.approx(2 + 4 * (x - 0.5) / 9.5)


def test_per_step_list(run):
    vals = torch.linspace(2, 12, N + 1)            # a SIGMAS-like list of n+1 values: one per step
    s = PerStep(vals.tolist())
    assert s.values(run) == pytest.approx(vals[:N].tolist())
    assert s(run.ctx(step=2.5)) == pytest.approx((vals[2] + vals[3]).item() / 2)
    short = PerStep([1.0, 3.0])                    # stretched over progress
    assert short.values(run) == pytest.approx([1 + 2 * p for p in ps(run)])


def test_math_ops(run):
    a, b = Linear(1, 11), Constant(4.0)
    for c in run.contexts():
        x = 1 + 10 * c.p_step
        assert Multiply(a, b)(c) == pytest.approx(4 * x)
        assert Add(a, 2.0)(c) == pytest.approx(x + 2)
        assert Min(a, b)(c) == pytest.approx(min(x, 4))
        assert Max(a, b)(c) == pytest.approx(max(x, 4))
        assert Affine(a, 1.0, 1.0)(c) == pytest.approx(x + 1)           # Ho–Salimans -> cfg
        assert Remap(a, 1, 11, 0, 1)(c) == pytest.approx(c.p_step)
    inv = Invert(a).values(run)
    assert inv == pytest.approx(list(reversed(a.values(run))))


def test_normalize_mean(run):
    s = NormalizeMean(Cosine(1, 5), target=6.0)
    vals = s.values(run)
    assert sum(vals) / len(vals) == pytest.approx(6.0)
    raw = Cosine(1, 5).values(run)
    assert [v - 1 for v in vals] == pytest.approx([(r - 1) * (vals[-1] - 1) / (raw[-1] - 1) for r in raw])


def test_bad_inputs_are_clear():
    with pytest.raises(ValueError, match="progress axis"):
        Linear(1, 2, axis="sigma")
    with pytest.raises(ValueError, match="lower bound"):
        Interval(Constant(2), 5, 1)
    with pytest.raises(ValueError, match="two sigmas"):
        RunInfo([1.0])
