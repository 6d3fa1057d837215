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
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..samplers.runner import keep_saved

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")   # diffusers attention projections
FEED_FORWARD_TARGETS = ("ff.net.0.proj", "ff.net.2")         # the transformer blocks' GEGLU feed-forward
COMFY_PREFIX = "diffusion_model."
LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LoRA(nn.Module):
    """``rows=(start, count)`` limits the update to those output rows of the weight (e.g. the q/k/v part of a layer
    that fuses attention and MLP inputs); None updates the whole weight."""

    def __init__(self, weight_shape, rank=8, alpha=None, init="default", dtype=torch.float32, device=None, rows=None):
        super().__init__()
        self.rows = rows
        if rows is not None:
            weight_shape = (rows[1], *weight_shape[1:])
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
        delta = self.delta().to(weight.dtype)
        if self.rows is None:
            return keep_saved(weight + delta)
        start, count = self.rows
        return keep_saved(torch.cat([weight[:start], weight[start:start + count] + delta, weight[start + count:]]))


def _targets_match(name, targets):
    if targets is None:
        return True
    if isinstance(targets, str):
        return re.search(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


# --- targets by model family ------------------------------------------------------------------------------------

TARGET_CHOICES = ("attention", "attention + feed-forward", "all")


@dataclass(frozen=True)
class Target:
    module: str               # the Linear/Conv layer
    key: str                  # the name its LoRA is saved under (ComfyUI's key map must know it)
    rows: tuple = None        # (start, count): only these output rows are updated


@dataclass(frozen=True)
class Family:
    """How one model family names its layers (regular expressions searched in module names)."""
    name: str
    detect: str               # a layer only this family has
    attention: str            # attention projections (q, k, v, out; joint-attention context projections too)
    feed_forward: str         # the blocks' MLPs
    never: str                # embeddings, norms, modulation, final layers: not trained, not even by "all"
    row_slices: tuple = ()    # (layer regex, key suffix, rows(weight shape)): attention rows of fused layers


def _flux_qkv_rows(shape):
    return (0, 3 * shape[1])          # single blocks' linear1 = [q; k; v; mlp_in], hidden size = in features


# ComfyUI's own module names (and diffusers' for the UNet, which spell attention the same way).
FAMILIES = (
    Family("UNet (SD1.x, SD2.x, SDXL)", r"transformer_blocks\.\d+\.attn1\.to_q$",
           attention=r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$", feed_forward=r"\.ff\.net\.(0\.proj|2)$",
           never=r"(^|\.)(time_embed|label_emb|time_embedding|add_embedding|emb_layers|time_emb_proj)(\.|$)"),
    Family("MMDiT (SD3, SD3.5)", r"^joint_blocks\.\d+\.x_block\.attn\.qkv$",
           attention=r"^joint_blocks\.\d+\.(x_block|context_block)\.attn2?\.(qkv|proj)$",
           feed_forward=r"^joint_blocks\.\d+\.(x_block|context_block)\.mlp\.fc[12]$",
           never=r"^(x_embedder|t_embedder|y_embedder|context_embedder|pos_embed|final_layer)|adaLN_modulation"),
    Family("Flux / Chroma", r"^double_blocks\.\d+\.img_attn\.qkv$",
           attention=r"^double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)$",
           feed_forward=r"^double_blocks\.\d+\.(img|txt)_mlp\.[02]$|^single_blocks\.\d+\.linear[12]$",
           never=r"^(img_in|txt_in|time_in|vector_in|guidance_in|distilled_guidance_layer|final_layer)(\.|$)|_mod\.|"
                 r"\.modulation\.",
           row_slices=((r"^single_blocks\.\d+\.linear1$", "_qkv", _flux_qkv_rows),)),
    Family("Lumina 2 (NextDiT)", r"^layers\.\d+\.attention\.qkv$",
           attention=r"^(layers|noise_refiner|context_refiner)\.\d+\.attention\.(qkv|out)$",
           feed_forward=r"^(layers|noise_refiner|context_refiner)\.\d+\.feed_forward\.w[123]$",
           never=r"^(x_embedder|t_embedder|cap_embedder|final_layer)|adaLN_modulation"),
    Family("joint-attention DiT (SD3 and Flux in diffusers names, Qwen-Image)",
           r"^transformer_blocks\.\d+\.attn\.add_q_proj$",
           attention=r"^transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
                     r"to_add_out)$|^single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v)$",
           # Flux single blocks: the MLP input and the fused attention-out + MLP-out projection count as feed-forward
           feed_forward=r"^transformer_blocks\.\d+\.(ff|ff_context|img_mlp|txt_mlp)\.net\.(0\.proj|2)$|"
                        r"^single_transformer_blocks\.\d+\.(proj_mlp|proj_out)$",
           never=r"^(x_embedder|context_embedder|time_text_embed|pos_embed|norm_out|proj_out|img_in|txt_in)(\.|$)|"
                 r"\.norm1(_context)?\.linear$|\.norm\.linear$|_mod\."),
    Family("HiDream", r"^double_stream_blocks\.\d+\.block\.attn1\.to_q$",
           attention=r"\.attn1\.(to_q|to_k|to_v|to_out)(_t)?$",
           feed_forward=r"\.ff_[it]\.(w[123]|shared_experts\.w[123]|experts\.\d+\.w[123])$",
           never=r"^(x_embedder|t_embedder|p_embedder|caption_projection|final_layer)|adaLN_modulation|\.gate\."),
    Family("Wan (video)", r"^blocks\.\d+\.self_attn\.q$",
           attention=r"^blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o|k_img|v_img)$",
           feed_forward=r"^blocks\.\d+\.ffn\.[02]$",
           never=r"^(patch_embedding|text_embedding|time_embedding|time_projection|img_emb|head)|\.modulation"),
)


def family_of(model):
    """The Family whose layer names ``model`` uses, or None."""
    names = [n for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    for family in FAMILIES:
        if any(re.search(family.detect, n) for n in names):
            return family
    return None


def layer_name_patterns(model, limit=12):
    """The model's layer names with block numbers as N, most frequent first (for error messages)."""
    counts = {}
    for n, m in model.named_modules():
        if isinstance(m, LAYER_TYPES):
            pattern = re.sub(r"\.\d+\.", ".N.", re.sub(r"\.\d+\.", ".N.", n))
            counts[pattern] = counts.get(pattern, 0) + 1
    return [p for p, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:limit]]


def family_targets(model, choice):
    """Targets of a choice in TARGET_CHOICES on ``model``'s family: "attention" (the attention projections),
    "attention + feed-forward" (also the MLPs) or "all" (every layer but embeddings, norms, modulation and final
    layers). Raises a ValueError listing the model's layer names when the family is unknown."""
    family = family_of(model)
    if family is None:
        raise ValueError(f"RewardLab does not know this model family's layer names, so targets={choice!r} has no "
                         f"meaning here. Its layers are named like {layer_name_patterns(model)}. Give a regular "
                         "expression in the LoRA targets regex input (e.g. 'attn\\.(qkv|proj)$') to choose layers.")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    if choice == "all":
        chosen = [n for n, _ in layers if not re.search(family.never, n)]
    else:
        pattern = family.attention if choice == "attention" else f"{family.attention}|{family.feed_forward}"
        chosen = [n for n, _ in layers if re.search(pattern, n)]
    targets = [Target(n, n) for n in chosen]
    shapes = {n: m.weight.shape for n, m in layers}
    for layer_pattern, suffix, rows in family.row_slices:
        targets += [Target(n, n + suffix, rows(shapes[n])) for n in shapes
                    if re.search(layer_pattern, n) and n not in chosen]
    return targets


def lora_targets(model, targets=ATTENTION_TARGETS):
    """The layers a LoRA attaches to (``Target`` records). ``targets``: a choice in TARGET_CHOICES (resolved by
    the model's family), a tuple of module-name suffixes, a regular expression, or None for every layer."""
    if isinstance(targets, str) and targets in TARGET_CHOICES:
        return family_targets(model, targets)
    return [Target(n, n) for n, m in model.named_modules() if isinstance(m, LAYER_TYPES) and _targets_match(n, targets)]


def inject_lora(model, rank=8, alpha=None, targets=ATTENTION_TARGETS, init="default"):
    """Attach a LoRA to every target layer (see ``lora_targets``). Returns {saved name: adapter}.
    The whole base model is frozen; only the adapters' ``up``/``down`` are trainable."""
    modules = dict(model.named_modules())
    chosen = lora_targets(model, targets)
    if not chosen:
        raise ValueError(f"no Linear/Conv layer matches LoRA targets {targets!r}; its layers are named like "
                         f"{layer_name_patterns(model)}")
    model.requires_grad_(False)
    adapters = {}
    for t in chosen:
        mod = modules[t.module]
        adapter = LoRA(mod.weight.shape, rank, alpha, init, dtype=torch.float32, device=mod.weight.device, rows=t.rows)
        parametrize.register_parametrization(mod, "weight", adapter, unsafe=True)
        adapters[t.key] = adapter
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
    by_key = {key(n): n for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)}
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
