"""ComfyUI side of guidance: the Scheduled Guider (a CFGGuider subclass) and the MODEL patch for plain KSampler.

Both run the host-free ``guided_step`` with a ComfyUI branch evaluator, so the numbers match the core:
    σ                 timestep[0] (hooks see no step index)
    step / progress   model_options["transformer_options"]["sample_sigmas"] (the run's σ list), interpolated off-grid
    model progress    the inverse of model_sampling.percent_to_sigma, tabulated once per run
    branches          comfy.samplers.calc_cond_batch([cond, uncond or None]); uncond is None (not computed) when the
                      weight is 1 or a gate closed: never a zeros uncond inside a formula (docs/methods.md, "Guidance")
    CFG               comfy.samplers.cfg_function, so sampler_cfg_function and post-CFG patches still apply
    other combiners   core combiner in its declared space, then the post-CFG patches
    guidance terms    one more calc_cond_batch of the cond with model-option patches: PAG replaces self-attention
                      ("attn1") in the named UNet blocks by its values, SLG skips the named DiT blocks ("dit"
                      double_block / single_block), the patches ComfyUI's own PAG and SLG nodes use
    per-run state     a RunState made in outer_sample (guider) or an OUTER_SAMPLE wrapper (MODEL patch)

comfy is imported lazily inside functions: importing this module never imports ComfyUI.
"""
import copy
import importlib
import math
import uuid

import numpy as np
import torch

from ..samplers.guidance import CFG, Constant, GuidanceSpec, RunInfo, apply_combiner, guided_step
from .models import check_conditioning, model_kind

_GUIDER_CLASS = None


def _comfy(module):
    return importlib.import_module(module)


class RunState:
    """Per-run guidance state. An object, not a dict, so ComfyUI's nested-dict option copies share it within a run."""

    def __init__(self):
        self.data = {}
        self.info = None
        self.sigmas = None


def guidance_kind(model_sampling):
    """The core guidance's prediction kind (const, v or eps) of a ComfyUI model."""
    return {"CONST": "const", "V_PREDICTION": "v", "EDM": "v"}.get(model_kind(model_sampling), "eps")


def model_progress(model_sampling, points=1001):
    """σ -> model progress p: the inverse of ``percent_to_sigma`` (the axis ConditioningSetTimestepRange uses)."""
    ps = np.linspace(0.0, 1.0, points)[1:-1]
    sig = np.array([float(model_sampling.percent_to_sigma(float(p))) for p in ps])
    neg_log = -np.log(np.clip(sig, 1e-12, None))            # increasing with p

    def progress(sigma):
        if sigma >= sig[0]:
            return 0.0
        if sigma <= sig[-1]:
            return 1.0
        return float(np.interp(-math.log(sigma), neg_log, ps))
    return progress


def run_info(state, inner_model, model_options):
    sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
    if sigmas is None:
        raise RuntimeError("RewardLab guidance needs the run's sigmas (transformer_options['sample_sigmas']); run it "
                           "through a ComfyUI sampler node (KSampler or SamplerCustomAdvanced)")
    if state.info is None or state.sigmas is not sigmas:
        ms = inner_model.model_sampling
        state.info = RunInfo(sigmas.detach().float().cpu(), guidance_kind(ms), model_progress(ms), state=state.data)
        state.sigmas = sigmas
    return state.info


def _with_cond_ops(model_options, cond_ops, ctx):
    """Model options whose model_function_wrapper passes the text embeddings (c_crossattn, y) through CADS."""
    if not cond_ops:
        return model_options
    previous = model_options.get("model_function_wrapper")

    def wrapper(apply_model, args):
        c = dict(args["c"])
        embeds = {k: c[k] for k in ("c_crossattn", "y") if isinstance(c.get(k), torch.Tensor)}
        for op in cond_ops:
            embeds = op(embeds, ctx)
        c.update(embeds)
        args = {**args, "c": c}
        if previous is not None:
            return previous(apply_model, args)
        return apply_model(args["input"], args["timestep"], **c)

    opts = dict(model_options)
    opts["model_function_wrapper"] = wrapper
    return opts


def parse_layers(text, kind):
    """Layer names of a guidance term from a node's text. PAG: UNet blocks "middle.0", "input.4", "output.1.0"
    (block, index[, transformer index]); SLG: DiT blocks "double.7", "single.12" (a bare number is a double block)."""
    layers = []
    for item in text.replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.split(".")
        if kind == "slg" and len(parts) == 1:
            parts = ["double", parts[0]]
        blocks, lengths = ((("input", "middle", "output"), (2, 3)) if kind == "pag" else (("double", "single"), (2,)))
        if parts[0] not in blocks or len(parts) not in lengths or not all(p.isdigit() for p in parts[1:]):
            example = "middle.0, input.4, output.1.0" if kind == "pag" else "double.7, double.8, single.12"
            raise ValueError(f"{kind.upper()} layer {item!r} is not understood; write e.g. '{example}'")
        layers.append(".".join(parts))
    if not layers:
        raise ValueError(f"{kind.upper()} needs at least one layer")
    return tuple(layers)


def _identity_attention(q, k, v, extra_options, mask=None):
    return v


def _skip_block(args, extra_args):
    return args


def term_options(model_options, term, model):
    """Model options for a guidance term's perturbed conditional call (ComfyUI's patch-replace mechanism)."""
    mp = _comfy("comfy.model_patcher")
    opts = dict(model_options)
    for layer in term.layers:
        parts = layer.split(".")
        if term.kind == "pag":
            opts = mp.set_model_options_patch_replace(opts, _identity_attention, "attn1", parts[0], int(parts[1]),
                                                      int(parts[2]) if len(parts) > 2 else None)
        else:
            if hasattr(model.diffusion_model, "input_blocks"):         # a UNet has no "dit" blocks to skip
                raise ValueError("Skip-layer guidance skips DiT blocks (SD3, Flux, ...); this is a UNet model: use "
                                 "Perturbed-Attention Guidance for UNet models (SD1.5, SDXL)")
            opts = mp.set_model_options_patch_replace(opts, _skip_block, "dit", f"{parts[0]}_block", int(parts[1]))
    return opts


def _post_cfg(opts, D, D_c, D_u, w, model, x, timestep, cond, uncond):
    for fn in opts.get("sampler_post_cfg_function", []):
        D = fn({"denoised": D, "cond": cond, "uncond": uncond, "cond_scale": w, "model": model, "uncond_denoised": D_u,
                "cond_denoised": D_c, "sigma": timestep, "model_options": opts, "input": x})
    return D


def guided_predict(spec, guider, x, timestep, model_options, seed, state):
    """The guided denoised prediction for one ComfyUI model call (what CFGGuider.predict_noise returns)."""
    samplers = _comfy("comfy.samplers")
    model = guider.inner_model
    info = run_info(state, model, model_options)
    ctx = info.ctx(sigma=float(timestep.reshape(-1)[0]))
    cond, uncond = guider.conds.get("positive"), guider.conds.get("negative")
    opts = _with_cond_ops(model_options, spec.cond_ops, ctx)

    def predict(x_in):
        def evaluate(need_uncond):
            conds = [cond, uncond if need_uncond else None]
            if "sampler_calc_cond_batch_function" in opts:
                out = opts["sampler_calc_cond_batch_function"](
                    {"conds": conds, "input": x_in, "sigma": timestep, "model": model, "model_options": opts})
            else:
                out = samplers.calc_cond_batch(model, conds, x_in, timestep, opts)
            scale = spec.weight(ctx) if need_uncond else 1.0
            for fn in opts.get("sampler_pre_cfg_function", []):
                out = fn({"conds": conds, "conds_out": out, "cond_scale": scale, "timestep": timestep, "input": x_in,
                          "sigma": timestep, "model": model, "model_options": opts})
            return out[0], (out[1] if need_uncond else None)

        def finish(D_c, D_u, w, need_uncond):
            u = D_u if need_uncond else torch.zeros_like(D_c)
            if isinstance(spec.combiner, CFG):
                return samplers.cfg_function(model, D_c, u, w if need_uncond else 1.0, x_in, timestep,
                                             model_options=opts, cond=cond, uncond=uncond if need_uncond else None)
            D = apply_combiner(spec.combiner, D_c, D_u, x_in, timestep, ctx, w) if need_uncond else D_c
            return _post_cfg(opts, D, D_c, u, w if need_uncond else 1.0, model, x_in, timestep, cond,
                             uncond if need_uncond else None)

        def perturbed(term):
            return samplers.calc_cond_batch(model, [cond], x_in, timestep, term_options(opts, term, model))[0]

        return guided_step(spec, ctx, x_in, timestep, evaluate, has_uncond=uncond is not None, finish=finish,
                           perturbed=perturbed)

    reward = spec.reward
    if reward is not None and reward.active(ctx):
        reward = copy.copy(reward)
        latent_decode = reward.decode
        if latent_decode is not None:       # the node's decode takes an unscaled (VAE-space) latent
            reward.decode = lambda D: latent_decode(model.process_latent_out(D))
        return reward.apply(ctx, x, predict)
    return predict(x)


def scheduled_guider_class():
    """The CFGGuider subclass, built on first use so importing this module never imports comfy."""
    global _GUIDER_CLASS
    if _GUIDER_CLASS is None:
        samplers = _comfy("comfy.samplers")

        class RewardLabScheduledGuider(samplers.CFGGuider):
            """CFGGuider whose predict_noise runs a GuidanceSpec with per-run state."""

            def __init__(self, model_patcher, spec):
                super().__init__(model_patcher)
                self.spec = spec
                self._run = None
                scale = spec.scale
                self.cfg = scale.value if isinstance(scale, Constant) else 1.0    # informative only

            def outer_sample(self, *args, **kwargs):
                self._run = RunState()          # fresh state for every sampling run
                try:
                    return super().outer_sample(*args, **kwargs)
                finally:
                    self._run = None

            def predict_noise(self, x, timestep, model_options={}, seed=None):
                return guided_predict(self.spec, self, x, timestep, model_options, seed, self._run or RunState())

        _GUIDER_CLASS = RewardLabScheduledGuider
    return _GUIDER_CLASS


def scheduled_guider(model, positive, negative, spec):
    check_conditioning(model, positive, "positive")
    check_conditioning(model, negative, "negative")
    guider = scheduled_guider_class()(model, spec)
    guider.set_conds(positive, negative)
    return guider


def derive_guider(guider, model=None, **spec_changes):
    """A new Scheduled Guider from a GUIDER (ours or a stock CFGGuider, whose cfg becomes a constant weight) with
    some spec fields replaced. The input guider is left untouched."""
    if isinstance(guider, scheduled_guider_class()):
        spec = guider.spec
    elif hasattr(guider, "original_conds") and hasattr(guider, "cfg"):
        spec = GuidanceSpec(scale=float(guider.cfg))
    else:
        raise ValueError("this node needs a GUIDER from CFGGuider or RewardLab Scheduled Guider")
    fields = dict(scale=spec.scale, combiner=spec.combiner, gates=spec.gates, cond_ops=spec.cond_ops, reward=spec.reward,
                  terms=spec.terms)
    fields.update(spec_changes)
    new = scheduled_guider_class()(model if model is not None else guider.model_patcher, GuidanceSpec(**fields))
    new.original_conds = dict(guider.original_conds)
    return new


def patch_model(model, spec, use_sampler_cfg=False):
    """A MODEL clone whose guidance is ``spec`` under any sampler node (KSampler too), via an OUTER_SAMPLE wrapper
    (per-run state) and a PREDICT_NOISE wrapper (the guided step). ``use_sampler_cfg``: the weight is the sampler
    node's cfg instead of spec.scale."""
    pe = _comfy("comfy.patcher_extension")
    mp_module = _comfy("comfy.model_patcher")
    key = f"rewardlab_guidance_{uuid.uuid4().hex[:8]}"
    patched = model.clone()

    def outer_sample(executor, *args, **kwargs):
        guider = executor.class_obj
        original = guider.model_options
        guider.model_options = mp_module.create_model_options_clone(original)
        guider.model_options.setdefault("transformer_options", {})[key] = RunState()
        try:
            return executor(*args, **kwargs)
        finally:
            guider.model_options = original

    def predict_noise(executor, x, timestep, model_options={}, seed=None):
        guider = executor.class_obj
        state = model_options.get("transformer_options", {}).get(key) or RunState()
        run_spec = spec
        if use_sampler_cfg:
            run_spec = copy.copy(spec)
            run_spec.scale = Constant(float(guider.cfg))
        return guided_predict(run_spec, guider, x, timestep, model_options, seed, state)

    patched.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, key, outer_sample)
    patched.add_wrapper_with_key(pe.WrappersMP.PREDICT_NOISE, key, predict_noise)
    return patched


def schedule_values(model, sigmas, schedule):
    """(weights per step, σ in EDM units per step) of a schedule for a MODEL + SIGMAS, as a run would see them."""
    ms = model.get_model_object("model_sampling")
    info = RunInfo(sigmas.detach().float().cpu(), guidance_kind(ms), model_progress(ms))
    return schedule.values(info), [c.sigma_edm for c in info.contexts()]
