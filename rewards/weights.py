"""Safe weight loading with errors that name the model and the expected layout.

safetensors files are read with safetensors; .pt/.pth/.bin/.ckpt only with ``torch.load(weights_only=True)``, which
refuses pickles that would construct arbitrary objects or run code.
"""
import contextlib
import logging
import os
import pickle
import re

import torch

PICKLE_EXTS = (".pt", ".pth", ".bin", ".ckpt")
SAFE_EXTS = (".safetensors",)


class RewardWeightsError(RuntimeError):
    """A weight file is missing, unreadable, unsafe, or does not match the model it is loaded into."""


def read_state_dict(path, model="reward", layout=""):
    """A flat {key: tensor} dict from ``path``; unwraps {'state_dict': ...} and strips DataParallel 'module.'."""
    hint = f" Expected layout: {layout}" if layout else ""
    ext = os.path.splitext(path)[1].lower()
    if not os.path.isfile(path):
        raise RewardWeightsError(f"{model}: weight file not found: {path}.{hint}")
    if ext in SAFE_EXTS:
        from safetensors.torch import load_file
        try:
            state = load_file(path, device="cpu")
        except Exception as e:
            raise RewardWeightsError(f"{model}: {path} is not a readable safetensors file ({e}).{hint}") from e
    elif ext in PICKLE_EXTS:
        state = _torch_load_safely(path, model, hint)
    else:
        raise RewardWeightsError(f"{model}: unsupported weight file {path}; use .safetensors (preferred) or "
                                 f"a .pt/.pth state dict.{hint}")
    return _flatten(state, path, model, hint)


def pickle_global(message):
    """The class or function a refused pickle asked for (e.g. '__main__.Net'), read from torch's weights_only
    message with its terminal colour codes removed; None when it names none."""
    match = re.search(r"GLOBAL ([\w.]+)", re.sub(r"\x1b\[[0-9;]*m", "", str(message)))
    return match.group(1) if match else None


def _torch_load_safely(path, model, hint):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        needs = pickle_global(e)
        what = f"needs the Python class or function {needs!r} to load" if needs else "holds Python objects"
        raise RewardWeightsError(
            f"{model}: refused to load {path}: it is a pickle that {what}, and loading it would run code from the "
            f"file. Only plain tensor state dicts are accepted: convert the file once, in a trusted environment, to "
            f".safetensors (safetensors.torch.save_file(model.state_dict(), ...)).{hint}") from None
    except Exception as e:
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise RewardWeightsError(f"{model}: {path} is not a readable PyTorch checkpoint ({type(e).__name__}: "
                                 f"{first}).{hint}") from None


def _flatten(state, path, model, hint):
    while isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise RewardWeightsError(f"{model}: {path} holds {type(state).__name__}, not a state dict of tensors.{hint}")
    bad = [k for k, v in state.items() if not torch.is_tensor(v)]
    if bad:
        raise RewardWeightsError(f"{model}: {path} has non-tensor entries {bad[:5]}; expected a state dict of tensors.{hint}")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


_LAYOUTS = (   # (key prefixes, what a file with them holds)
    (("vision_model.", "text_model."), "a transformers (Hugging Face) CLIPModel: vision_model.* / text_model.* keys"),
    (("visual.", "transformer.", "token_embedding."), "an open_clip CLIP state dict: visual.* / transformer.* keys"),
    (("blip.",), "an ImageReward (BLIP) state dict: blip.* keys"),
    (("model.diffusion_model.", "first_stage_model.", "cond_stage_model."), "a Stable Diffusion checkpoint"),
    (("lora_unet_", "lora_te"), "a LoRA"),
)


def describe_layout(keys):
    """What kind of file a state dict's keys look like ('a transformers CLIPModel: ...'), or None."""
    keys = list(keys)
    for prefixes, what in _LAYOUTS:
        if sum(k.startswith(prefixes) for k in keys) > len(keys) // 2:
            return what
    if any(k.endswith((".lora_up.weight", ".lora_down.weight")) for k in keys):
        return "a LoRA"
    return None


def describe_keys(module, limit=6):
    """'key (shape), ...' for the first ``limit`` entries of a module's state dict: the layout a file must have."""
    items = list(module.state_dict().items())
    text = ", ".join(f"{k} {tuple(v.shape)}" for k, v in items[:limit])
    return text + (f", ... ({len(items)} tensors)" if len(items) > limit else "")


def load_into(module, state, model="reward", path="", layout=""):
    """Strictly load ``state`` into ``module`` (casting dtype); a key or shape mismatch raises RewardWeightsError
    that lists what differs and the keys the model expects."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:4]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:4]})")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (e.g. {wrong[:3]})")
        where = f" in {path}" if path else ""
        layout_of_file = describe_layout(state)
        if layout_of_file and missing and len(missing) == len(expected):
            parts.insert(0, f"the file holds {layout_of_file}")
        raise RewardWeightsError(
            f"{model}: the weights{where} do not match the model: {'; '.join(parts)}. "
            f"Is this the right file for {model!r}? {('Expected layout: ' + layout + '. ') if layout else ''}"
            f"Expected keys: {describe_keys(module)}")
    module.load_state_dict(state, strict=True)
    return module


_INIT_FUNCTIONS = ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                   "xavier_normal_", "orthogonal_", "constant_", "ones_", "zeros_")


class _DropRandomInitNotice(logging.Filter):
    def filter(self, record):
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def weights_follow():
    """Silence open_clip's "No pretrained weights loaded ... Model initialized randomly" while a model is built
    whose weights a strict ``load_into`` loads right after (the notice would be false). Other records pass."""
    notice = _DropRandomInitNotice()
    root = logging.getLogger()
    root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)


@contextlib.contextmanager
def skip_init():
    """Build modules without random initialisation (torch.nn.init.* become no-ops): for models whose every
    parameter is then overwritten by a strict ``load_into``. A ViT-H-14 builds in ~7 s instead of ~40 s on CPU."""
    saved = {n: getattr(torch.nn.init, n) for n in _INIT_FUNCTIONS}
    try:
        for n in _INIT_FUNCTIONS:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)
