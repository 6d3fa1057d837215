"""Differentiable VAE decode inside ComfyUI.

Never ``vae.decode()`` for gradients: it detaches, writes into a preallocated buffer and may fall back to a tiled
path that runs under ``torch.inference_mode``. We decode with ``patcher.model.decode`` on a grad-ready clone.
"""
import importlib

import torch

from .grad import grad_ready

CLAMPS = ("straight_through", "hard", "none")


def grad_vae(vae):
    """A grad-ready clone of ``vae.patcher`` for ``decode`` (make it once per optimisation, not per step)."""
    vae.throw_exception_if_invalid()
    return grad_ready(vae.patcher)


def decode(vae, latent, patcher=None, clamp="straight_through"):
    """Differentiable VAE decode of an unscaled latent to a BCHW float32 image in [0, 1].

    ``patcher`` defaults to ``grad_vae(vae)`` when grad is on.
    clamp: "straight_through" (default): the values are stock ``vae.process_output`` (clamped to [0, 1]), the
           gradient is that of the unclamped (x+1)/2, so saturated pixels still pass gradient to the reward;
           "hard": stock clamp, zero gradient outside [0, 1]; "none": unclamped (x+1)/2.
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
        raw = patcher.model.decode(latent.to(vae.device, vae.vae_dtype)).float()
        if clamp == "hard":
            return vae.process_output(raw)
        linear = (raw + 1.0) / 2.0
        if clamp == "none":
            return linear
        return linear + (vae.process_output(raw) - linear).detach()
