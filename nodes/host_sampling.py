"""The host adapter's sampling half: ComfyUI MODEL / VAE / CONDITIONING driven through OUR runner, with gradients.

Every RewardLab optimiser samples inside ComfyUI through the same path a user's workflow can take:

    CFGGuider(model) ─► RunnerSampler (a comfy.samplers.Sampler) ─► samplers.runner.sample ─► model_wrap (CFG'd x̂0)

so an optimised NOISE or LoRA reproduces under stock SamplerCustomAdvanced + the "RewardLab Sampler" node.

Why the wrappers (comfyui-host.md §0.1-0.2): ComfyUI runs nodes in ``torch.inference_mode()``, so loaded weights are
inference tensors that autograd refuses to save. A weight wrapper on every weight and bias makes ``comfy.ops`` copy
the weight on each forward; a copy made outside inference mode is a normal tensor. ``grad_ready`` does that on a
clone, so the user's MODEL/VAE stay untouched.

comfy is imported lazily inside functions only: importing this module never imports ComfyUI.
"""
import contextlib
import importlib
import math
from dataclasses import dataclass

import torch

from ..samplers.runner import Cancelled, sample as run_trajectory
from ..samplers.steps import get_step
from ..training.lora import ATTENTION_TARGETS, LoRA, lora_targets
from . import host

STEP_NAMES = ("euler", "ddim", "euler_ancestral", "dpmpp_2m")


def _comfy(module):
    return importlib.import_module(module)


def _identity(t):
    return t


# --- autograd through ComfyUI models -------------------------------------------------------------------------

def _wrappable_keys(model_patcher):
    """'<module>.weight' / '<module>.bias' of every comfy-op module (the layers whose forward applies wrappers)."""
    for name, m in model_patcher.model.named_modules():
        if hasattr(m, "weight_function"):
            for attr in ("weight", "bias"):
                if getattr(m, attr, None) is not None:
                    yield f"{name}.{attr}"


def grad_ready(model_patcher, wrappers=None):
    """A clone of ``model_patcher`` (a MODEL or ``vae.patcher``) that autograd can run through.

    ``wrappers`` maps a full weight key (e.g. ``"diffusion_model.out.2.weight"``) to a callable on the weight,
    such as a LoRA adapter; every other weight and bias gets the identity. Base weights are frozen.
    """
    wrappers = dict(wrappers or {})
    patcher = model_patcher.clone()
    for key in _wrappable_keys(patcher):
        patcher.add_weight_wrapper(key, wrappers.pop(key, _identity))
    if wrappers:
        raise ValueError(f"weight wrappers for keys this model does not have, e.g. {sorted(wrappers)[:3]}")
    patcher.model.requires_grad_(False)     # only the wrappers' own parameters may collect gradients
    return patcher


def is_grad_ready(model_patcher):
    return all(k in model_patcher.weight_wrapper_patches for k in _wrappable_keys(model_patcher))


def inject_lora(model_patcher, rank=8, alpha=None, targets=ATTENTION_TARGETS, init="default"):
    """Grad-ready clone of a MODEL with a trainable ``training.lora.LoRA`` on every matching diffusion-model layer.

    targets: module-name suffixes (default: attention q/k/v/out), a regex string, or None for every Linear/Conv.
    Returns (patcher, adapters) with adapters keyed by ldm module name, so ``training.lora.lora_state_dict(adapters)``
    writes ``diffusion_model.<module>.lora_up.weight`` etc., exactly what stock LoraLoader reads.
    """
    dm = model_patcher.model.diffusion_model
    names = lora_targets(dm, targets)
    if not names:
        raise ValueError(f"no Linear/Conv2d layer of this model matches LoRA targets {targets!r}; "
                         "pass module-name suffixes, a regex, or None for all layers")
    modules = dict(dm.named_modules())
    with torch.inference_mode(False):       # adapter parameters must be normal (trainable) tensors
        adapters = {n: LoRA(modules[n].weight.shape, rank, alpha, init, device=model_patcher.load_device) for n in names}
    patcher = grad_ready(model_patcher, {f"diffusion_model.{n}.weight": a for n, a in adapters.items()})
    return patcher, adapters


def apply_lora_state_dict(model, lora_sd, strength=1.0):
    """A MODEL with a saved LoRA merged by ComfyUI's own loader (what LoraLoaderModelOnly does): a normal, fast
    MODEL for KSampler, with no live autograd modules."""
    return _comfy("comfy.sd").load_lora_for_models(model, None, lora_sd, strength, 0)[0]


@contextlib.contextmanager
def grad_enabled():
    """Context for training inside a node: leaves inference mode and turns autograd on."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


# --- memory ----------------------------------------------------------------------------------------------------

def prepare_training(*patchers):
    """Load the grad-ready patchers fully before training: evicts everything else (the guider's memory estimate
    ignores activations kept for backward) and avoids lowvram partial loading."""
    _comfy("comfy.model_management").load_models_gpu(list(patchers), memory_required=1e20, force_full_load=True)


def release(*patchers):
    """After training/optimisation: unload our grad-ready clones, strip their wrappers from the shared modules
    (so nothing of ours, e.g. a LoRA, stays attached to the user's model) and give cached memory back."""
    mm = _comfy("comfy.model_management")
    for p in patchers:
        was_loaded = False
        for i in reversed(range(len(mm.current_loaded_models))):
            if mm.current_loaded_models[i].model is p:
                mm.current_loaded_models.pop(i).model_unload()
                was_loaded = True
        if was_loaded:      # our clone owned the modules' wrapper lists; another clone's are left alone
            for m in p.model.modules():
                if hasattr(m, "weight_function"):
                    m.weight_function, m.bias_function = [], []
    host.free_memory()


# --- model facts ----------------------------------------------------------------------------------------------

@dataclass
class ModelInfo:
    latent_channels: int
    latent_dimensions: int       # 2 for images, 3 for video latents
    scale_factor: float          # latent_format.scale_factor (VAE latent -> model space)
    flow: bool                   # CONST (flow matching) sampling: x = (1-σ)·x0 + σ·ε
    prediction: str              # model_sampling class: EPS, V_PREDICTION, CONST, EDM, X0, ...
    sigma_min: float
    sigma_max: float
    model_sigmas: torch.Tensor   # the model's σ table (discrete models; a short table for flow models)


def _sampling_kind(model_sampling):
    """EPS, V_PREDICTION, EDM, X0 or CONST (flow), read from the model_sampling class's bases (ComfyUI composes
    it as ``class ModelSampling(<schedule>, <prediction>)``), most derived first."""
    bases = [c.__name__ for c in type(model_sampling).__mro__]
    for kind in ("CONST", "IMG_TO_IMG", "X0", "EDM", "V_PREDICTION", "EPS"):
        if kind in bases:
            return kind
    return type(model_sampling).__name__


def model_info(model):
    ms = model.get_model_object("model_sampling")
    lf = model.get_model_object("latent_format")
    kind = _sampling_kind(ms)
    sigmas = getattr(ms, "sigmas", None)
    return ModelInfo(latent_channels=lf.latent_channels, latent_dimensions=getattr(lf, "latent_dimensions", 2),
                     scale_factor=float(lf.scale_factor), flow=kind == "CONST", prediction=kind,
                     sigma_min=float(ms.sigma_min), sigma_max=float(ms.sigma_max),
                     model_sigmas=sigmas.detach().float().cpu() if sigmas is not None else None)


def calculate_sigmas(model, scheduler, steps, denoise=1.0):
    """ComfyUI's own schedule for this model (same as BasicScheduler): a CPU float tensor of steps+1 values."""
    samplers = _comfy("comfy.samplers")
    if scheduler not in samplers.SCHEDULER_NAMES:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(samplers.SCHEDULER_NAMES)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    total = steps if denoise >= 1.0 else int(steps / denoise)
    sigmas = samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, total).cpu()
    return sigmas[-(steps + 1):]


def latent_samples(model, latent):
    """The latent tensor of a LATENT (or a tensor), shaped for ``model``: an all-zero latent is widened to the
    model's channel count as stock samplers do; any other channel mismatch is an error."""
    samples = latent["samples"] if isinstance(latent, dict) else latent
    samples = _comfy("comfy.sample").fix_empty_latent_channels(model, samples)
    info = model_info(model)
    if samples.shape[1] != info.latent_channels:
        raise ValueError(f"the LATENT has {samples.shape[1]} channels but this model works on {info.latent_channels}: "
                         "make the latent with this model family's Empty Latent node (or encode with its VAE)")
    return samples


def empty_latent(model, width, height, batch_size=1, downscale=8):
    """Zeros shaped for ``model`` at an image size (downscale = the VAE's spatial factor, 8 for SD/SDXL/SD3/Flux)."""
    if width % downscale or height % downscale:
        raise ValueError(f"width and height must be multiples of {downscale}, got {width}x{height}")
    info = model_info(model)
    return torch.zeros(batch_size, info.latent_channels, height // downscale, width // downscale)


# --- the sampler ------------------------------------------------------------------------------------------------

def _generator(seed, device):
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


class RunnerSampler:
    """A ``comfy.samplers.Sampler`` whose loop is RewardLab's one runner (``samplers.runner.sample``).

    step:     euler | ddim | euler_ancestral | dpmpp_2m (flow-matching forms are picked from the model).
    policy:   ``runner.Policy`` (which steps record gradients, checkpointing, stop-grad); default: ambient grad mode.
    eta:      stochasticity of ddim / euler_ancestral (None: their defaults 0 / 1).
    seed:     seeds the private generator of ancestral noise; None uses the guider's seed (the NOISE's seed), so
              ancestral sampling reproduces as comfy's own samplers do. ``generator`` overrides both.
    callback: our per-step callback (runner dict: i, n, x, denoised, sigma, sigma_next), besides ComfyUI's.
    cancel:   called before every step; default: ComfyUI's Cancel button. A cancel raises ComfyUI's interrupt
              inside ComfyUI, ``runner.Cancelled`` elsewhere.
    After sample(), ``last`` holds the runner's Trajectory (x, denoised) in the model's internal latent space.

    Constructing it inside ComfyUI returns an instance of a subclass that also derives from comfy.samplers.Sampler.
    """

    def __new__(cls, *args, **kwargs):
        if cls is RunnerSampler and host.in_comfyui():
            cls = _comfy_runner_sampler_class()
        return super().__new__(cls)

    def __init__(self, step="euler", policy=None, eta=None, seed=None, generator=None, callback=None, cancel=None):
        if step not in STEP_NAMES:
            raise ValueError(f"unknown sampler step {step!r}; choose one of {', '.join(STEP_NAMES)}")
        self.step, self.policy, self.eta, self.seed = step, policy, eta, seed
        self.generator, self.callback, self.cancel = generator, callback, cancel
        self.last = None

    def max_denoise(self, model_wrap, sigmas):
        """Starting from pure noise (σ0 ≥ the model's σ_max)? Then ε-models scale noise by sqrt(1+σ0²)."""
        sigma_max, sigma = float(model_wrap.inner_model.model_sampling.sigma_max), float(sigmas[0])
        return math.isclose(sigma_max, sigma, rel_tol=1e-05) or sigma > sigma_max

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        ms = model_wrap.inner_model.model_sampling
        flow = _sampling_kind(ms) == "CONST"
        x = ms.noise_scaling(sigmas[0], noise, latent_image, self.max_denoise(model_wrap, sigmas))
        denoiser, extra = _PinnedGuider(model_wrap), dict(extra_args)    # the guider returns the CFG'd x̂0
        if denoise_mask is not None:
            # a LATENT's noise_mask (inpainting), applied exactly as stock samplers do
            denoiser = _comfy("comfy.samplers").KSamplerX0Inpaint(denoiser, sigmas)
            denoiser.latent_image, denoiser.noise = latent_image, noise
            extra["denoise_mask"] = denoise_mask
        seed = self.seed if self.seed is not None else extra_args.get("seed")
        generator = self.generator or _generator(seed, x.device)
        total = len(sigmas) - 1

        def on_step(info):
            if callback is not None:          # ComfyUI's preview/progress callback(step, x0, x, total)
                callback(info["i"], info["denoised"], info["x"], total)
            if self.callback is not None:
                self.callback(info)

        try:
            self.last = run_trajectory(denoiser, x, sigmas, step=get_step(self.step, flow=flow, eta=self.eta),
                                       policy=self.policy, extra_args=extra, callback=on_step,
                                       cancel=self.cancel or host.interrupted, generator=generator)
        except Cancelled:
            host.throw_if_interrupted()       # surface as ComfyUI's "execution_interrupted" when that was the cause
            raise
        return ms.inverse_noise_scaling(sigmas[-1], self.last.x)


class _PinnedGuider:
    """Calls a guider; after sampling has finished, re-enters its sampling state first.

    With ``Policy(checkpoint=True)`` the denoiser calls are recomputed during backward, i.e. after
    ``CFGGuider.sample`` has deleted ``inner_model``/``conds`` and run ``model_patcher.cleanup()``. For such a
    late call this proxy makes sure the same patcher is loaded (so its weight wrappers are the live ones), puts the
    processed conds back, runs ``pre_run`` and afterwards ``cleanup`` again. Any guider subclass (custom guidance)
    therefore recomputes exactly what it computed while sampling.
    """

    def __init__(self, guider):
        self.guider, self.inner_model, self.conds = guider, guider.inner_model, guider.conds

    def __call__(self, *args, **kwargs):
        g = self.guider
        if "inner_model" in g.__dict__:          # during sampling: a plain call
            return g(*args, **kwargs)
        mp = g.model_patcher
        _comfy("comfy.model_management").load_models_gpu([mp])
        g.inner_model, g.conds = self.inner_model, self.conds
        mp.pre_run()
        try:
            return g(*args, **kwargs)
        finally:
            mp.cleanup()
            del g.inner_model, g.conds


_RUNNER_SAMPLER_CLASS = None


def _comfy_runner_sampler_class():
    global _RUNNER_SAMPLER_CLASS
    if _RUNNER_SAMPLER_CLASS is None:
        _RUNNER_SAMPLER_CLASS = type("RunnerSampler", (RunnerSampler, _comfy("comfy.samplers").Sampler),
                                     {"__doc__": RunnerSampler.__doc__})
    return _RUNNER_SAMPLER_CLASS


def interrupt_exceptions():
    """The exceptions a cancelled trajectory raises (catch them to return the best result so far)."""
    mm = _comfy("comfy.model_management") if host.in_comfyui() else None
    return (Cancelled,) + ((mm.InterruptProcessingException,) if mm is not None else ())


def make_guider(model, positive, negative, cfg):
    guider = _comfy("comfy.samplers").CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider


def trajectory(model, positive, negative, cfg, sigmas, noise, latent, step="euler", policy=None, seed=0,
               guider=None, eta=None, return_denoised=False, callback=None):
    """One sampling run of a ComfyUI MODEL through CFGGuider + RunnerSampler, differentiable where ``policy`` and
    the ambient grad mode say so.

    noise:   the initial noise (a leaf with requires_grad for ReNO), shaped like the latent, e.g. from
             ``OptimisedNoise.generate_noise`` or ``comfy.sample.prepare_noise``.
    latent:  a LATENT dict or tensor (zeros for text-to-image; its ``noise_mask`` is honoured).
    guider:  a prepared GUIDER (custom guidance); by default a CFGGuider on ``model`` with positive/negative/cfg.
    seed:    the guider's seed, which also seeds ancestral noise, as the NOISE's seed does in SamplerCustomAdvanced.
    Returns the unscaled LATENT tensor (VAE space, ready for ``decode``), plus the last x̂0 in VAE space when
    ``return_denoised``. With grad enabled the model is made grad-ready if it is not already.
    """
    grad = torch.is_grad_enabled()
    if guider is None:
        if grad and not is_grad_ready(model):
            model = grad_ready(model)
        guider = make_guider(model, positive, negative, cfg)
    elif grad and not is_grad_ready(guider.model_patcher):
        raise ValueError("the guider's model is not grad-ready: build the guider on host_sampling.grad_ready(model)")
    mp = guider.model_patcher
    latent_dict = latent if isinstance(latent, dict) else {"samples": latent}
    samples = latent_samples(mp, latent_dict)
    if tuple(noise.shape) != tuple(samples.shape):
        raise ValueError(f"noise shaped {tuple(noise.shape)} does not match the latent {tuple(samples.shape)}")
    sampler = RunnerSampler(step, policy=policy, eta=eta, callback=callback)
    with torch.inference_mode(False), torch.set_grad_enabled(grad):   # results are normal tensors either way
        out = guider.sample(noise, samples, sampler, sigmas, denoise_mask=latent_dict.get("noise_mask"), seed=seed)
        if not return_denoised:
            return out
        return out, mp.model.process_latent_out(sampler.last.denoised.float())


# --- VAE ---------------------------------------------------------------------------------------------------------

def grad_vae(vae):
    """A grad-ready clone of ``vae.patcher`` for ``decode`` (make it once per optimisation, not per step)."""
    vae.throw_exception_if_invalid()
    return grad_ready(vae.patcher)


def decode(vae, latent, patcher=None, clamp="straight_through"):
    """Differentiable VAE decode of an unscaled latent to a BCHW float32 image in [0, 1].

    Uses ``patcher.model.decode`` (never ``vae.decode()``, which detaches, writes into a preallocated buffer and may
    fall back to an inference-mode tiled path). ``patcher`` defaults to ``grad_vae(vae)`` when grad is on.
    clamp: "straight_through" (default): the values are stock ``vae.process_output`` (clamped to [0, 1]), the
           gradient is that of the unclamped (x+1)/2, so saturated pixels still pass gradient to the reward;
           "hard": stock clamp, zero gradient outside [0, 1]; "none": unclamped (x+1)/2.
    """
    if clamp not in ("straight_through", "hard", "none"):
        raise ValueError(f"clamp must be 'straight_through', 'hard' or 'none', got {clamp!r}")
    grad = torch.is_grad_enabled()
    if patcher is None:
        patcher = grad_vae(vae) if grad else vae.patcher
    mm = _comfy("comfy.model_management")
    mm.load_models_gpu([patcher], memory_required=vae.memory_used_decode(latent.shape, vae.vae_dtype),
                       force_full_load=True)
    with torch.inference_mode(False), torch.set_grad_enabled(grad):
        raw = patcher.model.decode(latent.to(vae.device, vae.vae_dtype)).float()
        if clamp == "hard":
            return vae.process_output(raw)
        linear = (raw + 1.0) / 2.0
        if clamp == "none":
            return linear
        return linear + (vae.process_output(raw) - linear).detach()


# --- NOISE ---------------------------------------------------------------------------------------------------------

class OptimisedNoise:
    """A ComfyUI NOISE (``.seed`` + ``.generate_noise(latent_dict)``) that returns a fixed tensor: the output of
    ReNO / noise search / "Noise from Latent". The sampler scales it by σ0 itself (noise_scaling), so store the
    standard-normal-like noise, not the noised latent. ``seed`` is handed to the guider and seeds ancestral steps.
    """

    def __init__(self, seed, tensor):
        self.seed = int(seed)
        self.tensor = tensor.detach().to("cpu", torch.float32).clone()

    def generate_noise(self, input_latent):
        shape = tuple(input_latent["samples"].shape)
        if shape != tuple(self.tensor.shape):
            raise ValueError(f"this NOISE holds a tensor shaped {tuple(self.tensor.shape)} but the sampler's latent is "
                             f"{shape}: use the same latent size and batch as the node that made the noise")
        return self.tensor.clone()
