"""One registry of reward models: each entry is data (a RewardSpec) plus one loader function.

A loader is ``fn(name, config, files) -> Reward``: it builds the model from ``config`` on the CPU in fp32 and
loads the weight ``files`` ({role: path}). It is named by a string "module:function" relative to this package,
so nothing heavy is imported until a model is actually loaded. ``load_reward`` resolves the files (local
folders first, Hugging Face only when explicitly allowed), builds under ``torch.inference_mode(False)`` (ComfyUI
runs nodes in inference mode, whose tensors cannot be saved for backward), moves to device/dtype, freezes, caches.
"""
import importlib
import logging
import os
from dataclasses import dataclass, field

import torch

from .. import runtime

log = logging.getLogger("rewardlab")


@dataclass(frozen=True)
class WeightFile:
    role: str                      # the key the loader receives, e.g. "weights", "clip", "head"
    names: tuple                   # accepted file names, safetensors first; found in a reward folder or its <model>/ subfolder
    layout: str = ""               # what the file must contain (shown in errors)
    hf: tuple = None               # (repo_id, filename) for the explicit, user-enabled download
    url: str = ""                  # where to get it by hand


@dataclass(frozen=True)
class RewardSpec:
    name: str
    loader: str                    # "module:function" inside rewardlab.rewards
    config: dict = field(default_factory=dict)
    files: tuple = ()
    description: str = ""
    licence: str = ""


_SPECS = {}
_CACHE = {}


def register(spec):
    """Add or replace a registry entry (tests register tiny configs this way)."""
    _SPECS[spec.name] = spec
    return spec


def list_rewards(weight_free=None):
    """Registered names; ``weight_free=True/False`` filters on whether the model needs weight files."""
    return [n for n, s in _SPECS.items() if weight_free is None or (not s.files) == weight_free]


def get_spec(name):
    if name not in _SPECS:
        raise ValueError(f"unknown reward model {name!r}; available: {', '.join(_SPECS)}")
    return _SPECS[name]


# --- weight files ------------------------------------------------------------------------------------------

def find_file(spec, wf, folders):
    """First existing file: each accepted name in a folder or its <model>/ subfolder; the Hugging Face file name
    (often generic, e.g. open_clip_model.safetensors) only in the <model>/ subfolder, where downloads go."""
    for folder in folders:
        candidates = [os.path.join(d, n) for n in wf.names for d in (folder, os.path.join(folder, spec.name))]
        if wf.hf:
            candidates.append(os.path.join(folder, spec.name, wf.hf[1]))
        for path in candidates:
            if os.path.isfile(path):
                return path
    return None


def resolve_files(name, folder=None, allow_download=False):
    """{role: path} for every weight file of ``name``: local reward folders first (ComfyUI models/rewards,
    $REWARDLAB_MODELS, then ``folder``); the Hugging Face hub only when ``allow_download`` is True."""
    spec = get_spec(name)
    folders = runtime.current().reward_folders() + ([folder] if folder else [])
    files = {}
    for wf in spec.files:
        path = find_file(spec, wf, folders)
        if path is None and allow_download and wf.hf:
            path = _download(spec, wf, folders)
        if path is None:
            raise FileNotFoundError(_missing_message(spec, wf, folders, allow_download))
        files[wf.role] = path
    return files


def _missing_message(spec, wf, folders, allow_download):
    where = ", ".join(folders) if folders else "(no folder: pass one, set REWARDLAB_MODELS, or run inside ComfyUI)"
    msg = (f"reward {spec.name!r}: no {wf.role} weights found. Put one of {list(wf.names)} in a reward folder "
           f"or its '{spec.name}/' subfolder. Searched: {where}.")
    if wf.layout:
        msg += f" Expected: {wf.layout}."
    if wf.hf:
        msg += f" Source: huggingface.co/{wf.hf[0]} file {wf.hf[1]} (also accepted as '{spec.name}/{wf.hf[1]}')"
        msg += "." if allow_download else " (or enable 'allow download' to fetch it)."
    if wf.url:
        msg += f" Manual download: {wf.url}"
    return msg


def _download(spec, wf, folders):
    from huggingface_hub import hf_hub_download

    repo, filename = wf.hf
    target = os.path.join(folders[0], spec.name) if folders else None
    log.warning("RewardLab: downloading %s for reward %r from huggingface.co/%s into %s (downloads were enabled by the user)",
                filename, spec.name, repo, target or "the Hugging Face cache")
    return hf_hub_download(repo, filename, local_dir=target)


# --- building and caching -------------------------------------------------------------------------------------

def _loader(spec):
    module, _, function = spec.loader.partition(":")
    return getattr(importlib.import_module(f".{module}", __package__), function)


def build_reward(name, files=None, config=None, device="cpu", dtype=torch.float32):
    """Build ``name`` from its spec (config updated with ``config``) and the given files, uncached."""
    spec = get_spec(name)
    merged = {**spec.config, **(config or {})}
    with torch.inference_mode(False):
        reward = _loader(spec)(name, merged, files or {})
        reward.name = name
        reward = reward.to(device=device, dtype=dtype).freeze()
    return reward


def load_reward(name, device=None, dtype=torch.float32, folder=None, allow_download=False, config=None):
    """The cached reward model ``name`` on ``device`` in ``dtype`` (keyed by name, device, dtype, files, config)."""
    device = torch.device(device) if device is not None else runtime.current().device()
    files = resolve_files(name, folder, allow_download)
    key = (name, str(device), str(dtype), tuple(sorted(files.items())), tuple(sorted((config or {}).items())))
    if key not in _CACHE:
        _CACHE[key] = build_reward(name, files, config, device, dtype)
        runtime.current().manage(_CACHE[key])
    return _CACHE[key]


def cached():
    return [(k[0], k[1], k[2]) for k in _CACHE]


def unload(name=None):
    """Drop cached models (all, or those called ``name``) and return how many were dropped."""
    keys = [k for k in _CACHE if name is None or k[0] == name]
    for k in keys:
        runtime.current().forget(_CACHE.pop(k))
    if keys:
        runtime.current().free_memory()
    return len(keys)


# --- the entries ----------------------------------------------------------------------------------------------

_CLIP_L = WeightFile(
    "clip", ("ViT-L-14-quickgelu-openai.safetensors", "open_clip_vit_l_14_openai.safetensors", "ViT-L-14-openai.safetensors"),
    layout="open_clip ViT-L-14 (OpenAI, QuickGELU) state dict: visual.conv1.weight (1024, 3, 14, 14), visual.proj (1024, 768), ...",
    hf=("timm/vit_large_patch14_clip_224.openai", "open_clip_model.safetensors"))
_AESTHETIC_URL = "https://github.com/christophschuhmann/improved-aesthetic-predictor (Apache-2.0)"

for _spec in (
    RewardSpec("aesthetic-v2", "clip_models:load_aesthetic", {"clip_model": "ViT-L-14-quickgelu", "head": "mlp"},
               (_CLIP_L, WeightFile("head", ("sac+logos+ava1-l14-linearMSE.safetensors", "sac+logos+ava1-l14-linearMSE.pth"),
                                    layout="MLP head: layers.{0,2,4,6,7}.{weight,bias}, layers.0.weight (1024, 768)",
                                    url=_AESTHETIC_URL)),
               "LAION improved aesthetic predictor (v2): MLP on the normalised CLIP ViT-L/14 image embedding; ~1-10 scale.",
               "Apache-2.0 head, MIT CLIP"),
    RewardSpec("aesthetic-v1", "clip_models:load_aesthetic", {"clip_model": "ViT-L-14-quickgelu", "head": "linear"},
               (_CLIP_L, WeightFile("head", ("sa_0_4_vit_l_14_linear.safetensors", "sa_0_4_vit_l_14_linear.pth"),
                                    layout="Linear(768, 1): weight (1, 768), bias (1,)",
                                    url="https://github.com/LAION-AI/aesthetic-predictor (MIT)")),
               "LAION aesthetic predictor v1: linear head on the normalised CLIP ViT-L/14 image embedding.", "MIT"),
    RewardSpec("hps-v2.1", "clip_models:load_hps", {"clip_model": "ViT-H-14"},
               (WeightFile("weights", ("HPS_v2.1_compressed.safetensors", "HPS_v2.1_compressed.pt"),
                           layout="{'state_dict': open_clip ViT-H-14 state dict} (fp16)", hf=("xswu/HPSv2", "HPS_v2.1_compressed.pt")),),
               "Human Preference Score v2.1: cosine of open_clip ViT-H-14 image and text embeddings; ~0.25-0.30.", "Apache-2.0"),
    RewardSpec("hps-v2", "clip_models:load_hps", {"clip_model": "ViT-H-14"},
               (WeightFile("weights", ("HPS_v2_compressed.safetensors", "HPS_v2_compressed.pt"),
                           layout="{'state_dict': open_clip ViT-H-14 state dict} (fp16)", hf=("xswu/HPSv2", "HPS_v2_compressed.pt")),),
               "Human Preference Score v2.0 (scores are not comparable with v2.1).", "Apache-2.0"),
    RewardSpec("clipscore-vit-h-14", "clip_models:load_clipscore", {"clip_model": "ViT-H-14", "scale": "logit_scale"},
               (WeightFile("weights", ("CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", "open_clip_vit_h_14_laion2b.safetensors"),
                           layout="open_clip ViT-H-14 state dict", hf=("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "open_clip_model.safetensors")),),
               "CLIP score, logit_scale.exp() * cosine with LAION CLIP ViT-H-14 (ReNO's CLIP reward).", "MIT"),
    RewardSpec("clipscore-vit-l-14", "clip_models:load_clipscore", {"clip_model": "ViT-L-14-quickgelu", "scale": 100.0},
               (_CLIP_L,), "CLIP score, 100 * cosine with OpenAI CLIP ViT-L/14 (torchmetrics convention, without the clamp).", "MIT"),
    # Loaders for these two live in imagereward.py / pickscore.py.
    RewardSpec("imagereward", "imagereward:load", {},
               (WeightFile("weights", ("ImageReward.safetensors", "ImageReward.pt"),
                           layout="flat state dict: blip.visual_encoder.*, blip.text_encoder.*, mlp.layers.*",
                           hf=("THUDM/ImageReward", "ImageReward.pt")),),
               "ImageReward v1.0 (BLIP ViT-L/16 + BERT cross-attention), standardised score ~-2..2.", "Apache-2.0"),
    RewardSpec("pickscore", "pickscore:load", {},
               (WeightFile("weights", ("PickScore_v1.safetensors",),
                           layout="transformers CLIPModel (CLIP-H) state dict", hf=("yuvalkirstain/PickScore_v1", "model.safetensors")),),
               "PickScore v1: logit_scale.exp() * cosine with a CLIP-H fine-tuned on Pick-a-Pic; ~20-23.", "code MIT, weights unstated"),
    # Weight-free rewards (simple.py).
    RewardSpec("saturation", "simple:build", {"kind": "saturation"}, description="Mean HSV saturation."),
    RewardSpec("brightness", "simple:build", {"kind": "brightness"}, description="Mean Rec.601 luma (or -|luma - target|)."),
    RewardSpec("colourfulness", "simple:build", {"kind": "colourfulness"}, description="Hasler-Suesstrunk colourfulness."),
    RewardSpec("target-colour", "simple:build", {"kind": "target_colour"}, description="Closeness of pixels to a target RGB colour."),
    RewardSpec("target-hue", "simple:build", {"kind": "target_hue"}, description="Chroma projected on a target hue direction."),
    RewardSpec("sharpness", "simple:build", {"kind": "sharpness"}, description="Variance of the luma Laplacian."),
    RewardSpec("jpeg-compressibility", "simple:build", {"kind": "compressibility"},
               description="Differentiable JPEG-size proxy (8x8 DCT coefficient bit cost), negated."),
    RewardSpec("jpeg-incompressibility", "simple:build", {"kind": "incompressibility"},
               description="Differentiable JPEG-size proxy (8x8 DCT coefficient bit cost)."),
):
    register(_spec)
