"""The reward protocol every RewardLab reward follows.

A reward maps images (float BCHW in [0, 1], any size) and prompts to a Tensor[B] of scores, higher is better,
differentiable with respect to the images. Subclasses implement ``score(images, prompts)``; ``forward`` checks
the inputs, broadcasts prompts and returns fp32 scores.
"""
import torch


class Reward(torch.nn.Module):
    """Base class: frozen, always in eval mode, differentiable w.r.t. the images.

    Metadata (class or instance attributes):
      name         short identifier (the registry name for registered models)
      input_size   native square input size in pixels of the image tower, or None (any size)
      needs_text   whether ``prompts`` must be given
      score_range  typical (low, high) of the scores, used for display and ensemble normalisation
    """

    name = "reward"
    input_size = None
    needs_text = False
    score_range = (0.0, 1.0)

    def __init__(self):
        super().__init__()
        self.grad_checkpointing = False

    # --- subclasses implement this ---------------------------------------------------------------------------
    def score(self, images, prompts):
        """images: float BCHW in [0, 1] (any size, not yet preprocessed); prompts: list[str] of length B. Returns Tensor[B]."""
        raise NotImplementedError

    # --- the protocol ---------------------------------------------------------------------------------------
    def forward(self, images, prompts=None):
        images = check_images(images, self.name)
        prompts = normalize_prompts(prompts, images.shape[0], self.needs_text, self.name)
        scores = self.score(images, prompts)
        if scores.shape != (images.shape[0],):
            raise RuntimeError(f"reward {self.name!r} returned shape {tuple(scores.shape)}, expected ({images.shape[0]},)")
        return scores.float()

    def freeze(self):
        """Eval mode and no parameter gradients; returns self."""
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode=True):
        # Rewards are measurement instruments: dropout must never switch on, even when a parent module trains.
        return super().train(False)

    def set_grad_checkpointing(self, enable=True):
        """Recompute image-tower activations in backward to save memory (no effect on weight-free rewards)."""
        self.grad_checkpointing = bool(enable)
        for module in self.modules():
            if module is not self and hasattr(module, "set_grad_checkpointing"):
                module.set_grad_checkpointing(enable)
        return self

    @property
    def device(self):
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    @property
    def dtype(self):
        p = next((t for t in self.parameters() if t.is_floating_point()), None)
        return p.dtype if p is not None else torch.float32

    def extra_repr(self):
        return f"name={self.name!r}, input_size={self.input_size}, needs_text={self.needs_text}, score_range={self.score_range}"


def check_images(images, name="reward"):
    """Validate a BCHW float batch with 3 channels and return it (values are not clamped here)."""
    if not torch.is_tensor(images) or images.ndim != 4:
        raise ValueError(f"{name}: expected images as a float tensor shaped (B, C, H, W) in [0, 1], got "
                         f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}. "
                         "ComfyUI IMAGE tensors are (B, H, W, C): convert with image.movedim(-1, 1).")
    if images.shape[1] != 3 and images.shape[-1] in (3, 4):
        raise ValueError(f"{name}: images shaped {tuple(images.shape)} look like a ComfyUI IMAGE (B, H, W, C); "
                         "convert with image[..., :3].movedim(-1, 1).")
    if images.shape[1] != 3:
        raise ValueError(f"{name}: expected 3 colour channels in dim 1, got shape {tuple(images.shape)}. "
                         "Drop alpha with images[:, :3]; repeat grey images to 3 channels.")
    if not images.is_floating_point():
        raise ValueError(f"{name}: expected float images in [0, 1], got dtype {images.dtype}; divide uint8 by 255.")
    return images


def normalize_prompts(prompts, batch, needs_text, name="reward"):
    """One prompt per image: a str or 1-element list is broadcast, a list of length ``batch`` is kept.

    Rewards that need text raise a ValueError when no prompt is given; the others get empty strings.
    """
    if prompts is None:
        prompts = []
    elif isinstance(prompts, str):
        prompts = [prompts]
    else:
        prompts = [str(p) for p in prompts]
    if needs_text and not any(p.strip() for p in prompts):
        raise ValueError(f"reward {name!r} compares images with text: give a prompt (one for all images, or one per image).")
    if not prompts:
        return [""] * batch
    if len(prompts) == 1:
        return prompts * batch
    if len(prompts) != batch:
        raise ValueError(f"reward {name!r}: got {len(prompts)} prompts for {batch} images; give one prompt per image "
                         "or a single prompt for all of them.")
    return prompts
