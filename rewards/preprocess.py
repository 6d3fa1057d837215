"""Differentiable image preprocessing for reward models (fp32, no PIL, no rounding).

Each mode reproduces a reference pipeline (see rewards/README.md, "Pitfalls handled here"):
  shortest     torchvision Resize(size) on the shorter side + CenterCrop(size)   CLIP, PickScore, ImageReward, aesthetic
  longest_pad  resize the longer side to size, zero-pad to a square (HPSv2 ResizeMaxSize)
  squash       resize to exactly size x size                                      SigLIP (aesthetic v2.5)
Resizing is bicubic with antialias (PIL-like); the result is clamped to [0, 1] like an 8-bit PIL image, then normalised.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HALF_MEAN = HALF_STD = (0.5, 0.5, 0.5)
MODES = ("shortest", "longest_pad", "squash")


def resize(x, size_hw, antialias=True):
    return F.interpolate(x, size=size_hw, mode="bicubic", antialias=antialias, align_corners=False)


def resize_shortest_crop(x, size, antialias=True):
    """torchvision Resize(size) + CenterCrop(size): long side int(size*long/short), crop offset int(round(d/2))."""
    h, w = x.shape[-2:]
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    if (nh, nw) != (h, w):
        x = resize(x, (nh, nw), antialias)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return x[..., top:top + size, left:left + size]


def resize_longest_pad(x, size, antialias=True, fill=0.0):
    """HPSv2 ResizeMaxSize: longer side to size (round(dim*scale)), then pad (left/top = pad//2) with ``fill``."""
    h, w = x.shape[-2:]
    scale = size / float(max(h, w))
    if scale == 1.0:
        return x
    nh, nw = round(h * scale), round(w * scale)
    x = resize(x, (nh, nw), antialias)
    ph, pw = size - nh, size - nw
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=fill)


def resize_squash(x, size, antialias=True):
    return x if tuple(x.shape[-2:]) == (size, size) else resize(x, (size, size), antialias)


def normalize(x, mean, std):
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


@dataclass(frozen=True)
class Preprocess:
    """images BCHW in [0, 1] (any size, any float dtype) -> normalised fp32 BCHW of size x size."""

    size: int = 224
    mode: str = "shortest"
    mean: tuple = OPENAI_MEAN
    std: tuple = OPENAI_STD
    antialias: bool = True
    clamp: bool = True   # PIL clamps bicubic overshoot to [0, 255]; the gradient is 1 inside the range

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown preprocessing mode {self.mode!r}; use one of {MODES}")

    def __call__(self, images):
        x = images.float()   # bicubic+antialias has no fp16/bf16 CPU kernel, and fp32 keeps parity
        if self.mode == "shortest":
            x = resize_shortest_crop(x, self.size, self.antialias)
        elif self.mode == "longest_pad":
            x = resize_longest_pad(x, self.size, self.antialias)
        else:
            x = resize_squash(x, self.size, self.antialias)
        if self.clamp:
            x = x.clamp(0, 1)
        return normalize(x, self.mean, self.std)


def from_open_clip(model, mode=None, size=None):
    """A Preprocess matching ``open_clip.get_model_preprocess_cfg(model)`` (size, mean, std, resize mode)."""
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(model)
    cfg_size = cfg.get("size", 224)
    cfg_size = cfg_size[0] if isinstance(cfg_size, (tuple, list)) else cfg_size
    oc_mode = {"shortest": "shortest", "longest": "longest_pad", "squash": "squash"}[cfg.get("resize_mode", "shortest")]
    return Preprocess(size=int(size or cfg_size), mode=mode or oc_mode,
                      mean=tuple(cfg.get("mean", OPENAI_MEAN)), std=tuple(cfg.get("std", OPENAI_STD)))
