"""Toy models for the noise-optimisation tests: small conv denoisers (ε, v, flow), a decoder and rewards."""
import torch
from torch import nn

from rewardlab.samplers import CFGDenoiser, ModuleDenoiser, scaled_linear_model_sigmas, sigma_schedule
from rewardlab.noise.chain import Chain

C, H, W = 4, 8, 8


class ToyNet(nn.Module):
    """f(x, σ, cond) with the input scaled to unit variance, like c_in; ``cond`` is a (B, C) bias."""

    def __init__(self, flow=False):
        super().__init__()
        self.flow = flow
        self.inp = nn.Conv2d(C + 1, 16, 3, padding=1)
        self.out = nn.Conv2d(16, C, 3, padding=1)

    def forward(self, x, sigma, cond=None):
        s = sigma.view(-1, 1, 1, 1).to(x)
        scale = 1.0 if self.flow else (s**2 + 1) ** -0.5
        h = torch.cat([x * scale, s.log().expand(x.shape[0], 1, *x.shape[2:])], 1)
        h = self.out(torch.tanh(self.inp(h)))
        return h if cond is None else h + cond[:, :, None, None]


def toy_denoiser(kind, seed=0):
    """kind: 'eps', 'v' or 'flow'."""
    torch.manual_seed(seed)
    flow = kind == "flow"
    net = ToyNet(flow).requires_grad_(False)
    return ModuleDenoiser(net, prediction={"eps": "eps", "v": "v", "flow": "v"}[kind], flow=flow)


class ToyDecoder(nn.Module):
    """latent (B, 4, 8, 8) -> image (B, 3, 16, 16) in [0, 1]."""

    def __init__(self, seed=1):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(C, 3, 1)
        self.requires_grad_(False)

    def forward(self, z):
        return torch.sigmoid(self.conv(nn.functional.interpolate(z, scale_factor=2.0)))


class TargetReward:
    """Differentiable: −mean squared distance to a fixed target colour (higher is better)."""

    needs_text = False
    name = "target"

    def __init__(self, colour=(0.9, 0.2, 0.6)):
        self.colour = torch.tensor(colour).view(1, 3, 1, 1)

    def __call__(self, images, prompts=None):
        return -((images - self.colour) ** 2).mean(dim=(1, 2, 3))


class BrightnessReward:
    """Differentiable and unbounded in ε: mean brightness (pushes ‖ε‖ outward without a regulariser)."""

    needs_text = False
    name = "brightness"

    def __call__(self, images, prompts=None):
        return images.mean(dim=(1, 2, 3))


class RankReward:
    """Non-differentiable: the fraction of pixels whose red channel beats green (argmax-like, no gradient)."""

    needs_text = False
    name = "rank"

    def __call__(self, images, prompts=None):
        return (images[:, 0] > images[:, 1]).float().mean(dim=(1, 2))


class TextReward(TargetReward):
    needs_text = True
    name = "toy_text"

    def __call__(self, images, prompts=None):
        assert prompts is not None and len(prompts) == images.shape[0]
        return super().__call__(images)


class Ensemble:
    """A weighted sum of rewards (stand-in for rewards/ensemble.py)."""

    needs_text = False

    def __init__(self, parts):
        self.parts = parts

    def __call__(self, images, prompts=None):
        return sum(w * r(images, prompts) for w, r in self.parts)


def toy_chain(kind="eps", steps=1, step="euler", cfg=None, batch=1, seed=0, scheduler="karras"):
    model = toy_denoiser(kind)
    extra = None
    if cfg is not None:
        g = torch.Generator().manual_seed(5)
        cond = {"cond": torch.randn(batch, C, generator=g) * 0.3}
        uncond = {"cond": torch.zeros(batch, C)}
        model = CFGDenoiser(model, cond, uncond, scale=cfg)
    if kind == "flow":
        sigmas = sigma_schedule("normal", steps, flow_shift=1.0)
    else:
        sigmas = sigma_schedule(scheduler, steps, scaled_linear_model_sigmas())
    return Chain(model, sigmas, decode=ToyDecoder(), step=step, flow=kind == "flow", extra_args=extra, seed=seed,
                 channels=C)


def noise(batch=1, seed=0):
    return torch.randn(batch, C, H, W, generator=torch.Generator().manual_seed(seed))
