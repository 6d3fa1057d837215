"""Step functions: one solver update from x at sigmas[i] to sigmas[i+1], given the denoiser's x̂0.

Signature: ``step(x, denoised, sigmas, i, state, noise) -> x_next``. ``state`` is a per-run dict (multistep
solvers keep history there); ``noise()`` returns a fresh standard-normal tensor shaped like x (ancestral steps).
Every step is plain tensor arithmetic, so gradients flow through x and denoised. Formulas follow k-diffusion,
which is also what ComfyUI's samplers of the same name compute.
"""
import functools

import torch


def euler(x, denoised, sigmas, i, state, noise):
    """Euler on the probability-flow ODE. With η=0 this *is* DDIM written in σ-space, and with flow-matching
    sigmas it is the flow Euler step, since (x - x̂0)/σ is then the velocity ε - x0."""
    d = (x - denoised) / sigmas[i]
    return x + d * (sigmas[i + 1] - sigmas[i])


def ancestral_sigmas(sigma, sigma_next, eta):
    """Split the move to sigma_next into a deterministic part (σ_down) and fresh noise (σ_up).
    In σ-space this equals DDIM's η-noise: σ_up = η·σ'·sqrt(σ² - σ'²)/σ."""
    if eta == 0 or sigma_next == 0:
        return sigma_next, sigma_next * 0
    up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    down = (sigma_next**2 - up**2) ** 0.5
    return down, up


def euler_ancestral(x, denoised, sigmas, i, state, noise, eta=1.0):
    """Ancestral Euler; ``ddim`` with η is the same update."""
    down, up = ancestral_sigmas(sigmas[i], sigmas[i + 1], eta)
    x = x + (x - denoised) / sigmas[i] * (down - sigmas[i])
    return x + noise() * up if sigmas[i + 1] > 0 and eta > 0 else x


def euler_ancestral_flow(x, denoised, sigmas, i, state, noise, eta=1.0):
    """Ancestral Euler for flow-matching models (x = (1-σ)x0 + σε), as ComfyUI's RF variant."""
    s, s1 = sigmas[i], sigmas[i + 1]
    if s1 == 0 or eta == 0:
        return euler(x, denoised, sigmas, i, state, noise)
    down = s1 * (1 + (s1 / s - 1) * eta)
    ratio = down / s
    x = ratio * x + (1 - ratio) * denoised
    renoise = (s1**2 - down**2 * (1 - s1) ** 2 / (1 - down) ** 2) ** 0.5
    return (1 - s1) / (1 - down) * x + noise() * renoise


def dpmpp_2m(x, denoised, sigmas, i, state, noise):
    """DPM-Solver++(2M) (Lu et al. 2022), data-prediction form, first order on the first and last step."""
    s, s1 = sigmas[i], sigmas[i + 1]
    old = state.get("old_denoised")
    state["old_denoised"] = denoised
    if s1 == 0:
        return denoised
    h = s.log() - s1.log()
    if old is not None:
        r = (sigmas[i - 1].log() - s.log()) / h
        denoised = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
    return (s1 / s) * x - torch.expm1(-h) * denoised


def ddim(x, denoised, sigmas, i, state, noise, eta=0.0):
    """DDIM (Song et al. 2021) with stochasticity η, in σ-space (η=0: deterministic, equal to Euler)."""
    if eta == 0:
        return euler(x, denoised, sigmas, i, state, noise)
    return euler_ancestral(x, denoised, sigmas, i, state, noise, eta=eta)


STEPS = {"euler": euler, "ddim": ddim, "euler_ancestral": euler_ancestral, "dpmpp_2m": dpmpp_2m}
STOCHASTIC = {"euler_ancestral"}


def get_step(name, flow=False, eta=None):
    """A step function by ComfyUI-style name; ``flow`` picks the flow-matching form where it differs."""
    if name not in STEPS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(STEPS)}")
    fn = euler_ancestral_flow if (flow and name == "euler_ancestral") else STEPS[name]
    if flow and name == "ddim" and eta:
        fn = euler_ancestral_flow
    if eta is not None and name in ("ddim", "euler_ancestral"):
        return functools.partial(fn, eta=eta)
    return fn
