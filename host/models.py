"""Facts about a ComfyUI MODEL that the core needs: what it predicts, its σ range and schedule, its latent shape.

``model_kind`` is the one place that reads the prediction type; everything else (flow or not, the guidance space)
derives from it.
"""
import importlib
from dataclasses import dataclass

import torch

# ComfyUI composes model_sampling as ``class ModelSampling(<schedule>, <prediction>)``; most derived first.
KINDS = ("CONST", "IMG_TO_IMG", "X0", "EDM", "V_PREDICTION", "EPS")


def _comfy(module):
    return importlib.import_module(module)


def model_kind(model_sampling):
    """EPS, V_PREDICTION, EDM, X0, IMG_TO_IMG or CONST (flow matching), read from the model_sampling class's bases."""
    bases = [c.__name__ for c in type(model_sampling).__mro__]
    for kind in KINDS:
        if kind in bases:
            return kind
    return type(model_sampling).__name__


def is_flow(model_sampling):
    """Flow matching (CONST): x = (1-σ)·x0 + σ·ε."""
    return model_kind(model_sampling) == "CONST"


def skip_coefficient(model_sampling, sigma):
    """c_skip(σ) of ComfyUI's calculate_denoised: 1 for EPS and CONST (x − σ·out), σd²/(σ² + σd²) for V_PREDICTION
    and EDM, 0 for X0-type predictions."""
    kind = model_kind(model_sampling)
    if kind in ("EPS", "CONST"):
        return 1.0
    if kind in ("V_PREDICTION", "EDM"):
        sd = float(getattr(model_sampling, "sigma_data", 1.0))
        return sd**2 / (float(sigma) ** 2 + sd**2)
    return 0.0


@dataclass
class ModelInfo:
    latent_channels: int
    latent_dimensions: int       # 2 for images, 3 for video latents
    scale_factor: float          # latent_format.scale_factor (VAE latent -> model space)
    flow: bool                   # CONST (flow matching) sampling: x = (1-σ)·x0 + σ·ε
    prediction: str              # model_kind: EPS, V_PREDICTION, CONST, EDM, X0, ...
    sigma_min: float
    sigma_max: float
    model_sigmas: torch.Tensor   # the model's σ table (discrete models; a short table for flow models)


def model_info(model):
    ms = model.get_model_object("model_sampling")
    lf = model.get_model_object("latent_format")
    kind = model_kind(ms)
    sigmas = getattr(ms, "sigmas", None)
    return ModelInfo(latent_channels=lf.latent_channels, latent_dimensions=getattr(lf, "latent_dimensions", 2),
                     scale_factor=float(lf.scale_factor), flow=kind == "CONST", prediction=kind,
                     sigma_min=float(ms.sigma_min), sigma_max=float(ms.sigma_max),
                     model_sigmas=sigmas.detach().float().cpu() if sigmas is not None else None)


AYS_SCHEDULER = "align_your_steps"
AYS_FAMILIES = {"SD15": "sd15", "SDXL": "sdxl", "SVD_img2vid": "svd"}     # ComfyUI model config -> published table


def ays_family(model):
    """The Align Your Steps table of a MODEL's family (SD1.5, SDXL, SVD), or a clear error."""
    config = type(getattr(model.model, "model_config", None)).__name__
    if config not in AYS_FAMILIES:
        raise ValueError(f"Align Your Steps publishes schedules for SD1.5, SDXL and SVD; this model is {config}: "
                         "choose another scheduler")
    return AYS_FAMILIES[config]


def calculate_sigmas(model, scheduler, steps, denoise=1.0):
    """ComfyUI's own schedule for this model (same as BasicScheduler), or the core's Align Your Steps table for the
    model's family ("align_your_steps"): a CPU float tensor of steps+1 values."""
    samplers = _comfy("comfy.samplers")
    if scheduler not in samplers.SCHEDULER_NAMES and scheduler != AYS_SCHEDULER:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of "
                         f"{', '.join([*samplers.SCHEDULER_NAMES, AYS_SCHEDULER])}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    total = steps if denoise >= 1.0 else int(steps / denoise)
    if scheduler == AYS_SCHEDULER:
        from ..samplers.sigmas import align_your_steps
        sigmas = align_your_steps(total, ays_family(model))
    else:
        sigmas = samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, total).cpu()
    return sigmas[-(steps + 1):]


def latent_samples(model, latent):
    """The latent tensor of a LATENT (or a tensor), shaped for ``model``: an all-zero latent is widened to the
    model's channel count as stock samplers do; any other channel mismatch is an error."""
    samples = latent["samples"] if isinstance(latent, dict) else latent
    samples = _comfy("comfy.sample").fix_empty_latent_channels(model, samples)   # also: 4-D -> 5-D for video models
    info = model_info(model)
    want = 2 + info.latent_dimensions
    if samples.ndim != want:
        kinds = {4: "an image latent (B, C, H, W)", 5: "a video latent (B, C, T, H, W)"}
        raise ValueError(f"the LATENT is {samples.ndim}-D {tuple(samples.shape)} but this model takes "
                         f"{kinds.get(want, f'{want}-D latents')}: make the latent with this model family's Empty "
                         f"Latent node (or encode with its VAE)")
    if samples.shape[1] != info.latent_channels:
        raise ValueError(f"the LATENT has {samples.shape[1]} channels but this model works on {info.latent_channels}: "
                         "make the latent with this model family's Empty Latent node (or encode with its VAE)")
    return samples


def batched_latent(latent, batch):
    """A LATENT with ``batch`` samples: a one-sample latent is repeated, a latent of that size kept."""
    samples = latent["samples"]
    if batch == samples.shape[0]:
        return latent
    if samples.shape[0] != 1:
        raise ValueError(f"batch is {batch} but the LATENT holds {samples.shape[0]} samples: set batch to "
                         f"{samples.shape[0]} or use a single-sample latent (it is repeated to the batch)")
    return dict(latent, samples=samples.repeat(batch, *[1] * (samples.ndim - 1)))


def empty_latent(model, width, height, batch_size=1, downscale=8):
    """Zeros shaped for ``model`` at an image size (downscale = the VAE's spatial factor, 8 for SD/SDXL/SD3/Flux)."""
    if width % downscale or height % downscale:
        raise ValueError(f"width and height must be multiples of {downscale}, got {width}x{height}")
    info = model_info(model)
    return torch.zeros(batch_size, info.latent_channels, height // downscale, width // downscale)


def family_name(model):
    """ComfyUI's name for the model's configuration (SD15, SDXL, Segmind_Vega, SD3, Flux, Lumina2, ...)."""
    return type(model.model.model_config).__name__


def text_width(model):
    """Features per text token the model's conditioning must have (None when the configuration does not say)."""
    config = model.model.model_config.unet_config
    for key in ("context_dim", "context_in_dim", "cap_feat_dim", "joint_attention_dim"):
        if config.get(key):
            return int(config[key])
    embedder = config.get("context_embedder_config")
    return int(embedder["params"]["in_features"]) if embedder else None


def check_conditioning(model, conditioning, what="positive"):
    """A clear error when a CONDITIONING was made by another family's text encoder (wrong width per token)."""
    expected = text_width(model)
    for tensor, _ in conditioning or ():
        if expected is not None and tensor.shape[-1] != expected:
            raise ValueError(f"the {what} CONDITIONING has {tensor.shape[-1]} features per token, but this "
                             f"{family_name(model)} model takes {expected}: encode the prompt with this model family's "
                             "text encoders (the CLIP output of its checkpoint, or the CLIP loader type made for it)")
    return conditioning
