"""Guidance weight schedules and guided-combination methods (host-free). See docs/methods.md and guided.py."""
from .cads import CADS
from .combiners import (APG, APG_PAPER, CFG, COMBINER_NAMES, COMBINER_PAPER, AdaptiveGuidance, CFGRescale, CFGZeroStar,
                        Combiner, Gate, LinearAG, apply_combiner, fit_affine, make_combiner)
from .context import AXES, KINDS, SPACES, RunInfo, StepCtx, from_space, to_space
from .guided import GuidanceSpec, GuidedDenoiser, GuidedRun, cfg_denoiser_hooks, guided_step, spec_from_options
from .reward import RewardGuidance
from .terms import TERM_KINDS, GuidanceTerm, apply_terms, pag, perturbed_modules, slg
from .schedules import (Add, Affine, ClampLinear, Combine, Constant, Cosine, Interval, Invert, Keyframes, Linear, Max,
                        Min, Multiply, NormalizeMean, PerStep, PowerCosine, Remap, Schedule, VShape, as_schedule, wang)

__all__ = ["CADS", "APG", "APG_PAPER", "CFG", "COMBINER_NAMES", "COMBINER_PAPER", "AdaptiveGuidance", "CFGRescale", "CFGZeroStar", "Combiner", "Gate", "LinearAG", "fit_affine", "TERM_KINDS", "GuidanceTerm", "apply_terms", "pag",
           "perturbed_modules", "slg",
           "apply_combiner", "make_combiner", "spec_from_options",
           "AXES", "KINDS", "SPACES", "RunInfo", "StepCtx", "from_space", "to_space", "GuidanceSpec", "GuidedDenoiser",
           "GuidedRun", "cfg_denoiser_hooks", "guided_step", "RewardGuidance", "Add", "Affine", "ClampLinear",
           "Combine", "Constant", "Cosine", "Interval", "Invert", "Keyframes", "Linear", "Max", "Min", "Multiply",
           "NormalizeMean", "PerStep", "PowerCosine", "Remap", "Schedule", "VShape", "as_schedule", "wang"]
