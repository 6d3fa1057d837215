"""Shared helpers for the reward tests: tiny open_clip configs, smooth 8-bit test images, file writers."""
import numpy as np
import torch
from PIL import Image

# A 1.7 M-parameter open_clip CLIP with the ViT-B-32 layout (224 px input, so preprocessing is the real one).
TINY_OVERRIDES = dict(
    embed_dim=16,
    vision_cfg={"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
)
TINY_CLIP = {"clip_model": "ViT-B-32", "quick_gelu": True, "overrides": TINY_OVERRIDES}
# Several sizes and aspect ratios, including one smaller than 224 (upsampling) and one exactly 224.
SIZES = [(256, 256), (300, 500), (640, 360), (224, 224), (97, 150)]


def smooth_image(h, w, seed):
    """A photo-like 8-bit RGB PIL image: a few random low-frequency sinusoids per channel."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.full((h, w, 3), 0.5)
    for c in range(3):
        for _ in range(4):
            fx, fy, phase, amp = g.uniform(0.5, 6), g.uniform(0.5, 6), g.uniform(0, 6.28), g.uniform(0.1, 0.3)
            img[..., c] += amp * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
    return Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8))


def to_tensor(pil):
    """PIL 8-bit RGB -> float BCHW in [0, 1] (what a ComfyUI IMAGE holds)."""
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None].float() / 255


def reference_clip(seed=0):
    """The reference: open_clip's own model, built with the same config (weights get copied in by the tests)."""
    import open_clip

    torch.manual_seed(seed)
    return open_clip.create_model("ViT-B-32", pretrained=None, pretrained_text=False, force_quick_gelu=True,
                                  **TINY_OVERRIDES).eval()


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def assert_gradient_ascent_raises(reward, x, prompt, steps=5, lr=0.01):
    """The reward's pixel gradient is finite and non-zero, and a few normalised ascent steps raise the score."""
    x = x.clone().requires_grad_(True)
    score = reward(x, prompt)
    (grad,) = torch.autograd.grad(score.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    start = score.item()
    for _ in range(steps):
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(reward(x, prompt).sum(), x)
        x = (x + lr * grad / grad.abs().max()).clamp(0, 1)
    assert reward(x.detach(), prompt).item() > start + 1e-3


def assert_bf16_close(reward, x, prompt, tol=5e-2):
    """Preprocessing stays fp32 (no bf16 bicubic kernel on CPU); the towers run in the weights' dtype."""
    import copy

    half = copy.deepcopy(reward).to(torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert rel_err(half(x, prompt), reward(x, prompt)) < tol


def assert_checkpointing_recomputes(reward, layer, x, prompt):
    """With gradient checkpointing ``layer`` runs again in backward, and scores and pixel gradients are unchanged."""
    import copy

    calls = []
    hook = layer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        results = []
        for enable in (False, True):
            calls.clear()
            model = copy.deepcopy(reward).set_grad_checkpointing(enable)
            xi = x.clone().requires_grad_(True)
            score = model(xi, prompt)
            (grad,) = torch.autograd.grad(score.sum(), xi)
            results.append((score, grad, len(calls)))
    finally:
        hook.remove()
    (s0, g0, n0), (s1, g1, n1) = results
    assert (n0, n1) == (1, 2)
    torch.testing.assert_close(s1, s0)
    torch.testing.assert_close(g1, g0)
