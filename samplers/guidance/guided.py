"""The guided denoiser: branches, gates, combiner, condition transforms, reward guidance, per-run state.

One guided call (host-free; the ComfyUI guider runs the same ``guided_step`` with its own branch evaluator):

    ctx  <- σ and the run's grid                      (RunInfo.ctx)
    w    <- schedule(ctx)
    zero-init step?           -> D from a zero prediction, no model call (CFG-Zero*)
    uncond needed?            -> uncond exists, w != 1 and every gate is open (adaptive guidance latch)
    D_c[, D_u] <- evaluate    (one batched call when both run; conditions pass through CADS)
    gates observe D_c, D_u    (adaptive guidance decides whether *later* calls skip uncond)
    uncond skipped by a gate that estimates it (LinearAG) -> D_u from the estimate
    D    <- combiner in its space, or D_c when uncond was skipped
    terms                     D += s_k·(D_c − D_k), one perturbed conditional call each (PAG, SLG)
    reward guidance wraps the whole call when active (gradient through it)

``GuidedDenoiser.run(sigmas)`` gives a fresh per-run denoiser for ``samplers.sample``; state (APG momentum, the
AG latch, CADS noise stream, cached normalisations) lives in that run only.
"""
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..denoisers import cond_and_uncond
from ..runner import sample
from .combiners import CFG, AdaptiveGuidance, LinearAG, apply_combiner, make_combiner, zero_prediction
from .context import RunInfo, check_kind, infer_kind, infer_progress
from .schedules import as_schedule
from .terms import apply_terms, perturbed_modules


@dataclass
class GuidanceSpec:
    """Everything that defines a guidance method, independent of the host."""
    scale: object = 7.5                              # float or Schedule (ComfyUI cfg units)
    combiner: object = field(default_factory=CFG)
    gates: tuple = ()
    cond_ops: tuple = ()                             # e.g. CADS: (tensor kwargs, ctx) -> kwargs
    reward: object = None                            # RewardGuidance or None
    terms: tuple = ()                                # GuidanceTerm: PAG, SLG

    def __post_init__(self):
        self.scale = as_schedule(self.scale)
        self.gates = tuple(self.gates)
        self.cond_ops = tuple(self.cond_ops)
        self.terms = tuple(self.terms)

    def weight(self, ctx):
        return float(self.scale(ctx))

    def needs_uncond(self, ctx, w, has_uncond=True):
        """Skip uncond wherever it cannot change the result (w = 1: every combiner reduces to D_c) or a gate
        closed. This is where the NFE savings of the interval schedule and adaptive guidance come from."""
        return has_uncond and not math.isclose(w, 1.0) and all(g.needs_uncond(ctx) for g in self.gates)


def spec_from_options(scale, combiner="cfg", adaptive_guidance=False, adaptive_threshold=0.99, adaptive_space="x0",
                      linear_ag=False, **combiner_options):
    """A GuidanceSpec from the options the guidance nodes show: a weight, a combiner by name with its options
    (``make_combiner``), and optional Adaptive Guidance and LinearAG."""
    gates = (AdaptiveGuidance(adaptive_threshold, adaptive_space),) if adaptive_guidance else ()
    gates += (LinearAG(),) if linear_ag else ()
    return GuidanceSpec(scale=scale, combiner=make_combiner(combiner, **combiner_options), gates=gates)


def _estimated_uncond(gates, ctx, D_c, x, sigma):
    """D_u from the first gate that estimates a skipped uncond branch (LinearAG), or None."""
    for gate in gates:
        estimate = gate.estimate_uncond(ctx, D_c, x, sigma)
        if estimate is not None:
            return estimate
    return None


def guided_step(spec, ctx, x, sigma, evaluate, has_uncond=True, finish=None, perturbed=None):
    """One guided prediction. ``evaluate(need_uncond) -> (D_c, D_u or None)`` runs the model branches.
    ``finish(D_c, D_u, w, have_uncond) -> D`` lets a host replace the final combination (the ComfyUI guider uses
    it to keep the stock cfg function and post-CFG hooks); by default the combiner's result, or D_c.
    ``perturbed(term) -> D_k`` runs a guidance term's perturbed conditional branch (needed when spec.terms)."""
    w = spec.weight(ctx)
    if spec.combiner.zero_step(ctx):
        return zero_prediction(spec.combiner, x, sigma, ctx)
    need_uncond = spec.needs_uncond(ctx, w, has_uncond)
    D_c, D_u = evaluate(need_uncond)
    if need_uncond:
        for gate in spec.gates:
            gate.observe(ctx, D_c, D_u, x, sigma)
    elif has_uncond and not math.isclose(w, 1.0):
        D_u = _estimated_uncond(spec.gates, ctx, D_c, x, sigma)
    have_uncond = D_u is not None
    if finish is not None:
        D = finish(D_c, D_u, w, have_uncond)
    else:
        D = apply_combiner(spec.combiner, D_c, D_u, x, sigma, ctx, w) if have_uncond else D_c
    if spec.terms:
        if perturbed is None:
            raise ValueError("this host cannot run guidance terms (PAG, SLG): it gave no perturbed-branch evaluator")
        D = apply_terms(spec.terms, ctx, D, D_c, perturbed)
    return D


class GuidedRun(nn.Module):
    """A denoiser for exactly one sampling run (``model(x, sigma, **extra) -> x̂0``); counts network rows."""

    def __init__(self, parent, info):
        super().__init__()
        self.parent, self.info = parent, info
        self.calls = 0          # network calls
        self.evaluations = 0    # network evaluations per image (batch rows / batch size): the NFE count

    @property
    def flow(self):
        return self.info.kind == "const"

    @property
    def state(self):
        return self.info.state

    def _evaluate(self, x, sigma, ctx, extra):
        p = self.parent
        cond = p.cond
        uncond = p.uncond
        for op in p.spec.cond_ops:
            cond = op(cond, ctx)
            uncond = op(uncond, ctx) if uncond is not None else None

        def evaluate(need_uncond):
            self.calls += 1
            self.evaluations += 2 if need_uncond else 1
            return cond_and_uncond(p.model, x, sigma, cond, uncond if need_uncond else None, **extra)

        def perturbed(term):
            self.calls += 1
            self.evaluations += 1
            with perturbed_modules(p.model, term):
                return p.model(x, sigma, **cond, **extra)
        return evaluate, perturbed

    def _predict(self, x, sigma, ctx, extra):
        evaluate, perturbed = self._evaluate(x, sigma, ctx, extra)
        return guided_step(self.parent.spec, ctx, x, sigma, evaluate, has_uncond=self.parent.uncond is not None,
                           perturbed=perturbed)

    def forward(self, x, sigma, **extra):
        ctx = self.info.ctx(sigma=float(sigma.reshape(-1)[0]))
        reward = self.parent.spec.reward
        if reward is not None and reward.active(ctx):
            return reward.apply(ctx, x, lambda xx: self._predict(xx, sigma, ctx, extra))
        return self._predict(x, sigma, ctx, extra)


class GuidedDenoiser(nn.Module):
    """Guided wrapper around a core denoiser. ``cond``/``uncond`` are dicts of keyword arguments for it.

        guided = GuidedDenoiser(den, cond, uncond, GuidanceSpec(Linear(1, 13), APG(), gates=(AdaptiveGuidance(),)))
        traj = guided.sample(x_T, sigmas)                    # or: sample(guided.run(sigmas), x_T, sigmas)
    """

    def __init__(self, model, cond, uncond=None, spec=None, kind=None, model_progress=None, **spec_kw):
        super().__init__()
        if spec is not None and spec_kw:
            raise ValueError("give either spec= or its fields as keywords, not both")
        self.model, self.cond, self.uncond = model, dict(cond), (None if uncond is None else dict(uncond))
        self.spec = spec if spec is not None else GuidanceSpec(**spec_kw)
        self.kind = check_kind(kind) if kind is not None else infer_kind(model)
        self.model_progress = model_progress

    @property
    def flow(self):
        return self.kind == "const"

    def run_info(self, sigmas):
        progress = self.model_progress or infer_progress(self.model, self.kind, sigmas)
        return RunInfo(sigmas, self.kind, progress)

    def run(self, sigmas):
        """A fresh per-run denoiser for this σ grid (new state every time)."""
        return GuidedRun(self, self.run_info(sigmas))

    def forward(self, x, sigma, **extra):
        raise RuntimeError("GuidedDenoiser needs the run's sigmas: use guided.run(sigmas) as the denoiser, "
                           "or guided.sample(x, sigmas)")

    def sample(self, x, sigmas, **kw):
        """Run the core sampler (``samplers.sample``) with a fresh run; returns (Trajectory, GuidedRun)."""
        run = self.run(sigmas)
        kw.setdefault("flow", self.flow)
        return sample(run, x, sigmas, **kw), run


def cfg_denoiser_hooks(spec, sigmas, kind="eps", model_progress=None):
    """``scale`` and ``combine`` arguments for the core ``CFGDenoiser`` from a spec (schedule and combiner only;
    CFGDenoiser always evaluates both branches, so gates, CADS and reward guidance need GuidedDenoiser).
    Build one per run: the returned closures share that run's state."""
    info = RunInfo(sigmas, kind, model_progress)

    def scale(sigma):
        return spec.weight(info.ctx(sigma=float(torch.as_tensor(sigma).reshape(-1)[0])))

    def combine_fn(cond, uncond, x, sigma, w):
        ctx = info.ctx(sigma=float(torch.as_tensor(sigma).reshape(-1)[0]))
        return apply_combiner(spec.combiner, cond, uncond, x, sigma, ctx, w)
    return scale, combine_fn
