"""diffusers pipeline folders as DRaFT bundles: Stable Diffusion 1.x/2.x, SDXL, SD3 and Flux.

The family comes from ``model_index.json`` (``_class_name``); the folder is loaded with that diffusers pipeline
class, and the conditioning is what the pipeline's own ``encode_prompt`` returns, so it is built exactly as the
pipeline builds it:

  SD 1.x/2.x  CLIP last hidden state                                          UNet, ε/v prediction, discrete σ table
  SDXL        both CLIPs' penultimate hidden states concatenated, encoder 2's pooled ``text_embeds`` and
              ``time_ids`` = (original size, crop top-left, target size); an empty negative prompt is zeros when
              the pipeline's ``force_zeros_for_empty_prompt`` is set, as in the pipeline
  SD3         CLIP-L + CLIP-G penultimate states (padded to the T5 width) followed by T5's sequence (zeros when
              text_encoder_3 is absent), pooled CLIP-L + CLIP-G projections                 MMDiT, flow matching
  Flux        T5 sequence, CLIP pooled output, and the distilled guidance value (``guidance``) when the transformer
              has a guidance embedding; latents are packed 2×2 into tokens around each call   flow matching

The latents the trainer sees are always (C, H/f, W/f) with the VAE's C; the VAE's ``scaling_factor``,
``shift_factor`` (SD3, Flux) or ``latents_mean``/``latents_std`` are undone before decoding. Flow models sample on
the pipeline's own schedule: the scheduler's ``shift`` (SD3), or its dynamic shift from the image's token count
(Flux, and SD3 configs with ``use_dynamic_shifting``).

LoRA targets are diffusers module names per family (``Family.targets``: "attention" = the q/k/v/out projections,
plus the joint attention's ``add_*_proj``/``to_add_out``; "attention + feed-forward" adds the MLPs). LoRA files use
keys that ComfyUI's ``comfy/lora.py`` (``model_lora_keys_unet``) maps for the family:
  UNet families  kohya ``lora_unet_<diffusers name, dots as underscores>`` (mapped through ``unet_to_diffusers``)
  SD3, Flux      ``transformer.<diffusers name>`` (mapped through ``mmdit_to_diffusers`` / ``flux_to_diffusers``,
                 which split q/k/v into slices of ComfyUI's fused qkv weights)
"""
import json
import os
import re
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..samplers import DiscreteDenoiser, FlowDenoiser
from . import lora as lora_mod
from .bundle import TorchBundle

FLOW_SCHEDULE = "flow"     # the schedule name of flow families: the pipeline's own shifted flow-matching σ


def transformer_key(name):
    """ComfyUI's diffusers key for SD3/Flux transformers: ``transformer.<diffusers module name>``."""
    return "transformer." + name


@dataclass(frozen=True)
class Family:
    label: str
    build: Callable            # (pipe, family, device, height, width, guidance) -> TorchBundle
    lora_key: Callable
    steps: int                 # CLI defaults: the pipeline's default steps and guidance scale
    cfg: float
    scheduler: str
    load_kwargs: tuple = ()    # components not needed for training (passed as None to from_pretrained)
    optional: tuple = ()       # components that may be absent (null in model_index.json, or no folder): None then


# --- shared pieces ---------------------------------------------------------------------------------------------

def _vae_decoder(vae):
    """Latents -> images in [0, 1], undoing the VAE config's normalisation as the pipelines do before decoding."""
    c = vae.config
    mean, std = c.get("latents_mean"), c.get("latents_std")
    scale, shift = c.scaling_factor, c.get("shift_factor") or 0.0

    def decode(z):
        z = z.to(vae.dtype)
        if mean is not None and std is not None:
            view = (1, -1, 1, 1)
            z = z * torch.tensor(std).view(view).to(z) / scale + torch.tensor(mean).view(view).to(z)
        else:
            z = z / scale + shift
        return (vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1)
    return decode


def _vae_factor(pipe):
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def _size(height, width, default, multiple):
    height, width = height or default, width or default
    if height % multiple or width % multiple:
        raise ValueError(f"--height and --width must be multiples of {multiple} for this model, got {width}x{height}")
    return height, width


def _check_channels(pipe, expected, label):
    latent = pipe.vae.config.latent_channels
    if latent != expected:
        raise ValueError(f"this {label} folder's VAE has {latent} latent channels but its network expects {expected}: "
                         "the vae/ folder belongs to another model family; use the VAE that ships with the model")


def _max_tokens(tokenizer, family_default):
    """The T5 sequence length: the pipeline's default, or the tokenizer's own limit when that is smaller."""
    limit = getattr(tokenizer, "model_max_length", None) or family_default
    return min(family_default, int(limit))


def _no_guidance(guidance, label):
    if guidance is not None:
        raise ValueError(f"--guidance is the distilled guidance of guidance-embedded models (Flux-dev); this {label} "
                         "model has none: use --cfg for classifier-free guidance")


def _pipeline_flow_sigmas(scheduler, tokens, sigmas_fn=None, max_shift=1.15):
    """σ (n+1 values ending in 0) as the flow pipelines set them: ``set_timesteps`` on the folder's scheduler, with
    the dynamic shift ``mu`` from the image's token count when the config asks for it, and the pipeline's explicit
    σ grid (``sigmas_fn(n)``, Flux) when it passes one."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    def sigmas(steps, name):
        if name != FLOW_SCHEDULE:
            raise ValueError(f"this model samples on its pipeline's flow-matching schedule (the scheduler's shift); "
                             f"leave --scheduler unset (or pass '{FLOW_SCHEDULE}') instead of {name!r}")
        c, kwargs = scheduler.config, {}
        if c.get("use_dynamic_shifting"):
            kwargs["mu"] = calculate_shift(tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                           c.get("base_shift", 0.5), c.get("max_shift", max_shift))
        grid = sigmas_fn(steps) if sigmas_fn is not None and not c.get("use_flow_sigmas") else None
        if grid is not None:
            scheduler.set_timesteps(sigmas=grid, **kwargs)
        else:
            scheduler.set_timesteps(steps, **kwargs)
        return scheduler.sigmas.detach().float().cpu()
    return sigmas


class TransformerNet(nn.Module):
    """A diffusers transformer as ``net(x, t, **cond) -> velocity`` for ``FlowDenoiser`` (keyword call)."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, x, t, **cond):
        return self.transformer(hidden_states=x, timestep=t, return_dict=False, **cond)[0]


class FluxNet(TransformerNet):
    """Flux: latents packed 2×2 into tokens with their (0, row, col) position ids, text ids zero, and the timestep
    as σ (the transformer scales σ and the guidance by 1000 itself), as FluxPipeline calls it."""

    def forward(self, x, t, encoder_hidden_states, pooled_projections, guidance=None):
        from diffusers import FluxPipeline

        b, c, h, w = x.shape
        tokens = FluxPipeline._pack_latents(x, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
        txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=x.device, dtype=x.dtype)
        v = self.transformer(hidden_states=tokens, timestep=t, guidance=guidance, pooled_projections=pooled_projections,
                             encoder_hidden_states=encoder_hidden_states, txt_ids=txt_ids, img_ids=img_ids,
                             return_dict=False)[0]
        return FluxPipeline._unpack_latents(v, h, w, 1)


def _discrete(pipe, net):
    """(denoiser, its σ table) for an ε/v-prediction UNet, from the folder's scheduler."""
    sched = pipe.scheduler
    if getattr(sched, "alphas_cumprod", None) is None:
        raise ValueError(f"the folder's scheduler ({type(sched).__name__}) has no DDPM noise table (alphas_cumprod); "
                         "use the scheduler that ships with the model")
    den = DiscreteDenoiser.from_scheduler(net, sched)
    return den, {"model_sigmas": den.model_sigmas.cpu()}


# --- one builder per family ------------------------------------------------------------------------------------

def _build_sd(pipe, family, device, height, width, guidance):
    _no_guidance(guidance, family.label)
    f = _vae_factor(pipe)
    height, width = _size(height, width, pipe.unet.config.sample_size * f, f)
    _check_channels(pipe, pipe.unet.config.in_channels, family.label)

    def encode(prompts):
        return {"encoder_hidden_states": pipe.encode_prompt(prompts, device, 1, False)[0]}

    den, table = _discrete(pipe, pipe.unet)
    return _bundle(pipe, family, den, encode, (pipe.unet.config.in_channels, height // f, width // f), pipe.unet,
                   device, **table)


def _build_sdxl(pipe, family, device, height, width, guidance):
    _no_guidance(guidance, family.label)
    f = _vae_factor(pipe)
    height, width = _size(height, width, pipe.unet.config.sample_size * f, f)
    _check_channels(pipe, pipe.unet.config.in_channels, family.label)
    projection = pipe.text_encoder_2.config.projection_dim

    def encode(prompts):
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=False)
        # original size = target size = the trained resolution, crop (0, 0): the pipeline's defaults
        time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=embeds.dtype,
                                          text_encoder_projection_dim=projection)
        return {"encoder_hidden_states": embeds,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.to(device).repeat(len(prompts), 1)}}

    def uncond(n):
        c = encode([""] * n)
        if pipe.config.get("force_zeros_for_empty_prompt", True):
            c["encoder_hidden_states"] = torch.zeros_like(c["encoder_hidden_states"])
            c["added_cond_kwargs"]["text_embeds"] = torch.zeros_like(c["added_cond_kwargs"]["text_embeds"])
        return c

    den, table = _discrete(pipe, pipe.unet)
    return _bundle(pipe, family, den, encode, (pipe.unet.config.in_channels, height // f, width // f), pipe.unet,
                   device, uncond=uncond, **table)


def _build_sd3(pipe, family, device, height, width, guidance):
    _no_guidance(guidance, family.label)
    f, cfg = _vae_factor(pipe), pipe.transformer.config
    height, width = _size(height, width, cfg.sample_size * f, f * cfg.patch_size)
    _check_channels(pipe, cfg.in_channels, family.label)
    t5_tokens = _max_tokens(pipe.tokenizer_3, 256) if pipe.tokenizer_3 is not None else 256

    def encode(prompts):
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device, do_classifier_free_guidance=False,
                                                  max_sequence_length=t5_tokens)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    tokens = (height // f // cfg.patch_size) * (width // f // cfg.patch_size)
    model = FlowDenoiser(TransformerNet(pipe.transformer), pipe.scheduler.config.num_train_timesteps)
    return _bundle(pipe, family, model, encode, (cfg.in_channels, height // f, width // f), pipe.transformer, device,
                   sigmas=_pipeline_flow_sigmas(pipe.scheduler, tokens, max_shift=1.16))


def _build_flux(pipe, family, device, height, width, guidance):
    import numpy as np

    f, cfg = _vae_factor(pipe), pipe.transformer.config
    height, width = _size(height, width, 128 * f, 2 * f)      # FluxPipeline.default_sample_size = 128
    _check_channels(pipe, cfg.in_channels // 4, family.label)
    if cfg.guidance_embeds:
        guidance = 3.5 if guidance is None else float(guidance)      # FluxPipeline's default guidance_scale
    else:
        _no_guidance(guidance, family.label + " (no guidance embedding, e.g. schnell)")
    t5_tokens = _max_tokens(pipe.tokenizer_2, 512)

    def encode(prompts):
        embeds, pooled, _ = pipe.encode_prompt(prompts, None, device=device, max_sequence_length=t5_tokens)
        cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        if guidance is not None:
            cond["guidance"] = torch.full((len(prompts),), guidance, device=device, dtype=torch.float32)
        return cond

    tokens = (height // f // 2) * (width // f // 2)
    sigmas = _pipeline_flow_sigmas(pipe.scheduler, tokens, lambda n: np.linspace(1.0, 1 / n, n))
    model = FlowDenoiser(FluxNet(pipe.transformer), num_train_timesteps=1)   # Flux takes σ itself as the timestep
    bundle = _bundle(pipe, family, model, encode, (cfg.in_channels // 4, height // f, width // f), pipe.transformer,
                     device, sigmas=sigmas)
    bundle.guidance = guidance
    if not cfg.guidance_embeds:       # schnell-like few-step models
        bundle.defaults["steps"] = 4
    return bundle


def _bundle(pipe, family, model, encode, latent_shape, lora_root, device, **kw):
    bundle = TorchBundle(model, encode, _vae_decoder(pipe.vae), latent_shape, lora_root=lora_root, device=device,
                         checkpoint_decode=True, lora_key=family.lora_key, **kw)
    bundle.family = family.label
    bundle.defaults = {"steps": family.steps, "cfg": family.cfg, "scheduler": family.scheduler}
    return bundle


_SD_SKIP = (("safety_checker", None), ("feature_extractor", None), ("requires_safety_checker", False))
FAMILIES = {
    "StableDiffusionPipeline": Family("SD 1.x/2.x", _build_sd, lora_mod.kohya_key, 50, 7.5, "leading",
                                      _SD_SKIP),
    "StableDiffusionXLPipeline": Family("SDXL", _build_sdxl, lora_mod.kohya_key, 50, 5.0, "leading"),
    "StableDiffusion3Pipeline": Family("SD3", _build_sd3, transformer_key, 28, 7.0, FLOW_SCHEDULE,
                                       optional=("text_encoder_3", "tokenizer_3")),
    "FluxPipeline": Family("Flux", _build_flux, transformer_key, 28, 1.0, FLOW_SCHEDULE),
}


# --- loading ---------------------------------------------------------------------------------------------------

def model_index(path):
    """The folder's model_index.json, or None for a bare SD 1.x/2.x component folder."""
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        return None
    with open(index, encoding="utf-8") as f:
        return json.load(f)


def _load_component_folder(path):
    """A Stable Diffusion 1.x/2.x folder without model_index.json (unet/, vae/, text_encoder/, tokenizer/,
    scheduler/), assembled into a StableDiffusionPipeline."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not os.path.isdir(os.path.join(path, sub)):
            raise ValueError(f"{path!r} is not a diffusers model folder: model_index.json and '{sub}/' are missing")
    if os.path.isdir(os.path.join(path, "text_encoder_2")):
        raise ValueError(f"{path!r} has text_encoder_2/ but no model_index.json; SDXL, SD3 and Flux folders are "
                         "recognised by model_index.json: save the pipeline with save_pretrained")
    with warnings.catch_warnings():    # the pipeline's notes on old scheduler configs concern its own sampling loop
        warnings.simplefilter("ignore", FutureWarning)
        return StableDiffusionPipeline(
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae"),
            text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
            tokenizer=AutoTokenizer.from_pretrained(path, subfolder="tokenizer"),
            unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
            scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def load_pipeline(path):
    """(family, pipeline) for a diffusers folder (weights in float32), every module frozen in eval mode."""
    import diffusers

    index = model_index(path)
    if index is None:
        family, pipe = FAMILIES["StableDiffusionPipeline"], _load_component_folder(path)
    else:
        name = index.get("_class_name")
        if name not in FAMILIES:
            raise ValueError(f"{path!r} holds a {name}; `rewardlab train` supports {', '.join(FAMILIES)} folders "
                             "(train other models in ComfyUI with the DRaFT Train LoRA node)")
        family = FAMILIES[name]
        absent = {c: None for c in family.optional
                  if not (index.get(c) or [None])[0] or not os.path.isdir(os.path.join(path, c))}
        pipe = getattr(diffusers, name).from_pretrained(path, **dict(family.load_kwargs), **absent)
    for module in pipe.components.values():
        if isinstance(module, nn.Module):
            module.requires_grad_(False).eval()
    return family, pipe


def diffusers_bundle(path, device="cpu", dtype=torch.float32, height=None, width=None, guidance=None):
    """A diffusers SD 1.x/2.x, SDXL, SD3 or Flux folder as a DRaFT bundle (the latent size from height/width;
    ``guidance``: Flux's distilled guidance value). ``bundle.defaults`` holds the pipeline's steps, CFG and
    schedule name; ``bundle.family`` the family's name."""
    family, pipe = load_pipeline(path)
    pipe.to(device)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    bundle = family.build(pipe, family, device, height, width, guidance)
    bundle.pipeline = pipe
    return bundle
