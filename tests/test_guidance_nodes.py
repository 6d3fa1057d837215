"""Guidance node functions without ComfyUI: the schedules and specs they build (the ComfyUI runs are in
tests/comfyui/test_guidance_comfy.py)."""
import math
import subprocess
import sys

import pytest
import torch

from rewardlab.nodes import guidance_nodes as gn
from rewardlab.samplers import guidance as g
from rewardlab.samplers.sigmas import scaled_linear_model_sigmas, sigma_schedule

RUN = g.RunInfo(sigma_schedule("karras", 9, scaled_linear_model_sigmas()), "eps")


def values(schedule):
    return schedule.values(RUN)


def ps():
    return [c.p_step for c in RUN.contexts()]


def shape(name, start=1.0, end=13.0, power=2.0, floor=2.0, center=0.5, axis="p_step"):
    return gn.RewardLabGuidanceShape().build(name, start, end, power, floor, center, axis)[0]


def test_shape_node_builds_each_curve():
    assert values(shape("constant", start=4.0)) == [4.0] * 9
    assert values(shape("linear")) == pytest.approx([1 + 12 * p for p in ps()])
    assert values(shape("cosine")) == pytest.approx([1 + 6 * (1 - math.cos(math.pi * p)) for p in ps()])
    assert values(shape("power_cosine")) == pytest.approx([1 + 6 * (1 - math.cos(math.pi * p**2)) for p in ps()])
    assert values(shape("clamp_linear", floor=4.0)) == pytest.approx([max(4.0, 1 + 12 * p) for p in ps()])
    v = values(shape("V", start=8.0, end=2.0))
    assert v[0] == v[-1] == 8.0 and min(v) == pytest.approx(2.0)
    lam = values(shape("Λ", start=2.0, end=8.0))
    assert lam[0] == 2.0 and max(lam) == pytest.approx(8.0)
    with pytest.raises(ValueError, match="swap"):
        shape("V", start=2.0, end=8.0)


def test_wang_node_mean_and_direction():
    vals = values(gn.RewardLabGuidanceWang().build("cosine", 7.5, 2.0, 1.0, "p_step")[0])
    assert sum(vals) / len(vals) == pytest.approx(7.5) and vals == sorted(vals)


def test_interval_node_with_float_or_schedule():
    node = gn.RewardLabGuidanceInterval()
    flat = node.build(7.0, 0.28, 5.42, "sigma_edm", 1.0)[0]
    ramp = node.build(7.0, 0.28, 5.42, "sigma_edm", 1.0, cfg_schedule=g.Linear(2.0, 10.0))[0]
    for c in RUN.contexts():
        inside = 0.28 < c.sigma <= 5.42
        assert flat(c) == (7.0 if inside else 1.0)
        assert ramp(c) == pytest.approx(2 + 8 * c.p_step if inside else 1.0)


def test_keyframes_sigmas_math_transform_nodes():
    kf = gn.RewardLabGuidanceKeyframes().build("0:2, 1:10", "p_step", "linear")[0]
    assert values(kf) == pytest.approx([2 + 8 * p for p in ps()])
    per = gn.RewardLabGuidanceFromSigmas().build(torch.arange(10, dtype=torch.float32))[0]
    assert values(per) == pytest.approx(list(range(9)))
    prod = gn.RewardLabGuidanceMath().build("multiply", 1.0, 0.5, a_schedule=kf)[0]
    assert values(prod) == pytest.approx([(2 + 8 * p) * 0.5 for p in ps()])
    tr = gn.RewardLabGuidanceTransform()
    assert values(tr.build(kf, "invert", 0, 0, 1, 0, 1, False)[0]) == pytest.approx(list(reversed(values(kf))))
    assert values(tr.build(kf, "hs_to_cfg", 0, 0, 1, 0, 1, False)[0]) == pytest.approx([v + 1 for v in values(kf)])
    norm = values(tr.build(kf, "normalize_mean", 4.0, 0, 1, 0, 1, False)[0])
    assert sum(norm) / len(norm) == pytest.approx(4.0)
    remap = values(tr.build(kf, "remap", 0, 2.0, 10.0, 0.0, 1.0, False)[0])
    assert remap == pytest.approx(ps())


def test_spec_from_guider_widgets():
    kw = dict(apg_eta=0.2, apg_norm_threshold=3.0, apg_momentum=-0.5, zero_init_steps=2, rescale_phi=0.5,
              space="default", adaptive_guidance=True, adaptive_threshold=0.95, adaptive_space="eps")
    spec = g.spec_from_options(g.Constant(6.0), combiner="apg", **kw)
    assert isinstance(spec.combiner, g.APG) and spec.combiner.momentum == -0.5 and spec.combiner.space == "x0"
    assert isinstance(spec.gates[0], g.AdaptiveGuidance) and spec.gates[0].threshold == 0.95
    z = g.spec_from_options(g.Constant(6.0), combiner="cfg_zero_star", **dict(kw, space="x0", adaptive_guidance=False))
    assert z.combiner.space == "x0" and z.combiner.zero_init_steps == 2 and z.gates == ()
    assert g.make_combiner("cfg_rescale", 0, 0, 0, 0, 0.5, "default").space == "v_pred"
    with pytest.raises(ValueError, match="combiner"):
        g.make_combiner("pag", 0, 0, 0, 0, 0.5, "default")


def test_comfy_facing_module_imports_without_comfy():
    code = ("import sys, rewardlab.host.guidance, rewardlab.nodes.guidance_nodes; "
            "print([m for m in ('comfy', 'diffusers', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_guidance_term_layers_parse_comfyui_block_names():
    from rewardlab.host.guidance import parse_layers
    assert parse_layers("middle.0, input.4 ; output.1.0", "pag") == ("middle.0", "input.4", "output.1.0")
    assert parse_layers("7, 8, single.12", "slg") == ("double.7", "double.8", "single.12")
    with pytest.raises(ValueError, match="write e.g. 'middle.0"):
        parse_layers("mid_block", "pag")
    with pytest.raises(ValueError, match="at least one layer"):
        parse_layers(" , ", "slg")


def test_linear_ag_option_adds_the_gate():
    spec = g.spec_from_options(5.0, linear_ag=True)
    assert [type(gate).__name__ for gate in spec.gates] == ["LinearAG"]
