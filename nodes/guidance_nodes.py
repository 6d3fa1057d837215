"""Guidance nodes: GUIDANCE_SCHEDULE builders, the Scheduled Guider (GUIDER), Apply Guidance Schedule (MODEL patch
for plain KSampler), CADS and reward guidance (GUIDER -> GUIDER), and a schedule plot.

Weights are ComfyUI cfg values (D = D_u + cfg·(D_c - D_u); 1 = no guidance). Every weight input is a FLOAT widget
with an optional GUIDANCE_SCHEDULE socket beside it: a connected schedule wins. Progress runs 0 at the first
(noisiest) step to 1 at the last. The ComfyUI side (the guider class, the MODEL patch) is host/guidance.py.
"""
import math

from ..host import guidance as comfy_guidance
from ..host.grad import grad_ready
from ..host.vae import decode, grad_vae
from ..plots import line_plot
from ..samplers import guidance as g

CATEGORY = "RewardLab/Guidance"
SCHEDULE = "GUIDANCE_SCHEDULE"
PROGRESS_AXES = ["p_step", "p_model"]
ALL_AXES = ["sigma_edm", "sigma", "log_snr", "p_step", "p_model"]
AXIS_TOOLTIP = ("Progress axis: p_step = sampling steps of this run (0 at the first step, 1 at the last); p_model = "
                "the model's own time (continuous across KSamplerAdvanced passes, like ConditioningSetTimestepRange).")
COMBINERS = list(g.COMBINER_NAMES)
SPACES = ["default", "x0", "eps", "velocity", "v_pred"]


def _float(default, lo, hi, step, tooltip):
    return ("FLOAT", {"default": default, "min": lo, "max": hi, "step": step, "tooltip": tooltip})


def _schedule_socket(what):
    return (SCHEDULE, {"tooltip": f"Optional schedule for {what}; when connected it replaces the number widget."})


def weight(value, schedule=None):
    """A schedule from the FLOAT widget and the optional GUIDANCE_SCHEDULE socket (the socket wins)."""
    return schedule if schedule is not None else g.Constant(float(value))


# --- schedules ---------------------------------------------------------------------------------------------------

class RewardLabGuidanceShape:
    DESCRIPTION = ("A guidance-weight curve over sampling progress p: constant, linear, cosine (flat ends), "
                   "power-cosine (MUSE), clamp-linear (Wang et al.), V or Λ. Increasing schedules are the ones Wang et "
                   "al. (2404.13040) found to help.")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = (SCHEDULE,)
    RETURN_NAMES = ("schedule",)
    OUTPUT_TOOLTIPS = ("The weight schedule (cfg units).",)
    SHAPES = ["constant", "linear", "cosine", "power_cosine", "clamp_linear", "V", "Λ"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "shape": (cls.SHAPES, {"default": "linear", "tooltip": "constant = start everywhere; linear/cosine/power_cosine "
                                   "go from start to end; clamp_linear = max(floor, linear); V and Λ go start -> end "
                                   "(at center) -> start."}),
            "start": _float(1.0, 0.0, 100.0, 0.1, "cfg at p = 0 (the first step); for V/Λ, at both ends."),
            "end": _float(13.0, 0.0, 100.0, 0.1, "cfg at p = 1 (the last step); for V/Λ, at the center."),
            "power": _float(2.0, 0.01, 16.0, 0.01, "power_cosine exponent s in (1 - cos(π·p^s))/2."),
            "floor": _float(2.0, 0.0, 100.0, 0.1, "clamp_linear lower bound (Wang et al. use cfg 2, i.e. w_HS = 1)."),
            "center": _float(0.5, 0.01, 0.99, 0.01, "V/Λ: progress of the turning point."),
            "axis": (PROGRESS_AXES, {"default": "p_step", "tooltip": AXIS_TOOLTIP}),
        }}

    def build(self, shape, start, end, power, floor, center, axis):
        if shape == "constant":
            return (g.Constant(start),)
        if shape == "linear":
            return (g.Linear(start, end, axis),)
        if shape == "cosine":
            return (g.Cosine(start, end, axis),)
        if shape == "power_cosine":
            return (g.PowerCosine(start, end, power, axis),)
        if shape == "clamp_linear":
            return (g.Max(g.Constant(floor), g.Linear(start, end, axis)),)
        if shape in ("V", "Λ"):
            if (shape == "V") != (end < start):
                raise ValueError(f"a {shape} shape needs end {'below' if shape == 'V' else 'above'} start; swap them "
                                 "or pick the other shape")
            return (g.VShape(start, end, center, axis),)
        raise ValueError(f"unknown shape {shape!r}")


class RewardLabGuidanceWang:
    DESCRIPTION = ("Wang et al. (2404.13040) guidance schedulers at a given mean cfg: linear/cosine increasing (mean over "
                   "the steps = cfg), clamp-linear, power-cosine (peaks at cfg), inverse-linear (decreasing, for "
                   "comparison). Increasing schedules are the paper's recommendation.")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = (SCHEDULE,)
    RETURN_NAMES = ("schedule",)
    OUTPUT_TOOLTIPS = ("The weight schedule (cfg units).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "family": (["linear", "cosine", "clamp-linear", "pcs", "inv-linear", "static"],
                       {"default": "linear", "tooltip": "Scheduler family from the paper."}),
            "cfg": _float(7.5, 1.0, 100.0, 0.1, "Mean cfg (= 1 + the paper's w0)."),
            "floor": _float(2.0, 0.0, 100.0, 0.1, "clamp-linear floor in cfg units."),
            "power": _float(1.0, 0.01, 16.0, 0.01, "pcs exponent s."),
            "axis": (PROGRESS_AXES, {"default": "p_step", "tooltip": AXIS_TOOLTIP}),
        }}

    def build(self, family, cfg, floor, power, axis):
        return (g.wang(family, cfg, floor=floor, power=power, axis=axis),)


class RewardLabGuidanceInterval:
    DESCRIPTION = ("Guidance only inside an interval (Kynkäänniemi et al. 2404.07724): the weight inside, `outside` "
                   "elsewhere. With outside = 1 the negative prompt is not evaluated there at all (fewer model calls). "
                   "σ axes use (low, high]; SDXL's published interval is σ ∈ (0.28, 5.42] in EDM units.")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = (SCHEDULE,)
    RETURN_NAMES = ("schedule",)
    OUTPUT_TOOLTIPS = ("The gated weight schedule.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "cfg": _float(7.0, 0.0, 100.0, 0.1, "cfg inside the interval."),
            "low": _float(0.28, 0.0, 1000.0, 0.01, "Lower bound (exclusive on σ axes, inclusive on progress axes)."),
            "high": _float(5.42, 0.0, 1000.0, 0.01, "Upper bound (inclusive)."),
            "axis": (ALL_AXES, {"default": "sigma_edm", "tooltip": "sigma_edm = σ in EDM units (the model's σ for SD1.5/"
                                "SDXL, σ/(1-σ) for flow models); sigma = the raw σ; log_snr; or a progress axis."}),
            "outside": _float(1.0, 0.0, 100.0, 0.1, "cfg outside the interval (1 = no guidance, uncond skipped)."),
        }, "optional": {
            "cfg_schedule": _schedule_socket("the weight inside the interval"),
            "decide": (["per call", "per step"], {"default": "per call", "tooltip": "per call: the paper's w(σ) at "
                       "every model call's σ. per step: once per sampling step from the σ it starts at, as the "
                       "authors' sampler does (off-grid midpoint calls of 2S/SDE samplers follow their step)."}),
        }}

    def build(self, cfg, low, high, axis, outside, cfg_schedule=None, decide="per call"):
        return (g.Interval(weight(cfg, cfg_schedule), low, high, axis, outside,
                           decide="step" if decide == "per step" else "call"),)


class RewardLabGuidanceKeyframes:
    DESCRIPTION = "A schedule from keyframes 'position:cfg, ...' on any axis, interpolated between them."
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = (SCHEDULE,)
    RETURN_NAMES = ("schedule",)
    OUTPUT_TOOLTIPS = ("The keyframed weight schedule.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "keyframes": ("STRING", {"default": "0:3.0, 0.5:7.5, 1:5.0", "multiline": True,
                                     "tooltip": "Comma-separated position:cfg pairs; values are held beyond the ends."}),
            "axis": (ALL_AXES, {"default": "p_step", "tooltip": "Axis of the positions (progress 0..1, or σ units)."}),
            "interpolation": (list(g.schedules.INTERPOLATIONS), {"default": "linear",
                              "tooltip": "linear; ease (smoothstep, flat at keyframes); step (hold the earlier value)."}),
        }}

    def build(self, keyframes, axis, interpolation):
        return (g.Keyframes.parse(keyframes, axis, interpolation),)


class RewardLabGuidanceFromSigmas:
    DESCRIPTION = ("A schedule from a per-step list carried in a SIGMAS socket (one cfg per step, e.g. from a "
                   "curve node); a list of another length is stretched over the run.")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = (SCHEDULE,)
    RETURN_NAMES = ("schedule",)
    OUTPUT_TOOLTIPS = ("The per-step weight schedule.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"weights": ("SIGMAS", {"tooltip": "One cfg value per sampling step (n or n+1 values)."})}}

    def build(self, weights):
        return (g.PerStep(tuple(float(v) for v in weights.flatten().tolist())),)


class RewardLabGuidanceMath:
    DESCRIPTION = "Combine two weights (schedules or numbers): multiply, add, subtract, min, max."
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = (SCHEDULE,)
    RETURN_NAMES = ("schedule",)
    OUTPUT_TOOLTIPS = ("The combined schedule.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "operation": (list(g.Combine.OPS), {"default": "multiply", "tooltip": "How a and b combine at every step."}),
            "a": _float(1.0, -100.0, 100.0, 0.01, "First operand (when no schedule is connected to a_schedule)."),
            "b": _float(1.0, -100.0, 100.0, 0.01, "Second operand (when no schedule is connected to b_schedule)."),
        }, "optional": {"a_schedule": _schedule_socket("a"), "b_schedule": _schedule_socket("b")}}

    def build(self, operation, a, b, a_schedule=None, b_schedule=None):
        return (g.Combine(operation, weight(a, a_schedule), weight(b, b_schedule)),)


class RewardLabGuidanceTransform:
    DESCRIPTION = ("Transform a schedule: invert (time-reverse), hs_to_cfg (Ho–Salimans w -> cfg = 1 + w), cfg_to_hs, "
                   "normalize_mean (Wang et al.: rescale around cfg 1 so the mean over the run's steps is `target`), "
                   "remap [in_low, in_high] -> [out_low, out_high].")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = (SCHEDULE,)
    RETURN_NAMES = ("schedule",)
    OUTPUT_TOOLTIPS = ("The transformed schedule.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "schedule": (SCHEDULE, {"tooltip": "The schedule to transform."}),
            "transform": (["invert", "hs_to_cfg", "cfg_to_hs", "normalize_mean", "remap"],
                          {"default": "normalize_mean", "tooltip": "What to do (see the node description)."}),
            "target": _float(7.5, 0.0, 100.0, 0.1, "normalize_mean: the mean cfg over the run's steps."),
            "in_low": _float(1.0, -100.0, 100.0, 0.01, "remap: input value mapped to out_low."),
            "in_high": _float(13.0, -100.0, 100.0, 0.01, "remap: input value mapped to out_high."),
            "out_low": _float(1.0, -100.0, 100.0, 0.01, "remap: output for in_low."),
            "out_high": _float(7.0, -100.0, 100.0, 0.01, "remap: output for in_high."),
            "clamp": ("BOOLEAN", {"default": False, "tooltip": "remap: clamp to [out_low, out_high]."}),
        }}

    def build(self, schedule, transform, target, in_low, in_high, out_low, out_high, clamp):
        if transform == "invert":
            return (g.Invert(schedule),)
        if transform == "hs_to_cfg":
            return (g.Affine(schedule, 1.0, 1.0),)
        if transform == "cfg_to_hs":
            return (g.Affine(schedule, 1.0, -1.0),)
        if transform == "normalize_mean":
            return (g.NormalizeMean(schedule, target),)
        return (g.Remap(schedule, in_low, in_high, out_low, out_high, clamp),)


# --- guiders -----------------------------------------------------------------------------------------------------

def combiner_inputs():
    return {
        "combiner": (COMBINERS, {"default": "cfg", "tooltip": "cfg: D_u + w(D_c - D_u). apg: Adaptive Projected "
                     "Guidance at the paper's scale (w - 1). cfg_zero_star: CFG-Zero* in velocity space. cfg_rescale: "
                     "Lin et al. rescale (φ)."}),
        "preset": (["custom", "paper"], {"default": "custom", "tooltip": "paper: the combiner's published values "
                   "(APG η 0, r 15, β −0.5; CFG-Zero* zeroes the first step; rescale φ 0.7) replace the widgets below. "
                   "custom: the widgets. The defaults already are the papers' values."}),
        "apg_eta": _float(g.COMBINER_PAPER["apg_eta"], 0.0, 1.0, 0.01, "APG η: weight of the update parallel to D_c (paper: 0)."),
        "apg_norm_threshold": _float(g.COMBINER_PAPER["apg_norm_threshold"], 0.0, 100.0, 0.1, "APG r: cap on ‖Δ‖ per image "
                                     "(paper: 15 for SDXL, 2.5 for EDM2; 0 = no cap)."),
        "apg_momentum": _float(g.COMBINER_PAPER["apg_momentum"], -1.0, 1.0, 0.01, "APG β: running-average momentum (paper: −0.5, "
                               "a reverse momentum; 0 = off)."),
        "zero_init_steps": ("INT", {"default": g.COMBINER_PAPER["zero_init_steps"], "min": 0, "max": 100, "tooltip": "CFG-Zero*: "
                                    "first steps with a zero velocity (no model call). 1 = the paper's first step; "
                                    "the authors suggest about 4% of the steps; 0 = off."}),
        "rescale_phi": _float(g.COMBINER_PAPER["rescale_phi"], 0.0, 1.0, 0.01, "CFG-rescale φ: mix of the rescaled and the plain "
                              "CFG result (paper: 0.7)."),
        "space": (SPACES, {"default": "default", "tooltip": "Prediction space of the combiner (default: apg x0, "
                           "cfg_zero_star velocity, cfg_rescale v_pred). CFG is the same in every space."}),
        "adaptive_guidance": ("BOOLEAN", {"default": False, "tooltip": "Adaptive Guidance (Castillo et al.): once cond "
                              "and uncond agree (cosine ≥ threshold), later steps skip the negative prompt entirely."}),
        "adaptive_threshold": _float(0.99, 0.0, 1.0, 0.0001, "Adaptive Guidance cosine-similarity threshold."),
        "adaptive_space": (SPACES[1:], {"default": "x0", "tooltip": "Space in which Adaptive Guidance compares cond "
                           "and uncond. The paper compares ε; at high noise ε is dominated by the shared x/σ term and "
                           "latches at once (docs/methods.md §4.8), so x0 is the default."}),
        "linear_ag": ("BOOLEAN", {"default": False, "tooltip": "LinearAG (Castillo et al.): on every other step of the "
                      "first half the negative prompt is not evaluated but estimated as an affine function of the "
                      "current and previous predictions. The first run with a step count calibrates the coefficients "
                      "(full cost); later runs with that step count save those evaluations."}),
    }


class RewardLabScheduledGuider:
    DESCRIPTION = ("A GUIDER for SamplerCustomAdvanced with a scheduled cfg and a choice of combiner (CFG, APG, "
                   "CFG-Zero*, CFG-rescale) and optional Adaptive Guidance. Wherever the weight is 1 (e.g. outside a "
                   "guidance interval) or Adaptive Guidance has latched, the negative prompt is not evaluated.")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = ("GUIDER",)
    RETURN_NAMES = ("guider",)
    OUTPUT_TOOLTIPS = ("Connect to SamplerCustomAdvanced (or to the CADS / Reward Guidance nodes).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model."}),
            "positive": ("CONDITIONING", {"tooltip": "Positive conditioning."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative conditioning (the uncond branch)."}),
            "cfg": _float(7.0, 0.0, 100.0, 0.1, "Constant cfg when no schedule is connected."),
            **combiner_inputs(),
        }, "optional": {"cfg_schedule": _schedule_socket("cfg")}}

    def build(self, model, positive, negative, cfg, cfg_schedule=None, **kw):
        spec = g.spec_from_options(weight(cfg, cfg_schedule), **kw)
        return (comfy_guidance.scheduled_guider(model, positive, negative, spec),)


class RewardLabApplyGuidanceSchedule:
    DESCRIPTION = ("Patch a MODEL so any sampler node, plain KSampler included, uses a cfg schedule, a combiner and "
                   "optional Adaptive Guidance. Without a schedule the weight is the sampler node's cfg.")
    CATEGORY = CATEGORY
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The patched model (the input MODEL is not changed).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL", {"tooltip": "The diffusion model to patch."}), **combiner_inputs()},
                "optional": {"cfg_schedule": (SCHEDULE, {"tooltip": "cfg schedule; when absent the KSampler's cfg is "
                                                         "used as a constant weight."})}}

    def patch(self, model, cfg_schedule=None, **kw):
        spec = g.spec_from_options(cfg_schedule if cfg_schedule is not None else 1.0, **kw)
        return (comfy_guidance.patch_model(model, spec, use_sampler_cfg=cfg_schedule is None),)


class RewardLabCADSGuider:
    DESCRIPTION = ("CADS (Sadat et al. 2310.17347): anneal the text conditioning with noise early in sampling for more "
                   "diverse images at high cfg. γ ramps from 0 (pure noise, t ≥ τ2) to 1 (clean, t ≤ τ1), t = 1 - p.")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = ("GUIDER",)
    RETURN_NAMES = ("guider",)
    OUTPUT_TOOLTIPS = ("The guider with condition annealing.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "guider": ("GUIDER", {"tooltip": "A CFGGuider or RewardLab Scheduled Guider (left unchanged)."}),
            "tau1": _float(0.6, 0.0, 1.0, 0.01, "τ1: the condition is clean once t ≤ τ1 (t = 1 at the first step)."),
            "tau2": _float(0.9, 0.0, 1.0, 0.01, "τ2: the condition is pure scaled noise while t ≥ τ2."),
            "noise_scale": _float(0.25, 0.0, 2.0, 0.01, "s: noise scale (the authors recommend ≤ 0.3)."),
            "psi": _float(1.0, 0.0, 1.0, 0.01, "ψ: mix of the rescaled (mean/std restored) and raw noised condition."),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "Seed of the condition noise."}),
            "axis": (PROGRESS_AXES, {"default": "p_step", "tooltip": AXIS_TOOLTIP}),
        }}

    def build(self, guider, tau1, tau2, noise_scale, psi, seed, axis):
        cads = g.CADS(tau1, tau2, noise_scale, psi, seed, axis)
        base = guider.spec.cond_ops if isinstance(guider, comfy_guidance.scheduled_guider_class()) else ()
        return (comfy_guidance.derive_guider(guider, cond_ops=tuple(base) + (cads,)),)


class RewardLabRewardGuider:
    DESCRIPTION = ("Reward guidance (universal guidance, Bansal et al. 2302.07121): at the steps in the window, push "
                   "the prediction along the gradient of a REWARD_MODEL on the VAE-decoded x̂0, D += s·σ²·∇R; optional "
                   "backward steps optimise x̂0 directly. Needs gradients: slower and more memory than plain sampling.")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = ("GUIDER",)
    RETURN_NAMES = ("guider",)
    OUTPUT_TOOLTIPS = ("The guider with reward guidance.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "guider": ("GUIDER", {"tooltip": "A CFGGuider or RewardLab Scheduled Guider (left unchanged)."}),
            "vae": ("VAE", {"tooltip": "VAE used to decode x̂0 for the reward (differentiably)."}),
            "reward": ("REWARD_MODEL", {"tooltip": "The reward to increase."}),
            "prompt": ("STRING", {"default": "", "multiline": True, "tooltip": "Prompt for rewards that read text."}),
            "strength": _float(1.0, 0.0, 10000.0, 0.01, "s: forward guidance strength (scaled by σ²)."),
            "start": _float(0.0, 0.0, 1.0, 0.01, "Window start in step progress."),
            "end": _float(0.8, 0.0, 1.0, 0.01, "Window end in step progress."),
            "backward_steps": ("INT", {"default": 0, "min": 0, "max": 50, "tooltip": "Backward guidance: gradient "
                               "steps on x̂0 per guided step (0 = off)."}),
            "backward_lr": _float(0.1, 0.0, 1000.0, 0.001, "Step size of the backward-guidance updates."),
            "gradient": (["through model", "x0 only"], {"default": "x0 only", "tooltip": "through model: the paper's "
                         "gradient through the denoiser (needs a grad-ready model copy, slow); x0 only: the cheap variant "
                         "differentiating the reward w.r.t. x̂0."}),
        }, "optional": {
            "strength_schedule": _schedule_socket("the strength"),
            "recurrence": ("INT", {"default": 1, "min": 1, "max": 20, "tooltip": "Self-recurrence k (the paper's "
                           "Algorithm 1): at each guided step, step, re-noise back and guide again, k times in all "
                           "(k× the cost; the paper's examples use 2 to 10). 1 = off."}),
        }}

    def build(self, guider, vae, reward, prompt, strength, start, end, backward_steps, backward_lr, gradient,
              strength_schedule=None, recurrence=1):
        vae_patcher = grad_vae(vae)
        prompts = prompt.strip() or None

        def score(images):
            return reward(images, None if prompts is None else [prompts] * images.shape[0])

        through = gradient == "through model"
        guidance = g.RewardGuidance(score, lambda latent: decode(vae, latent, patcher=vae_patcher),
                                    weight(strength, strength_schedule), start, end, backward_steps, backward_lr,
                                    through_model=through, recurrence=recurrence)
        model = grad_ready(guider.model_patcher) if through else None
        return (comfy_guidance.derive_guider(guider, model=model, reward=guidance),)


class RewardLabPAGGuider:
    DESCRIPTION = ("Perturbed-Attention Guidance (Ahn et al. 2403.17377): one more conditional model call per step with "
                   "the self-attention of the chosen UNet blocks replaced by the identity, and D += s·(D_cond − "
                   "D_perturbed). Works with or without CFG; the scale takes a schedule.")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = ("GUIDER",)
    RETURN_NAMES = ("guider",)
    OUTPUT_TOOLTIPS = ("The guider with the PAG term (connect to SamplerCustomAdvanced).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "guider": ("GUIDER", {"tooltip": "A CFGGuider or RewardLab Scheduled Guider (left unchanged)."}),
            "scale": _float(3.0, 0.0, 100.0, 0.01, "s: PAG scale (the authors' SD example uses 5 without CFG; "
                            "ComfyUI and diffusers use 3 with CFG)."),
            "layers": ("STRING", {"default": "middle.0", "tooltip": "UNet blocks whose self-attention is perturbed: "
                                  "block.index[.transformer], e.g. 'middle.0' (the paper's SD choice), 'input.4', "
                                  "'output.1'; comma-separated."}),
            "start": _float(0.0, 0.0, 1.0, 0.01, "First step fraction i/n with PAG."),
            "end": _float(1.0, 0.0, 1.0, 0.01, "Last step fraction i/n with PAG."),
        }, "optional": {"scale_schedule": _schedule_socket("the PAG scale")}}

    def build(self, guider, scale, layers, start, end, scale_schedule=None):
        term = g.GuidanceTerm("pag", weight(scale, scale_schedule), comfy_guidance.parse_layers(layers, "pag"), start,
                              end)
        return (_with_term(guider, term),)


class RewardLabSLGGuider:
    DESCRIPTION = ("Skip-Layer Guidance (Stability AI, SD3.5): one more conditional model call per step with the "
                   "chosen DiT blocks skipped, and D += s·(D_cond − D_skipped), inside a window of the steps. For DiT "
                   "models (SD3, Flux, ...); use Perturbed-Attention Guidance for UNets.")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = ("GUIDER",)
    RETURN_NAMES = ("guider",)
    OUTPUT_TOOLTIPS = ("The guider with the SLG term (connect to SamplerCustomAdvanced).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "guider": ("GUIDER", {"tooltip": "A CFGGuider or RewardLab Scheduled Guider (left unchanged)."}),
            "scale": _float(2.8, 0.0, 100.0, 0.01, "s: SLG scale (Stability's SD3.5 Medium value: 2.8)."),
            "layers": ("STRING", {"default": "7, 8, 9", "tooltip": "DiT blocks to skip: numbers (double/joint blocks) "
                                  "or 'single.N' (Flux single blocks), comma-separated. SD3.5 Medium: 7, 8, 9."}),
            "start": _float(0.01, 0.0, 1.0, 0.001, "SLG runs while start < i/n < end (Stability: 0.01)."),
            "end": _float(0.2, 0.0, 1.0, 0.001, "SLG runs while start < i/n < end (Stability: 0.2)."),
        }, "optional": {"scale_schedule": _schedule_socket("the SLG scale")}}

    def build(self, guider, scale, layers, start, end, scale_schedule=None):
        term = g.GuidanceTerm("slg", weight(scale, scale_schedule), comfy_guidance.parse_layers(layers, "slg"), start,
                              end)
        return (_with_term(guider, term),)


def _with_term(guider, term):
    base = guider.spec.terms if isinstance(guider, comfy_guidance.scheduled_guider_class()) else ()
    return comfy_guidance.derive_guider(guider, terms=tuple(base) + (term,))


class RewardLabPlotGuidanceSchedule:
    DESCRIPTION = "Plot a weight schedule for a MODEL + SIGMAS: cfg against the step and against σ."
    CATEGORY = CATEGORY
    FUNCTION = "plot"
    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("by_step", "by_sigma")
    OUTPUT_TOOLTIPS = ("cfg per sampling step.", "cfg against log10 σ (EDM units), noisiest on the right.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model (its σ units and model-time axis)."}),
            "sigmas": ("SIGMAS", {"tooltip": "The run's sigmas, e.g. from BasicScheduler."}),
            "cfg": _float(7.0, 0.0, 100.0, 0.1, "Constant cfg when no schedule is connected."),
        }, "optional": {"cfg_schedule": _schedule_socket("cfg")}}

    def plot(self, model, sigmas, cfg, cfg_schedule=None):
        values, sigma_edm = comfy_guidance.schedule_values(model, sigmas, weight(cfg, cfg_schedule))
        by_step = line_plot({"cfg": values}, title="guidance weight by step", xlabel="step", ylabel="cfg")
        # log σ: the noisy end spans decades; the plot font has no Greek letters
        log_sigma = [math.log10(max(s, 1e-6)) for s in sigma_edm]
        by_sigma = line_plot({"cfg": values}, title="guidance weight by sigma", xlabel="log10 sigma (EDM units)",
                             ylabel="cfg", x=log_sigma)
        return (by_step, by_sigma)


NODE_CLASS_MAPPINGS = {
    "RewardLabGuidanceShape": RewardLabGuidanceShape,
    "RewardLabGuidanceWang": RewardLabGuidanceWang,
    "RewardLabGuidanceInterval": RewardLabGuidanceInterval,
    "RewardLabGuidanceKeyframes": RewardLabGuidanceKeyframes,
    "RewardLabGuidanceFromSigmas": RewardLabGuidanceFromSigmas,
    "RewardLabGuidanceMath": RewardLabGuidanceMath,
    "RewardLabGuidanceTransform": RewardLabGuidanceTransform,
    "RewardLabScheduledGuider": RewardLabScheduledGuider,
    "RewardLabApplyGuidanceSchedule": RewardLabApplyGuidanceSchedule,
    "RewardLabCADSGuider": RewardLabCADSGuider,
    "RewardLabRewardGuider": RewardLabRewardGuider,
    "RewardLabPAGGuider": RewardLabPAGGuider,
    "RewardLabSLGGuider": RewardLabSLGGuider,
    "RewardLabPlotGuidanceSchedule": RewardLabPlotGuidanceSchedule,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "RewardLabGuidanceShape": "Guidance Schedule (Shape)",
    "RewardLabGuidanceWang": "Guidance Schedule (Wang et al.)",
    "RewardLabGuidanceInterval": "Guidance Interval",
    "RewardLabGuidanceKeyframes": "Guidance Schedule (Keyframes)",
    "RewardLabGuidanceFromSigmas": "Guidance Schedule from SIGMAS",
    "RewardLabGuidanceMath": "Guidance Schedule Math",
    "RewardLabGuidanceTransform": "Guidance Schedule Transform",
    "RewardLabScheduledGuider": "Scheduled Guider",
    "RewardLabApplyGuidanceSchedule": "Apply Guidance Schedule",
    "RewardLabCADSGuider": "CADS (Condition Annealing)",
    "RewardLabRewardGuider": "Reward Guidance",
    "RewardLabPAGGuider": "Perturbed-Attention Guidance",
    "RewardLabSLGGuider": "Skip-Layer Guidance",
    "RewardLabPlotGuidanceSchedule": "Plot Guidance Schedule",
}
