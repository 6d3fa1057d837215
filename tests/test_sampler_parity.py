"""Our σ-space samplers against diffusers' scheduler loops on the same tiny random UNet, noise and timesteps."""
import pytest
import torch

from rewardlab.samplers import DiscreteDenoiser, FlowDenoiser, sample, sigma_schedule
from rewardlab.samplers.sigmas import leading

TOL = 1e-5


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    net = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                               layers_per_block=1, cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
                               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)


SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _diffusers_loop(unet, scheduler, x, cond):
    for t in scheduler.timesteps:
        out = unet(scheduler.scale_model_input(x, t), t, encoder_hidden_states=cond).sample
        x = scheduler.step(out, t, x).prev_sample
    return x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_ddim_matches_diffusers(unet, inputs, prediction_type, set_alpha_to_one):
    from diffusers import DDIMScheduler

    noise, cond = inputs
    sched = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=set_alpha_to_one, steps_offset=1,
                          prediction_type=prediction_type)
    sched.set_timesteps(10)
    ref = _diffusers_loop(unet, sched, noise.clone(), cond)

    den = DiscreteDenoiser.from_scheduler(unet, sched)
    ms = den.model_sigmas
    sigmas = leading(10, ms)
    # diffusers' last DDIM step lands on ᾱ_0 (not 1) unless set_alpha_to_one.
    sigmas[-1] = 0.0 if set_alpha_to_one else ms[0]
    assert torch.allclose(sigmas[:-1], ms[sched.timesteps])
    x_ve = noise * (1 + sigmas[0] ** 2) ** 0.5                    # VP x_T = ε  <=>  VE x = ε·sqrt(1+σ²)
    with torch.no_grad():
        out = sample(den, x_ve, sigmas, "ddim", extra_args={"encoder_hidden_states": cond}).x
    ours = out / (1 + sigmas[-1] ** 2) ** 0.5                       # back to VP
    assert (ours - ref).abs().max() <= TOL * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("schedule,options", [("karras", dict(use_karras_sigmas=True)),
                                              ("leading", dict(timestep_spacing="leading", steps_offset=1))])
def test_euler_matches_diffusers(unet, inputs, schedule, options):
    from diffusers import EulerDiscreteScheduler

    noise, cond = inputs
    sched = EulerDiscreteScheduler(**SD_BETAS, **options)
    sched.set_timesteps(10)
    x0 = noise * sched.init_noise_sigma
    ref = _diffusers_loop(unet, sched, x0.clone(), cond)
    den = DiscreteDenoiser.from_scheduler(unet, sched)
    sigmas = sigma_schedule(schedule, 10, den.model_sigmas)
    assert torch.allclose(sigmas, sched.sigmas, rtol=1e-6, atol=0)
    with torch.no_grad():
        ours = sample(den, x0.clone(), sigmas, "euler", extra_args={"encoder_hidden_states": cond}).x
    assert (ours - ref).abs().max() <= TOL * max(1.0, ref.abs().max().item())


def test_dpmpp_2m_matches_diffusers(unet, inputs):
    from diffusers import DPMSolverMultistepScheduler

    noise, cond = inputs
    sched = DPMSolverMultistepScheduler(**SD_BETAS, algorithm_type="dpmsolver++", solver_order=2,
                                        use_karras_sigmas=True, final_sigmas_type="zero")
    sched.set_timesteps(10)
    ref = _diffusers_loop(unet, sched, noise.clone(), cond)      # VP, x_T = ε

    den = DiscreteDenoiser.from_scheduler(unet, sched, round_timesteps=True)   # diffusers' DPM rounds t
    sigmas = sigma_schedule("karras", 10, den.model_sigmas)
    with torch.no_grad():
        ours = sample(den, noise * (1 + sigmas[0] ** 2) ** 0.5, sigmas, "dpmpp_2m",
                      extra_args={"encoder_hidden_states": cond}).x
    assert (ours - ref).abs().max() <= TOL * max(1.0, ref.abs().max().item())


def test_flow_euler_matches_diffusers(unet, inputs):
    from diffusers import FlowMatchEulerDiscreteScheduler

    noise, cond = inputs
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(6)

    def velocity_net(x, t, **kw):                 # diffusers flow models take t = σ·1000
        return unet(x, t, **kw)

    ref = noise.clone()
    for t in sched.timesteps:
        v = velocity_net(ref, t.expand(2), encoder_hidden_states=cond).sample
        ref = sched.step(v, t, ref).prev_sample

    sigmas = sigma_schedule("simple", 6, flow_shift=3.0)
    assert torch.allclose(sigmas, sched.sigmas, atol=1e-6)
    with torch.no_grad():
        ours = sample(FlowDenoiser(velocity_net), noise.clone(), sigmas, "euler", flow=True,
                      extra_args={"encoder_hidden_states": cond}).x
    assert (ours - ref).abs().max() <= TOL * max(1.0, ref.abs().max().item())
