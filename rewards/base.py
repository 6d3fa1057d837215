"""The reward protocol every RewardLab reward follows.

A reward maps images (float BCHW in [0, 1], any size) and prompts to a Tensor[B] of scores, higher is better,
differentiable with respect to the images. Subclasses implement ``score(images, prompts)``; ``forward`` checks
the inputs, broadcasts prompts, moves the images to the reward's device and returns fp32 scores on the images'
device (the VAE that made the images and the reward may live on different devices).
"""
import itertools

import torch

from .. import runtime


class Reward(torch.nn.Module):
    """Base class: frozen, always in eval mode, differentiable w.r.t. the images.

    Metadata (class or instance attributes):
      name         short identifier (the registry name for registered models)
      input_size   native square input size in pixels of the image tower, or None (any size)
      needs_text   whether ``prompts`` must be given
      score_range  typical (low, high) of the scores, used for display and ensemble normalisation
      min_size     smallest height and width in pixels the reward can score (smaller images are a clear error)
    """

    name = "reward"
    min_size = 1
    input_size = None
    needs_text = False
    score_range = (0.0, 1.0)

    def __init__(self):
        super().__init__()
        self.grad_checkpointing = False
        self._text_cache = {}

    # --- subclasses implement this ---------------------------------------------------------------------------
    def score(self, images, prompts):
        """images: float BCHW in [0, 1] (any size, not yet preprocessed); prompts: list[str] of length B. Returns Tensor[B]."""
        raise NotImplementedError

    # --- the protocol ---------------------------------------------------------------------------------------
    def forward(self, images, prompts=None):
        images = check_images(images, self.name, self.min_size)
        prompts = normalize_prompts(prompts, images.shape[0], self.needs_text, self.name)
        runtime.current().use(self)       # a host's memory manager may have moved the weights away
        home = self._weights_device()
        scores = self.score(images if home is None else images.to(home), prompts)
        if scores.shape != (images.shape[0],):
            raise RuntimeError(f"reward {self.name!r} returned shape {tuple(scores.shape)}, expected ({images.shape[0]},)")
        return scores.float().to(images.device)

    def cached_text_features(self, prompts, encode):
        """``encode(prompts)`` per prompt, computed once: prompts stay fixed while images are optimised. Keyed by
        device, dtype and inference mode (inference tensors cannot be saved for a later backward); bounded."""
        state = (str(self.device), str(self.dtype), torch.is_inference_mode_enabled())
        missing = list(dict.fromkeys(p for p in prompts if (p, state) not in self._text_cache))
        if missing:
            if len(self._text_cache) > 512:
                self._text_cache.clear()
            with torch.no_grad():
                for prompt, feature in zip(missing, encode(missing)):
                    self._text_cache[(prompt, state)] = feature
        return torch.stack([self._text_cache[(p, state)] for p in prompts])

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

    def _weights_device(self):
        """Where the weights live; None for a weight-free reward (it scores on the images' device)."""
        for t in itertools.chain(self.parameters(), self.buffers()):
            return t.device
        return None

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


def check_images(images, name="reward", min_size=1):
    """Validate a BCHW float batch with 3 channels, at least ``min_size`` pixels high and wide, and return it
    (values are not clamped here)."""
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
    if images.shape[0] == 0:
        raise ValueError(f"{name}: the image batch is empty")
    h, w = images.shape[-2:]
    if min(h, w) < min_size:
        raise ValueError(f"{name}: images of {h}x{w} pixels are too small for this reward (at least {min_size}x"
                         f"{min_size}); upscale them or use a larger image.")
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


def prompt_lines(text):
    """The non-empty, stripped lines of a multi-line prompt box."""
    return [line.strip() for line in str(text or "").splitlines() if line.strip()]


def split_prompts(text, batch):
    """Prompts for a batch from a prompt box: no lines -> None, one line -> broadcast, ``batch`` lines -> one per
    image; any other count is an error that says what to write."""
    lines = prompt_lines(text)
    if not lines:
        return None
    if len(lines) not in (1, batch):
        raise ValueError(f"got {len(lines)} prompt lines for {batch} images: write one line for all images or exactly "
                         "one line per image.")
    return lines * batch if len(lines) == 1 else lines
