"""The one trajectory runner. Every RewardLab method is this loop plus a per-step gradient policy.

    x_T ─► step ─► step ─► … ─► step ─► x_0          (denoiser: model(x, sigma, **extra) -> x̂0)
           ╰ no-grad prefix ╯ ╰ grad suffix ╯

How the methods map onto it (see docs/methods.md):
  DRaFT        Policy.all()                        grad through every step (checkpoint=True to fit memory)
  DRaFT-K      Policy.last(k)                      steps before the last k run without a graph
  DRaFT-LV     no-grad chain, then sample(sigmas=[σ1, 0]) on n re-noised copies, grad on that one step
  AlignProp    Policy.last(k) with k drawn once per trajectory (the TRL port detaches instead: same θ-gradient)
  ReFL         sample(sigmas[:m+2]) with Policy.last(1): the returned ``denoised`` is the one-step x̂0 at step m
  DRTune       Policy.at(steps, stop_grad_input=True, input_skip=c_skip): θ-grads at sparse steps, no network
               Jacobian between them, the parametrisation's skip path c_skip·x kept
  ReNO/DOODL   the noise is the leaf: Policy.all(checkpoint=True) and x_T requires grad
"""
import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

from .steps import get_step


class Cancelled(RuntimeError):
    """Raised when the ``cancel`` hook asks the runner to stop; carries the step index reached."""

    def __init__(self, step):
        super().__init__(f"sampling cancelled at step {step}")
        self.step = step


class Trajectory(NamedTuple):
    x: torch.Tensor          # the final sample (at sigmas[-1])
    denoised: torch.Tensor   # the last x̂0 prediction (at sigmas[-2])


@dataclass
class Policy:
    """Per-step gradient policy. Steps are numbered 0..n-1 from the noisiest."""

    grad: Callable[[int, int], bool] = field(default=lambda i, n: True)
    # Steps without grad: "no_grad" cuts the graph there (DRaFT-K); "detach" only detaches the denoiser
    # output, so the linear skip path x -> x' stays differentiable (AlignProp/TRL truncation).
    prefix: str = "no_grad"
    checkpoint: bool = False                        # recompute each grad step's denoiser call in backward
    stop_grad_input: Callable[[int, int], bool] = field(default=lambda i, n: False)   # DRTune's sg(x_t)
    # c_skip(σ) of the parametrisation D = c_skip·x + c_out·F(c_in·x), for stop_grad_input steps and "detach" prefix
    # steps: the network's input (resp. output) is cut, D keeps the path c_skip·x (ε and flow models: 1), as in the
    # ε-form DDIM update x' = a·x + b·sg(ε̂) of DRTune and AlignProp. None: D is cut as a whole.
    input_skip: Callable = None

    @classmethod
    def all(cls, **kw):
        return cls(**kw)

    @classmethod
    def none(cls, **kw):
        return cls(grad=lambda i, n: False, **kw)

    @classmethod
    def last(cls, k, **kw):
        """Gradient only through the last k steps (DRaFT-K, AlignProp with k drawn by the caller)."""
        return cls(grad=lambda i, n: i >= n - k, **kw)

    @classmethod
    def at(cls, steps, stop_grad_input=False, **kw):
        """Gradient at an explicit set of steps, optionally with stop-grad on the denoiser input (DRTune)."""
        steps = frozenset(steps)
        return cls(grad=lambda i, n: i in steps,
                   stop_grad_input=(lambda i, n: i in steps) if stop_grad_input else (lambda i, n: False), **kw)

    def __post_init__(self):
        if self.prefix not in ("no_grad", "detach"):
            raise ValueError(f"prefix must be 'no_grad' or 'detach', got {self.prefix!r}")


def noise_scaling(sigma, noise, latent=None, flow=False, max_denoise=True):
    """x at the first sigma, as ComfyUI's model_sampling.noise_scaling: flow mixes (1-σ)·latent + σ·noise;
    ε/v models add σ·noise, or sqrt(1+σ²)·noise when starting from pure noise (the VP prior x_T ~ N(0, I))."""
    latent = torch.zeros_like(noise) if latent is None else latent
    if flow:
        return sigma * noise + (1 - sigma) * latent
    scale = (sigma**2 + 1) ** 0.5 if max_denoise else sigma
    return latent + noise * scale


# --- gradients through models that update tensors in place -----------------------------------------------------
#
# Flux, Chroma and MMDiT blocks add residuals in place (``x += attn(norm(x))``). Autograd refuses a backward through
# a tensor that was changed after it was saved (plain calls), and torch's non-reentrant checkpoint silently returns a
# wrong input gradient in that case (its recomputation saves aliases). So every model call that records gradients
# saves *copies* of its activations (``inplace_safe``), and checkpointed calls recompute in backward under the same
# rule (``recompute_in_backward``). Weights are never updated in place: tensors without history are saved as they
# are, and ``keep_saved`` marks LoRA'd weights so they are not copied either.

_KEEP = "_rewardlab_keep_saved"


def keep_saved(tensor):
    """Mark a tensor (a weight with a LoRA added) that no model updates in place: saved for backward uncopied."""
    setattr(tensor, _KEEP, True)
    return tensor


def _snapshot(t):
    if t.grad_fn is None or getattr(t, _KEEP, False):
        return t
    return t.clone()


def _unpack(t):
    return t


@contextlib.contextmanager
def inplace_safe():
    """Within this context, operations save copies of the activations they need for backward."""
    with torch.autograd.graph.saved_tensors_hooks(_snapshot, _unpack):
        yield


def _autocast_states():
    return [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cuda", "cpu")]


def _detached(value):
    """Tensors (also inside tuples, lists and dicts) cut from their graph, keeping whether they require grad; one
    that does is a copy with history (not a leaf), since models may update their inputs in place (Flux's blocks)."""
    if isinstance(value, torch.Tensor):
        return value.detach().requires_grad_(True).clone() if value.requires_grad else value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


class _Saved:
    """Stands in the graph for one tensor a checkpointed function saved. The graph drops it once the operation that
    saved it has run in backward (or when the graph is freed), and the recomputed tensor goes with it."""
    __slots__ = ("__weakref__",)


class _Checkpoint:
    """Saved-tensor hooks that keep only a placeholder per saved tensor; the first unpack in backward runs ``fn``
    again (same inputs, same autocast) and records what it saves, copying activations as ``inplace_safe`` does. The
    graph is recorded in the forward, so ``torch.autograd.grad`` with any inputs (LoRA weights, the noise) works.

    A recomputed tensor lives only as long as its placeholder: an operation that has run in backward frees what it
    saved, so one block's recomputed activations are alive at a time, even when part of the graph never runs
    (``autograd.grad`` with respect to some inputs only)."""

    def __init__(self, fn, args, kwargs):
        self.fn, self.args, self.kwargs = fn, _detached(args), _detached(kwargs)
        self.autocast, self.placeholders, self.saved = _autocast_states(), [], weakref.WeakKeyDictionary()

    def pack(self, t):
        placeholder = _Saved()
        self.placeholders.append(weakref.ref(placeholder))
        return placeholder

    def unpack(self, placeholder):
        if placeholder not in self.saved:
            self._recompute()
        return self.saved[placeholder]

    def _recompute(self):
        recorded = []
        with contextlib.ExitStack() as stack:
            for device, enabled, dtype in self.autocast:
                stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(
                lambda t: recorded.append(_snapshot(t)), _unpack))
            self.fn(*self.args, **self.kwargs)
        if len(recorded) != len(self.placeholders):   # a model whose recomputation differs would get wrong gradients
            raise RuntimeError(f"checkpoint recomputation saved {len(recorded)} tensors where the forward "
                               f"saved {len(self.placeholders)}: this model does not compute the same way twice; "
                               "turn checkpointing off")
        for ref, tensor in zip(self.placeholders, recorded):
            placeholder = ref()
            if placeholder is not None:                # None: its operation already ran and let it go
                self.saved[placeholder] = tensor


def recompute_in_backward(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` that keeps no activations for backward: they are recomputed then (gradient
    checkpointing). Nests: a checkpointed function may call checkpointed parts (a model's blocks)."""
    hooks = _Checkpoint(fn, args, kwargs)
    with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
        return fn(*args, **kwargs)


def checkpointed(forward):
    """``forward`` that, when recording gradients, keeps no activations and recomputes them in backward (for a
    model's blocks: host.grad.checkpoint_blocks)."""
    def run(*args, **kwargs):
        if torch.is_grad_enabled():
            return recompute_in_backward(forward, *args, **kwargs)
        return forward(*args, **kwargs)
    return run


def _denoise(model, x, sigma, extra, use_checkpoint):
    s = sigma.expand(x.shape[0])
    if use_checkpoint and torch.is_grad_enabled():
        return recompute_in_backward(lambda a: model(a, s, **extra), x)
    with inplace_safe():
        return model(x, s, **extra)


def sample(model, x, sigmas, step="euler", policy=None, extra_args=None, callback=None, cancel=None,
           generator=None, flow=False, on_grad_call=None):
    """Run ``model`` from x (already at sigmas[0]) down the sigmas. Returns Trajectory(x, denoised).

    step:      a name from steps.STEPS or a step function.
    policy:    which steps record gradients (default: all, i.e. the ambient grad mode decides).
    callback:  called after every step with dict(i, n, x, denoised, sigma, sigma_next) (detached tensors).
    cancel:    called before every step; a truthy return raises Cancelled.
    generator: torch.Generator for ancestral noise, so a trajectory is reproducible (e.g. fixed across ReNO
               iterations) without touching the global RNG.
    on_grad_call: called after every denoiser call that records gradients with (x_in, sigma, denoised), the graph
               attached and outside any checkpoint (DRaFT+'s penalty compares ``denoised`` with the frozen model).
    """
    step_fn = get_step(step, flow=flow) if isinstance(step, str) else step
    policy = policy or Policy.all()
    extra = extra_args or {}
    sigmas = sigmas.to(device=x.device, dtype=torch.float32)
    n = len(sigmas) - 1
    if n < 1:
        raise ValueError("sigmas needs at least two entries (one step)")
    state = {}
    outer_grad = torch.is_grad_enabled()

    def noise():
        return torch.randn(x.shape, generator=generator, dtype=torch.float32,
                           device=generator.device if generator is not None else "cpu").to(x)

    denoised = None
    for i in range(n):
        if cancel is not None and cancel():
            raise Cancelled(i)
        on = outer_grad and policy.grad(i, n)
        with torch.set_grad_enabled(on):
            stop = on and policy.stop_grad_input(i, n)
            inp = x.detach() if stop else x
            denoised = _denoise(model, inp, sigmas[i], extra, on and policy.checkpoint)
            if stop and policy.input_skip is not None:
                denoised = denoised + policy.input_skip(sigmas[i]) * (x - inp)     # zero value, the skip's gradient
            if on and on_grad_call is not None:
                on_grad_call(inp, sigmas[i], denoised)
        if not on:
            denoised = denoised.detach()
            if policy.prefix == "no_grad":
                x = x.detach()
            elif policy.input_skip is not None:          # detach the network output only: D = sg(D) + c_skip·x
                with torch.set_grad_enabled(outer_grad):
                    denoised = denoised + policy.input_skip(sigmas[i]) * (x - x.detach())
        with torch.set_grad_enabled(outer_grad and (on or policy.prefix == "detach")):
            x = step_fn(x, denoised, sigmas, i, state, noise)
        if callback is not None:
            callback({"i": i, "n": n, "x": x.detach(), "denoised": denoised.detach(),
                      "sigma": sigmas[i], "sigma_next": sigmas[i + 1]})
    return Trajectory(x, denoised)
