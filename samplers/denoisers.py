"""Adapters from networks to the denoiser protocol ``model(x, sigma, **extra) -> x̂0`` (k-diffusion convention).

x is in "σ-space": x = x0 + σ·ε for ε/v models, x = (1-σ)·x0 + σ·ε for flow models. ``sigma`` is a batch
vector. Conditioning travels as keyword arguments, e.g. ``encoder_hidden_states=...``.
"""
import torch
from torch import nn


def sigma_to_t(sigma, model_sigmas):
    """Fractional timestep of σ by interpolating log σ in the model's table (k-diffusion / diffusers rule).
    Computed in float64 so that a σ taken from the table maps back to its exact integer timestep."""
    log_sigmas = model_sigmas.to(sigma.device, torch.float64).log()
    log_sigma = sigma.to(torch.float64).log()
    dists = log_sigma - log_sigmas[:, None]
    low = dists.ge(0).cumsum(0).argmax(0).clamp(max=len(log_sigmas) - 2)
    w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
    return ((1 - w) * low + w * (low + 1)).to(sigma.dtype)


class DiscreteDenoiser(nn.Module):
    """A DDPM-trained network (diffusers UNet2DConditionModel or anything with the same call) predicting
    ε or v, wrapped as an x̂0 denoiser: input scaled by c_in = 1/sqrt(σ²+1), σ mapped to its timestep."""

    def __init__(self, net, alphas_cumprod, prediction_type="epsilon", round_timesteps=False):
        super().__init__()
        # round_timesteps: feed the nearest integer timestep (ComfyUI's ModelSamplingDiscrete and diffusers'
        # DPM-Solver do this); otherwise the interpolated fractional one (k-diffusion, diffusers Euler).
        self.round_timesteps = round_timesteps
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        self.net = net
        self.prediction_type = prediction_type
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.register_buffer("model_sigmas", ((1 - ac) / ac).sqrt().float(), persistent=False)
        self.flow = False

    @classmethod
    def from_scheduler(cls, net, scheduler, **kw):
        """Build from any diffusers scheduler (its alphas_cumprod and prediction_type)."""
        return cls(net, scheduler.alphas_cumprod, scheduler.config.prediction_type, **kw)

    @property
    def sigma_min(self):
        return float(self.model_sigmas[0])

    @property
    def sigma_max(self):
        return float(self.model_sigmas[-1])

    def forward(self, x, sigma, **extra):
        sigma = sigma.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        c_in = (sigma**2 + 1) ** -0.5
        t = sigma_to_t(sigma.flatten(), self.model_sigmas)
        if self.round_timesteps:
            t = t.round()
        out = _sample(self.net(x * c_in, t, **extra))
        if self.prediction_type == "epsilon":
            return x - sigma * out
        return x * c_in**2 - out * sigma * c_in        # v: x0 = ᾱ·x_VE - sqrt(1-ᾱ)·v


class FlowDenoiser(nn.Module):
    """A flow-matching network predicting the velocity v = ε - x0 at timestep t = σ·T (SD3/Flux convention)."""

    def __init__(self, net, num_train_timesteps=1000):
        super().__init__()
        self.net = net
        self.T = num_train_timesteps
        self.flow = True

    def forward(self, x, sigma, **extra):
        v = _sample(self.net(x, sigma * self.T, **extra))
        return x - sigma.to(x.dtype).view(-1, *([1] * (x.ndim - 1))) * v


class ModuleDenoiser(nn.Module):
    """A plain torch module ``f(x, sigma, **extra)`` predicting x0, ε or v in σ-space, for toy models."""

    def __init__(self, net, prediction="x0", flow=False):
        super().__init__()
        if prediction not in ("x0", "eps", "v"):
            raise ValueError(f"prediction must be 'x0', 'eps' or 'v', got {prediction!r}")
        self.net, self.prediction, self.flow = net, prediction, flow

    def forward(self, x, sigma, **extra):
        out = self.net(x, sigma, **extra)
        s = sigma.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        if self.prediction == "x0":
            return out
        if self.prediction == "eps":
            return x - s * out
        if self.flow:
            return x - s * out
        return x / (s**2 + 1) - out * s / (s**2 + 1) ** 0.5


def skip_coefficient(model, sigma):
    """c_skip(σ) of a core denoiser, D(x) = c_skip·x + c_out·F(c_in·x): 1 for ε and flow models (D = x − σ·F),
    1/(σ²+1) for VP v-prediction, 0 for x0-prediction. The part of D that is the input itself."""
    inner = getattr(model, "model", model)                  # through a CFGDenoiser
    if getattr(inner, "flow", False):
        return 1.0
    prediction = getattr(inner, "prediction_type", getattr(inner, "prediction", "epsilon"))
    if prediction in ("epsilon", "eps"):
        return 1.0
    if prediction in ("v_prediction", "v"):
        return 1.0 / (float(sigma) ** 2 + 1.0)
    return 0.0


def _sample(out):
    """diffusers models return an output object with ``.sample``; plain modules return a tensor."""
    return getattr(out, "sample", out)


def _cat_batch(a, b):
    """Concatenate two conditioning values along the batch (tensors, nested dicts, or shared non-tensors)."""
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: _cat_batch(a[k], b[k]) for k in a}
    return a


def cond_and_uncond(model, x, sigma, cond, uncond=None, **extra):
    """(D_c, D_u) from one batched call of ``model`` (uncond rows first); D_u is None without an uncond, and then
    only the conditional rows run. ``cond``/``uncond`` are dicts of keyword arguments for the model."""
    if uncond is None:
        return model(x, sigma, **cond, **extra), None
    both = model(torch.cat([x, x]), torch.cat([sigma, sigma]), **_cat_batch(uncond, cond), **extra)
    D_u, D_c = both.chunk(2)
    return D_c, D_u


class CFGDenoiser(nn.Module):
    """Classifier-free guidance, cond and uncond in one batched call: D = D_u + w·(D_c - D_u).

    ``cond``/``uncond`` are dicts of keyword arguments for the inner denoiser. ``scale`` is a float or a
    function of σ (a guidance schedule). ``combine(cond_x0, uncond_x0, x, sigma, scale)`` replaces the
    plain CFG rule when given (APG, CFG-rescale, ... live in the guidance module)."""

    def __init__(self, model, cond, uncond=None, scale=7.5, combine=None):
        super().__init__()
        self.model, self.cond, self.uncond, self.scale, self.combine = model, cond, uncond, scale, combine
        self.flow = getattr(model, "flow", False)

    def scale_at(self, sigma):
        return self.scale(sigma) if callable(self.scale) else self.scale

    def forward(self, x, sigma, **extra):
        w = self.scale_at(sigma)
        skip_uncond = self.combine is None and w == 1.0
        cond, uncond = cond_and_uncond(self.model, x, sigma, self.cond, None if skip_uncond else self.uncond, **extra)
        if uncond is None:
            return cond
        if self.combine is not None:
            return self.combine(cond, uncond, x, sigma, w)
        return uncond + (cond - uncond) * w
