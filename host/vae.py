"""Differentiable VAE decode inside ComfyUI.

Never ``vae.decode()`` for gradients: it detaches, writes into a preallocated buffer and may fall back to a tiled
path that runs under ``torch.inference_mode``. We decode with ``patcher.model.decode`` on a grad-ready clone.
"""
import importlib

import torch

from ..samplers.runner import recompute_in_backward
from .grad import grad_ready

CLAMPS = ("straight_through", "hard", "none")


def grad_vae(vae, decode_only=False):
    """A grad-ready clone of ``vae.patcher`` for ``decode`` (make it once per optimisation, not per step).

    ``decode_only``: while the clone is loaded, the VAE's encoder is swapped for a stand-in (an object patch), so
    ComfyUI leaves the encoder's weights where they are instead of loading them with the decoder. Only for a clone
    that is unloaded (``host.grad.release``) before the VAE encodes again: DRaFT's bundle, ReNO and noise search."""
    vae.throw_exception_if_invalid()
    patcher = vae.patcher
    if decode_only and isinstance(getattr(patcher.model, "encoder", None), torch.nn.Module):
        encoder_size = importlib.import_module("comfy.model_management").module_size(patcher.model.encoder)
        patcher = patcher.clone()
        patcher.add_object_patch("encoder", EncoderLeftOut())
        patcher.size = patcher.model_size() - encoder_size      # what ComfyUI plans and reports as loaded
    return grad_ready(patcher)


class EncoderLeftOut(torch.nn.Module):
    """Stands in for the encoder of a decode-only VAE clone while it is loaded."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this VAE copy only decodes (RewardLab left its encoder off the device); unload it with "
                           "host.grad.release before encoding")


def decode(vae, latent, patcher=None, clamp="straight_through", tile=0):
    """Differentiable VAE decode of an unscaled latent to a BCHW float32 image in [0, 1].

    ``patcher`` defaults to ``grad_vae(vae)`` when grad is on.
    clamp: "straight_through" (default): the values are stock ``vae.process_output`` (clamped to [0, 1]), the
           gradient is that of the unclamped (x+1)/2, so saturated pixels still pass gradient to the reward;
           "hard": stock clamp, zero gradient outside [0, 1]; "none": unclamped (x+1)/2.
    tile:  decode in overlapping tiles of this many image pixels (0: in one piece), for images whose decoder
           activations would not fit: each tile is recomputed in backward, so one tile's activations are alive at a
           time; the tiles are blended with linear ramps over their overlap, and gradients flow through every tile.
           Near seams the result differs a little from the untiled decode (the decoder's group norms see one tile at
           a time), as with ComfyUI's own VAEDecodeTiled.
    """
    if clamp not in CLAMPS:
        raise ValueError(f"clamp must be one of {', '.join(CLAMPS)}, got {clamp!r}")
    grad = torch.is_grad_enabled()
    if patcher is None:
        patcher = grad_vae(vae) if grad else vae.patcher
    mm = importlib.import_module("comfy.model_management")
    mm.load_models_gpu([patcher], memory_required=vae.memory_used_decode(latent.shape, vae.vae_dtype),
                       force_full_load=True)
    with torch.inference_mode(False), torch.set_grad_enabled(grad):
        z = latent.to(vae.device, vae.vae_dtype)
        factor = vae.downscale_ratio if isinstance(vae.downscale_ratio, int) else 8
        if tile and max(z.shape[-2:]) * factor > tile:
            raw = decode_tiled(lambda t: patcher.model.decode(t).float(), z, max(1, tile // factor), factor)
        else:
            raw = patcher.model.decode(z).float()
        if clamp == "hard":
            return vae.process_output(raw)
        linear = (raw + 1.0) / 2.0
        if clamp == "none":
            return linear
        return linear + (vae.process_output(raw) - linear).detach()


def _ramp(n, overlap, device):
    """Blend weights along one axis of a tile: rising over the first ``overlap`` pixels, falling over the last."""
    w = torch.ones(n, device=device)
    if overlap > 0:
        edge = torch.linspace(1.0 / (overlap + 1), 1.0 - 1.0 / (overlap + 1), overlap, device=device)
        w[:overlap] = torch.minimum(w[:overlap], edge)
        w[-overlap:] = torch.minimum(w[-overlap:], edge.flip(0))
    return w


def _starts(size, tile, stride):
    starts = list(range(0, max(size - tile, 0) + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def decode_tiled(decode_fn, z, tile, factor, overlap=None):
    """Decode latent ``z`` (B, C, h, w) in tiles of ``tile`` latent pixels with ``overlap`` (default: a quarter),
    differentiably; ``factor`` is the VAE's upscaling. Tiles are weighted by linear ramps and normalised."""
    overlap = tile // 4 if overlap is None else overlap
    h, w = z.shape[-2:]
    th, tw = min(tile, h), min(tile, w)
    H, W = h * factor, w * factor
    out, weight = 0, torch.zeros(1, 1, H, W, device=z.device)
    for y in _starts(h, th, max(1, th - overlap)):
        for x in _starts(w, tw, max(1, tw - overlap)):
            tile_z = z[..., y:y + th, x:x + tw]
            # each tile is decoded again in backward, so only one tile's activations are alive at a time
            piece = recompute_in_backward(decode_fn, tile_z) if torch.is_grad_enabled() else decode_fn(tile_z)
            ramp = (_ramp(piece.shape[-2], overlap * factor if th < h else 0, piece.device)[:, None]
                    * _ramp(piece.shape[-1], overlap * factor if tw < w else 0, piece.device)[None])
            pad = (x * factor, W - x * factor - piece.shape[-1], y * factor, H - y * factor - piece.shape[-2])
            out = out + torch.nn.functional.pad(piece * ramp, pad)
            weight += torch.nn.functional.pad(ramp, pad)
    return out / weight
