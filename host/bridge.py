"""The one guider bridge: RewardLab's runner inside ComfyUI's sampling, with gradients where the caller asks.

    guider.sample(noise, latent, RunnerSampler, sigmas)
        └─ RunnerSampler.sample(model_wrap, …) ─► chain(model_wrap, …) ─┬─► chain.run(noise)      a SAMPLER node
                                                                         └─► body(chain)          run_in_guider

``RunnerSampler.chain`` is the only place that turns ComfyUI's sampler arguments into a core ``noise.Chain``: the
guider's CFG'd x̂0 as the denoiser, ComfyUI's own ``model_sampling.noise_scaling`` with the ``max_denoise`` KSAMPLER
would pick, the step function for the model kind, and the seed that stock samplers use for ancestral noise. The
SAMPLER node samples with that chain; ``run_in_guider`` hands the same chain to a body (a DRaFT micro-batch, a whole
ReNO optimisation, a noise search) that runs inside one ``guider.sample`` call. Inside that call models are loaded
and conditioning is processed once, and the guider stays alive during the body's backward pass, which per-step
checkpointing needs (its recomputation calls the model again). A NOISE found by a body therefore replays exactly
under stock SamplerCustomAdvanced with the RewardLab Sampler: both build the same chain (docs/comfyui.md).

comfy is imported lazily inside functions only: importing this module never imports ComfyUI.
"""
import importlib
import math

import torch

from .. import runtime
from ..noise.chain import Chain
from ..samplers.runner import Cancelled
from ..samplers.steps import get_step
from . import services
from .grad import check_grad_ready, grad_ready, is_grad_ready
from .models import check_conditioning, is_flow, latent_samples

STEP_NAMES = ("euler", "ddim", "euler_ancestral", "dpmpp_2m")


def _comfy(module):
    return importlib.import_module(module)


def interrupt_exceptions():
    """The exceptions a cancelled trajectory raises (catch them to return the best result so far)."""
    mm = _comfy("comfy.model_management") if services.in_comfyui() else None
    return (Cancelled,) + ((mm.InterruptProcessingException,) if mm is not None else ())


class RunnerSampler:
    """A ``comfy.samplers.Sampler`` whose loop is RewardLab's one runner (``samplers.runner.sample``).

    step:     euler | ddim | euler_ancestral | dpmpp_2m (flow-matching forms are picked from the model).
    policy:   ``runner.Policy`` (which steps record gradients, checkpointing, stop-grad); default: ambient grad mode.
    eta:      stochasticity of ddim / euler_ancestral (None: their defaults 0 / 1).
    seed:     seeds the private generator of ancestral noise; None uses the guider's seed (the NOISE's seed), so
              ancestral sampling reproduces as comfy's own samplers do.
    callback: our per-step callback (runner dict: i, n, x, denoised, sigma, sigma_next), besides ComfyUI's.
    cancel:   called before every step; default: ComfyUI's Cancel button. A cancel raises ComfyUI's interrupt
              inside ComfyUI, ``runner.Cancelled`` elsewhere.
    body:     ``fn(chain)`` to run instead of sampling (see ``run_in_guider``); its result lands in ``result``.
    decode:   VAE-space latent -> image, for the chain handed to ``body``.
    After a plain sample(), ``last`` holds the runner's Trajectory (x, denoised) in the model's internal latent space.

    Constructing it inside ComfyUI returns an instance of a subclass that also derives from comfy.samplers.Sampler.
    """

    def __new__(cls, *args, **kwargs):
        if cls is RunnerSampler and services.in_comfyui():
            cls = _comfy_runner_sampler_class()
        return super().__new__(cls)

    def __init__(self, step="euler", policy=None, eta=None, seed=None, callback=None, cancel=None, body=None,
                 decode=None):
        if step not in STEP_NAMES:
            raise ValueError(f"unknown sampler step {step!r}; choose one of {', '.join(STEP_NAMES)}")
        self.step, self.policy, self.eta, self.seed = step, policy, eta, seed
        self.callback, self.cancel, self.body, self.decode = callback, cancel, body, decode
        self.last = self.result = None

    def max_denoise(self, model_wrap, sigmas):
        """Starting from pure noise (σ0 ≥ the model's σ_max)? Then ε-models scale noise by sqrt(1+σ0²)."""
        sigma_max, sigma = float(model_wrap.inner_model.model_sampling.sigma_max), float(sigmas[0])
        return math.isclose(sigma_max, sigma, rel_tol=1e-05) or sigma > sigma_max

    def chain(self, model_wrap, sigmas, extra_args, noise, latent_image, denoise_mask=None):
        """The core Chain for this sampling call (module docstring)."""
        base = model_wrap.inner_model
        if torch.is_grad_enabled() and isinstance(base, torch.nn.Module):
            check_grad_ready(base)            # name what would break the backward pass, before any work
        ms = base.model_sampling
        flow, max_denoise = is_flow(ms), self.max_denoise(model_wrap, sigmas)
        with torch.inference_mode(False):     # ComfyUI made these in inference mode; these copies can join graphs
            sigmas = sigmas.clone()
            latent_image = torch.zeros_like(noise) if latent_image is None else latent_image.clone()
        denoiser, extra = model_wrap, dict(extra_args)        # the guider returns the CFG'd x̂0
        if denoise_mask is not None:
            # a LATENT's noise_mask (inpainting), applied exactly as stock samplers do
            denoiser = _comfy("comfy.samplers").KSamplerX0Inpaint(model_wrap, sigmas)
            denoiser.latent_image, denoiser.noise = latent_image, noise
            extra["denoise_mask"] = denoise_mask

        def to_vae_space(x):                  # what guider.sample returns for a final sample
            return base.process_latent_out(ms.inverse_noise_scaling(sigmas[-1], x).float())

        return Chain(model=denoiser, sigmas=sigmas, step=get_step(self.step, flow=flow, eta=self.eta), flow=flow,
                     latent=latent_image, max_denoise=max_denoise, extra_args=extra,
                     seed=self.seed if self.seed is not None else extra_args.get("seed"),
                     channels=base.latent_format.latent_channels, interrupts=interrupt_exceptions(),
                     scale_noise=lambda sigma, n, latent: ms.noise_scaling(sigma, n, latent, max_denoise),
                     output=to_vae_space,
                     decode=None if self.decode is None else lambda x: self.decode(base.process_latent_out(x)))

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        chain = self.chain(model_wrap, sigmas, extra_args, noise, latent_image, denoise_mask)
        if self.body is not None:
            self.result = self.body(chain)
            return latent_image               # guider.sample needs a tensor; run_in_guider returns ``result``
        total = chain.steps

        def on_step(info):
            if callback is not None:          # ComfyUI's preview/progress callback(step, x0, x, total)
                callback(info["i"], info["denoised"], info["x"], total)
            if self.callback is not None:
                self.callback(info)

        try:
            self.last = chain.run(noise, self.policy, callback=on_step,
                                  cancel=self.cancel or runtime.current().interrupted)
        except Cancelled:
            runtime.current().check_interrupt()   # ComfyUI's "execution_interrupted" when Cancel was the cause
            raise
        return model_wrap.inner_model.model_sampling.inverse_noise_scaling(sigmas[-1], self.last.x)


_RUNNER_SAMPLER_CLASS = None


def _comfy_runner_sampler_class():
    global _RUNNER_SAMPLER_CLASS
    if _RUNNER_SAMPLER_CLASS is None:
        _RUNNER_SAMPLER_CLASS = type("RunnerSampler", (RunnerSampler, _comfy("comfy.samplers").Sampler),
                                     {"__doc__": RunnerSampler.__doc__})
    return _RUNNER_SAMPLER_CLASS


def run_in_guider(guider, body, latent, sigmas, seed=0, step="euler", eta=None, noise=None, denoise_mask=None,
                  decode=None):
    """Run ``body(chain)`` inside one ``guider.sample`` call and return its result (module docstring).

    latent:  the start latent (model-shaped; zeros for text-to-image), as guider.sample takes it.
    seed:    the guider's seed: seeds the chain's ancestral noise, as a NOISE's seed does in SamplerCustomAdvanced.
    noise:   the noise guider.sample gets (only a noise_mask reads it); zeros by default.
    decode:  VAE-space latent -> image in [0, 1]; the chain's ``images`` then decode model-space latents.
    The ambient grad mode is kept, outside inference mode, so whatever the body returns is a normal tensor.
    """
    sampler = RunnerSampler(step, eta=eta, body=body, decode=decode)
    noise = torch.zeros_like(latent) if noise is None else noise
    grad = torch.is_grad_enabled()            # read first: leaving inference mode turns grad mode on
    with torch.inference_mode(False), torch.set_grad_enabled(grad):
        guider.sample(noise, latent, sampler, sigmas, denoise_mask=denoise_mask, seed=seed)
    return sampler.result


def cfg_guider(model, positive, negative, cfg):
    """Stock CFGGuider on ``model`` (conditioning checked against the model family first)."""
    check_conditioning(model, positive, "positive")
    check_conditioning(model, negative, "negative")
    guider = _comfy("comfy.samplers").CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider


def trajectory(model, positive, negative, cfg, sigmas, noise, latent, step="euler", policy=None, seed=0,
               guider=None, eta=None, return_denoised=False, callback=None, then=None):
    """One sampling run of a ComfyUI MODEL through ``run_in_guider``, differentiable where ``policy`` and the ambient
    grad mode say so (tests and scripts; nodes use run_in_guider directly).

    noise:   the initial noise (a leaf with requires_grad for ReNO), shaped like the latent.
    latent:  a LATENT dict or tensor (zeros for text-to-image; its ``noise_mask`` is honoured).
    guider:  a prepared GUIDER (custom guidance); by default a CFGGuider on ``model`` with positive/negative/cfg.
    seed:    the guider's seed, which also seeds ancestral noise, as the NOISE's seed does in SamplerCustomAdvanced.
    then:    ``fn(result)`` run inside the guider, e.g. a backward pass that recomputes checkpointed steps.
    Returns the unscaled LATENT tensor (VAE space, ready for ``decode``), plus the last x̂0 in VAE space when
    ``return_denoised`` (or ``then``'s result). With grad enabled the model is made grad-ready if it is not already.
    """
    grad = torch.is_grad_enabled()
    if guider is None:
        if grad and not is_grad_ready(model):
            model = grad_ready(model)
        guider = cfg_guider(model, positive, negative, cfg)
    elif grad and not is_grad_ready(guider.model_patcher):
        raise ValueError("the guider's model is not grad-ready: build the guider on host.grad.grad_ready(model)")
    mp = guider.model_patcher
    latent_dict = latent if isinstance(latent, dict) else {"samples": latent}
    samples = latent_samples(mp, latent_dict)
    if tuple(noise.shape) != tuple(samples.shape):
        raise ValueError(f"noise shaped {tuple(noise.shape)} does not match the latent {tuple(samples.shape)}")

    def body(chain):
        traj = chain.run(noise.to(chain.latent.device), policy, callback=callback)
        out = chain.returned(traj.x)
        if return_denoised:
            out = (out, mp.model.process_latent_out(traj.denoised.float()))
        return then(out) if then is not None else out

    return run_in_guider(guider, body, samples, sigmas, seed=seed, step=step, eta=eta, noise=noise,
                         denoise_mask=latent_dict.get("noise_mask"))
