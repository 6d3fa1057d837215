"""Noise nodes: ReNO noise optimisation, gradient-free noise search, and wrapping a LATENT as a NOISE.

The optimisation or search runs inside one guider call (host/noise.py, host/bridge.py) with the chain the
"RewardLab Sampler" node samples with, so the NOISE output (seed + optimised tensor) reproduces the optimised image
under stock SamplerCustomAdvanced with the same model, conditioning, cfg, sampler and sigmas.
"""
import torch

from .. import runtime
from ..host.bridge import STEP_NAMES
from ..host.noise import OptimisedNoise, run_noise_method
from ..host.services import best_image_progress, scheduler_names
from ..noise import DOODL_PAPER, METHODS, OPTIMIZERS, RENO_PAPER, noise_search, optimise_noise
from .train_nodes import VAE_TILE_INPUT
from ..plots import line_plot
from ..rewards.base import split_prompts
from ..rewards.losses import reno_weighted

PRESETS = {"ReNO (paper)": RENO_PAPER, "DOODL (paper)": DOODL_PAPER}

CATEGORY = "RewardLab/Noise"


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
        "sampler": (list(STEP_NAMES), {"default": "euler",
                                          "tooltip": "Step rule; use the same one in the sampler that replays the "
                                                     "NOISE (RewardLab Sampler or stock euler/euler_ancestral/"
                                                     "dpmpp_2m)."}),
        "scheduler": (scheduler_names(), {"default": "normal" if "normal" in scheduler_names() else None,
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
                   "SGD-Nesterov, grad-norm clip, χ-norm regulariser, the best iterate is kept. preset 'ReNO (paper)' "
                   "sets ReNO's published settings and weights the rewards as ReNO does (HPS 5, ImageReward 1, "
                   "PickScore 0.05, CLIP 0.01); 'DOODL (paper)' runs DOODL's optimiser (heavy-ball SGD, step 1, "
                   "element clip 1e-3, renormalised noise, last iterate) through every step of a multi-step chain.")
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
            "preset": (["custom", *PRESETS], {"default": "custom", "tooltip": "ReNO (paper) / DOODL (paper): the "
                       "published settings replace iterations, lr and every option below (sources in "
                       "docs/methods.md §2); ReNO also weights the rewards (Combine Rewards members) by ReNO's table. "
                       "custom: the widgets."}),
            "optimizer": (list(OPTIMIZERS), {"default": "sgd", "tooltip": "sgd = SGD-Nesterov (ReNO), sgd_momentum = "
                          "heavy-ball SGD (DOODL), adam, lbfgs."}),
            "grad_clip": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 100.0, "step": 0.0001,
                                    "tooltip": "Gradient clip (ReNO: per-sample norm 0.1; DOODL: element value 1e-3; "
                                               "0 = off)."}),
            "clip": (["norm", "value"], {"default": "norm", "tooltip": "norm: each sample's gradient L2 norm ≤ grad_clip "
                     "(ReNO). value: every element within ±grad_clip (DOODL)."}),
            "keep": (["best", "last"], {"default": "best", "tooltip": "Return the best iterate by reward (ReNO) or the "
                     "last one (DOODL)."}),
            "grad_last": ("INT", {"default": 0, "min": 0, "max": 200,
                                  "tooltip": "Backpropagate through the denoiser of the last N steps only (0 = all). "
                                             "Earlier steps still pass the gradient along the solver's linear path."}),
            "checkpoint_steps": ("BOOLEAN", {"default": False,
                                             "tooltip": "Recompute each step's model call, block by block, in "
                                                        "backward: much less memory (what lets a large DiT at full "
                                                        "resolution fit), about 1.5-2x time."}),
            "checkpoint_reward": ("BOOLEAN", {"default": False,
                                              "tooltip": "Recompute VAE decode + reward in backward to save memory."}),
            "renormalise": ("BOOLEAN", {"default": False,
                                        "tooltip": "DOODL: rescale the noise to its initial norm after each update."}),
            "perturbation": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.0001,
                                       "tooltip": "DOODL: std of small random kicks added after each update "
                                                  "(1e-4 in DOODL)."}),
            "vae_tile_size": VAE_TILE_INPUT,
        }}

    def optimise(self, model, positive, negative, vae, latent, reward, steps, sampler, scheduler, cfg, seed, batch,
                 iterations, lr, reg_weight, prompt="", preset="custom", optimizer="sgd", grad_clip=0.1, clip="norm",
                 keep="best", grad_last=0, checkpoint_steps=False, checkpoint_reward=False, renormalise=False,
                 perturbation=0.0, vae_tile_size=0):
        settings = dict(iterations=iterations, lr=lr, optimizer=optimizer, grad_clip=grad_clip, clip=clip, keep=keep,
                        reg_weight=reg_weight, grad_last=grad_last or None, checkpoint_steps=checkpoint_steps,
                        renormalise=renormalise, perturbation=perturbation)
        settings.update(PRESETS.get(preset, {}))
        if preset == "ReNO (paper)":
            with torch.inference_mode(False):
                reward = reno_weighted(reward).to(reward.device)

        def run(chain, noise):
            return optimise_noise(chain, reward, noise, split_prompts(prompt, noise.shape[0]),
                                  checkpoint_reward=checkpoint_reward,
                                  callback=best_image_progress(settings["iterations"], "iteration"),
                                  cancel=runtime.current().interrupted, **settings)

        result, outputs = run_noise_method(model, positive, negative, cfg, vae, latent, steps, sampler, scheduler,
                                           seed, batch, run, vae_tile=vae_tile_size,
                                           checkpoint_model_blocks=settings["checkpoint_steps"])
        plot = line_plot({"reward": result.history.mean(1).tolist(), "best": result.best_so_far().mean(1).tolist()},
                         title="ReNO: reward per iteration", xlabel="iteration", ylabel="reward")
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

        def run(chain, noise):
            with torch.no_grad():
                return noise_search(method, chain, reward, noise, budget, prompts=split_prompts(prompt, noise.shape[0]),
                                    seed=search_seed, callback=best_image_progress(budget, "calls"),
                                    cancel=runtime.current().interrupted, **extra)

        result, outputs = run_noise_method(model, positive, negative, cfg, vae, latent, steps, sampler, scheduler,
                                           seed, batch, run)
        plot = line_plot({"best": result.history.mean(1).tolist()}, title=f"noise search ({method})", xlabel="round",
                         ylabel="reward")
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
        return (OptimisedNoise(seed, latent["samples"]),)


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
