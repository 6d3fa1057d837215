"""What the host-free core needs from whatever program runs it, and nothing more.

The core (samplers/, rewards/, noise/, training/, tiny/) never imports ComfyUI or the host wing. When it needs a
device, a folder, a progress bar or the Cancel button, it asks ``current()``. The plain default below serves the
command line and the tests; the ComfyUI host wing installs its own implementation (``host.services.ComfyRuntime``)
when the pack is loaded, so the same core code follows ComfyUI's devices, folders, progress bar and Cancel button.
See docs/architecture.md ("dependencies point one way").
"""
import os

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


def safe_output_path(subfolder, name, suffix, root=None):
    """A path for the user-given ``name`` under root/subfolder that cannot escape root (default: the runtime's output
    folder): path separators and '..' are stripped from the name, and the result is checked against root."""
    root = os.path.abspath(root or current().output_directory())
    clean = "".join(c if c.isalnum() or c in "-_. " else "_" for c in os.path.basename(str(name).replace("\\", "/")))
    clean = clean.strip(" .") or "rewardlab"
    path = os.path.abspath(os.path.join(root, subfolder, clean + suffix))
    if os.path.commonpath([root, path]) != root:
        raise ValueError(f"refusing to write outside the output folder: {name!r}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path
