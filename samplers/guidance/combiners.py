"""How the cond and uncond predictions combine at weight w, and gates that decide whether uncond runs at all.

Every combiner declares the prediction space it is defined in (``space``); ``apply_combiner`` converts D_c and D_u into
that space, combines, and converts back to the denoised D. CFG is affine with weights summing to 1, so its space
does not matter; APG, CFG-Zero* and CFG-rescale give different results per space, so they never pick one silently.
At w = 1 every combiner here reduces to D_c, which lets the guided denoiser skip the uncond call (see guided.py).
"""
import torch

from .context import SPACES, from_space, to_space


def _dims(t):
    return tuple(range(1, t.ndim))


def _check_space(space):
    if space not in SPACES:
        raise ValueError(f"space must be one of {', '.join(SPACES)}, got {space!r}")
    return space


class Combiner:
    space = "x0"

    def __call__(self, cond, uncond, ctx, w):
        """cond/uncond in ``self.space``; returns the guided prediction in the same space."""
        raise NotImplementedError

    def zero_step(self, ctx):
        """True where the combiner outputs a zero prediction in its space without any model call."""
        return False


class CFG(Combiner):
    """D = D_u + w·(D_c - D_u)."""

    def __call__(self, cond, uncond, ctx, w):
        return uncond + (cond - uncond) * w

    def __repr__(self):
        return "CFG()"


APG_PAPER = dict(eta=0.0, norm_threshold=15.0, momentum=-0.5)      # the paper's SDXL values (docs/methods.md §4.5)


class APG(Combiner):
    """Adaptive Projected Guidance (Sadat, Hilliges, Weber, 2410.02416), at the paper's scale:
        Δ = D_c - D_u;  Δ <- Δ + β·Δ_prev (running average);  Δ <- Δ·min(1, r/‖Δ‖);
        D = D_c + (w - 1)·(Δ⊥ + η·Δ∥),  Δ∥ the projection of Δ on D_c.
    Defaults are the paper's (η 0, r 15, β −0.5: its SDXL row); at η = 1, r = 0 (off), β = 0 this is CFG at w.
    The momentum lives in the per-run state."""

    def __init__(self, eta=0.0, norm_threshold=15.0, momentum=-0.5, space="x0"):
        self.eta, self.norm_threshold, self.momentum = float(eta), float(norm_threshold), float(momentum)
        self.space = _check_space(space)

    def __call__(self, cond, uncond, ctx, w):
        diff = cond - uncond
        if self.momentum != 0:
            key = ("apg_running", id(self))
            prev = ctx.state.get(key)
            diff = diff if prev is None else diff + self.momentum * prev
            ctx.state[key] = diff
        if self.norm_threshold > 0:
            norm = diff.flatten(1).norm(dim=1).view(-1, *([1] * (diff.ndim - 1)))
            diff = diff * torch.clamp(self.norm_threshold / norm.clamp_min(1e-12), max=1.0)
        unit = torch.nn.functional.normalize(cond.double().flatten(1), dim=1).view_as(cond)
        parallel = (diff.double() * unit).sum(dim=_dims(diff), keepdim=True) * unit
        orthogonal = diff.double() - parallel
        update = (orthogonal + self.eta * parallel).to(cond.dtype)
        return cond + (w - 1) * update

    def __repr__(self):
        return f"APG(eta={self.eta}, norm_threshold={self.norm_threshold}, momentum={self.momentum}, space={self.space!r})"


class CFGZeroStar(Combiner):
    """CFG-Zero* (Fan et al., 2503.18886) in velocity space: s* = <v_c, v_u>/‖v_u‖² per sample,
    v = s*·v_u + w·(v_c - s*·v_u); the first ``zero_init_steps`` steps output v = 0 (D = x) with no model call.
    The default, 1, zeroes the first step as the paper's listing and the authors' pipelines (``i <= zero_steps``
    with zero_steps = 0) do; N zeroed steps = their zero_steps = N − 1 (the README suggests ~4 % of the steps).
    Done in D space instead (ComfyUI core's post-CFG node) it is off by (1 - w)(1 - s*)·x."""

    def __init__(self, zero_init_steps=1, space="velocity"):
        self.zero_init_steps = int(zero_init_steps)
        self.space = _check_space(space)

    def zero_step(self, ctx):
        return ctx.step < self.zero_init_steps

    @staticmethod
    def optimal_scale(cond, uncond):
        dot = (cond * uncond).sum(dim=_dims(cond), keepdim=True)
        return dot / ((uncond * uncond).sum(dim=_dims(uncond), keepdim=True) + 1e-8)

    def __call__(self, cond, uncond, ctx, w):
        s = self.optimal_scale(cond, uncond)
        return s * uncond + w * (cond - s * uncond)

    def __repr__(self):
        return f"CFGZeroStar(zero_init_steps={self.zero_init_steps}, space={self.space!r})"


class CFGRescale(Combiner):
    """Rescaled CFG (Lin et al., 2305.08891): x_cfg = u + w(c - u); x_resc = x_cfg·std(c)/std(x_cfg) per sample;
    φ·x_resc + (1 - φ)·x_cfg. Defined on v-predictions (the paper's models), hence space "v_pred" by default."""

    def __init__(self, phi=0.7, space="v_pred"):
        self.phi = float(phi)
        self.space = _check_space(space)

    def __call__(self, cond, uncond, ctx, w):
        cfg = uncond + w * (cond - uncond)
        dims = _dims(cond)
        rescaled = cfg * (cond.std(dim=dims, keepdim=True) / cfg.std(dim=dims, keepdim=True).clamp_min(1e-12))
        return self.phi * rescaled + (1 - self.phi) * cfg

    def __repr__(self):
        return f"CFGRescale(phi={self.phi}, space={self.space!r})"


def apply_combiner(combiner, D_c, D_u, x, sigma, ctx, w):
    """Guided D from the two denoised predictions, computed in the combiner's space."""
    space = combiner.space
    c = to_space(D_c, x, sigma, ctx.kind, space)
    u = to_space(D_u, x, sigma, ctx.kind, space)
    return from_space(combiner(c, u, ctx, w), x, sigma, ctx.kind, space)


COMBINER_NAMES = ("cfg", "apg", "cfg_zero_star", "cfg_rescale")


COMBINER_PAPER = {"apg_eta": APG_PAPER["eta"], "apg_norm_threshold": APG_PAPER["norm_threshold"],
                  "apg_momentum": APG_PAPER["momentum"], "zero_init_steps": 1, "rescale_phi": 0.7}


def make_combiner(name, apg_eta=0.0, apg_norm_threshold=15.0, apg_momentum=-0.5, zero_init_steps=1, rescale_phi=0.7,
                  space="default", preset="custom"):
    """A combiner by name, with its options (the names the guidance nodes use); space "default" keeps the
    combiner's own prediction space. preset "paper" replaces the options by the papers' values (COMBINER_PAPER)."""
    if preset not in ("custom", "paper"):
        raise ValueError(f"preset must be 'custom' or 'paper', got {preset!r}")
    if preset == "paper":
        apg_eta, apg_norm_threshold, apg_momentum, zero_init_steps, rescale_phi = (
            COMBINER_PAPER[k] for k in ("apg_eta", "apg_norm_threshold", "apg_momentum", "zero_init_steps",
                                        "rescale_phi"))
    kw = {} if space == "default" else {"space": space}
    if name == "cfg":
        return CFG()
    if name == "apg":
        return APG(apg_eta, apg_norm_threshold, apg_momentum, **kw)
    if name == "cfg_zero_star":
        return CFGZeroStar(zero_init_steps, **kw)
    if name == "cfg_rescale":
        return CFGRescale(rescale_phi, **kw)
    raise ValueError(f"unknown combiner {name!r}; choose one of {', '.join(COMBINER_NAMES)}")


def zero_prediction(combiner, x, sigma, ctx):
    """D for a zero prediction in the combiner's space (CFG-Zero*'s zero-init steps)."""
    return from_space(torch.zeros_like(x), x, sigma, ctx.kind, combiner.space)


# --- gates ------------------------------------------------------------------------------------------------------

class Gate:
    """Decides before the model call whether the uncond branch is needed, and may watch the predictions."""

    def needs_uncond(self, ctx):
        return True

    def observe(self, ctx, D_c, D_u, x, sigma):
        pass

    def estimate_uncond(self, ctx, D_c, x, sigma):
        """D_u for a call whose uncond branch this gate skipped, or None (the call then returns D_c)."""
        return None


class AdaptiveGuidance(Gate):
    """Adaptive Guidance (Castillo et al., 2312.12487): γ_t = cos(cond, uncond) in ``space``, per sample; once the
    smallest γ_t in the batch reaches ``threshold`` (and progress ≥ ``start``), every later call runs the
    conditional branch only: the uncond network evaluation is skipped for real. The latch is per-run state."""

    def __init__(self, threshold=0.99, space="x0", start=0.0):
        if not -1 <= threshold <= 1:
            raise ValueError(f"the cosine-similarity threshold must lie in [-1, 1], got {threshold}")
        self.threshold, self.space, self.start = float(threshold), _check_space(space), float(start)

    @property
    def _key(self):
        return ("adaptive_guidance", id(self))

    def needs_uncond(self, ctx):
        return ctx.state.get(self._key) is None

    def observe(self, ctx, D_c, D_u, x, sigma):
        c = to_space(D_c, x, sigma, ctx.kind, self.space).flatten(1).float()
        u = to_space(D_u, x, sigma, ctx.kind, self.space).flatten(1).float()
        gamma = float(torch.nn.functional.cosine_similarity(c, u, dim=1).min())
        ctx.state.setdefault(("adaptive_guidance_trace", id(self)), []).append((ctx.step, gamma))
        if gamma >= self.threshold and ctx.p_step >= self.start:
            ctx.state[self._key] = ctx.step      # latched: the step at which guidance stopped

    def __repr__(self):
        return f"AdaptiveGuidance(threshold={self.threshold}, space={self.space!r}, start={self.start})"


def fit_affine(target, regressors):
    """Least-squares scalars c minimising ‖target − Σ_j c_j·regressors_j‖² over every element (float64)."""
    A = torch.stack([r.flatten().double() for r in regressors], 1)
    return torch.linalg.lstsq(A, target.flatten().double().unsqueeze(1)).solution.flatten().tolist()


class LinearAG(Gate):
    """LinearAG (Castillo et al., 2312.12487, the affine variant of Adaptive Guidance): on some steps of the first
    part of sampling the uncond network evaluation is replaced by an affine function of past estimates,
        ε_u(t) ≈ a_t·ε_c(t) + b_t·ε_c(t−1) + c_t·ε_u(t−1)          (in ``space``, ε by default)
    with scalar coefficients per step fitted by least squares. Estimated steps: every ``every``-th step from step
    ``every`` − 1 while step progress < ``until``. A run whose step count has no coefficients yet calibrates: it
    evaluates every branch and fits each estimated step's coefficients; later runs with that step count use them
    (``coefficients`` persists on this object, by step count)."""

    def __init__(self, every=2, until=0.5, space="eps"):
        if every < 2:
            raise ValueError(f"LinearAG estimates every n-th step with n ≥ 2 (1 would estimate from estimates), got {every}")
        self.every, self.until, self.space = int(every), float(until), _check_space(space)
        self.coefficients = {}

    def estimated(self, ctx):
        i = ctx.step
        return (ctx.sigma_next is not None and i >= 1 and int(i) % self.every == self.every - 1
                and ctx.p_step < self.until)

    def _table(self, ctx):
        return self.coefficients.get(ctx.n_steps)

    def _history(self, ctx):
        return ctx.state.setdefault(("linear_ag", id(self)), {})

    def needs_uncond(self, ctx):
        table = self._table(ctx)
        i = int(ctx.step)
        return not (self.estimated(ctx) and table is not None and i in table and i - 1 in self._history(ctx))

    def observe(self, ctx, D_c, D_u, x, sigma):
        if ctx.sigma_next is None:                       # off-grid calls (2nd-order midpoints) are not recorded
            return
        i = int(ctx.step)
        c = to_space(D_c, x, sigma, ctx.kind, self.space).detach()
        u = to_space(D_u, x, sigma, ctx.kind, self.space).detach()
        history = self._history(ctx)
        history[i] = (c, u)
        table = self.coefficients.setdefault(ctx.n_steps, {})
        if self.estimated(ctx) and i - 1 in history and i not in table:       # calibration run: fit this step
            prev_c, prev_u = history[i - 1]
            table[i] = fit_affine(u, (c, prev_c, prev_u))

    def estimate_uncond(self, ctx, D_c, x, sigma):
        table = self._table(ctx)
        history = self._history(ctx)
        i = int(ctx.step)
        if not self.estimated(ctx) or table is None or i not in table or i - 1 not in history:
            return None
        a, b, c = table[i]
        cur = to_space(D_c, x, sigma, ctx.kind, self.space)
        prev_c, prev_u = history[i - 1]
        u = a * cur + b * prev_c + c * prev_u
        history[i] = (cur.detach(), u.detach())
        return from_space(u.to(D_c.dtype), x, sigma, ctx.kind, self.space)

    def __repr__(self):
        return f"LinearAG(every={self.every}, until={self.until}, space={self.space!r})"
