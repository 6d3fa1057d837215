"""Model bundles: what the DRaFT trainer needs from a host, and nothing more.

A bundle knows how to turn prompts into a guided denoiser (CFG inside), decode latents into images in [0, 1],
which sigma schedule to use, and where to put LoRA adapters. The trainer runs every trajectory itself through the
core runner (``samplers.sample``). The trainer never touches a
UNet, a VAE or a text encoder directly, so the same loop runs on the embedded tiny model, a diffusers pipeline
folder (training/pipelines.py) and a ComfyUI MODEL (whose bundle lives next to the ComfyUI nodes and drives the bridge).
"""
import warnings

import torch

from ..samplers import CFGDenoiser, sigma_schedule, skip_coefficient
from ..samplers.runner import recompute_in_backward
from . import lora as lora_mod


class ModelBundle:
    """Base class. Subclasses set ``latent_shape`` (C, H, W), ``flow``, ``device`` and implement ``sigmas``,
    ``encode`` + ``denoiser`` (or override ``session``), ``decode`` and ``add_lora``."""

    flow = False
    device = torch.device("cpu")
    latent_shape = None
    lora_key = staticmethod(lora_mod.comfy_key)    # module name -> LoRA file key prefix

    def sigmas(self, steps, scheduler):
        raise NotImplementedError

    def encode(self, prompts):
        """Conditioning for a batch of prompts (opaque to the trainer)."""
        raise NotImplementedError

    def denoiser(self, conds, cfg):
        """A denoiser ``model(x, sigma) -> x̂0`` with classifier-free guidance at scale ``cfg`` inside it."""
        raise NotImplementedError

    def session(self, prompts, cfg, fn):
        """Run ``fn(denoiser)`` with the guided denoiser for ``prompts`` and return its result.

        Everything that may call the denoiser happens inside ``fn``: the trajectories *and* the backward pass,
        whose checkpoint recomputation calls the denoiser again. A host whose model call is only valid inside a
        scope (ComfyUI's guider.sample) overrides this method to run ``fn`` inside that scope."""
        return fn(self.denoiser(self.encode(prompts), cfg))

    def decode(self, x):
        """Latents -> images (B, 3, H, W) in [0, 1], differentiable."""
        raise NotImplementedError

    def skip(self, sigma):
        """c_skip(σ) of the model's parametrisation D = c_skip·x + c_out·F(c_in·x) (DRTune's stop-gradient on the
        network input keeps this path); 1 for ε and flow models."""
        raise NotImplementedError

    def add_lora(self, rank, alpha, targets):
        """Attach trainable LoRA adapters; returns {module name: training.lora.LoRA}."""
        raise NotImplementedError


class TorchBundle(ModelBundle):
    """A bundle over plain torch pieces.

    model:        denoiser module in the k-diffusion convention, ``model(x, sigma, **cond) -> x̂0``
    encode:       prompts -> dict of keyword arguments for ``model`` (batch-first tensors)
    decode:       latents -> images in [0, 1]
    model_sigmas: the σ table of a discrete model (None for flow models, which pass ``flow_shift``)
    lora_root:    the module whose Linear/Conv2d layers get adapters (default: ``model``)
    lora_key:     module name -> file key prefix (default ``diffusion_model.<name>``; diffusers models use the
                  key format ComfyUI maps for their family, training/pipelines.py)
    checkpoint_decode: recompute the decoder in backward instead of storing its activations
    sigmas:       ``(steps, scheduler name) -> σ`` when the model brings its own schedule (diffusers flow pipelines)
    uncond:       ``n -> conditioning`` of the unconditional branch (default: ``encode([""] * n)``)
    """

    def __init__(self, model, encode, decode, latent_shape, model_sigmas=None, flow_shift=None, lora_root=None,
                 device=None, checkpoint_decode=False, lora_key=None, sigmas=None, uncond=None):
        self.model = model
        self._encode, self._decode = encode, decode
        self.latent_shape = tuple(latent_shape)
        self.model_sigmas, self.flow_shift = model_sigmas, flow_shift
        self.flow = flow_shift is not None or bool(getattr(model, "flow", False))
        self.lora_root = lora_root if lora_root is not None else model
        self.device = torch.device(device) if device is not None else _module_device(model)
        self.checkpoint_decode = checkpoint_decode
        if lora_key is not None:
            self.lora_key = lora_key
        self._sigmas, self._encode_uncond = sigmas, uncond
        self._uncond = {}

    def sigmas(self, steps, scheduler):
        if self._sigmas is not None:
            return self._sigmas(steps, scheduler)
        return sigma_schedule(scheduler, steps, self.model_sigmas, self.flow_shift if self.flow else None)

    def encode(self, prompts):
        with torch.no_grad():
            return self._encode(list(prompts))

    def uncond(self, n):
        if n not in self._uncond:      # the empty prompt's conditioning is constant: encode it once per batch size
            if self._encode_uncond is None:
                self._uncond[n] = self.encode([""] * n)
            else:
                with torch.no_grad():
                    self._uncond[n] = self._encode_uncond(n)
        return self._uncond[n]

    def compile_prefix(self, backend="inductor", cuda_graphs=False):
        """Run the denoiser network's calls without grad (the no-grad prefix and evaluation) through a faster copy;
        calls that record gradients stay eager, so the backward pass is the eager one.

        backend:     a torch.compile backend ("inductor"), or None for no compilation
        cuda_graphs: replay those calls from CUDA graphs: with "inductor" its ``reduce-overhead`` mode (compiled
                     kernels, captured), with None the ``cudagraphs`` backend (the eager kernels, captured). Off
                     CUDA there is nothing to capture: a warning, and the calls run as ``backend`` alone gives.
        """
        graphs = bool(cuda_graphs) and self.device.type == "cuda"
        if cuda_graphs and not graphs:
            warnings.warn(f"cuda_graphs is on but the model is on {self.device.type}: the no-grad prefix runs "
                          "without CUDA graphs", stacklevel=2)
        if graphs and backend in (None, "cudagraphs"):
            fast = torch.compile(self.model, backend="cudagraphs", dynamic=False)
        elif graphs:
            if backend != "inductor":
                raise ValueError(f"cuda_graphs works with the 'inductor' backend or none, not {backend!r}")
            fast = torch.compile(self.model, backend=backend, mode="reduce-overhead", dynamic=False)
        elif backend:
            fast = torch.compile(self.model, backend=backend, dynamic=False)
        else:
            self.__dict__.pop("_fast", None)
            return
        self._fast = _NoGradFast(self.model, fast, replays=graphs)

    def denoiser(self, conds, cfg):
        n = _batch_of(conds)
        uncond = self.uncond(n) if cfg != 1.0 else None
        return CFGDenoiser(getattr(self, "_fast", None) or self.model, conds, uncond, cfg)

    def skip(self, sigma):
        """c_skip(σ) of the model's parametrisation (DRTune keeps this path through its stop-gradient)."""
        return skip_coefficient(self.model, sigma)

    def decode(self, x):
        if self.checkpoint_decode and torch.is_grad_enabled():
            return recompute_in_backward(self._decode, x)
        return self._decode(x)

    def add_lora(self, rank, alpha, targets):
        return lora_mod.inject_lora(self.lora_root, rank=rank, alpha=alpha, targets=targets)


class _NoGradFast:
    """Dispatch: the compiled network when autograd is off, the eager one when it records a graph.

    With CUDA graphs (``replays``) every call is a new step for torch's graph trees, and the output is copied out
    of the graph's static buffer, which the next replay overwrites (the runner keeps x̂0 across steps)."""

    def __init__(self, eager, fast, replays=False):
        self.eager, self.fast, self.replays = eager, fast, replays
        self.flow = getattr(eager, "flow", False)

    def __call__(self, x, sigma, **extra):
        if torch.is_grad_enabled():
            return self.eager(x, sigma, **extra)
        if not self.replays:
            return self.fast(x, sigma, **extra)
        torch.compiler.cudagraph_mark_step_begin()
        return self.fast(x, sigma, **extra).clone()


def _module_device(module):
    p = next(iter(module.parameters()), None) if hasattr(module, "parameters") else None
    return p.device if p is not None else torch.device("cpu")


def _batch_of(conds):
    for v in conds.values():
        if isinstance(v, torch.Tensor):
            return v.shape[0]
        if isinstance(v, dict):
            return _batch_of(v)
    raise ValueError("conditioning holds no tensor to read the batch size from")


# --- concrete hosts ---------------------------------------------------------------------------------------------

def tiny_bundle(model=None, device="cpu"):
    """The embedded tiny pixel-space model (``rewardlab.tiny``) as a bundle."""
    if model is None:
        from ..tiny.model import load_tiny
        model = load_tiny(device=device)
    m = model
    denoiser = m.denoiser.to(device)
    shape = (3, m.image_size, m.image_size)          # pixel space: the "latent" is the RGB image in [-1, 1]
    return TorchBundle(denoiser, m.encode, m.decode, shape, model_sigmas=m.model_sigmas, lora_root=m.unet,
                       device=device)
