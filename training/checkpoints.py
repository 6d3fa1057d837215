"""Atomic training checkpoints: the LoRA in ComfyUI's key format plus a small state file beside it.

    <dir>/<name>.safetensors      the LoRA (what LoraLoader / Apply Reward LoRA read)
    <dir>/<name>.state.pt         optimiser state, step, log, RNG bookkeeping (torch.load(weights_only=True))

Both are written to a temporary file in the same folder and moved into place with ``os.replace``, so a crash
or a cancel mid-write never leaves a half-written checkpoint: the previous one stays valid.
"""
import os
import tempfile

import torch

from ..runtime import safe_output_path

STATE_SUFFIX = ".state.pt"


def _atomic(path, write):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_lora_file(lora_sd, path, metadata=None):
    """Write a LoRA state dict as safetensors, atomically."""
    from safetensors.torch import save_file

    sd = {k: v.detach().to("cpu").contiguous() for k, v in lora_sd.items()}
    _atomic(path, lambda tmp: save_file(sd, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()}))


def load_lora_file(path):
    from safetensors.torch import load_file

    return load_file(path)


def state_path(lora_path):
    return os.path.splitext(lora_path)[0] + STATE_SUFFIX


def save_checkpoint(lora_sd, state, lora_path, metadata=None):
    """The state file first, then the LoRA: a LoRA on disk always has a state at least as new beside it."""
    _atomic(state_path(lora_path), lambda tmp: torch.save(state, tmp))
    save_lora_file(lora_sd, lora_path, metadata)


def load_checkpoint(lora_path):
    """(lora_sd, state) of a checkpoint written by ``save_checkpoint``; state is None for a bare LoRA file."""
    sd = load_lora_file(lora_path)
    sp = state_path(lora_path)
    state = torch.load(sp, map_location="cpu", weights_only=True) if os.path.exists(sp) else None
    return sd, state


def output_lora_path(name, root=None, subfolder="loras"):
    """<output>/loras/<name>.safetensors for a user-given name, which cannot escape the output folder
    ('../x' becomes 'x'). Inside ComfyUI <output> is its output directory, so LoraLoader lists the file."""
    name = str(name)
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    return safe_output_path(subfolder, name, ".safetensors", root=root)
