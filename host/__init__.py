"""The host wing: everything that touches ComfyUI lives here, and only here (docs/architecture.md).

    services.py   devices, memory, progress and Cancel, folders, image layout (the core's runtime, answered by ComfyUI)
    models.py     facts about a MODEL: prediction kind, σ range and schedule, latent shape
    grad.py       grad-ready clones (weight wrappers), LoRA adapters as wrappers, loading and releasing
    bridge.py     the one guider bridge: RunnerSampler and run_in_guider
    vae.py        differentiable VAE decode
    noise.py      NOISE objects and the noise methods' ComfyUI plumbing
    bundle.py     the ComfyUI model bundle for the DRaFT trainer
    guidance.py   the Scheduled Guider and the guidance MODEL patch
    routes.py     HTTP routes on ComfyUI's server

comfy is imported lazily inside functions, so the pack imports (and CI tests it) without ComfyUI. Loading the wing
makes the core ask ComfyUI for devices, folders, progress and Cancel (runtime.install).
"""
from .. import runtime
from .services import ComfyRuntime

runtime.install(ComfyRuntime())
