"""LoRA on torch modules, addressed by module name, saved in ComfyUI's native key format.

One adapter is a callable on a weight: ``adapter(W) = W + scale·(alpha/rank)·(up @ down)``. The same object
serves both hosts: here it is registered as a torch parametrization of ``module.weight``; inside ComfyUI it
is a weight wrapper (``ModelPatcher.add_weight_wrapper``), which calls it the same way.

File format (what ComfyUI's LoraLoader reads without translation):
    <prefix><module>.lora_up.weight    (out, r)
    <prefix><module>.lora_down.weight  (r, in·kh·kw)
    <prefix><module>.alpha             0-d
with prefix "diffusion_model." for ldm/ComfyUI module names. For diffusers module names use
``kohya_key`` ("lora_unet_" + name with dots as underscores), which ComfyUI maps for SD/SDXL UNets.
"""
import math
import re

import torch
from torch import nn
from torch.nn.utils import parametrize

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")   # diffusers attention projections
FEED_FORWARD_TARGETS = ("ff.net.0.proj", "ff.net.2")         # the transformer blocks' GEGLU feed-forward
COMFY_PREFIX = "diffusion_model."


class LoRA(nn.Module):
    def __init__(self, weight_shape, rank=8, alpha=None, init="default", dtype=torch.float32, device=None):
        super().__init__()
        out_f, in_f = weight_shape[0], math.prod(weight_shape[1:])
        rank = min(rank, out_f, in_f)
        self.shape = tuple(weight_shape)
        self.down = nn.Parameter(torch.empty(rank, in_f, dtype=dtype, device=device))
        self.up = nn.Parameter(torch.zeros(out_f, rank, dtype=dtype, device=device))
        self.register_buffer("alpha", torch.tensor(float(alpha if alpha is not None else rank)))
        self.scale = 1.0          # strength multiplier at use time (may be > 1 or < 0)
        self.merged = False       # True while the delta is baked into the base weight
        if init == "default":     # up = 0 so training starts exactly at the base model
            nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.down, std=1 / rank)
        elif init != "empty":
            raise ValueError(f"unknown LoRA init {init!r}; use 'default', 'gaussian' or 'empty'")

    @property
    def rank(self):
        return self.down.shape[0]

    def delta(self):
        return (self.up @ self.down).view(self.shape) * (self.alpha / self.rank * self.scale)

    def forward(self, weight):
        if self.merged or self.scale == 0:
            return weight
        return weight + self.delta().to(weight.dtype)


def _targets_match(name, targets):
    if targets is None:
        return True
    if isinstance(targets, str):
        return re.search(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_targets(model, targets=ATTENTION_TARGETS):
    """Names of the Linear / Conv2d modules a LoRA would attach to."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and _targets_match(n, targets)]


def inject_lora(model, rank=8, alpha=None, targets=ATTENTION_TARGETS, init="default", names=None):
    """Attach a LoRA to every matching module (or exactly ``names``). Returns {module name: adapter}.
    The whole base model is frozen; only the adapters' ``up``/``down`` are trainable."""
    modules = dict(model.named_modules())
    names = names if names is not None else lora_targets(model, targets)
    if not names:
        raise ValueError(f"no Linear/Conv2d module matches LoRA targets {targets!r}; pass module names or a regex")
    model.requires_grad_(False)
    adapters = {}
    for name in names:
        mod = modules[name]
        w = mod.weight
        adapter = LoRA(w.shape, rank, alpha, init, dtype=torch.float32, device=w.device)
        parametrize.register_parametrization(mod, "weight", adapter, unsafe=True)
        adapters[name] = adapter
    return adapters


def remove_lora(model, adapters, merge=False):
    """Detach the adapters from the modules; with merge=True the delta stays in the weights."""
    modules = dict(model.named_modules())
    for name in adapters:
        parametrize.remove_parametrizations(modules[name], "weight", leave_parametrized=merge)


def lora_parameters(adapters):
    return [p for a in adapters.values() for p in (a.down, a.up)]


def set_scale(adapters, scale):
    for a in adapters.values():
        a.scale = scale


def kohya_key(name):
    return "lora_unet_" + name.replace(".", "_")


def comfy_key(name):
    return COMFY_PREFIX + name


def lora_state_dict(adapters, key=comfy_key, dtype=torch.float32):
    """The adapters as a flat dict in ComfyUI's LoRA key format."""
    sd = {}
    for name, a in adapters.items():
        k = key(name)
        sd[f"{k}.lora_up.weight"] = a.up.detach().to("cpu", dtype).contiguous()
        sd[f"{k}.lora_down.weight"] = a.down.detach().to("cpu", dtype).contiguous()
        sd[f"{k}.alpha"] = a.alpha.detach().to("cpu", torch.float32)
    return sd


def split_lora_state_dict(sd):
    """{module key prefix: {"up", "down", "alpha"}} from a LoRA file's flat dict; unknown keys are reported."""
    groups, unknown = {}, []
    for k, v in sd.items():
        for suffix, field in ((".lora_up.weight", "up"), (".lora_down.weight", "down"), (".alpha", "alpha")):
            if k.endswith(suffix):
                groups.setdefault(k[: -len(suffix)], {})[field] = v
                break
        else:
            unknown.append(k)
    if unknown:
        raise ValueError(f"not a LoRA in lora_up/lora_down/alpha format; unexpected keys such as {unknown[:3]}")
    for prefix, g in groups.items():
        if "up" not in g or "down" not in g:
            raise ValueError(f"LoRA entry {prefix!r} lacks lora_up or lora_down weight")
    return groups


def load_lora_state_dict(adapters, sd, key=comfy_key, strict=True):
    """Copy a saved LoRA into existing adapters (resume). Returns the module names that got weights."""
    groups = split_lora_state_dict(sd)
    loaded = []
    for name, a in adapters.items():
        g = groups.get(key(name))
        if g is None:
            continue
        if g["up"].shape != a.up.shape or g["down"].reshape(a.down.shape[0], -1).shape != a.down.shape:
            raise ValueError(f"LoRA shape mismatch for {name}: file has up {tuple(g['up'].shape)}, "
                             f"model expects {tuple(a.up.shape)} (rank or model differ)")
        with torch.no_grad():
            a.up.copy_(g["up"].reshape(a.up.shape))
            a.down.copy_(g["down"].reshape(a.down.shape))
            if "alpha" in g:
                a.alpha.copy_(g["alpha"])
        loaded.append(name)
    if strict and len(loaded) != len(groups):
        missing = sorted(set(groups) - {key(n) for n in loaded})
        raise ValueError(f"{len(missing)} LoRA entries match no module of this model, e.g. {missing[:3]}")
    return loaded


def apply_lora(model, sd, scale=1.0, key=comfy_key):
    """Attach a saved LoRA to a model (shapes from the file). Returns the adapters."""
    groups = split_lora_state_dict(sd)
    by_key = {key(n): n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    missing = [p for p in groups if p not in by_key]
    if missing:
        raise ValueError(f"{len(missing)} LoRA entries match no module of this model, e.g. {missing[:3]}")
    names = [by_key[p] for p in groups]
    rank = {by_key[p]: g["up"].shape[1] for p, g in groups.items()}
    modules = dict(model.named_modules())
    adapters = {}
    for name in names:
        w = modules[name].weight
        a = LoRA(w.shape, rank[name], init="empty", device=w.device)
        parametrize.register_parametrization(modules[name], "weight", a, unsafe=True)
        adapters[name] = a
    load_lora_state_dict(adapters, sd, key=key)
    set_scale(adapters, scale)
    return adapters


def merge(model, adapters):
    """Bake each adapter's delta into its base weight (fast inference); ``unmerge`` undoes it exactly."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, a in adapters.items():
            if not a.merged:
                modules[name].parametrizations.weight.original += a.delta().to(modules[name].parametrizations.weight.original.dtype)
                a.merged = True


def unmerge(model, adapters):
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, a in adapters.items():
            if a.merged:
                a.merged = False
                modules[name].parametrizations.weight.original -= a.delta().to(modules[name].parametrizations.weight.original.dtype)


def mix_lora_state_dicts(items):
    """One LoRA whose delta is Σ αᵢ·ΔWᵢ (DRaFT's LoRA mixing): ranks are concatenated, so the result is exact.
    ``items`` is a list of (state_dict, α)."""
    out = {}
    grouped = [(split_lora_state_dict(sd), alpha) for sd, alpha in items]
    prefixes = sorted({p for g, _ in grouped for p in g})
    for p in prefixes:
        ups, downs = [], []
        for g, alpha in grouped:
            if p in g:
                e = g[p]
                r = e["up"].shape[1]
                s = float(e.get("alpha", torch.tensor(float(r)))) / r * alpha
                ups.append(e["up"].float().reshape(e["up"].shape[0], r) * s)
                downs.append(e["down"].float().reshape(r, -1))
        up, down = torch.cat(ups, 1), torch.cat(downs, 0)
        out[f"{p}.lora_up.weight"] = up.contiguous()
        out[f"{p}.lora_down.weight"] = down.contiguous()
        out[f"{p}.alpha"] = torch.tensor(float(up.shape[1]))    # alpha = rank: scale already folded into up
    return out
