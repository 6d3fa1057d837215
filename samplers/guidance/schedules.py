"""Guidance-weight schedules: functions of the step context returning a weight.

Weights are in ComfyUI's convention, D = D_u + w·(D_c - D_u) (w = 1 is "no guidance"). Papers that use the
Ho–Salimans weight (Wang et al.) have cfg = 1 + w_HS; ``Affine(s, offset=1)`` converts.

Shapes are defined on a progress axis p ∈ [0, 1] (0 = first, noisiest call): ``p_step`` (sampling steps of this
run, the default) or ``p_model`` (model time, continuous across split passes). Interval and keyframe schedules
also take σ axes (``sigma_edm``, ``sigma``, ``log_snr``).

Wang et al. 2404.13040, in cfg units with cfg0 = 1 + w0:
    linear ↑     Linear(1, 1 + 2·w0)                   mean over the steps = cfg0
    cosine ↑     Cosine(1, 1 + 2·w0)                   1 + w0·(1 - cos πp), mean = cfg0
    clamp-linear ClampLinear(cfg0, floor=1 + c)        max(1 + c, 1 + 2·w0·p)
    pcs(s)       PowerCosine(1, 1 + w0, s)             1 + w0·(1 - cos(π·p^s))/2
    V / Λ        VShape(edge, middle)
NormalizeMean rescales any schedule so that its mean over the run's steps is a target weight.
"""
import math
from dataclasses import dataclass

from .context import AXES, StepCtx

PROGRESS_AXES = ("p_step", "p_model")
INTERPOLATIONS = ("linear", "ease", "step")


def check_progress_axis(axis):
    if axis not in PROGRESS_AXES:
        raise ValueError(f"this schedule runs on a progress axis ({', '.join(PROGRESS_AXES)}), got {axis!r}")
    return axis


def check_axis(axis):
    if axis not in AXES:
        raise ValueError(f"axis must be one of {', '.join(AXES)}, got {axis!r}")
    return axis


class Schedule:
    """Base class; subclasses implement ``__call__(ctx) -> float``."""

    def __call__(self, ctx: StepCtx) -> float:
        raise NotImplementedError

    def values(self, run):
        """The weight at each grid call of a RunInfo (for plots and tests)."""
        return [float(self(c)) for c in run.contexts()]


def as_schedule(w):
    """A Schedule from a Schedule, a number or a callable of the context."""
    if isinstance(w, Schedule):
        return w
    if isinstance(w, (int, float)):
        return Constant(float(w))
    if callable(w):
        return Fn(w)
    raise TypeError(f"a guidance weight must be a number or a schedule, got {type(w).__name__}")


@dataclass(frozen=True)
class Fn(Schedule):
    fn: object

    def __call__(self, ctx):
        return float(self.fn(ctx))


@dataclass(frozen=True)
class Constant(Schedule):
    value: float

    def __call__(self, ctx):
        return self.value


@dataclass(frozen=True)
class _Ramp(Schedule):
    """start + (end - start)·ramp(p): the shared form of the linear and cosine families."""
    start: float
    end: float

    def __post_init__(self):
        check_progress_axis(self.axis)

    def __call__(self, ctx):
        return self.start + (self.end - self.start) * self.ramp(ctx.axis(self.axis))


@dataclass(frozen=True)
class Linear(_Ramp):
    axis: str = "p_step"

    def ramp(self, p):
        return p


@dataclass(frozen=True)
class Cosine(_Ramp):
    """start + (end - start)·(1 - cos πp)/2: flat at both ends."""
    axis: str = "p_step"

    def ramp(self, p):
        return (1 - math.cos(math.pi * p)) / 2


@dataclass(frozen=True)
class PowerCosine(_Ramp):
    """MUSE's power-cosine: start + (end - start)·(1 - cos(π·p^power))/2."""
    power: float = 1.0
    axis: str = "p_step"

    def __post_init__(self):
        super().__post_init__()
        if self.power <= 0:
            raise ValueError(f"power must be > 0, got {self.power}")

    def ramp(self, p):
        return (1 - math.cos(math.pi * p ** self.power)) / 2


@dataclass(frozen=True)
class ClampLinear(Schedule):
    """Wang et al.'s clamp-linear in cfg units: max(floor, 1 + 2·(cfg - 1)·p)."""
    cfg: float
    floor: float = 2.0
    axis: str = "p_step"

    def __post_init__(self):
        check_progress_axis(self.axis)

    def __call__(self, ctx):
        return max(self.floor, 1 + 2 * (self.cfg - 1) * ctx.axis(self.axis))


@dataclass(frozen=True)
class VShape(Schedule):
    """Piecewise linear edge -> middle (at p = center) -> edge: a V when middle < edge, a Λ when middle > edge."""
    edge: float
    middle: float
    center: float = 0.5
    axis: str = "p_step"

    def __post_init__(self):
        check_progress_axis(self.axis)
        if not 0 < self.center < 1:
            raise ValueError(f"center must lie strictly between 0 and 1, got {self.center}")

    def __call__(self, ctx):
        p = ctx.axis(self.axis)
        frac = p / self.center if p <= self.center else (1 - p) / (1 - self.center)
        return self.edge + (self.middle - self.edge) * frac


@dataclass(frozen=True)
class Interval(Schedule):
    """``inner`` inside the interval, ``outside`` (default 1 = no guidance) elsewhere.
    σ axes use Kynkäänniemi et al.'s half-open (lo, hi]; progress axes the closed [lo, hi].

    decide "call" evaluates the paper's w(σ) at every model call's own σ. "step" decides once per sampling step
    from the σ the step starts at, as the authors' EDM sampler does (both Heun evaluations of a step alike): an
    off-grid call (DPM++ 2S or dpm_2 midpoints, SDE substeps) takes the decision of its step. A second evaluation
    placed exactly on the next grid σ (Heun's corrector) cannot be told from that step's first call by σ alone,
    so it follows the next step under both rules."""
    inner: Schedule
    lo: float
    hi: float
    axis: str = "sigma_edm"
    outside: float = 1.0
    decide: str = "call"

    def __post_init__(self):
        check_axis(self.axis)
        if self.lo > self.hi:
            raise ValueError(f"interval lower bound {self.lo} is above the upper bound {self.hi}")
        if self.decide not in ("call", "step"):
            raise ValueError(f"decide must be 'call' (per model call) or 'step' (per sampling step), got {self.decide!r}")

    def inside(self, ctx):
        if self.decide == "step" and ctx.run is not None:
            ctx = ctx.run.ctx(step=math.floor(ctx.step + 1e-6))        # the step this call belongs to
        v = ctx.axis(self.axis)
        if self.axis in PROGRESS_AXES:
            return self.lo <= v <= self.hi
        return self.lo < v <= self.hi

    def __call__(self, ctx):
        return self.inner(ctx) if self.inside(ctx) else self.outside


def _ease(t, interpolation):
    if interpolation == "linear":
        return t
    if interpolation == "ease":
        return t * t * (3 - 2 * t)          # smoothstep: zero slope at both keyframes
    return 0.0                              # step: hold the earlier keyframe's value


@dataclass(frozen=True)
class Keyframes(Schedule):
    """Values at positions on an axis, interpolated between them and held constant beyond the ends."""
    points: tuple          # ((position, value), ...)
    axis: str = "p_step"
    interpolation: str = "linear"

    def __post_init__(self):
        check_axis(self.axis)
        if not self.points:
            raise ValueError("keyframes need at least one (position, value) pair")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        object.__setattr__(self, "points", tuple(sorted((float(a), float(b)) for a, b in self.points)))

    @classmethod
    def parse(cls, text, axis="p_step", interpolation="linear"):
        """From "pos:value, pos:value, ..." (e.g. "0:1, 0.5:7.5, 1:3")."""
        pts = []
        for item in text.replace(";", ",").replace("\n", ",").split(","):
            if item.strip():
                try:
                    pos, val = item.split(":")
                    pts.append((float(pos), float(val)))
                except ValueError:
                    raise ValueError(f"keyframe {item.strip()!r} is not 'position:value' (e.g. '0.5:7.5')") from None
        return cls(tuple(pts), axis, interpolation)

    def __call__(self, ctx):
        x, pts = ctx.axis(self.axis), self.points
        if x <= pts[0][0]:
            return pts[0][1]
        if x >= pts[-1][0]:
            return pts[-1][1]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if x0 <= x <= x1:
                if x == x1:
                    return y1
                return y0 + (y1 - y0) * _ease((x - x0) / (x1 - x0), self.interpolation)
        return pts[-1][1]


@dataclass(frozen=True)
class PerStep(Schedule):
    """One weight per sampling step (a SIGMAS-like list). Off-grid calls interpolate between neighbours; a list
    whose length differs from the step count is stretched over step progress."""
    values_: tuple

    def __post_init__(self):
        object.__setattr__(self, "values_", tuple(float(v) for v in self.values_))
        if not self.values_:
            raise ValueError("the per-step weight list is empty")

    def __call__(self, ctx):
        v = self.values_
        pos = ctx.step if len(v) in (ctx.n_steps, ctx.n_steps + 1) else ctx.p_step * (len(v) - 1)
        i = min(max(int(math.floor(pos)), 0), len(v) - 1)
        if i + 1 >= len(v):
            return v[i]
        return v[i] + (v[i + 1] - v[i]) * (pos - i)


# --- math on schedules ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Combine(Schedule):
    op: str
    a: Schedule
    b: Schedule

    OPS = {"multiply": lambda a, b: a * b, "add": lambda a, b: a + b, "min": min, "max": max,
           "subtract": lambda a, b: a - b}

    def __post_init__(self):
        if self.op not in self.OPS:
            raise ValueError(f"operation must be one of {', '.join(self.OPS)}, got {self.op!r}")
        object.__setattr__(self, "a", as_schedule(self.a))
        object.__setattr__(self, "b", as_schedule(self.b))

    def __call__(self, ctx):
        return self.OPS[self.op](self.a(ctx), self.b(ctx))


def Multiply(a, b):
    return Combine("multiply", a, b)


def Add(a, b):
    return Combine("add", a, b)


def Min(a, b):
    return Combine("min", a, b)


def Max(a, b):
    return Combine("max", a, b)


@dataclass(frozen=True)
class Invert(Schedule):
    """Time-reversed: the weight of the mirrored step (p -> 1 - p). Turns an increasing schedule decreasing."""
    inner: Schedule

    def __call__(self, ctx):
        return self.inner(ctx.mirrored())


@dataclass(frozen=True)
class Affine(Schedule):
    """scale·w + offset. Ho–Salimans weight -> cfg: Affine(s, 1, 1); cfg -> HS: Affine(s, 1, -1)."""
    inner: Schedule
    scale: float = 1.0
    offset: float = 0.0

    def __call__(self, ctx):
        return self.scale * self.inner(ctx) + self.offset


@dataclass(frozen=True)
class Remap(Schedule):
    """Map [in_lo, in_hi] linearly onto [out_lo, out_hi] (optionally clamped)."""
    inner: Schedule
    in_lo: float
    in_hi: float
    out_lo: float
    out_hi: float
    clamp: bool = False

    def __post_init__(self):
        if self.in_lo == self.in_hi:
            raise ValueError("remap input range is empty (in_lo == in_hi)")

    def __call__(self, ctx):
        t = (self.inner(ctx) - self.in_lo) / (self.in_hi - self.in_lo)
        if self.clamp:
            t = min(max(t, 0.0), 1.0)
        return self.out_lo + (self.out_hi - self.out_lo) * t


@dataclass(frozen=True)
class NormalizeMean(Schedule):
    """Wang et al.'s normalisation: rescale (w - baseline) so the mean weight over the run's steps is ``target``."""
    inner: Schedule
    target: float
    baseline: float = 1.0

    def __call__(self, ctx):
        if ctx.run is None:
            raise ValueError("NormalizeMean needs the run's sigmas (evaluate it through a RunInfo)")
        key = ("normalize_mean", id(self))
        if key not in ctx.state:            # per-run cache: the mean depends on the run's σ grid
            mean = sum(self.inner(c) for c in ctx.run.contexts()) / ctx.run.n_steps
            if math.isclose(mean, self.baseline):
                raise ValueError("cannot normalise a schedule whose mean equals the baseline (it is flat at w=1)")
            ctx.state[key] = (self.target - self.baseline) / (mean - self.baseline)
        return self.baseline + (self.inner(ctx) - self.baseline) * ctx.state[key]


def wang(family, cfg, **kw):
    """Wang et al. families at mean cfg ``cfg`` (ComfyUI units): 'static', 'linear', 'cosine', 'inv-linear',
    'clamp-linear' (kw floor), 'pcs' (kw power; peaks at cfg, not mean-normalised)."""
    axis = kw.get("axis", "p_step")
    w0 = cfg - 1
    if family == "static":
        return Constant(cfg)
    if family == "linear":
        return Linear(1.0, 1 + 2 * w0, axis)
    if family == "inv-linear":
        return Linear(1 + 2 * w0, 1.0, axis)
    if family == "cosine":
        return Cosine(1.0, 1 + 2 * w0, axis)
    if family == "clamp-linear":
        return ClampLinear(cfg, kw.get("floor", 2.0), axis)
    if family == "pcs":
        return PowerCosine(1.0, cfg, kw.get("power", 1.0), axis)
    raise ValueError(f"unknown Wang et al. family {family!r}")
