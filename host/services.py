"""ComfyUI's environment services: devices, memory, progress and Cancel, folders, image layout.

``ComfyRuntime`` is the host side of the core's small runtime protocol (runtime.py): the core asks
``runtime.current()`` and, inside ComfyUI, gets ComfyUI's device, folders, progress bar and Cancel button. Every
method degrades to the plain runtime when ``comfy`` cannot be imported, so node functions run in CI too.
comfy is imported lazily, inside functions (see docs/comfyui.md).
"""
import importlib
import os

import torch

from .. import runtime

REWARD_FOLDER = "rewards"
_MANAGED = {}          # id(reward model) -> its ModelPatcher


class _Holder(torch.nn.Module):
    """The module a reward's ModelPatcher manages: ComfyUI stores its bookkeeping on it, moving it moves the reward."""

    def __init__(self, reward):
        super().__init__()
        self.reward = reward


def optional(module):
    """The module, or None when it cannot be imported (outside ComfyUI)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def in_comfyui():
    return optional("comfy.model_management") is not None


class ComfyRuntime(runtime.Runtime):
    """runtime.Runtime answered by ComfyUI: model_management, ProgressBar, folder_paths."""

    def device(self):
        mm = optional("comfy.model_management")
        return mm.get_torch_device() if mm is not None else super().device()

    def free_memory(self):
        mm = optional("comfy.model_management")
        if mm is not None:
            mm.soft_empty_cache(True)
        else:
            super().free_memory()

    def interrupted(self):
        mm = optional("comfy.model_management")
        return bool(mm is not None and mm.processing_interrupted())

    def check_interrupt(self):
        """ComfyUI's own interrupt exception, so a cancelled node ends as "interrupted" in the UI."""
        mm = optional("comfy.model_management")
        if mm is not None:
            mm.throw_exception_if_processing_interrupted()
        else:
            super().check_interrupt()

    def progress(self, total):
        """comfy.utils.ProgressBar: UI progress, previews, and Cancel (its update raises the interrupt)."""
        utils = optional("comfy.utils")
        return utils.ProgressBar(total) if utils is not None else super().progress(total)

    def manage(self, module):
        """A ModelPatcher around the reward model, so comfy.model_management can offload it to load a large
        diffusion model (and the reverse); ComfyUI's "free memory" and Unload Reward Models release it."""
        mm = optional("comfy.model_management")
        if mm is None or id(module) in _MANAGED or not any(True for _ in module.parameters()):
            return                    # weight-free rewards need no memory management
        import comfy.model_patcher
        holder = _Holder(module)      # ModelPatcher sets attributes such as ``device`` on the module it manages
        device = next(iter(module.parameters()), torch.empty(0)).device
        _MANAGED[id(module)] = comfy.model_patcher.ModelPatcher(holder, load_device=device,
                                                                 offload_device=mm.unet_offload_device())
        self.use(module)

    def use(self, module):
        patcher = _MANAGED.get(id(module))
        if patcher is not None:
            # moved outside inference mode, so the weights stay normal tensors a backward pass can save
            with torch.inference_mode(False):
                optional("comfy.model_management").load_models_gpu([patcher], force_full_load=True)

    def forget(self, module):
        patcher = _MANAGED.pop(id(module), None)
        mm = optional("comfy.model_management")
        if patcher is not None and mm is not None:
            for i in reversed(range(len(mm.current_loaded_models))):
                if mm.current_loaded_models[i].model is patcher:
                    mm.current_loaded_models.pop(i).model_unload()

    def reward_folders(self):
        """ComfyUI's models/rewards (every registered path), then $REWARDLAB_MODELS."""
        fp = optional("folder_paths")
        dirs = []
        if fp is not None:
            register_reward_folder()
            dirs += list(fp.get_folder_paths(REWARD_FOLDER))
        return dirs + super().reward_folders()

    def output_directory(self):
        fp = optional("folder_paths")
        return fp.get_output_directory() if fp is not None else super().output_directory()


def managed_patchers():
    """The ModelPatchers of the reward models handed to ComfyUI's memory manager."""
    return list(_MANAGED.values())


def resolve_device(policy):
    """A device choice of a node ("auto": ComfyUI's device, "gpu": require one, "cpu") as a torch.device."""
    if policy == "cpu":
        return torch.device("cpu")
    device = runtime.current().device()
    if policy == "gpu" and device.type == "cpu":
        raise RuntimeError("device 'gpu' was requested but no GPU is available; choose 'auto' or 'cpu'.")
    return device


def auto_dtype(device):
    """Reduced precision on CUDA (bf16 where supported), fp32 elsewhere."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def intermediate_device():
    mm = optional("comfy.model_management")
    return mm.intermediate_device() if mm is not None else torch.device("cpu")


def register_reward_folder():
    """Register ComfyUI's models/rewards folder (idempotent). Users may add more with extra_model_paths.yaml."""
    fp = optional("folder_paths")
    if fp is None:
        return None
    path = os.path.join(fp.models_dir, REWARD_FOLDER)
    # extra_model_paths.yaml may have created the key already (with only the user's folders): keep the default too.
    paths, extensions = fp.folder_names_and_paths.get(REWARD_FOLDER, ([], set()))
    if path not in paths:
        paths.append(path)
    fp.folder_names_and_paths[REWARD_FOLDER] = (paths, set(extensions) | set(fp.supported_pt_extensions) | {".json"})
    return path


# --- progress with previews -------------------------------------------------------------------------------------

def preview_from_image(image_bhwc):
    """A ProgressBar preview tuple ("JPEG", PIL image, max size) from the first image of an IMAGE batch."""
    from PIL import Image

    arr = (image_bhwc[0].detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype("uint8")
    return ("JPEG", Image.fromarray(arr), 512)


def best_image_progress(total, key):
    """A callback for noise methods: advances a ProgressBar to ``info[key]`` with the current best image as preview.
    Once Cancel was pressed it stops updating (the bar's update would raise the interrupt, and the method returns
    its best result so far instead)."""
    bar = runtime.current().progress(total)

    def update(info):
        if not runtime.current().interrupted():
            bar.update_absolute(min(info[key], total), total, preview_from_image(bchw_to_image(info["best_images"])))
    return update


# --- image layout ---------------------------------------------------------------------------------------------

def image_to_bchw(image):
    """ComfyUI IMAGE (B, H, W, C) float in [0, 1] -> (B, C, H, W) float32."""
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an IMAGE batch shaped (B, H, W, C), got {tuple(image.shape)}")
    if image.shape[0] == 0:
        raise ValueError("the IMAGE batch is empty: connect a node that outputs at least one image")
    return image[..., :3].movedim(-1, 1).float()


def bchw_to_image(x):
    """(B, C, H, W) -> ComfyUI IMAGE (B, H, W, C), detached, on the intermediate device."""
    return x.detach().movedim(1, -1).clamp(0, 1).float().to(intermediate_device())


# --- sampling choices and noise ----------------------------------------------------------------------------------

def scheduler_names():
    """ComfyUI's scheduler names (the core's outside ComfyUI) plus "align_your_steps", for node dropdowns."""
    from .models import AYS_SCHEDULER
    samplers = optional("comfy.samplers")
    if samplers is not None:
        return [*samplers.SCHEDULER_NAMES, AYS_SCHEDULER]
    from ..samplers.sigmas import SCHEDULER_NAMES
    return [*SCHEDULER_NAMES, AYS_SCHEDULER]


def prepare_noise(samples, seed):
    """The initial noise stock RandomNoise(seed) / KSampler give for a latent tensor (CPU), or plain torch.randn
    from a seeded generator outside ComfyUI."""
    sample = optional("comfy.sample")
    if sample is not None:
        return sample.prepare_noise(samples, seed)
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(samples.shape, generator=g, dtype=torch.float32)


# --- server -----------------------------------------------------------------------------------------------------

def prompt_server_routes():
    """ComfyUI's ``PromptServer.instance.routes`` (an aiohttp RouteTableDef) inside a running server, else None
    (tests, the CLI): callers register routes only when this is not None."""
    server = optional("server") if in_comfyui() else None
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    return getattr(instance, "routes", None)
