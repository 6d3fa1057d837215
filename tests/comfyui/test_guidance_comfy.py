"""Guidance nodes inside real ComfyUI (in-process, CPU): the GUIDER in stock SamplerCustomAdvanced, the patched MODEL
in stock KSampler, interval gating equal to cfg=1 outside the interval, fewer uncond evaluations, CADS, reward
guidance and the schedule plot."""
import pytest
import torch

from rewardlab.nodes import guidance_nodes as gn
from rewardlab.rewards.simple import SimpleReward, brightness
from rewardlab.samplers import guidance as g

STEPS, CFG, SEED = 4, 5.0, 3


def _cs():
    from comfy_extras import nodes_custom_sampler
    return nodes_custom_sampler


def _zeros():
    return {"samples": torch.zeros(1, 4, 8, 8)}


def combiner_kw(**over):
    kw = dict(combiner="cfg", apg_eta=0.0, apg_norm_threshold=0.0, apg_momentum=0.0, zero_init_steps=0, rescale_phi=0.7,
              space="default", adaptive_guidance=False, adaptive_threshold=0.99, adaptive_space="x0")
    kw.update(over)
    return kw


def sigmas_of(model, steps=STEPS):
    with torch.inference_mode():
        return _cs().BasicScheduler().get_sigmas(model, "normal", steps, 1.0)[0]


def run_guider(guider, sigmas, seed=SEED, sampler="euler"):
    cs = _cs()
    with torch.inference_mode():
        return cs.SamplerCustomAdvanced().sample(cs.Noise_RandomNoise(seed), guider, cs.KSamplerSelect().get_sampler(
            sampler)[0], sigmas, _zeros())[0]["samples"]


def stock_guider(model, conds, cfg):
    with torch.inference_mode():
        return _cs().CFGGuider().get_guider(model, conds[0], conds[1], cfg)[0]


def scheduled(model, conds, cfg=CFG, schedule=None, **kw):
    with torch.inference_mode():
        return gn.RewardLabScheduledGuider().build(model, conds[0], conds[1], cfg, cfg_schedule=schedule,
                                                   **combiner_kw(**kw))[0]


def counting(model):
    """A model clone that counts evaluated rows per branch (cond_or_uncond: 0 = positive, 1 = negative)."""
    counts = {0: 0, 1: 0}
    m = model.clone()

    def wrapper(apply_model, args):
        for b in args["cond_or_uncond"]:
            counts[b] += 1
        return apply_model(args["input"], args["timestep"], **args["c"])
    m.set_model_unet_function_wrapper(wrapper)
    return m, counts


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_constant_guider_equals_stock_cfg_guider(comfy, unet, conds, sampler):
    sigmas = sigmas_of(unet)
    ref = run_guider(stock_guider(unet, conds, CFG), sigmas, sampler=sampler)
    ours = run_guider(scheduled(unet, conds), sigmas, sampler=sampler)
    assert ref.abs().max() > 0.1
    assert torch.equal(ours, ref)


def test_scheduled_guider_with_apg_and_schedule_runs_and_differs(comfy, unet, conds):
    sigmas = sigmas_of(unet)
    ref = run_guider(stock_guider(unet, conds, CFG), sigmas)
    sched = g.Linear(1.0, 9.0)
    for kw in (dict(), dict(combiner="apg", apg_momentum=-0.5, apg_norm_threshold=5.0),
               dict(combiner="cfg_zero_star", zero_init_steps=1), dict(combiner="cfg_rescale")):
        out = run_guider(scheduled(unet, conds, schedule=sched, **kw), sigmas)
        assert torch.isfinite(out).all() and (out - ref).abs().max() > 1e-4, kw


def test_interval_steps_outside_equal_cfg_one(comfy, unet, conds):
    """One step at a time from the same noised input: outside (0.28, 5.42] the interval guider's step equals the
    cfg=1 step exactly, inside it does not."""
    sigmas = sigmas_of(unet, 6)
    interval = g.Interval(g.Constant(CFG), 0.28, 5.42)
    inside = [0.28 < float(s) <= 5.42 for s in sigmas[:-1]]
    assert any(inside) and not all(inside)
    ours_guider = scheduled(unet, conds, schedule=interval)
    cfg1 = stock_guider(unet, conds, 1.0)
    for i, is_inside in enumerate(inside):
        step = sigmas[i:i + 2]
        ours, one = run_guider(ours_guider, step), run_guider(cfg1, step)
        if is_inside:
            assert (ours - one).abs().max() > 1e-5, i
        else:
            assert torch.equal(ours, one), i


def test_interval_and_adaptive_guidance_skip_uncond_evaluations(comfy, unet, conds):
    sigmas = sigmas_of(unet)
    model, counts = counting(unet)
    run_guider(scheduled(model, conds), sigmas)
    assert counts == {0: STEPS, 1: STEPS}
    model, counts = counting(unet)
    run_guider(scheduled(model, conds, schedule=g.Interval(g.Constant(CFG), 0.28, 5.42)), sigmas)
    inside = sum(0.28 < float(s) <= 5.42 for s in sigmas[:-1])
    assert counts == {0: STEPS, 1: inside}
    model, counts = counting(unet)
    run_guider(scheduled(model, conds, adaptive_guidance=True, adaptive_threshold=0.0), sigmas)
    assert counts == {0: STEPS, 1: 1}                   # latched after the first comparison
    model, counts = counting(unet)                       # state is per run: the second run compares afresh
    guider = scheduled(model, conds, adaptive_guidance=True, adaptive_threshold=0.0)
    run_guider(guider, sigmas)
    run_guider(guider, sigmas)
    assert counts == {0: 2 * STEPS, 1: 2}


def test_patched_model_runs_in_stock_ksampler(comfy, unet, conds):
    with torch.inference_mode():
        ref = comfy.KSampler().sample(unet, SEED, STEPS, CFG, "euler", "normal", conds[0], conds[1], _zeros())[0]
        plain = gn.RewardLabApplyGuidanceSchedule().patch(unet, **combiner_kw())[0]
        same = comfy.KSampler().sample(plain, SEED, STEPS, CFG, "euler", "normal", conds[0], conds[1], _zeros())[0]
        sched = gn.RewardLabApplyGuidanceSchedule().patch(unet, cfg_schedule=g.Linear(1.0, 9.0),
                                                          **combiner_kw(combiner="apg"))[0]
        other = comfy.KSampler().sample(sched, SEED, STEPS, CFG, "euler", "normal", conds[0], conds[1], _zeros())[0]
    assert torch.equal(same["samples"], ref["samples"])          # no schedule: the KSampler's cfg, plain CFG
    assert (other["samples"] - ref["samples"]).abs().max() > 1e-4
    assert not any("rewardlab" in str(key) for keys in unet.wrappers.values() for key in keys)   # input untouched
    assert any("rewardlab" in str(key) for keys in sched.wrappers.values() for key in keys)


def test_patched_model_interval_skips_uncond_under_ksampler(comfy, unet, conds):
    counted, counts = counting(unet)
    with torch.inference_mode():
        patched = gn.RewardLabApplyGuidanceSchedule().patch(counted, cfg_schedule=g.Interval(g.Constant(CFG), 0.28, 5.42),
                                                            **combiner_kw())[0]
        comfy.KSampler().sample(patched, SEED, STEPS, CFG, "euler", "normal", conds[0], conds[1], _zeros())
    inside = sum(0.28 < float(s) <= 5.42 for s in sigmas_of(unet)[:-1])
    assert counts == {0: STEPS, 1: inside}


def test_patched_model_adaptive_guidance_state_is_per_run(comfy, unet, conds):
    counted, counts = counting(unet)
    with torch.inference_mode():
        patched = gn.RewardLabApplyGuidanceSchedule().patch(
            counted, **combiner_kw(adaptive_guidance=True, adaptive_threshold=0.0))[0]
        for seed in (SEED, SEED):
            comfy.KSampler().sample(patched, seed, STEPS, CFG, "euler", "normal", conds[0], conds[1], _zeros())
    assert counts == {0: 2 * STEPS, 1: 2}              # each KSampler run latches after its own first comparison


def test_cads_guider_changes_the_sample_reproducibly(comfy, unet, conds):
    sigmas = sigmas_of(unet)
    base = scheduled(unet, conds)
    with torch.inference_mode():
        cads = gn.RewardLabCADSGuider().build(base, 0.6, 0.9, 0.5, 1.0, 0, "p_step")[0]
        from_stock = gn.RewardLabCADSGuider().build(stock_guider(unet, conds, CFG), 0.6, 0.9, 0.5, 1.0, 0, "p_step")[0]
    a, b1, b2 = run_guider(base, sigmas), run_guider(cads, sigmas), run_guider(cads, sigmas)
    assert (a - b1).abs().max() > 1e-5 and torch.equal(b1, b2)
    assert torch.equal(run_guider(from_stock, sigmas), b1)
    assert base.spec.cond_ops == ()                               # the input guider is untouched


def test_reward_guider_raises_brightness(comfy, unet, vae, conds):
    sigmas = sigmas_of(unet, 4)
    reward = SimpleReward("brightness", brightness)
    base = scheduled(unet, conds)

    def bright(latent):
        with torch.inference_mode():
            return float(brightness(vae.decode(latent).movedim(-1, 1)).mean())
    with torch.inference_mode():
        guided = gn.RewardLabRewardGuider().build(base, vae, reward, "", 200.0, 0.0, 1.0, 0, 0.1, "x0 only")[0]
    before, after = bright(run_guider(base, sigmas)), bright(run_guider(guided, sigmas))
    assert after > before + 1e-3, (before, after)


def test_plot_schedule_node(comfy, unet):
    sigmas = sigmas_of(unet, 10)
    by_step, by_sigma = gn.RewardLabPlotGuidanceSchedule().plot(unet, sigmas, 7.0, cfg_schedule=g.wang("cosine", 7.5))
    for img in (by_step, by_sigma):
        assert img.ndim == 4 and img.shape[0] == 1 and img.shape[-1] == 3
        assert float(img.min()) < 0.5 < float(img.max())         # something is drawn on the white canvas


def test_schedule_values_use_model_progress(comfy, unet):
    from rewardlab.host import guidance as host_guidance
    sigmas = sigmas_of(unet, 10)
    vals, sig = host_guidance.schedule_values(unet, sigmas, g.Linear(0.0, 1.0, axis="p_model"))
    ms = unet.get_model_object("model_sampling")
    for v, s in zip(vals, sig):             # p_model inverts percent_to_sigma
        if 0.01 < v < 0.99:
            assert float(ms.percent_to_sigma(v)) == pytest.approx(s, rel=2e-2)


def test_reward_guider_through_the_model_runs_with_gradients(comfy, unet, vae, conds):
    """The paper's variant differentiates through the UNet: it needs the grad-ready model copy inside inference mode."""
    sigmas = sigmas_of(unet, 2)
    reward = SimpleReward("brightness", brightness)
    base = scheduled(unet, conds)
    with torch.inference_mode():
        guided = gn.RewardLabRewardGuider().build(base, vae, reward, "", 200.0, 0.0, 1.0, 1, 0.5, "through model")[0]
    assert guided.model_patcher is not unet
    plain, steered = run_guider(base, sigmas), run_guider(guided, sigmas)
    assert torch.isfinite(steered).all() and (steered - plain).abs().max() > 1e-5


def test_pag_guider_equals_stock_perturbed_attention_guidance(comfy, unet, conds):
    """Our PAG term on the middle block is ComfyUI's own PerturbedAttentionGuidance (same patch, same formula)."""
    from comfy_extras import nodes_pag
    sigmas = sigmas_of(unet)
    with torch.inference_mode():
        stock_model = nodes_pag.PerturbedAttentionGuidance.execute(unet, 3.0).result[0]
        ours = gn.RewardLabPAGGuider().build(stock_guider(unet, conds, CFG), 3.0, "middle.0", 0.0, 1.0)[0]
    ref = run_guider(stock_guider(stock_model, conds, CFG), sigmas)
    got = run_guider(ours, sigmas)
    plain = run_guider(stock_guider(unet, conds, CFG), sigmas)
    assert (ref - plain).abs().max() > 1e-4                  # PAG does something on this model
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_pag_adds_one_conditional_call_per_step_and_slg_refuses_a_unet(comfy, unet, conds):
    counted, counts = counting(unet)
    sigmas = sigmas_of(unet)
    with torch.inference_mode():
        pag = gn.RewardLabPAGGuider().build(scheduled(counted, conds), 2.0, "middle.0", 0.0, 1.0)[0]
        slg = gn.RewardLabSLGGuider().build(scheduled(unet, conds), 2.8, "7, 8, 9", 0.0, 1.0)[0]
    run_guider(pag, sigmas)
    assert counts == {0: 2 * STEPS, 1: STEPS}
    with pytest.raises(ValueError, match="UNet model"):
        run_guider(slg, sigmas)


def test_align_your_steps_scheduler_for_comfyui_models(comfy, unet):
    from rewardlab.host.models import calculate_sigmas
    from rewardlab.host.services import scheduler_names
    from rewardlab.samplers.sigmas import align_your_steps
    assert "align_your_steps" in scheduler_names()
    torch.testing.assert_close(calculate_sigmas(unet, "align_your_steps", 10), align_your_steps(10, "sd15"))


def test_linear_ag_and_reward_recurrence_run_in_comfyui(comfy, unet, vae, conds):
    counted, counts = counting(unet)
    sigmas = sigmas_of(unet, 8)
    guider = scheduled(counted, conds, linear_ag=True)
    first = run_guider(guider, sigmas)                        # calibration run: every branch
    assert counts[1] == 8
    second = run_guider(guider, sigmas)
    assert counts[1] == 8 + 6                                 # steps 1 and 3 estimated
    assert (first - second).abs().max() < 0.2 * first.abs().max()
    reward = SimpleReward("brightness", brightness)
    base = scheduled(unet, conds)
    with torch.inference_mode():
        once = gn.RewardLabRewardGuider().build(base, vae, reward, "", 200.0, 0.0, 1.0, 0, 0.1, "x0 only")[0]
        twice = gn.RewardLabRewardGuider().build(base, vae, reward, "", 200.0, 0.0, 1.0, 0, 0.1, "x0 only",
                                                 recurrence=2)[0]
    a, b = run_guider(once, sigmas_of(unet, 3)), run_guider(twice, sigmas_of(unet, 3))
    assert torch.isfinite(b).all() and (a - b).abs().max() > 1e-5
