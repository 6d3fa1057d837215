"""The ComfyUI model bundle: a MODEL + VAE (+ CONDITIONING, or CLIP for per-sample prompts) for the DRaFT trainer.

The trainer (training/draft.py) is host-free; it asks a bundle for sigmas, a guided denoiser inside a session,
decoding and LoRA adapters. Here every session is one ``run_in_guider`` call on a grad-ready clone of the MODEL
that carries the LoRA adapters, so the trajectories *and* the backward pass (with its checkpoint recomputation)
run while the guider is alive.
"""
import torch

from .. import runtime
from ..training.bundle import ModelBundle
from .bridge import cfg_guider, run_in_guider
from .grad import checkpoint_blocks, load_for_training, lora_patcher, release
from .models import calculate_sigmas, check_conditioning, model_info, skip_coefficient
from .vae import decode, grad_vae


def cat_conditioning(items):
    """One CONDITIONING whose tensors hold one row per item (per-sample prompts in one batch)."""
    conds = [c[0] for c in items]
    extras = [c[1] for c in items]
    merged = {}
    for k, v in extras[0].items():
        merged[k] = torch.cat([e[k] for e in extras]) if isinstance(v, torch.Tensor) else v
    return [[torch.cat(conds), merged]]


def zero_conditioning(conditioning):
    """ConditioningZeroOut: the same structure with every tensor zeroed (an empty negative)."""
    return [[torch.zeros_like(c), {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v for k, v in d.items()}]
            for c, d in conditioning]


def is_guidance_distilled(model):
    """Flux-dev-like models take the guidance value as an input (FluxGuidance) instead of a CFG batch."""
    return bool(model.model.model_config.unet_config.get("guidance_embed"))


class ComfyBundle(ModelBundle):
    """A ComfyUI MODEL + VAE (+ CONDITIONING, or CLIP for per-sample prompts) as a trainer bundle.

    Prompts encoded with the CLIP input get what the family's own text-encode nodes add: the image size, no crop and
    the target size (CLIPTextEncodeSDXL; SDXL's size conditioning), and for guidance-distilled models the
    ``guidance`` value (FluxGuidance). Connected CONDITIONING is used as it is.
    """

    def __init__(self, model, vae, width, height, positive=None, negative=None, clip=None, downscale=8,
                 guidance=3.5, vae_tile=0, checkpoint_blocks=False):
        if positive is None and clip is None:
            raise ValueError("connect a positive CONDITIONING, or a CLIP and a prompt list")
        self.model, self.vae, self.clip = model, vae, clip
        self.positive = check_conditioning(model, positive, "positive")
        self.negative = check_conditioning(model, negative, "negative")
        info = model_info(model)
        if width % downscale or height % downscale:
            raise ValueError(f"width and height must be multiples of {downscale}, got {width}x{height}")
        self.flow = info.flow
        self.latent_shape = (info.latent_channels, height // downscale, width // downscale)
        self.device = torch.device(runtime.current().device())
        self.patcher = self.vae_patcher = None
        self.vae_tile, self.checkpoint_blocks = vae_tile, checkpoint_blocks
        self._encoded = {}
        self._extra = {"width": width, "height": height, "crop_w": 0, "crop_h": 0, "target_width": width,
                       "target_height": height}
        if is_guidance_distilled(model):
            self._extra["guidance"] = float(guidance)

    def encode_prompts(self, prompts):
        """Encode every prompt (and the empty negative) now, so the text encoder is not needed during training and
        ComfyUI can move it off the GPU when the models for training load."""
        if self.clip is not None:
            for prompt in dict.fromkeys([*prompts, ""]):
                self._clip_cond(prompt)

    def add_lora(self, rank, alpha, targets):
        self.patcher, adapters = lora_patcher(self.model, rank=rank, alpha=alpha, targets=targets)
        if self.checkpoint_blocks:
            checkpoint_blocks(self.patcher)
        self.vae_patcher = grad_vae(self.vae, decode_only=True)   # DRaFT never encodes: the encoder stays off
        load_for_training(self.patcher)
        return adapters

    def sigmas(self, steps, scheduler):
        with torch.inference_mode(False):      # a normal tensor: it joins autograd graphs
            self._schedule = calculate_sigmas(self.model, scheduler, steps).clone()
        return self._schedule

    def _clip_cond(self, prompt):
        if prompt not in self._encoded:
            with torch.inference_mode(False), torch.no_grad():
                tokens = self.clip.tokenize(prompt)
                c, d = self.clip.encode_from_tokens_scheduled(tokens)[0]
            self._encoded[prompt] = check_conditioning(self.model, [[c, {**d, **self._extra}]], "CLIP")[0]
        c, d = self._encoded[prompt]
        return [c, dict(d)]

    def conditioning(self, prompts):
        """(positive, negative) CONDITIONING for a batch: the CONDITIONING inputs, or per-sample CLIP encodings."""
        if self.positive is not None:
            positive = self.positive
        else:
            positive = cat_conditioning([self._clip_cond(p) for p in prompts])
        if self.negative is not None:
            negative = self.negative
        elif self.clip is not None:
            negative = [self._clip_cond("")]
        else:
            negative = zero_conditioning(positive)
        return positive, negative

    def session(self, prompts, cfg, fn):
        guider = cfg_guider(self.patcher, *self.conditioning(prompts), cfg)
        zeros = torch.zeros(len(prompts), *self.latent_shape)
        # the trainer's schedule, so model patches reading transformer_options["sample_sigmas"] see the real one
        return run_in_guider(guider, lambda chain: fn(chain.denoiser()), zeros, self._schedule.cpu(), seed=0)

    def decode(self, x):
        return decode(self.vae, self.patcher.model.process_latent_out(x), patcher=self.vae_patcher, tile=self.vae_tile)

    def skip(self, sigma):
        return skip_coefficient(self.model.get_model_object("model_sampling"), sigma)

    def release(self):
        """Unload the grad-ready clones and strip the LoRA wrappers from the shared modules."""
        release(self.patcher, self.vae_patcher)
