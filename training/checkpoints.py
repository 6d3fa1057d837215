"""Training checkpoints: the LoRA in ComfyUI's key format, and the training state kept where LoRA loaders never look.

    <root>/<lora folder>/<name>.safetensors     the LoRA (what LoraLoader / Apply Reward LoRA read)
    <root>/rewardlab_state/<name>.state.pt      optimiser state, step, log, settings and a copy of the LoRA weights
                                                (read with torch.load(weights_only=True))

Inside ComfyUI <root> is the output folder and the LoRA folder is ``loras``, so output/loras holds LoRAs only (a
stock LoraLoader lists every .pt there too). The command line writes both below its ``--out`` folder. State files
of older versions, written beside the LoRA, are moved into ``rewardlab_state/`` (``move_legacy_states``).

Every file is written to a temporary ``.part`` file in the same folder (an extension no loader lists), flushed to
disk, and moved into place with ``os.replace``; a crash or a cancel mid-write leaves the previous checkpoint valid.
The state holds its own copy of the LoRA weights, so a resume is exact even if a crash fell between the two files.
"""
import logging
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass

import torch

from ..rewards.weights import pickle_global
from ..runtime import check_output_name, current

LORA_SUFFIX = ".safetensors"
STATE_SUFFIX = ".state.pt"
STATE_FOLDER = "rewardlab_state"
MAX_NUMBERED = 99999

log = logging.getLogger("rewardlab")


# --- writing ------------------------------------------------------------------------------------------------------

def _fsync_path(path, directory=False):
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:                     # e.g. directories cannot be opened on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write):
    """``write(tmp_path)``, then flush it to disk and move it onto ``path`` (never a half-written ``path``)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".part", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        _fsync_path(tmp)
        os.replace(tmp, path)
        _fsync_path(folder, directory=True)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path, text):
    """``atomic_write`` for a text file (UTF-8): logs, summaries, reports."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def save_lora_file(lora_sd, path, metadata=None):
    """Write a LoRA state dict as safetensors, atomically."""
    from safetensors.torch import save_file

    sd = {k: v.detach().to("cpu").contiguous() for k, v in lora_sd.items()}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()}))


def load_lora_file(path):
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as e:
        detail = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{path} is not a readable LoRA .safetensors file ({type(e).__name__}: {detail}); choose "
                         f"another name or delete the file") from None


def default_state_path(lora_path):
    """<folder of the LoRA>/rewardlab_state/<stem>.state.pt: for a LoRA folder of its own (the command line).
    Hosts whose LoRA folder a loader lists pass the state path explicitly (see ``RunFiles``)."""
    folder, base = os.path.split(os.path.abspath(lora_path))
    return os.path.join(folder, STATE_FOLDER, _stem(base) + STATE_SUFFIX)


def legacy_state_path(lora_path):
    """Where versions before rewardlab_state/ wrote the state: beside the LoRA."""
    return os.path.join(os.path.dirname(os.path.abspath(lora_path)), _stem(os.path.basename(lora_path)) + STATE_SUFFIX)


def _stem(base):
    return base[: -len(LORA_SUFFIX)] if base.endswith(LORA_SUFFIX) else os.path.splitext(base)[0]


def save_checkpoint(lora_sd, state, lora_path, metadata=None, state_path=None):
    """The state first, then the LoRA: the state on disk is always at least as new as the LoRA beside it."""
    atomic_write(state_path or default_state_path(lora_path), lambda tmp: torch.save(state, tmp))
    save_lora_file(lora_sd, lora_path, metadata)


def cpu_copy(obj):
    """A copy of nested dicts / lists / tuples whose tensors are detached CPU clones (a snapshot that later
    in-place optimiser updates do not change)."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


# --- reading ------------------------------------------------------------------------------------------------------

def load_state(path):
    """A training state written by ``save_checkpoint``, loaded with weights_only=True. Anything else is a
    ValueError that says what the file is and what to do; torch's own advice to turn weights_only off never
    reaches the user."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        needs = pickle_global(e)
        what = f"needs {needs!r} (Python code) to load" if needs else "holds objects other than plain tensors"
        raise ValueError(f"refused to load the training state {path}: it {what}, which is unsafe, so it is not a "
                         f"RewardLab state file. Delete or move it, or train under a new name.") from None
    except Exception as e:
        raise ValueError(f"the training state {path} is not readable ({type(e).__name__}); delete or move it to "
                         f"restart from the LoRA alone, or train under a new name.") from None
    if not isinstance(state, dict) or "step" not in state or "optimizer" not in state:
        raise ValueError(f"{path} is not a RewardLab training state (no step / optimizer entries); delete or move it, "
                         f"or train under a new name.")
    return state


def find_state(lora_path, state_path=None):
    """The state file of a LoRA, moving one written by an older version from beside the LoRA into rewardlab_state/
    first. None when the LoRA has no state (a bare LoRA file)."""
    state_path = state_path or default_state_path(lora_path)
    legacy = legacy_state_path(lora_path)
    if not os.path.exists(state_path) and os.path.exists(legacy):
        _move(legacy, state_path)
    return state_path if os.path.exists(state_path) else None


def load_checkpoint(lora_path, state_path=None):
    """(lora_sd, state) of a checkpoint written by ``save_checkpoint``; state is None for a bare LoRA file."""
    found = find_state(lora_path, state_path)
    return load_lora_file(lora_path), (load_state(found) if found else None)


def _move(src, dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.move(src, dst)
    log.info("RewardLab: moved training state %s to %s (LoRA loaders list every .pt in a LoRA folder)", src, dst)


def move_legacy_states(lora_folder, state_folder):
    """Move every ``<x>.state.pt`` that lies beside ``<x>.safetensors`` below ``lora_folder`` (where older versions
    wrote it) to ``state_folder``, keeping subfolders. Returns the moved destination paths."""
    moved = []
    if not os.path.isdir(lora_folder):
        return moved
    for folder, _, files in os.walk(lora_folder):
        for f in files:
            if f.endswith(STATE_SUFFIX) and f[: -len(STATE_SUFFIX)] + LORA_SUFFIX in files:
                rel = os.path.relpath(os.path.join(folder, f), lora_folder)
                dst = os.path.join(state_folder, rel)
                if not os.path.exists(dst):
                    _move(os.path.join(folder, f), dst)
                    moved.append(dst)
    return moved


# --- where a run's files go -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunFiles:
    """The files of one named LoRA: <root>/<lora_folder>/<name>.safetensors and <root>/rewardlab_state/<name>.state.pt.
    ``name`` has passed ``runtime.check_output_name`` (subfolders allowed, never '..')."""
    root: str
    name: str
    lora_folder: str = "loras"

    @property
    def lora(self):
        return os.path.join(self.root, self.lora_folder, *self.name.split("/")) + LORA_SUFFIX

    @property
    def state(self):
        return os.path.join(self.root, STATE_FOLDER, *self.name.split("/")) + STATE_SUFFIX

    @property
    def listed_name(self):
        """The name a LoRA loader shows for it (relative to the LoRA folder)."""
        return self.name + LORA_SUFFIX

    def taken(self):
        """True when a LoRA or a training state of this name exists (in either state location)."""
        return any(os.path.exists(p) for p in (self.lora, self.state, legacy_state_path(self.lora)))

    def numbered(self, n):
        return RunFiles(self.root, f"{self.name}_{n:05d}", self.lora_folder)

    def next_free(self):
        """This name if it is free, else the first free ``<name>_00001``, ``<name>_00002``, ... (as SaveImage
        numbers its files)."""
        if not self.taken():
            return self
        for n in range(1, MAX_NUMBERED + 1):
            candidate = self.numbered(n)
            if not candidate.taken():
                return candidate
        raise ValueError(f"all {MAX_NUMBERED} numbered names of {self.name!r} are taken: choose another name")

    def remove_state(self):
        """Delete this name's training state (it would describe a LoRA that is being replaced)."""
        for p in (self.state, legacy_state_path(self.lora)):
            if os.path.exists(p):
                os.remove(p)

    def prepare(self):
        """Check both paths stay inside root and create the LoRA's folder (the state's is made when it is written);
        returns self."""
        root = os.path.abspath(self.root)
        for p in (self.lora, self.state):
            if os.path.commonpath([root, os.path.abspath(p)]) != root:
                raise ValueError(f"refusing to write outside {root}: {self.name!r}")
        os.makedirs(os.path.dirname(self.lora), exist_ok=True)
        return self


def run_files(name, root=None, lora_folder="loras", what="LoRA name"):
    """RunFiles for a user-given name (checked first: a bad name fails here, before any work starts). Default root:
    the runtime's output folder, so inside ComfyUI the LoRA lands in output/loras where LoraLoader lists it."""
    clean = check_output_name(name, what=what, suffix=LORA_SUFFIX)
    return RunFiles(os.path.abspath(root or current().output_directory()), clean, lora_folder)


def name_problem(name):
    """True, or the message saying why ``name`` cannot be written (for a node's VALIDATE_INPUTS)."""
    try:
        run_files(name)
    except ValueError as e:
        return str(e)
    return True


def claim(files, resume=False, overwrite=False):
    """Where a LoRA goes: its own name when free, when resuming it, or when overwriting it; else the next free
    numbered name. State files of older versions are first moved out of the LoRA folder (LoraLoader lists it)."""
    move_legacy_states(os.path.join(files.root, files.lora_folder), os.path.join(files.root, STATE_FOLDER))
    chosen = files if (resume or overwrite) else files.next_free()
    return chosen.prepare()


def output_lora_path(name, root=None, subfolder="loras"):
    """<output>/loras/<name>.safetensors for a user-given name (checked by ``runtime.check_output_name``)."""
    return run_files(name, root, subfolder).prepare().lora
