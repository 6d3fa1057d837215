"""What the host-free core needs from whatever program runs it, and nothing more.

The core (samplers/, rewards/, noise/, training/, tiny/) never imports ComfyUI or the host wing. When it needs a
device, a folder, a progress bar or the Cancel button, it asks ``current()``. The plain default below serves the
command line and the tests; the ComfyUI host wing installs its own implementation (``host.services.ComfyRuntime``)
when the pack is loaded, so the same core code follows ComfyUI's devices, folders, progress bar and Cancel button.
See docs/architecture.md ("dependencies point one way").
"""
import os
import re

import torch


class NullBar:
    """A progress bar that only counts (what ``progress`` returns outside a host with a UI)."""

    def __init__(self, total):
        self.total, self.current = total, 0

    def update(self, n=1):
        self.current += n

    def update_absolute(self, value, total=None, preview=None):
        self.current = value


class Runtime:
    """Plain-torch services: CUDA when available, ./rewardlab_out for outputs, $REWARDLAB_MODELS for weights."""

    def device(self):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def free_memory(self):
        """Give cached accelerator memory back (after training, OOM or cancel)."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def interrupted(self):
        """True once the user asked to stop (ComfyUI's Cancel button); polled by long loops."""
        return False

    def check_interrupt(self):
        """Raise the host's own "cancelled" exception when the user asked to stop (here: samplers.Cancelled)."""
        if self.interrupted():
            from .samplers.runner import Cancelled
            raise Cancelled(None)

    def progress(self, total):
        return NullBar(total)

    def manage(self, module):
        """Hand an auxiliary model (a reward model) to the host's memory manager, which may move it off the
        accelerator to make room for others. The plain runtime has none."""

    def use(self, module):
        """Bring a managed model back to its compute device before it runs."""

    def forget(self, module):
        """Take a model out of the host's memory manager (it is being dropped)."""

    def reward_folders(self):
        """Folders searched for reward-model weights, in order."""
        return [os.environ["REWARDLAB_MODELS"]] if os.environ.get("REWARDLAB_MODELS") else []

    def output_directory(self):
        """The folder every file we write lives below."""
        return os.path.abspath("rewardlab_out")


_current = Runtime()


def current():
    """The runtime in use: the plain one, or the one a host installed."""
    return _current


def install(runtime):
    """Make ``runtime`` the one the core asks from now on (the host wing calls this once on load)."""
    global _current
    _current = runtime
    return runtime


# --- names of files we write -------------------------------------------------------------------------------------

MAX_NAME_BYTES = 200      # per path component, in UTF-8; leaves room for "_00001" and ".safetensors" under 255
MAX_PATH_CHARS = 1024
FORBIDDEN_CHARS = '<>:"|?*'
RESERVED_NAMES = frozenset(["CON", "PRN", "AUX", "NUL"]
                           + [f"{d}{i}" for d in ("COM", "LPT") for i in "0123456789¹²³"])   # Windows devices


def check_output_name(name, what="name", suffix=""):
    """The user-given file ``name`` as a relative path with '/' between subfolders, or a ValueError that names the
    fix. Refused: an empty name, '.' and '..', absolute paths, control characters and <>:"|?*, a part that starts or
    ends with a space or ends with a dot, Windows device names (CON, NUL, COM1, ... also as 'nul.txt') and parts
    longer than MAX_NAME_BYTES. A trailing ``suffix`` (".safetensors") is dropped; backslashes count as '/'.
    Nothing is silently rewritten, so two different names never land on the same file."""
    def refuse(problem):
        shown = repr(name) if len(str(name)) <= 60 else f"{str(name)[:40]!r}... ({len(name)} characters)"
        raise ValueError(f"{what} {shown} {problem}")

    if not isinstance(name, str):
        raise ValueError(f"{what} must be text, got {type(name).__name__}")
    text = name.replace("\\", "/")
    if suffix and text.lower().endswith(suffix.lower()):
        text = text[: -len(suffix)]
    if not text.strip():
        refuse("is empty: type a file name such as 'my_lora'")
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        refuse("is an absolute path: give a name (optionally with subfolders, 'styles/my_lora'); files always "
               "go below the output folder")
    if len(text) > MAX_PATH_CHARS:
        refuse(f"is {len(text)} characters long: shorten it to at most {MAX_PATH_CHARS}")
    for part in text.split("/"):
        if part in ("", ".", ".."):
            refuse("contains an empty, '.' or '..' folder: remove it (names cannot leave the output folder); "
                   "use 'folder/name' for a subfolder")
        bad = sorted({c for c in part if c in FORBIDDEN_CHARS or ord(c) < 32 or ord(c) == 127})
        if bad:
            refuse(f"contains {', '.join(map(repr, bad))}, which file names cannot hold on every system: use letters, "
                   "digits, spaces, '-', '_' and '.'")
        if part != part.strip() or part.endswith("."):
            refuse(f"has a part ({part!r}) that starts or ends with a space or ends with a dot: remove them")
        if part.split(".")[0].strip().upper() in RESERVED_NAMES:
            refuse(f"uses {part.split('.')[0]!r}, a reserved device name on Windows: choose another name")
        if len(part.encode("utf-8")) > MAX_NAME_BYTES:
            refuse(f"has a part of {len(part.encode('utf-8'))} bytes: shorten it to at most {MAX_NAME_BYTES} bytes "
                   "(file systems allow 255, and RewardLab adds suffixes such as '_00001.safetensors')")
    return text


def safe_output_path(subfolder, name, suffix, root=None):
    """The path root/subfolder/<name><suffix> for a user-given ``name`` checked by ``check_output_name`` (default
    root: the runtime's output folder). The result is checked to lie inside root; its folder is created."""
    root = os.path.abspath(root or current().output_directory())
    clean = check_output_name(name, suffix=suffix)
    path = os.path.abspath(os.path.join(root, subfolder, clean + suffix))
    if os.path.commonpath([root, path]) != root:
        raise ValueError(f"refusing to write outside the output folder: {name!r}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path
