"""Reward guidance: steer sampling with the gradient of a differentiable reward on the decoded x̂0.

Forward universal guidance (Bansal et al., 2302.07121) adds s(t)·sqrt(1-ᾱ)·∇_{z_t} ℓ to ε̂. In σ-space with
ℓ = -reward this is (derived in docs/methods.md, "Reward guidance")
    D <- D + s·σ²·∇_x R(decode(D(x)))
i.e. the gradient flows through the denoiser (its Jacobian). ``through_model=False`` is the cheap variant that
differentiates with respect to x̂0 only: D <- D + s·σ²·∇_{x̂0} R(decode(x̂0)).
Backward guidance finds Δ* ≈ argmax_Δ R(decode(x̂0 + Δ)) with m gradient steps and sets D <- D + Δ*
(the ε-form update ε̂ - sqrt(ᾱ/(1-ᾱ))·Δ* is exactly x̂0 + Δ*).
"""
import torch

from ..runner import inplace_safe
from .schedules import as_schedule


class RewardGuidance:
    def __init__(self, reward, decode=None, strength=1.0, start=0.0, end=1.0, backward_steps=0, backward_lr=0.1,
                 through_model=True):
        if not 0 <= start <= end <= 1:
            raise ValueError(f"reward-guidance window needs 0 ≤ start ≤ end ≤ 1 (step progress), got {start}..{end}")
        if backward_steps < 0:
            raise ValueError("backward_steps must be ≥ 0")
        self.reward, self.decode = reward, decode
        self.strength = as_schedule(strength)
        self.start, self.end = float(start), float(end)
        self.backward_steps, self.backward_lr = int(backward_steps), float(backward_lr)
        self.through_model = bool(through_model)

    def active(self, ctx):
        return self.start <= ctx.p_step <= self.end and (self.strength(ctx) != 0 or self.backward_steps > 0)

    def score(self, x0):
        """Reward per batch item of a (latent) x̂0."""
        images = x0 if self.decode is None else self.decode(x0)
        r = self.reward(images)
        return r.reshape(r.shape[0], -1).mean(1) if r.ndim > 1 else r.reshape(-1)

    def apply(self, ctx, x, predict):
        """Guided D at this call. ``predict(x)`` computes the (already CFG-combined) denoised prediction."""
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
                D = D + s * ctx.sigma**2 * grad
            if self.backward_steps:
                D = D + self._backward_delta(D)
        return D.detach()

    def _backward_delta(self, D):
        delta = torch.zeros_like(D, requires_grad=True)
        for _ in range(self.backward_steps):
            g, = torch.autograd.grad(self.score(D + delta).sum(), delta)
            delta = (delta + self.backward_lr * g).detach().requires_grad_(True)
        return delta.detach()

    def __repr__(self):
        return (f"RewardGuidance(strength={self.strength}, window=({self.start}, {self.end}), "
                f"backward_steps={self.backward_steps}, through_model={self.through_model})")
