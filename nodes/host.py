"""The host adapter: the only module that imports ``comfy`` / ``folder_paths`` / ``server``, always lazily.

Outside ComfyUI (tests, the CLI) every function here degrades to a plain-torch equivalent, so node functions
can be called directly in CI.
"""
import importlib
import os

import torch

REWARD_FOLDER = "rewards"


def _optional(module):
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def in_comfyui():
    return _optional("comfy.model_management") is not None


# --- devices and memory -------------------------------------------------------------------------------------

def torch_device():
    mm = _optional("comfy.model_management")
    if mm is not None:
        return mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def intermediate_device():
    mm = _optional("comfy.model_management")
    return mm.intermediate_device() if mm is not None else torch.device("cpu")


def free_memory():
    """Give cached GPU memory back (after training, OOM or cancel)."""
    mm = _optional("comfy.model_management")
    if mm is not None:
        mm.soft_empty_cache(True)
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def throw_if_interrupted():
    """Raise ComfyUI's interrupt exception when the user pressed Cancel (no-op outside ComfyUI)."""
    mm = _optional("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


def interrupted():
    mm = _optional("comfy.model_management")
    return bool(mm is not None and mm.processing_interrupted())


# --- progress ------------------------------------------------------------------------------------------------

class _NullBar:
    def __init__(self, total):
        self.total, self.current = total, 0

    def update(self, n=1):
        self.current += n

    def update_absolute(self, value, total=None, preview=None):
        self.current = value


def progress_bar(total):
    """comfy.utils.ProgressBar (UI progress, previews and Cancel) or a no-op stand-in."""
    utils = _optional("comfy.utils")
    return utils.ProgressBar(total) if utils is not None else _NullBar(total)


def preview_from_image(image_bhwc):
    """A ProgressBar preview tuple ("JPEG", PIL image, max size) from the first image of an IMAGE batch."""
    from PIL import Image

    arr = (image_bhwc[0].detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype("uint8")
    return ("JPEG", Image.fromarray(arr), 512)


# --- folders -------------------------------------------------------------------------------------------------

def register_reward_folder():
    """Register ComfyUI's models/rewards folder (idempotent). Users may add more with extra_model_paths.yaml."""
    fp = _optional("folder_paths")
    if fp is None:
        return None
    path = os.path.join(fp.models_dir, REWARD_FOLDER)
    # extra_model_paths.yaml may have created the key already (with only the user's folders): keep the default too.
    paths, extensions = fp.folder_names_and_paths.get(REWARD_FOLDER, ([], set()))
    if path not in paths:
        paths.append(path)
    fp.folder_names_and_paths[REWARD_FOLDER] = (paths, set(extensions) | set(fp.supported_pt_extensions) | {".json"})
    return path


def reward_folders(extra=None):
    """Directories searched for reward weights: ComfyUI's models/rewards (all registered paths), then
    REWARDLAB_MODELS, then ``extra`` (a user-given folder)."""
    dirs = []
    fp = _optional("folder_paths")
    if fp is not None:
        register_reward_folder()
        dirs += list(fp.get_folder_paths(REWARD_FOLDER))
    if os.environ.get("REWARDLAB_MODELS"):
        dirs.append(os.environ["REWARDLAB_MODELS"])
    if extra:
        dirs.append(extra)
    return dirs


def output_directory():
    """ComfyUI's output folder, or ./rewardlab_out outside ComfyUI. Every file we write lives below this."""
    fp = _optional("folder_paths")
    return fp.get_output_directory() if fp is not None else os.path.abspath("rewardlab_out")


def safe_output_path(subfolder, name, suffix, root=None):
    """A path for ``name`` under root/subfolder that cannot escape root: path separators and '..' are stripped
    from the user's name, and the result is checked against root."""
    root = os.path.abspath(root or output_directory())
    clean = "".join(c if c.isalnum() or c in "-_. " else "_" for c in os.path.basename(str(name).replace("\\", "/")))
    clean = clean.strip(" .") or "rewardlab"
    path = os.path.abspath(os.path.join(root, subfolder, clean + suffix))
    if os.path.commonpath([root, path]) != root:
        raise ValueError(f"refusing to write outside the output folder: {name!r}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


# --- image layout ---------------------------------------------------------------------------------------------

def image_to_bchw(image):
    """ComfyUI IMAGE (B, H, W, C) float in [0, 1] -> (B, C, H, W) float32."""
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an IMAGE batch shaped (B, H, W, C), got {tuple(image.shape)}")
    return image[..., :3].movedim(-1, 1).float()


def bchw_to_image(x):
    """(B, C, H, W) -> ComfyUI IMAGE (B, H, W, C), detached, on the intermediate device."""
    return x.detach().movedim(1, -1).clamp(0, 1).float().to(intermediate_device())


# --- sampling choices ---------------------------------------------------------------------------------------------

def scheduler_names():
    """ComfyUI's scheduler names (for node dropdowns), or the core's outside ComfyUI."""
    samplers = _optional("comfy.samplers")
    if samplers is not None:
        return list(samplers.SCHEDULER_NAMES)
    from ..samplers.schedules import SCHEDULER_NAMES
    return list(SCHEDULER_NAMES)


# --- server routes --------------------------------------------------------------------------------------------

def prompt_server_routes():
    """ComfyUI's ``PromptServer.instance.routes`` (an aiohttp RouteTableDef) inside a running server, else None
    (tests, the CLI): callers register routes only when this is not None."""
    server = _optional("server") if in_comfyui() else None
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    return getattr(instance, "routes", None)


def prepare_noise(samples, seed):
    """The initial noise stock RandomNoise(seed) / KSampler give for a latent tensor (CPU), or plain torch.randn
    from a seeded generator outside ComfyUI."""
    sample = _optional("comfy.sample")
    if sample is not None:
        return sample.prepare_noise(samples, seed)
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(samples.shape, generator=g, dtype=torch.float32)
