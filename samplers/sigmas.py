"""Sigma schedules in the k-diffusion convention: a 1-D float tensor of n+1 values, decreasing, ending in 0.

Discrete (DDPM-trained) models are described by their 1000-entry ``model_sigmas`` table,
σ_t = sqrt((1 - ᾱ_t) / ᾱ_t). Flow-matching models use σ in [0, 1] with x_σ = (1 - σ)·x0 + σ·ε.
The names follow ComfyUI's scheduler names so a user sees the same choices in both places.
"""
import math

import torch


def append_zero(sigmas):
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def model_sigmas_from_betas(betas):
    """The σ table of a DDPM beta schedule: σ_t = sqrt((1 - ᾱ_t) / ᾱ_t)."""
    alphas_cumprod = torch.cumprod(1.0 - torch.as_tensor(betas, dtype=torch.float64), 0)
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float()


def scaled_linear_model_sigmas(n_train=1000, beta_start=0.00085, beta_end=0.012):
    """Stable Diffusion 1.x/2.x/XL training schedule."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, n_train, dtype=torch.float64) ** 2
    return model_sigmas_from_betas(betas)


def karras(n, sigma_min, sigma_max, rho=7.0):
    """Karras et al. 2022, eq. 5."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero(((hi + ramp * (lo - hi)) ** rho).float())


def exponential(n, sigma_min, sigma_max):
    """Uniform in log σ."""
    return append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp().float())


def _at_timesteps(model_sigmas, timesteps):
    """σ at (possibly fractional) timesteps, interpolating log σ as k-diffusion does."""
    log_sigmas = model_sigmas.double().log()
    t = torch.as_tensor(timesteps, dtype=torch.float64).clamp(0, len(model_sigmas) - 1)
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=len(model_sigmas) - 1)
    w = t - lo
    return ((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp().float()


def leading(n, model_sigmas, offset=1):
    """DDIM's "leading" spacing (diffusers' default for SD): t = 0, c, 2c, … + offset, highest first."""
    step = len(model_sigmas) // n
    timesteps = torch.arange(n - 1, -1, -1) * step + offset
    return append_zero(model_sigmas[timesteps.clamp(max=len(model_sigmas) - 1)])


def trailing(n, model_sigmas):
    """"trailing" spacing (Lin et al. 2023): t = T-1, T-1-c, …; starts at the last training timestep."""
    T = len(model_sigmas)
    timesteps = torch.arange(T, 0, -T / n).round().long() - 1
    return append_zero(model_sigmas[timesteps])


def normal(n, model_sigmas):
    """ComfyUI "normal": n points uniform in timestep from T-1 down to 0 inclusive, then σ=0."""
    t = torch.linspace(len(model_sigmas) - 1, 0, n)
    return append_zero(_at_timesteps(model_sigmas, t))


def sgm_uniform(n, model_sigmas):
    """ComfyUI "sgm_uniform": like normal, but the endpoint 0 is excluded from the timestep grid."""
    t = torch.linspace(len(model_sigmas) - 1, 0, n + 1)[:-1]
    return append_zero(_at_timesteps(model_sigmas, t))


def simple(n, model_sigmas):
    """ComfyUI "simple": every (T/n)-th entry of the σ table, from the top."""
    stride = len(model_sigmas) / n
    idx = [len(model_sigmas) - 1 - int(i * stride) for i in range(n)]
    return append_zero(model_sigmas[idx])


def ddim_uniform(n, model_sigmas):
    """ComfyUI "ddim_uniform": timesteps 1, 1+c, … (c = T // n), highest first."""
    step = len(model_sigmas) // n
    timesteps = torch.arange(1, len(model_sigmas), step)[:n].flip(0)
    return append_zero(model_sigmas[timesteps])


def _time_shift(s, shift):
    return shift * s / (1 + (shift - 1) * s)


def flow(n, shift=1.0, n_train=1000):
    """Flow matching, as diffusers' FlowMatchEulerDiscreteScheduler (SD3): σ linear from 1 to the shifted 1/T,
    then time-shifted (σ' = sσ / (1 + (s-1)σ)); the shift is applied to the end point too, as there."""
    s = torch.linspace(1.0, float(_time_shift(torch.tensor(1 / n_train, dtype=torch.float64), shift)), n,
                       dtype=torch.float64)
    s = _time_shift(s, shift)
    return append_zero(s.float())


# Align Your Steps (Sabour, Fidler, Kreis 2024, arXiv 2404.14507): the 10-step σ schedules NVIDIA publishes on the
# project's "howto" page (research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html), σ_0 … σ_10 in each
# family's own σ units (EDM-style σ for SVD). The last value is the model's σ_min; sampling ends at σ = 0.
AYS_SIGMAS = {
    "sd15": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
    "svd": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
}


def loglinear_interp(values, n):
    """n values placed evenly between the table's entries, interpolating log σ linearly (AYS's rule for other step
    counts); the table's entries are kept where the grids meet."""
    table = torch.tensor(values, dtype=torch.float64).log()
    src = torch.linspace(0, 1, len(table), dtype=torch.float64)
    dst = torch.linspace(0, 1, n, dtype=torch.float64)
    idx = torch.searchsorted(src, dst).clamp(1, len(src) - 1)
    w = (dst - src[idx - 1]) / (src[idx] - src[idx - 1])
    return ((1 - w) * table[idx - 1] + w * table[idx]).exp()


def align_your_steps(n, family="sd15"):
    """The AYS schedule of a model family for n steps: the published 10-step σ_0 … σ_10 for n = 10, else those
    interpolated log-linearly to n + 1 values; the last one (σ_min) becomes 0, the end of sampling."""
    if family not in AYS_SIGMAS:
        raise ValueError(f"Align Your Steps publishes schedules for {', '.join(AYS_SIGMAS)}, not {family!r}; "
                         "use another scheduler for this model")
    sigmas = loglinear_interp(AYS_SIGMAS[family], n + 1).float()
    sigmas[-1] = 0.0
    return sigmas


DISCRETE = {"normal": normal, "sgm_uniform": sgm_uniform, "simple": simple, "ddim_uniform": ddim_uniform,
            "leading": leading, "trailing": trailing}
AYS_NAMES = {f"ays_{family}": family for family in AYS_SIGMAS}
SCHEDULER_NAMES = ("karras", "exponential", *DISCRETE, *AYS_NAMES)


def sigma_schedule(name, n, model_sigmas=None, flow_shift=None):
    """One entry point for every schedule. ``model_sigmas`` is the model's σ table (discrete models);
    ``flow_shift`` marks a flow-matching model (σ in [0, 1])."""
    if n < 1:
        raise ValueError(f"steps must be >= 1, got {n}")
    if name in AYS_NAMES:
        return align_your_steps(n, AYS_NAMES[name])
    if flow_shift is not None:
        return flow(n, shift=flow_shift)
    if model_sigmas is None:
        raise ValueError(f"schedule {name!r} needs the model's sigma table (model_sigmas)")
    if name == "karras":
        return karras(n, float(model_sigmas[0]), float(model_sigmas[-1]))
    if name == "exponential":
        return exponential(n, float(model_sigmas[0]), float(model_sigmas[-1]))
    if name not in DISCRETE:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
    return DISCRETE[name](n, model_sigmas)
