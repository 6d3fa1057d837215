"""Build a model without initialising its weights, for loaders that overwrite every weight next.

Random initialisation of a ViT-L + BERT (ImageReward) or a CLIP-H (PickScore) takes tens of seconds on a CPU, and
is wasted work when a checkpoint is loaded right after. Building on the meta device and then allocating
uninitialised storage is instant.
"""
import torch


def empty_module(build, device="cpu"):
    """``build()`` with uninitialised parameters and persistent buffers on ``device``.

    Non-persistent buffers are not in checkpoints, so they must be rebuilt: the models here have only
    ``position_ids`` (arange over positions), which is refilled. Any other non-persistent buffer makes this fall
    back to an ordinary (initialising) build, so the result is always correct.
    """
    with torch.device("meta"):
        module = build()
    saved = set(module.state_dict())
    transient = [name for name, _ in module.named_buffers() if name not in saved]
    if any(not name.endswith("position_ids") for name in transient):
        return build().to(device)
    module.to_empty(device=device)
    with torch.no_grad():
        for name in transient:
            ids = module.get_buffer(name)
            ids.copy_(torch.arange(ids.shape[-1], device=ids.device).expand_as(ids))
    return module
