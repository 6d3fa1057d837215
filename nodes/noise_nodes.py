"""Noise nodes: ReNO noise optimisation, gradient-free noise search, and wrapping a LATENT as a NOISE.

The whole optimisation / search runs inside one ``CFGGuider.sample`` call (see ``_InsideGuider``): every evaluation
is RewardLab's one runner on the guider's CFG'd x̂0 with RunnerSampler's noise scaling and ancestral seeding, i.e.
the implementation the "RewardLab Sampler" node runs, whose euler / euler_ancestral / dpmpp_2m steps equal stock
ComfyUI's. The NOISE output (seed + optimised tensor) therefore reproduces the optimised image under stock
SamplerCustomAdvanced with the same model, conditioning, cfg, sampler and sigmas (tests/comfyui/test_noise_comfy.py).
"""
import math

import torch

from . import host
from . import host_sampling as hs
from ..samplers.noise_opt import OPTIMIZERS, Chain, optimise_noise
from ..samplers.steps import get_step
from ..samplers.search import METHODS, noise_search

CATEGORY = "RewardLab/Noise"


class _GuiderDenoiser:
    """The guider's CFG'd x̂0 as a core denoiser (what RunnerSampler hands the runner when there is no mask)."""

    def __init__(self, model_wrap, flow):
        self.model_wrap, self.flow = model_wrap, flow

    def __call__(self, x, sigma, **extra):
        return self.model_wrap(x, sigma, **extra)


class _InsideGuider:
    """A duck-typed comfy Sampler whose ``sample`` runs a whole noise optimisation / search (``body(chain)``)
    inside ONE ``guider.sample`` call. Models are loaded and conditioning is processed once, and the guider stays
    alive during backward, which per-step checkpointing needs: its recompute calls the model again. The chain
    is the core Chain over the guider, with the steps, noise scaling and ancestral seeding of RunnerSampler."""

    def __init__(self, body, step, seed, info, vae, vae_patcher):
        self.body, self.step, self.seed, self.info = body, step, seed, info
        self.vae, self.vae_patcher = vae, vae_patcher
        self.result = self.to_vae_space = None

    def max_denoise(self, model_wrap, sigmas):
        sigma_max, sigma = float(model_wrap.inner_model.model_sampling.sigma_max), float(sigmas[0])
        return math.isclose(sigma_max, sigma, rel_tol=1e-05) or sigma > sigma_max

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        base = model_wrap.inner_model
        # ComfyUI made these in inference mode; clones made here (inference mode off) can join autograd graphs.
        sigmas = sigmas.clone()
        latent_image = latent_image.clone() if latent_image is not None else None
        chain = Chain(model=_GuiderDenoiser(model_wrap, self.info.flow), sigmas=sigmas,
                      decode=lambda x: hs.decode(self.vae, base.process_latent_out(x), patcher=self.vae_patcher),
                      step=get_step(self.step, flow=self.info.flow), flow=self.info.flow,
                      latent=latent_image if latent_image is not None and latent_image.any() else None,
                      max_denoise=self.max_denoise(model_wrap, sigmas), extra_args=extra_args, seed=self.seed,
                      channels=self.info.latent_channels)
        self.to_vae_space = lambda x: base.process_latent_out(x.detach()).float().cpu()
        self.result = self.body(chain, noise.device)
        return self.result.latent


def _inside_guider(model, positive, negative, cfg, vae, latent, sigmas, step, seed, body):
    """Run ``body(chain, device)`` inside one guider.sample with grad-ready model and VAE; returns the sampler
    (its ``result`` and ``to_vae_space``). Our grad-ready clones are always released."""
    info = hs.model_info(model)
    samples = hs.latent_samples(model, latent)
    with hs.grad_enabled():
        patcher, vae_patcher = hs.grad_ready(model), hs.grad_vae(vae)
        try:
            hs.prepare_training(patcher, vae_patcher)     # both resident: decode must not evict the UNet mid-loop
            sampler = _InsideGuider(body, step, seed, info, vae, vae_patcher)
            guider = hs.make_guider(patcher, positive, negative, cfg)
            guider.sample(torch.zeros_like(samples), samples, sampler, sigmas, seed=seed)
        finally:
            hs.release(patcher, vae_patcher)
    return sampler


class _DeviceReward:
    """Moves decoded images to the reward's device and the scores back (the VAE and reward may differ)."""

    def __init__(self, reward):
        self.reward = reward
        self.needs_text = getattr(reward, "needs_text", False)
        self.name = getattr(reward, "name", type(reward).__name__)

    def __call__(self, images, prompts=None):
        device = getattr(self.reward, "device", images.device)
        return self.reward(images.to(device), prompts).to(images.device)


def _prompts(text, batch):
    from .reward_nodes import split_prompts
    return split_prompts(text, batch)


def _batched_latent(latent, batch):
    samples = latent["samples"]
    if batch == samples.shape[0]:
        return latent
    if samples.shape[0] != 1:
        raise ValueError(f"batch is {batch} but the LATENT holds {samples.shape[0]} samples: set batch to "
                         f"{samples.shape[0]} or use a single-sample latent (it is repeated to the batch)")
    return dict(latent, samples=samples.repeat(batch, *[1] * (samples.ndim - 1)))


def _run(model, positive, negative, vae, latent, steps, sampler, scheduler, cfg, seed, batch, body):
    """Shared node plumbing: batch the latent, take the seed's noise (as stock RandomNoise), run ``body(chain,
    noise)`` inside the guider, and turn the result into (NOISE, LATENT, IMAGE)."""
    if "noise_mask" in latent:
        raise ValueError("noise optimisation and search do not support a LATENT with a noise_mask (inpainting); "
                         "remove the mask (e.g. use the latent without Set Latent Noise Mask)")
    latent = _batched_latent(latent, batch)
    sigmas = hs.calculate_sigmas(model, scheduler, steps)
    noise = host.prepare_noise(hs.latent_samples(model, latent), seed)    # the seed's own sample is iterate 0
    inside = _inside_guider(model, positive, negative, cfg, vae, latent, sigmas, sampler, seed,
                            lambda chain, device: body(chain, noise.to(device).clone()))
    result = inside.result
    outputs = (hs.OptimisedNoise(result.seed, result.noise), {"samples": inside.to_vae_space(result.latent)},
               host.bchw_to_image(result.images))
    return result, outputs


def _progress(total, key):
    """A ProgressBar callback showing the current best image; skips updates once Cancel was pressed (the bar's
    update would raise ComfyUI's interrupt, and we want to return the best so far instead)."""
    bar = host.progress_bar(total)

    def update(info):
        if not host.interrupted():
            bar.update_absolute(min(info[key], total), total,
                                host.preview_from_image(host.bchw_to_image(info["best_images"])))
    return update


def _common_inputs(steps_default, cfg_default):
    return {
        "model": ("MODEL", {"tooltip": "The diffusion model whose starting noise is optimised."}),
        "positive": ("CONDITIONING", {"tooltip": "Positive conditioning (your prompt)."}),
        "negative": ("CONDITIONING", {"tooltip": "Negative conditioning (used when cfg > 1)."}),
        "vae": ("VAE", {"tooltip": "The VAE that turns latents into the images the reward judges (differentiable)."}),
        "latent": ("LATENT", {"tooltip": "Gives the size and batch (e.g. Empty Latent Image); a non-empty latent is "
                                         "the start image (img2img). It must have this model's channel count."}),
        "reward": ("REWARD_MODEL", {"tooltip": "What to maximise: a reward from Load Reward Model / Combine Rewards."}),
        "steps": ("INT", {"default": steps_default, "min": 1, "max": 200,
                          "tooltip": "Sampling steps of the chain (1 for one-step models such as SD-Turbo)."}),
        "sampler": (list(hs.STEP_NAMES), {"default": "euler",
                                          "tooltip": "Step rule; use the same one in the sampler that replays the "
                                                     "NOISE (RewardLab Sampler or stock euler/euler_ancestral/"
                                                     "dpmpp_2m)."}),
        "scheduler": (host.scheduler_names(), {"default": "normal" if "normal" in host.scheduler_names() else None,
                                               "tooltip": "Sigma schedule (as in BasicScheduler)."}),
        "cfg": ("FLOAT", {"default": cfg_default, "min": 0.0, "max": 30.0, "step": 0.1,
                          "tooltip": "Classifier-free guidance scale (1.0 = no guidance, typical for turbo models)."}),
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff,
                         "tooltip": "Starting noise (as RandomNoise) and the ancestral-noise seed; the NOISE output "
                                    "carries it."}),
        "batch": ("INT", {"default": 1, "min": 1, "max": 64,
                          "tooltip": "Independent noises optimised together (a one-sample latent is repeated)."}),
    }


PROMPT_INPUT = ("STRING", {"multiline": True, "default": "",
                           "tooltip": "Prompt text for text-image rewards (HPS, PickScore, CLIP score, ...): one "
                                      "line for all, or one per sample. Not needed for image-only rewards."})


class RewardLabReNOOptimiseNoise:
    DESCRIPTION = ("ReNO: gradient ascent on the starting noise against a reward (best for 1-4 step models). "
                   "SGD-Nesterov, grad-norm clip, χ-norm regulariser, the best iterate is kept. With more steps it "
                   "is DOODL-style optimisation (turn on checkpoint_steps; renormalise keeps the noise norm).")
    CATEGORY = CATEGORY
    FUNCTION = "optimise"
    RETURN_TYPES = ("NOISE", "LATENT", "IMAGE", "IMAGE")
    RETURN_NAMES = ("noise", "latent", "image", "reward_plot")
    OUTPUT_TOOLTIPS = ("The optimised noise (with the seed): plug into SamplerCustomAdvanced to reproduce the image.",
                       "The sample from the best noise.", "The best image per sample.",
                       "Reward per iteration (mean over the batch): current and best so far.")

    @classmethod
    def INPUT_TYPES(cls):
        req = _common_inputs(1, 1.0)
        req.update({
            "iterations": ("INT", {"default": 50, "min": 1, "max": 1000,
                                   "tooltip": "Render + reward evaluations (ReNO: 50)."}),
            "lr": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 1000.0, "step": 0.1,
                             "tooltip": "Learning rate (ReNO: 5 with SGD; 10 for Hyper-SD)."}),
            "reg_weight": ("FLOAT", {"default": 0.01, "min": 0.0, "max": 10.0, "step": 0.001,
                                     "tooltip": "χ-norm regulariser weight: keeps the noise on the Gaussian shell "
                                                "(0 turns it off; the noise may then drift out of distribution)."}),
        })
        return {"required": req, "optional": {
            "prompt": PROMPT_INPUT,
            "optimizer": (list(OPTIMIZERS), {"default": "sgd", "tooltip": "sgd = SGD-Nesterov (ReNO), adam, lbfgs."}),
            "grad_clip": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 100.0, "step": 0.01,
                                    "tooltip": "Per-sample gradient-norm clip (ReNO: 0.1; 0 = off)."}),
            "grad_last": ("INT", {"default": 0, "min": 0, "max": 200,
                                  "tooltip": "Backpropagate through the denoiser of the last N steps only (0 = all). "
                                             "Earlier steps still pass the gradient along the solver's linear path."}),
            "checkpoint_steps": ("BOOLEAN", {"default": False,
                                             "tooltip": "Recompute each step's model call in backward: much less "
                                                        "memory for multi-step chains, ~1.3x time."}),
            "checkpoint_reward": ("BOOLEAN", {"default": False,
                                              "tooltip": "Recompute VAE decode + reward in backward to save memory."}),
            "renormalise": ("BOOLEAN", {"default": False,
                                        "tooltip": "DOODL: rescale the noise to its initial norm after each update."}),
            "perturbation": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.0001,
                                       "tooltip": "DOODL: std of small random kicks added after each update "
                                                  "(1e-4 in DOODL)."}),
        }}

    def optimise(self, model, positive, negative, vae, latent, reward, steps, sampler, scheduler, cfg, seed, batch,
                 iterations, lr, reg_weight, prompt="", optimizer="sgd", grad_clip=0.1, grad_last=0,
                 checkpoint_steps=False, checkpoint_reward=False, renormalise=False, perturbation=0.0):
        def body(chain, noise):
            return optimise_noise(chain, _DeviceReward(reward), noise, _prompts(prompt, noise.shape[0]),
                                  iterations=iterations, lr=lr, optimizer=optimizer, grad_clip=grad_clip,
                                  reg_weight=reg_weight, grad_last=grad_last or None,
                                  checkpoint_steps=checkpoint_steps, checkpoint_reward=checkpoint_reward,
                                  renormalise=renormalise, perturbation=perturbation,
                                  callback=_progress(iterations, "iteration"), cancel=host.interrupted)

        result, outputs = _run(model, positive, negative, vae, latent, steps, sampler, scheduler, cfg, seed, batch,
                               body)
        plot = _plot({"reward": result.history.mean(1).tolist(), "best": result.best_so_far().mean(1).tolist()},
                     "ReNO: reward per iteration", "iteration")
        return (*outputs, plot)


class RewardLabNoiseSearch:
    DESCRIPTION = ("Gradient-free search for a better starting noise under a budget of model calls: random "
                   "(best-of-N), zero_order (walk from the seed's noise to better neighbours) or paths (fork "
                   "partial trajectories with fresh noise, keep the best). Works with any reward, including "
                   "non-differentiable ones; never returns worse than the seed's own sample.")
    CATEGORY = CATEGORY
    FUNCTION = "search"
    RETURN_TYPES = ("NOISE", "LATENT", "IMAGE", "IMAGE", "FLOAT")
    RETURN_NAMES = ("noise", "latent", "image", "scores_plot", "best_score")
    OUTPUT_TOOLTIPS = ("The best noise with the seed (for paths: the start of the winning path, exact only when "
                       "the seed's own path won).", "The best sample.", "The best image per sample.",
                       "Best reward after each round (mean over the batch).", "Best reward (mean over the batch).")

    @classmethod
    def INPUT_TYPES(cls):
        req = _common_inputs(20, 7.0)
        req.update({
            "method": (list(METHODS), {"default": "random", "tooltip": "random, zero_order or paths."}),
            "budget": ("INT", {"default": 200, "min": 1, "max": 100000,
                               "tooltip": "Maximum model calls (one per sampling step; random: budget // steps "
                                          "candidates)."}),
        })
        return {"required": req, "optional": {
            "prompt": PROMPT_INPUT,
            "search_seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff,
                                    "tooltip": "Seed of the candidate noises (the search is reproducible)."}),
            "neighbours": ("INT", {"default": 4, "min": 1, "max": 64,
                                   "tooltip": "zero_order: candidates around the pivot per round."}),
            "step_size": ("FLOAT", {"default": 0.25, "min": 0.0, "max": 10.0, "step": 0.01,
                                    "tooltip": "zero_order: neighbour distance λ ((pivot + λ·u)/√(1+λ²))."}),
            "branches": ("INT", {"default": 4, "min": 1, "max": 32,
                                 "tooltip": "paths: forks per path at each fork step."}),
            "backtrack": ("INT", {"default": 1, "min": 1, "max": 50,
                                  "tooltip": "paths: steps a fork re-noises back before re-solving."}),
        }}

    def search(self, model, positive, negative, vae, latent, reward, steps, sampler, scheduler, cfg, seed, batch,
               method, budget, prompt="", search_seed=0, neighbours=4, step_size=0.25, branches=4, backtrack=1):
        extra = {"zero_order": dict(neighbours=neighbours, step_size=step_size),
                 "paths": dict(branches=branches, backtrack=backtrack)}.get(method, {})

        def body(chain, noise):
            with torch.no_grad():
                return noise_search(method, chain, _DeviceReward(reward), noise, budget,
                                    prompts=_prompts(prompt, noise.shape[0]), seed=search_seed,
                                    callback=_progress(budget, "calls"),
                                    cancel=host.interrupted, **extra)

        result, outputs = _run(model, positive, negative, vae, latent, steps, sampler, scheduler, cfg, seed, batch,
                               body)
        plot = _plot({"best": result.history.mean(1).tolist()}, f"noise search ({method})", "round")
        return (*outputs, plot, float(result.reward.mean()))


class RewardLabNoiseFromLatent:
    DESCRIPTION = ("Wrap any LATENT tensor as a NOISE for SamplerCustomAdvanced (e.g. a saved optimised noise). "
                   "The sampler scales it by the first sigma itself, so pass unit-variance noise, not a noised latent.")
    CATEGORY = CATEGORY
    FUNCTION = "wrap"
    RETURN_TYPES = ("NOISE",)
    RETURN_NAMES = ("noise",)
    OUTPUT_TOOLTIPS = ("A NOISE returning this tensor, carrying the seed for ancestral samplers.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "latent": ("LATENT", {"tooltip": "The tensor to use as the starting noise (its shape must match the "
                                             "sampler's latent)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff,
                             "tooltip": "Seed handed to the sampler for ancestral noise (use the one the noise was "
                                        "optimised with)."}),
        }}

    def wrap(self, latent, seed):
        return (hs.OptimisedNoise(seed, latent["samples"]),)


def _plot(series, title, xlabel):
    from ..plots import line_plot
    return line_plot(series, title=title, xlabel=xlabel, ylabel="reward")


NODE_CLASS_MAPPINGS = {
    "RewardLabReNOOptimiseNoise": RewardLabReNOOptimiseNoise,
    "RewardLabNoiseSearch": RewardLabNoiseSearch,
    "RewardLabNoiseFromLatent": RewardLabNoiseFromLatent,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "RewardLabReNOOptimiseNoise": "ReNO Optimise Noise",
    "RewardLabNoiseSearch": "Noise Search",
    "RewardLabNoiseFromLatent": "Noise from Latent",
}
