"""Shared fixtures for the guidance tests: an exact Gaussian denoiser with a conditional mean, and a call counter."""
import torch
from torch import nn

from rewardlab.samplers import sigma_schedule
from rewardlab.samplers.sigmas import scaled_linear_model_sigmas


class GaussianDenoiser(nn.Module):
    """The exact posterior mean for data x0 ~ N(mean, s²·I): D(x; σ) = (s²·x + σ²·mean)/(s² + σ²).
    ``mean`` is the conditioning (a tensor shaped like x), so cond and uncond differ by their means.
    Counts network calls and evaluated rows (NFE per image = rows / batch)."""

    def __init__(self, s=0.5, flow=False):
        super().__init__()
        self.s2, self.flow = s * s, flow
        self.calls, self.rows = 0, 0

    def forward(self, x, sigma, mean):
        self.calls += 1
        self.rows += x.shape[0]
        sg = sigma.view(-1, *([1] * (x.ndim - 1))).to(x)
        if self.flow:                        # x = (1-σ)x0 + σε: posterior mean of x0 given x
            a = 1 - sg
            return (a * self.s2 * x + sg**2 * mean) / (a**2 * self.s2 + sg**2)
        return (self.s2 * x + sg**2 * mean) / (self.s2 + sg**2)


def means(batch=2, shape=(3, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, *shape, generator=g) * 0.8
    uncond = torch.randn(batch, *shape, generator=g) * 0.3
    return {"mean": cond}, {"mean": uncond}


def sd_sigmas(steps=10, name="karras"):
    return sigma_schedule(name, steps, scaled_linear_model_sigmas())


def noise(batch=2, shape=(3, 8, 8), seed=1):
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))
