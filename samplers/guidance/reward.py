"""Reward guidance: steer sampling with the gradient of a differentiable reward on the decoded x̂0.

Forward universal guidance (Bansal et al., 2302.07121) adds s(t)·sqrt(1-ᾱ)·∇_{z_t} ℓ to ε̂. In σ-space with
ℓ = -reward this is (derived in docs/methods.md, "Reward guidance")
    D <- D + s·σ²·∇_x R(decode(D(x)))
i.e. the gradient flows through the denoiser (its Jacobian). ``through_model=False`` is the cheap variant that
differentiates with respect to x̂0 only: D <- D + s·σ²·∇_{x̂0} R(decode(x̂0)).
Backward guidance finds Δ* ≈ argmax_Δ R(decode(x̂0 + Δ)) with m gradient steps and sets D <- D + Δ*
(the ε-form update ε̂ - sqrt(ᾱ/(1-ᾱ))·Δ* is exactly x̂0 + Δ*).

Self-recurrence (the paper's Algorithm 1, k = ``recurrence``): step x_t → x_{t−1} with the guided D, re-noise
x_{t−1} back to σ_t with fresh noise, and guide again, k times; the last x_{t−1} is kept. Inside one denoiser call
this is done with the first-order (DDIM/Euler) step and the call returns D' + σ'/(σ − σ')·(x_k − x), which makes
the sampler's own first-order step from x land exactly on the step from the recurred x_k (σ' the next grid σ).
"""
import logging

import torch

from ..runner import inplace_safe

log = logging.getLogger("rewardlab")
from .schedules import as_schedule


class RewardGuidance:
    def __init__(self, reward, decode=None, strength=1.0, start=0.0, end=1.0, backward_steps=0, backward_lr=0.1,
                 through_model=True, recurrence=1, seed=0):
        if not 0 <= start <= end <= 1:
            raise ValueError(f"reward-guidance window needs 0 ≤ start ≤ end ≤ 1 (step progress), got {start}..{end}")
        if backward_steps < 0:
            raise ValueError("backward_steps must be ≥ 0")
        if recurrence < 1:
            raise ValueError("recurrence (the paper's k) must be ≥ 1; 1 = no self-recurrence")
        self.reward, self.decode = reward, decode
        self.strength = as_schedule(strength)
        self.start, self.end = float(start), float(end)
        self.backward_steps, self.backward_lr = int(backward_steps), float(backward_lr)
        self.through_model = bool(through_model)
        self.recurrence, self.seed = int(recurrence), int(seed)

    def active(self, ctx):
        return self.start <= ctx.p_step <= self.end and (self.strength(ctx) != 0 or self.backward_steps > 0)

    def score(self, x0):
        """Reward per batch item of a (latent) x̂0."""
        images = x0 if self.decode is None else self.decode(x0)
        r = self.reward(images)
        return r.reshape(r.shape[0], -1).mean(1) if r.ndim > 1 else r.reshape(-1)

    def apply(self, ctx, x, predict):
        """Guided D at this call. ``predict(x)`` computes the (already CFG-combined) denoised prediction."""
        D = self._guided(ctx, x, predict)
        if self.recurrence == 1 or ctx.sigma_next is None:      # off-grid calls: no step to recur over
            return D
        sigma, nxt = ctx.sigma, ctx.sigma_next
        x_k = x
        for _ in range(self.recurrence - 1):
            x_next = x_k + (x_k - D) * ((nxt - sigma) / sigma)                    # the first-order step to σ'
            x_k = self._renoise(ctx, x_next, nxt, sigma)
            D = self._guided(ctx, x_k, predict)
        return D + (x_k - x) * (nxt / (sigma - nxt))

    def _renoise(self, ctx, x_next, nxt, sigma):
        """x at σ' back to σ with fresh noise: a·x + sqrt(σ² − (a·σ')²)·n, a = 1 (ε/v) or (1 − σ)/(1 − σ') (flow)."""
        key = ("reward_recurrence", id(self))
        if key not in ctx.state:
            ctx.state[key] = torch.Generator().manual_seed(self.seed)
        a = (1 - sigma) / (1 - nxt) if ctx.kind == "const" else 1.0
        n = torch.randn(x_next.shape, generator=ctx.state[key], dtype=torch.float32).to(x_next)
        return a * x_next + max(sigma**2 - (a * nxt) ** 2, 0.0) ** 0.5 * n

    def _guided(self, ctx, x, predict):
        s = float(self.strength(ctx))
        with torch.inference_mode(False), torch.enable_grad():
            if s != 0 and self.through_model:
                x_in = x.detach().clone().requires_grad_(True)
                with inplace_safe():                  # models that add residuals in place (see runner.py)
                    D = predict(x_in)
                grad, = torch.autograd.grad(self.score(D).sum(), x_in)
                D = D.detach()
            else:
                with torch.no_grad():
                    D = predict(x)
                grad = None
                if s != 0:
                    d_in = D.clone().requires_grad_(True)
                    grad, = torch.autograd.grad(self.score(d_in).sum(), d_in)
            if grad is not None:
                D = D + s * ctx.sigma**2 * _finite_or_zero(grad)
            if self.backward_steps:
                D = D + self._backward_delta(D)
        return D.detach()

    def _backward_delta(self, D):
        delta = torch.zeros_like(D, requires_grad=True)
        for _ in range(self.backward_steps):
            g, = torch.autograd.grad(self.score(D + delta).sum(), delta)
            delta = (delta + self.backward_lr * _finite_or_zero(g)).detach().requires_grad_(True)
        return delta.detach()

    def __repr__(self):
        return (f"RewardGuidance(strength={self.strength}, window=({self.start}, {self.end}), "
                f"backward_steps={self.backward_steps}, through_model={self.through_model}, "
                f"recurrence={self.recurrence})")


def _finite_or_zero(grad):
    """The reward gradient with the samples whose gradient is not finite (a NaN reward, an overflow) left unguided
    for this step, instead of turning their whole image into NaN."""
    bad = ~torch.isfinite(grad).flatten(1).all(1)
    if not bad.any():
        return grad
    log.warning("reward guidance: the reward gradient is NaN/Inf for %d of %d samples; they are not guided at this "
                "step (check the reward and the strength)", int(bad.sum()), len(bad))
    return torch.where(bad.view(-1, *[1] * (grad.dim() - 1)), torch.zeros_like(grad), grad)
