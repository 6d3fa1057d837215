"""RunnerSampler / trajectory / OptimisedNoise against ComfyUI's stock sampling stack (in-process, CPU)."""
import pytest
import torch

from rewardlab.samplers.runner import Cancelled
from rewardlab.host.bridge import RunnerSampler, interrupt_exceptions, trajectory
from rewardlab.host.grad import grad_enabled, grad_ready, release
from rewardlab.host.models import calculate_sigmas, empty_latent, latent_samples, model_info
from rewardlab.host.noise import OptimisedNoise
from rewardlab.host.vae import decode, grad_vae
from rewardlab.nodes.sampler_nodes import RewardLabSampler
from rewardlab.samplers.runner import Policy

STEPS, CFG, SEED = 3, 3.0, 7


def _custom_nodes():
    from comfy_extras import nodes_custom_sampler
    return nodes_custom_sampler


def _zeros():
    return {"samples": torch.zeros(1, 4, 8, 8)}


@pytest.fixture(scope="module")
def flow_unet(comfy, unet):
    """The tiny UNet under stock ModelSamplingSD3: CONST (flow-matching) sampling with shift 3, as SD3 uses."""
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3
    with torch.inference_mode():
        return ModelSamplingSD3().patch(unet, 3.0)[0]


def _stock_ksampler(comfy, model, conds, sampler_name, seed=SEED):
    with torch.inference_mode():
        out = comfy.KSampler().sample(model, seed, STEPS, CFG, sampler_name, "normal", conds[0], conds[1], _zeros())
    return out[0]["samples"]


def _custom_advanced(comfy, model, conds, noise, sampler, latent=None, denoise=1.0):
    """Stock SamplerCustomAdvanced + CFGGuider + BasicScheduler around a given NOISE and SAMPLER."""
    cs = _custom_nodes()
    with torch.inference_mode():
        guider = cs.CFGGuider().get_guider(model, conds[0], conds[1], CFG)[0]
        sigmas = cs.BasicScheduler().get_sigmas(model, "normal", STEPS, denoise)[0]
        return cs.SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, latent or _zeros())[0]["samples"]


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "dpmpp_2m"])
def test_runner_sampler_matches_stock_ksampler(comfy, unet, conds, name):
    ref = _stock_ksampler(comfy, unet, conds, name)
    ours = _custom_advanced(comfy, unet, conds, _custom_nodes().Noise_RandomNoise(SEED),
                            RewardLabSampler().get_sampler(name, -1.0)[0])
    assert isinstance(RewardLabSampler().get_sampler(name, -1.0)[0], __import__("comfy.samplers").samplers.Sampler)
    assert ref.abs().max() > 0.1                      # a real sample, not a degenerate zero
    assert (ours - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["euler", "euler_ancestral"])
def test_runner_sampler_matches_stock_ksampler_on_a_flow_model(comfy, flow_unet, conds, name):
    info = model_info(flow_unet)
    assert info.flow and info.prediction == "CONST" and info.sigma_max == pytest.approx(1.0)
    ref = _stock_ksampler(comfy, flow_unet, conds, name)          # stock picks its RF ancestral variant itself
    ours = _custom_advanced(comfy, flow_unet, conds, _custom_nodes().Noise_RandomNoise(SEED),
                            RewardLabSampler().get_sampler(name, -1.0)[0])
    assert ref.abs().max() > 0.1 and (ours - ref).abs().max() <= 1e-4


def test_runner_sampler_matches_stock_on_masked_img2img(comfy, unet, conds):
    """A non-empty latent (process_latent_in, σ0 < σ_max so no max-denoise scaling) with a noise_mask and denoise 0.6."""
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, 4:] = 1.0
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=g), "noise_mask": mask}
    with torch.inference_mode():
        ref = comfy.KSampler().sample(unet, SEED, STEPS, CFG, "euler", "normal", conds[0], conds[1], latent,
                                      denoise=0.6)[0]["samples"]
    ours = _custom_advanced(comfy, unet, conds, _custom_nodes().Noise_RandomNoise(SEED),
                            RewardLabSampler().get_sampler("euler", -1.0)[0], latent=latent, denoise=0.6)
    assert (ours - ref).abs().max() <= 1e-4
    assert (ours[..., :4] - latent["samples"][..., :4]).abs().max() <= 1e-4    # the masked-out half is kept


def test_trajectory_equals_stock_sampler_and_returns_x0(comfy, unet, conds):
    ref = _stock_ksampler(comfy, unet, conds, "euler")
    from comfy.sample import prepare_noise
    noise = prepare_noise(torch.zeros(1, 4, 8, 8), SEED)
    sigmas = calculate_sigmas(unet, "normal", STEPS)
    with torch.inference_mode():
        x, x0 = trajectory(unet, conds[0], conds[1], CFG, sigmas, noise, _zeros(), seed=SEED, return_denoised=True)
    assert (x - ref).abs().max() <= 1e-4
    # euler's last step lands on σ=0, where the sample is exactly the last x̂0 (both in VAE space)
    assert (x0 - x).abs().max() <= 1e-5
    assert not x.is_inference()                        # usable in a later autograd graph


def test_optimised_noise_reproduces_through_stock_sampler_custom_advanced(comfy, unet, vae, conds):
    """The NOISE contract: optimise the noise through trajectory(), hand it over as a NOISE, and stock
    SamplerCustomAdvanced + RewardLab Sampler reproduce the optimised latent (ancestral, so the seed matters)."""
    sigmas = calculate_sigmas(unet, "normal", STEPS)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, 8, 8, generator=g).requires_grad_(True)
    with torch.inference_mode(), grad_enabled():
        mp, vp = grad_ready(unet), grad_vae(vae)
        x = trajectory(mp, conds[0], conds[1], CFG, sigmas, noise, _zeros(), step="euler_ancestral", seed=11,
                          policy=Policy.all())
        decode(vae, x, patcher=vp)[:, 0].mean().backward()    # "reward": the red channel
        release(mp, vp)
    assert noise.grad is not None and noise.grad.abs().sum() > 0
    with torch.no_grad():
        noise -= 50.0 * noise.grad                                  # one ascent step: an "optimised" noise
        x_opt = trajectory(unet, conds[0], conds[1], CFG, sigmas, noise, _zeros(), step="euler_ancestral", seed=11)
    replay = _custom_advanced(comfy, unet, conds, OptimisedNoise(11, noise),
                              RewardLabSampler().get_sampler("euler_ancestral", -1.0)[0])
    assert (replay - x_opt).abs().max() <= 1e-4
    other_seed = _custom_advanced(comfy, unet, conds, OptimisedNoise(12, noise),
                                  RewardLabSampler().get_sampler("euler_ancestral", -1.0)[0])
    assert (other_seed - x_opt).abs().max() > 1e-3            # the seed is part of the contract for ancestral steps


def test_optimised_noise_rejects_other_latent_shape(comfy):
    noise = OptimisedNoise(0, torch.zeros(1, 4, 8, 8))
    assert noise.generate_noise({"samples": torch.zeros(1, 4, 8, 8)}).shape == (1, 4, 8, 8)
    with pytest.raises(ValueError, match="same latent size"):
        noise.generate_noise({"samples": torch.zeros(2, 4, 8, 8)})


def test_model_info_and_latent_checks(comfy, unet, conds):
    info = model_info(unet)
    assert (info.latent_channels, info.flow, info.prediction) == (4, False, "EPS")
    assert info.scale_factor == pytest.approx(0.18215) and info.sigma_max == pytest.approx(14.6146, rel=1e-3)
    cs = _custom_nodes()
    with torch.inference_mode():
        ref = cs.BasicScheduler().get_sigmas(unet, "karras", 5, 0.6)[0]
    assert torch.equal(calculate_sigmas(unet, "karras", 5, denoise=0.6), ref)
    assert empty_latent(unet, 64, 48, 2).shape == (2, 4, 6, 8)
    # an all-zero latent of another family is widened like stock samplers do; real content is refused
    assert latent_samples(unet, {"samples": torch.zeros(1, 16, 8, 8)}).shape == (1, 4, 8, 8)
    with pytest.raises(ValueError, match="16 channels but this model works on 4"):
        trajectory(unet, conds[0], conds[1], CFG, calculate_sigmas(unet, "normal", 2),
                      torch.zeros(1, 16, 8, 8), {"samples": torch.ones(1, 16, 8, 8)})


def test_cancel_surfaces_as_comfy_interrupt(comfy, unet, conds):
    import comfy.model_management as mm
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _custom_advanced(comfy, unet, conds, _custom_nodes().Noise_RandomNoise(SEED), RunnerSampler("euler"))
    finally:
        mm.interrupt_current_processing(False)
    assert interrupt_exceptions() == (Cancelled, mm.InterruptProcessingException)
