"""ReNO / Noise Search / Noise from Latent nodes inside ComfyUI (in-process, CPU, download-free fixtures).

The NOISE contract: the node's NOISE through stock SamplerCustomAdvanced (stock euler, or RewardLab Sampler for
ancestral steps) reproduces the node's optimised latent and image, and the reward of that image."""
import pytest
import torch

from rewardlab.host.noise import OptimisedNoise
from rewardlab.nodes.noise_nodes import (RewardLabNoiseFromLatent, RewardLabNoiseSearch,
                                         RewardLabReNOOptimiseNoise)
from rewardlab.nodes.sampler_nodes import RewardLabSampler
from rewardlab.rewards.base import Reward
from rewardlab.rewards.simple import build as build_simple

CFG = 2.0


def _red():
    return build_simple("red", {"kind": "target_colour", "colour": (1.0, 0.0, 0.0)})


class _TextRed(Reward):
    name, needs_text = "text_red", True

    def score(self, images, prompts):
        return images[:, 0].mean(dim=(1, 2))


def _zeros(batch=1):
    return {"samples": torch.zeros(batch, 4, 8, 8)}


def _replay(model, conds, noise, sampler, steps, scheduler="normal", batch=1):
    from comfy_extras import nodes_custom_sampler as cs
    with torch.inference_mode():
        guider = cs.CFGGuider().get_guider(model, conds[0], conds[1], CFG)[0]
        sigmas = cs.BasicScheduler().get_sigmas(model, scheduler, steps, 1.0)[0]
        return cs.SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, _zeros(batch))[0]["samples"]


def _decode(vae, latent):
    with torch.inference_mode():
        return vae.decode(latent)            # stock VAE decode: IMAGE (B, H, W, C)


def _reno(unet, vae, conds, reward, steps=1, sampler="euler", iterations=4, batch=1, **kw):
    with torch.inference_mode():             # a ComfyUI worker runs nodes in inference mode
        return RewardLabReNOOptimiseNoise().optimise(unet, conds[0], conds[1], vae, _zeros(), reward, steps, sampler,
                                                     "normal", CFG, 5, batch, iterations, 20.0, 0.01, **kw)


@pytest.mark.parametrize("steps,sampler,replay_sampler", [(1, "euler", "stock_euler"),
                                                          (2, "euler_ancestral", "rewardlab")])
def test_reno_noise_reproduces_through_stock_sampler_custom_advanced(comfy, unet, vae, conds, steps, sampler,
                                                                     replay_sampler):
    reward = _red()
    noise, latent, image, plot = _reno(unet, vae, conds, reward, steps=steps, sampler=sampler,
                                       checkpoint_steps=steps > 1)
    assert noise.seed == 5 and plot.ndim == 4 and plot.shape[-1] == 3
    if replay_sampler == "stock_euler":
        from comfy_extras import nodes_custom_sampler as cs
        stock = cs.KSamplerSelect().get_sampler("euler")[0]
    else:
        stock = RewardLabSampler().get_sampler(sampler, -1.0)[0]
    replay = _replay(unet, conds, noise, stock, steps)
    assert (replay - latent["samples"]).abs().max() <= 1e-4
    replay_image = _decode(vae, replay)
    assert (replay_image - image).abs().max() <= 1e-4
    assert torch.allclose(reward(replay_image.movedim(-1, 1)), reward(image.movedim(-1, 1)), atol=1e-4)
    # ReNO moved the noise away from the seed's noise and did not make the reward worse
    import comfy.sample
    seed_noise = comfy.sample.prepare_noise(torch.zeros(1, 4, 8, 8), 5)
    assert (noise.tensor - seed_noise).abs().max() > 1e-3
    seed_image = _decode(vae, _replay(unet, conds, OptimisedNoise(5, seed_noise), stock, steps))
    assert reward(image.movedim(-1, 1)) >= reward(seed_image.movedim(-1, 1))


@pytest.mark.parametrize("method", ["random", "zero_order", "paths"])
def test_noise_search_is_never_worse_than_the_seed(comfy, unet, vae, conds, method):
    reward = _red()
    with torch.inference_mode():
        noise, latent, image, plot, best = RewardLabNoiseSearch().search(
            unet, conds[0], conds[1], vae, _zeros(), reward, 2, "euler", "normal", CFG, 5, 1, method, 12,
            search_seed=1, branches=2)
    import comfy.sample
    seed_noise = comfy.sample.prepare_noise(torch.zeros(1, 4, 8, 8), 5)
    stock = RewardLabSampler().get_sampler("euler", -1.0)[0]
    seed_score = reward(_decode(vae, _replay(unet, conds, OptimisedNoise(5, seed_noise), stock, 2)).movedim(-1, 1))
    assert best >= float(seed_score) - 1e-6
    assert best == pytest.approx(float(reward(image.movedim(-1, 1))), abs=1e-5)
    if method != "paths":
        replay = _replay(unet, conds, noise, stock, 2)
        assert (replay - latent["samples"]).abs().max() <= 1e-4


def test_noise_from_latent_wraps_the_tensor(comfy, unet, conds):
    t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    (noise,) = RewardLabNoiseFromLatent().wrap({"samples": t}, 9)
    assert noise.seed == 9 and torch.equal(noise.generate_noise(_zeros()), t)
    from comfy_extras import nodes_custom_sampler as cs
    a = _replay(unet, conds, noise, cs.KSamplerSelect().get_sampler("euler")[0], 2)
    b = _replay(unet, conds, OptimisedNoise(9, t), cs.KSamplerSelect().get_sampler("euler")[0], 2)
    assert torch.equal(a, b)


def test_bad_inputs_get_clear_errors(comfy, unet, vae, conds):
    with pytest.raises(ValueError, match="channels"):
        with torch.inference_mode():
            RewardLabReNOOptimiseNoise().optimise(unet, conds[0], conds[1], vae, {"samples": torch.ones(1, 16, 8, 8)},
                                                  _red(), 1, "euler", "normal", CFG, 0, 1, 2, 5.0, 0.01)
    with pytest.raises(ValueError, match="prompt"):
        _reno(unet, vae, conds, _TextRed(), iterations=2)
    with pytest.raises(ValueError, match="budget"):
        with torch.inference_mode():
            RewardLabNoiseSearch().search(unet, conds[0], conds[1], vae, _zeros(), _red(), 2, "euler", "normal", CFG,
                                          0, 1, "random", 1)
    noise, *_ = _reno(unet, vae, conds, _TextRed(), iterations=2, prompt="a red square")
    assert noise.tensor.shape == (1, 4, 8, 8)


def test_reno_batch_and_cancel_returns_best_so_far(comfy, unet, vae, conds):
    import comfy.model_management as mm
    calls = {"n": 0}
    reward = _red()

    class Cancelling(Reward):
        name = "cancelling"

        def score(self, images, prompts):
            calls["n"] += 1
            if calls["n"] == 2:
                mm.interrupt_current_processing(True)       # the user presses Cancel during iteration 2
            return reward(images)

    try:
        noise, latent, image, plot = _reno(unet, vae, conds, Cancelling(), iterations=10, batch=2)
    finally:
        mm.interrupt_current_processing(False)
    assert calls["n"] == 2 and noise.tensor.shape == (2, 4, 8, 8) and image.shape[0] == 2


class _NaNReward(Reward):
    name = "always-nan"

    def score(self, images, prompts):
        return images.mean(dim=(1, 2, 3)) * float("nan")


def test_a_reward_that_fails_on_every_candidate_is_reported(comfy, unet, vae, conds):
    """NaN from a reward model: the nodes do not hand back a 'best' noise chosen among NaNs."""
    with pytest.raises(ValueError, match=r"best reward of sample\(s\) \[0\] is NaN/Inf"):
        _reno(unet, vae, conds, _NaNReward(), iterations=2)
    with pytest.raises(ValueError, match="NaN/Inf"), torch.inference_mode():
        RewardLabNoiseSearch().search(unet, conds[0], conds[1], vae, _zeros(), _NaNReward(), 1, "euler", "normal",
                                      CFG, 0, 1, "random", 3)


def test_the_largest_seed_the_nodes_accept_works(comfy, unet, vae, conds):
    with torch.inference_mode():
        noise, *_ = RewardLabReNOOptimiseNoise().optimise(unet, conds[0], conds[1], vae, _zeros(), _red(), 1, "euler",
                                                          "normal", CFG, 2**64 - 1, 1, 2, 5.0, 0.01, perturbation=1e-4)
    assert noise.seed == 2**64 - 1


def test_reno_and_search_load_the_vae_without_its_encoder(comfy, unet, vae, conds, vae_loads):
    """Like DRaFT (test_train_comfy.py), ReNO and noise search decode with a VAE clone whose encoder stays off the
    device, and the VAE has its encoder back afterwards."""
    from rewardlab.host.vae import EncoderLeftOut

    _reno(unet, vae, conds, build_simple("brightness", {}, {}), iterations=1)
    with torch.inference_mode():
        RewardLabNoiseSearch().search(unet, conds[0], conds[1], vae, _zeros(), build_simple("brightness", {}, {}),
                                      1, "euler", "normal", 1.0, 0, 1, "random", 2)
    assert len(vae_loads.loaded) >= 2 and set(vae_loads.loaded) == {(vae_loads.decoder_only, EncoderLeftOut)}
    assert not vae_loads.moved and vae.first_stage_model.encoder is vae_loads.encoder
