"""The step context every schedule, combiner and gate sees, and conversions between prediction spaces.

A guided model call only knows σ. ``RunInfo`` holds what the whole run knows (the σ grid of the sampler, the
model family, the model's own progress axis, the per-run state) and turns a σ into a ``StepCtx``:
fractional step index (interpolated for off-grid σ such as Heun's or DPM++2S's midpoints), progress in steps and
in model time, log-SNR and the EDM-equivalent σ.

Conventions (docs/methods.md, "Conventions"): x = x0 + σ·ε for ε/v models ("eps", "v"), x = (1-σ)·x0 + σ·ε for flow models
("const"). Progress runs 0 at the first (noisiest) call to 1 at the last.
"""
import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

KINDS = ("eps", "v", "const")
AXES = ("p_step", "p_model", "sigma_edm", "log_snr", "sigma")
SPACES = ("x0", "eps", "velocity", "v_pred")


def check_kind(kind):
    if kind not in KINDS:
        raise ValueError(f"model kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return kind


def sigma_edm(sigma, kind):
    """σ in EDM units: the model's σ for ε/v models, σ/(1-σ) for flow models (x/(1-σ) = x0 + σ/(1-σ)·ε)."""
    if kind != "const":
        return float(sigma)
    return math.inf if sigma >= 1 else float(sigma) / (1 - float(sigma))


def log_snr(sigma, kind):
    """log(α²/σ²), the same for every model family: -2·log σ_edm."""
    s = sigma_edm(sigma, kind)
    if s == 0:
        return math.inf
    return -math.inf if math.isinf(s) else -2 * math.log(s)


@dataclass
class StepCtx:
    sigma: float
    sigma_next: float | None     # the next grid σ when this call sits on the grid, else None
    step: float                  # fractional step index in this run (0 = first call)
    n_steps: int
    p_step: float                # step progress 0 -> 1 in this run
    p_model: float               # model-time progress 0 -> 1 (same across split passes)
    log_snr: float
    sigma_edm: float
    kind: str                    # "eps" | "v" | "const"
    state: dict = field(repr=False, default_factory=dict)   # per-run mutable store
    run: "RunInfo | None" = field(repr=False, default=None)

    def axis(self, name):
        if name not in AXES:
            raise ValueError(f"axis must be one of {', '.join(AXES)}, got {name!r}")
        return getattr(self, name)

    def mirrored(self):
        """The context at the mirrored step (step i <-> n-1-i), used by the Invert schedule."""
        if self.run is not None:
            return self.run.ctx(step=max(self.n_steps - 1, 0) - self.step)
        return replace(self, p_step=1 - self.p_step, p_model=1 - self.p_model)


def log_linear_progress(sigma_max, sigma_min):
    """EDM-style model progress: linear in log σ between σ_max (p=0) and σ_min (p=1)."""
    hi, lo = math.log(sigma_max), math.log(max(sigma_min, 1e-12))

    def progress(sigma):
        if sigma <= 0:
            return 1.0
        return min(max((hi - math.log(sigma)) / (hi - lo), 0.0), 1.0) if hi > lo else 0.0
    return progress


def table_progress(model_sigmas):
    """Discrete (DDPM) models: p = 1 - t/(T-1) with t the fractional timestep of σ in the model's σ table."""
    from ..denoisers import sigma_to_t

    table = torch.as_tensor(model_sigmas, dtype=torch.float32).cpu()
    last = len(table) - 1

    def progress(sigma):
        if sigma <= 0:
            return 1.0
        return 1.0 - float(sigma_to_t(torch.tensor([float(sigma)]), table)[0]) / last
    return progress


def infer_kind(model):
    """eps / v / const from a core denoiser's attributes (flow flag, prediction type)."""
    inner = getattr(model, "model", model)       # a CFGDenoiser wraps the network denoiser
    if getattr(model, "flow", False) or getattr(inner, "flow", False):
        return "const"
    pred = getattr(inner, "prediction_type", getattr(inner, "prediction", "epsilon"))
    return "v" if pred in ("v_prediction", "v") else "eps"


def infer_progress(model, kind, sigmas):
    """The model-time axis of a core denoiser: its σ table, 1-σ for flow, else log-linear over the run."""
    inner = getattr(model, "model", model)
    table = getattr(inner, "model_sigmas", None)
    if table is not None:
        return table_progress(table)
    if kind == "const":
        return lambda sigma: min(max(1.0 - float(sigma), 0.0), 1.0)
    positive = [float(s) for s in sigmas if float(s) > 0]
    return log_linear_progress(max(positive), min(positive))


class RunInfo:
    """One sampling run: the σ grid (n+1 values, model calls at the first n), the model kind, the model's
    progress function σ -> p_model, and the per-run state dict. Create one per run; never share it."""

    def __init__(self, sigmas, kind="eps", model_progress: Callable[[float], float] | None = None, state=None):
        self.sigmas = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
        if len(self.sigmas) < 2:
            raise ValueError("a run needs at least two sigmas (one step)")
        self.n_steps = len(self.sigmas) - 1
        self.kind = check_kind(kind)
        positive = [s for s in self.sigmas if s > 0]
        self.model_progress = model_progress or log_linear_progress(max(positive), min(positive))
        self.state = {} if state is None else state

    def step_of(self, sigma):
        """Fractional step index of σ: exact on the grid, interpolated in log σ between neighbours."""
        s = self.sigmas
        sigma = float(sigma)
        for i, si in enumerate(s):
            if math.isclose(sigma, si, rel_tol=1e-5, abs_tol=1e-8):
                return float(i)
        if sigma > s[0]:
            return 0.0
        for i in range(len(s) - 1):
            hi, lo = s[i], s[i + 1]
            if hi >= sigma >= lo:
                if lo > 0:
                    return i + (math.log(hi) - math.log(sigma)) / (math.log(hi) - math.log(lo))
                return i + (hi - sigma) / (hi - lo)
        return float(len(s) - 1)

    def sigma_at(self, step):
        i = min(max(int(math.floor(step)), 0), len(self.sigmas) - 1)
        frac = step - i
        if frac <= 0 or i + 1 >= len(self.sigmas):
            return self.sigmas[i]
        hi, lo = self.sigmas[i], self.sigmas[i + 1]
        if lo > 0:
            return math.exp(math.log(hi) + frac * (math.log(lo) - math.log(hi)))
        return hi + frac * (lo - hi)

    def ctx(self, sigma=None, step=None):
        """The context of a model call at σ (or at a fractional step index)."""
        if sigma is None and step is None:
            raise ValueError("give sigma or step")
        step = self.step_of(sigma) if step is None else float(step)
        sigma = self.sigma_at(step) if sigma is None else float(sigma)
        on_grid = abs(step - round(step)) < 1e-6 and round(step) < self.n_steps
        p_step = min(max(step / (self.n_steps - 1), 0.0), 1.0) if self.n_steps > 1 else 0.0
        return StepCtx(sigma=sigma, sigma_next=self.sigmas[round(step) + 1] if on_grid else None, step=step,
                       n_steps=self.n_steps, p_step=p_step, p_model=float(self.model_progress(sigma)),
                       log_snr=log_snr(sigma, self.kind), sigma_edm=sigma_edm(sigma, self.kind), kind=self.kind,
                       state=self.state, run=self)

    def contexts(self):
        """The contexts of the n grid model calls, in order."""
        return [self.ctx(step=i) for i in range(self.n_steps)]


# --- prediction spaces ---------------------------------------------------------------------------------------
# x0:       the denoised prediction D.
# velocity: the ODE drift (x - D)/σ: the flow velocity ε - x0 for flow models, ε for ε/v models in σ-space.
# eps:      ε̂ (for flow models ε = (x - (1-σ)·D)/σ).
# v_pred:   the VP v-prediction (x/(1+σ²) - D)·sqrt(1+σ²)/σ for ε/v models; the flow velocity for flow models.

def _bcast(sigma, x):
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return s.reshape(-1, *([1] * (x.ndim - 1))) if s.ndim else s


def to_space(D, x, sigma, kind, space):
    if space == "x0":
        return D
    s = _bcast(sigma, x)
    if space == "velocity" or (space == "v_pred" and kind == "const"):
        return (x - D) / s
    if space == "eps":
        return (x - (1 - s) * D) / s if kind == "const" else (x - D) / s
    if space == "v_pred":
        return (x / (1 + s**2) - D) * (1 + s**2).sqrt() / s
    raise ValueError(f"space must be one of {', '.join(SPACES)}, got {space!r}")


def from_space(P, x, sigma, kind, space):
    if space == "x0":
        return P
    s = _bcast(sigma, x)
    if space == "velocity" or (space == "v_pred" and kind == "const"):
        return x - s * P
    if space == "eps":
        return (x - s * P) / (1 - s).clamp_min(1e-6) if kind == "const" else x - s * P
    if space == "v_pred":
        return x / (1 + s**2) - P * s / (1 + s**2).sqrt()
    raise ValueError(f"space must be one of {', '.join(SPACES)}, got {space!r}")
