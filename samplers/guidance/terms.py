"""Extra-branch guidance terms: D ← D + s(ctx)·(D_c − D_k), D_k the conditional prediction of a perturbed model.

    PAG  perturbed-attention guidance (Ahn et al. 2024, arXiv 2403.17377): the self-attention maps of chosen layers
         are replaced by the identity, so those layers output V (ε̃ = ε_cfg + s·(ε_c − ε̂_c) in the paper).
    SLG  skip-layer guidance (Stability AI, SD3.5; diffusers' StableDiffusion3Pipeline): chosen transformer blocks
         are skipped, inside a window of the steps (start < i/n < stop).

The term is affine with weights summing to zero, so it is the same in every prediction space. It needs one extra
conditional model call per step where its weight is not zero. ``layers`` are names in the host's own naming: here
(torch modules) dotted module-name parts such as "mid_block" (PAG: every self-attention ``attn1`` below it) or
"transformer_blocks.7" (SLG: that block); ComfyUI names are in host/guidance.py.
"""
import contextlib
from dataclasses import dataclass

from .schedules import Schedule, as_schedule

TERM_KINDS = ("pag", "slg")


@dataclass(frozen=True)
class GuidanceTerm:
    kind: str                      # "pag" | "slg"
    scale: Schedule                # s(ctx); 0 skips the extra call
    layers: tuple                  # layer names in the host's naming
    start: float = 0.0             # window on the step fraction i/n (SLG: open interval, as diffusers)
    stop: float = 1.0

    def __post_init__(self):
        if self.kind not in TERM_KINDS:
            raise ValueError(f"guidance term kind must be one of {', '.join(TERM_KINDS)}, got {self.kind!r}")
        if not self.layers:
            raise ValueError(f"{self.kind.upper()} needs at least one layer to perturb")
        if not 0 <= self.start <= self.stop <= 1:
            raise ValueError(f"the {self.kind.upper()} window needs 0 ≤ start ≤ stop ≤ 1, got {self.start}..{self.stop}")
        object.__setattr__(self, "scale", as_schedule(self.scale))
        object.__setattr__(self, "layers", tuple(self.layers))

    def weight(self, ctx):
        """s(ctx) inside the window, else 0. PAG's window is closed ([0, 1] by default); SLG's is open, as in the
        SD3 pipeline's `i > n·start and i < n·stop`."""
        frac = ctx.step / ctx.n_steps
        inside = self.start < frac < self.stop if self.kind == "slg" else self.start <= frac <= self.stop
        return float(self.scale(ctx)) if inside else 0.0

    def __repr__(self):
        return f"GuidanceTerm({self.kind}, scale={self.scale}, layers={self.layers}, window=({self.start}, {self.stop}))"


def pag(scale=3.0, layers=("mid_block",), start=0.0, stop=1.0):
    return GuidanceTerm("pag", scale, layers, start, stop)


def slg(scale=2.8, layers=("transformer_blocks.7", "transformer_blocks.8", "transformer_blocks.9"), start=0.01,
        stop=0.2):
    """Stability AI's SD3.5 Medium recommendation: blocks 7, 8, 9, scale 2.8, steps 1 %–20 %."""
    return GuidanceTerm("slg", scale, layers, start, stop)


def apply_terms(terms, ctx, D, D_c, perturbed):
    """D + Σ_k s_k·(D_c − D_k) over the active terms; ``perturbed(term)`` runs the perturbed conditional branch."""
    for term in terms:
        s = term.weight(ctx)
        if s != 0:
            D = D + s * (D_c - perturbed(term))
    return D


# --- perturbing torch modules (the host-free core; ComfyUI uses model-option patches instead) -------------------

def _matches(name, layer):
    return f".{layer}." in f".{name}."


def _identity_attention(module, args, kwargs, output):
    """PAG: softmax(QKᵀ)V with the attention map replaced by the identity, i.e. to_out(to_v(h))."""
    h = args[0] if args else kwargs["hidden_states"]
    out = module.to_out[1](module.to_out[0](module.to_v(h)))
    if getattr(module, "residual_connection", False):
        out = out + h
    return out / getattr(module, "rescale_output_factor", 1.0)


def _skip_block(module, args, kwargs, output):
    """SLG: the block returns its inputs: hidden_states for a tensor output, (encoder_hidden_states, hidden_states)
    for a joint (MMDiT) block's pair."""
    h = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple) and len(output) == 2:
        e = args[1] if len(args) > 1 else kwargs["encoder_hidden_states"]
        return e, h
    return h


@contextlib.contextmanager
def perturbed_modules(root, term):
    """Forward hooks on ``root``'s submodules that make it the term's perturbed model, removed on exit."""
    handles = []
    for name, module in root.named_modules():
        if term.kind == "pag":
            hit = name.rsplit(".", 1)[-1] == "attn1" and any(_matches(name, layer) for layer in term.layers)
            hook = _identity_attention
        else:
            hit = any(name == layer or name.endswith("." + layer) for layer in term.layers)
            hook = _skip_block
        if hit:
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
    if not handles:
        raise ValueError(f"{term.kind.upper()} found no module for layers {list(term.layers)} in this model; name "
                         + ("blocks that hold self-attention 'attn1' modules, e.g. 'mid_block'" if term.kind == "pag"
                            else "transformer blocks, e.g. 'transformer_blocks.7'"))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
