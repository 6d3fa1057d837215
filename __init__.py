"""RewardLab: reward alignment for diffusion models, as ComfyUI nodes.

Loaded two ways: by ComfyUI from ``custom_nodes/<any name>/`` (relative imports only), and as the installed
package ``rewardlab``. Importing it must stay cheap and must never import ``comfy``: heavy libraries
(diffusers, open_clip, transformers) are imported inside the functions that need them.
"""
from .host import routes
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

routes.install()        # RewardLab's HTTP routes, when a ComfyUI server is running (a no-op anywhere else)

WEB_DIRECTORY = None
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
