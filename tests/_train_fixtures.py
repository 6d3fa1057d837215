"""Shared toys for the DRaFT trainer tests: a small conditional ε-network on 2×2×2 "latents" with LoRA targets,
a bundle around it, and a smooth reward. Everything is seeded; building takes milliseconds."""
import torch
from torch import nn

from rewardlab.samplers import ModuleDenoiser, scaled_linear_model_sigmas
from rewardlab.training.bundle import TorchBundle
from rewardlab.training.draft import derive_seed

SHAPE = (2, 2, 2)
D = 8
COND = 4


class ToyNet(nn.Module):
    """ε(x, σ, cond) with three Linear layers; records (σ, grad enabled) for every call."""

    def __init__(self, hidden=16):
        super().__init__()
        self.l1 = nn.Linear(D + COND + 1, hidden)
        self.l2 = nn.Linear(hidden, hidden)
        self.l3 = nn.Linear(hidden, D)
        self.calls = []

    def forward(self, x, sigma, cond):
        self.calls.append((float(sigma[0]), torch.is_grad_enabled()))
        s = sigma.view(-1, 1).to(x.dtype)
        h = torch.cat([x.flatten(1) / (s**2 + 1).sqrt(), cond, s.log() / 4], 1)
        h = torch.tanh(self.l2(torch.tanh(self.l1(h))))
        return self.l3(h).view_as(x)


def encode(prompts):
    """A fixed random vector per prompt ("" -> zeros, the unconditional input)."""
    rows = [torch.zeros(COND) if p == "" else torch.randn(COND, generator=torch.Generator().manual_seed(derive_seed(p)))
            for p in prompts]
    return {"cond": torch.stack(rows)}


def decode(x):
    return torch.sigmoid(x)


TARGET = torch.linspace(0.2, 0.8, D).view(SHAPE)


def reward(images, prompts):
    """Smooth, non-trivial: closeness to a fixed pattern, with a prompt-independent bonus for contrast."""
    return -(images - TARGET).square().flatten(1).mean(1) + 0.1 * images.flatten(1).std(1)


def toy_bundle(seed=0):
    torch.manual_seed(seed)
    net = ToyNet()
    model = ModuleDenoiser(net, prediction="eps")
    return TorchBundle(model, encode, decode, SHAPE, model_sigmas=scaled_linear_model_sigmas(), lora_root=net)


TARGETS = ("l1", "l2", "l3")
