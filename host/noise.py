"""NOISE objects, and the ComfyUI side of noise optimisation and search.

A ComfyUI NOISE is any object with ``.seed`` and ``.generate_noise(latent_dict)``. The sampler scales it by σ0
itself (noise scaling), so a NOISE stores standard-normal-like noise, not a noised latent.
"""
import math

import torch

from .bridge import cfg_guider, run_in_guider
from .grad import checkpoint_blocks, grad_enabled, grad_ready, load_for_training, release
from .models import batched_latent, calculate_sigmas, latent_samples
from .services import bchw_to_image, prepare_noise
from .vae import decode, grad_vae


class OptimisedNoise:
    """A ComfyUI NOISE that returns a fixed tensor: the output of ReNO / noise search / "Noise from Latent".
    ``seed`` is handed to the guider and seeds ancestral steps."""

    def __init__(self, seed, tensor):
        self.seed = int(seed)
        self.tensor = tensor.detach().to("cpu", torch.float32).clone()

    def generate_noise(self, input_latent):
        shape = tuple(input_latent["samples"].shape)
        if shape != tuple(self.tensor.shape):
            raise ValueError(f"this NOISE holds a tensor shaped {tuple(self.tensor.shape)} but the sampler's latent is "
                             f"{shape}: use the same latent size and batch as the node that made the noise")
        return self.tensor.clone()


def run_noise_method(model, positive, negative, cfg, vae, latent, steps, sampler, scheduler, seed, batch, method,
                     vae_tile=0, checkpoint_model_blocks=False):
    """Run a noise method on a ComfyUI MODEL: ``method(chain, noise) -> noise.chain.NoiseResult``.

    The latent is repeated to ``batch``; the start noise is the seed's own (as stock RandomNoise gives it), so the
    seed's sample is iterate 0; the whole method runs inside one guider call (host/bridge.py) on grad-ready copies
    of the model and VAE, which are released afterwards. Returns (result, (NOISE, LATENT, IMAGE)).
    """
    if "noise_mask" in latent:
        raise ValueError("noise optimisation and search do not support a LATENT with a noise_mask (inpainting); "
                         "remove the mask (e.g. use the latent without Set Latent Noise Mask)")
    latent = batched_latent(latent, batch)
    sigmas = calculate_sigmas(model, scheduler, steps)
    samples = latent_samples(model, latent)
    noise = prepare_noise(samples, seed)

    def body(chain):
        result = method(chain, noise.to(chain.latent.device).clone())
        result.latent = chain.returned(result.latent).detach().cpu()
        return result

    with grad_enabled():
        patcher, vae_patcher = grad_ready(model), grad_vae(vae, decode_only=True)   # released below
        if checkpoint_model_blocks:
            checkpoint_blocks(patcher)
        try:
            load_for_training(patcher, vae_patcher)     # both resident: decode must not evict the UNet mid-loop
            result = run_in_guider(cfg_guider(patcher, positive, negative, cfg), body, samples, sigmas, seed=seed,
                                   step=sampler, decode=lambda z: decode(vae, z, patcher=vae_patcher, tile=vae_tile))
        finally:
            release(patcher, vae_patcher)
    bad = [i for i, r in enumerate(result.reward.tolist()) if not math.isfinite(r)]
    if bad:
        raise ValueError(f"the best reward of sample(s) {bad} is NaN/Inf: the reward failed on every candidate. "
                         f"Check it on a plain image first (Score Images)")
    return result, (OptimisedNoise(result.seed, result.noise), {"samples": result.latent},
                    bchw_to_image(result.images))
