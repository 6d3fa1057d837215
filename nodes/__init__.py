"""V1 node classes, grouped by capability. Each module exposes NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS."""
import importlib

# One line per capability module; add yours here.
_MODULES = ("reward_nodes", "sampler_nodes", "noise_nodes", "guidance_nodes", "train_nodes")

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _name in _MODULES:
    _mod = importlib.import_module(f".{_name}", __name__)
    NODE_CLASS_MAPPINGS.update(_mod.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_mod, "NODE_DISPLAY_NAME_MAPPINGS", {}))
