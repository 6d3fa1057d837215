"""CADS, condition-annealed sampling (Sadat et al., 2310.17347): noise the conditioning embedding early on.

With diffusion time t = 1 - p (1 at the first step):
    γ(t) = 1 for t ≤ τ1,  (τ2 - t)/(τ2 - τ1) for τ1 < t < τ2,  0 for t ≥ τ2
    ŷ = sqrt(γ)·y + s·sqrt(1 - γ)·n,  n ~ N(0, I)
    ŷ_resc = (ŷ - mean ŷ)/std ŷ · std y + mean y;   y' = ψ·ŷ_resc + (1 - ψ)·ŷ
mean and std are scalars over the whole tensor, batch included, as in the paper's listing (torch.mean(y),
torch.std(y)); per_sample=True takes them per batch item instead. Applied to cond and uncond alike. The noise comes from a
per-run generator seeded with ``seed``, so a run is reproducible and two runs never share a stream.
"""
import torch

from .schedules import check_progress_axis


class CADS:
    def __init__(self, tau1=0.6, tau2=0.9, noise_scale=0.25, psi=1.0, seed=0, axis="p_step", keys=None,
                 per_sample=False):
        if not 0 <= tau1 <= tau2 <= 1:
            raise ValueError(f"CADS needs 0 ≤ tau1 ≤ tau2 ≤ 1, got tau1={tau1}, tau2={tau2}")
        if not 0 <= psi <= 1:
            raise ValueError(f"CADS rescale ψ must lie in [0, 1], got {psi}")
        self.tau1, self.tau2, self.noise_scale, self.psi = float(tau1), float(tau2), float(noise_scale), float(psi)
        self.seed, self.axis, self.keys = int(seed), check_progress_axis(axis), keys
        self.per_sample = bool(per_sample)

    def gamma(self, ctx):
        t = 1.0 - ctx.axis(self.axis)
        if t <= self.tau1:
            return 1.0
        if t >= self.tau2:
            return 0.0
        return (self.tau2 - t) / (self.tau2 - self.tau1)

    def _generator(self, ctx):
        key = ("cads_generator", id(self))
        if key not in ctx.state:
            ctx.state[key] = torch.Generator().manual_seed(self.seed)
        return ctx.state[key]

    def noise(self, y, ctx):
        """The annealed embedding for one conditioning tensor y (batch first)."""
        g = self.gamma(ctx)
        if g >= 1.0 or not torch.is_floating_point(y):
            return y
        n = torch.randn(y.shape, generator=self._generator(ctx), dtype=torch.float32).to(y)
        noised = g**0.5 * y + self.noise_scale * (1 - g) ** 0.5 * n
        if self.psi == 0:
            return noised
        dims = tuple(range(1, y.ndim)) if self.per_sample and y.ndim > 1 else tuple(range(y.ndim))
        rescaled = ((noised - noised.mean(dims, keepdim=True)) / noised.std(dims, keepdim=True).clamp_min(1e-12)
                    * y.std(dims, keepdim=True) + y.mean(dims, keepdim=True))
        return self.psi * rescaled + (1 - self.psi) * noised

    def __call__(self, kwargs, ctx):
        """Apply to a dict of conditioning keyword arguments (tensors in ``keys``, or every float tensor)."""
        if self.gamma(ctx) >= 1.0:
            return kwargs
        return {k: self.noise(v, ctx) if isinstance(v, torch.Tensor) and (self.keys is None or k in self.keys) else v
                for k, v in kwargs.items()}

    def __repr__(self):
        return f"CADS(tau1={self.tau1}, tau2={self.tau2}, noise_scale={self.noise_scale}, psi={self.psi}, seed={self.seed})"
