"""Noise optimisation: change where sampling starts instead of changing the model (algorithms.md §7–8).

    ε (leaf, unit variance) ─► noise_scaling ─► samplers.sample (the one runner) ─► decode ─► reward
                  ▲                                                                        │
                  ╰──────────── SGD-Nesterov / Adam / L-BFGS on −reward + λ·χ_d(‖ε‖) ───────╯

- ReNO (Eyring et al. 2024): one- or few-step chain, SGD-Nesterov (momentum 0.9), lr 5, grad-norm clip 0.1,
  50 evaluations, χ_d regulariser λ·(½‖ε‖² − (d−1)·log‖ε‖) per sample, the ancestral generator re-seeded identically
  every iteration, and the BEST iterate by reward (regulariser excluded) is returned, not the last.
- DOODL-style multi-step: the same loop over a K-step chain with per-step checkpointing, renormalisation of ε to its
  initial norm after every update, and a small perturbation noise.

"Gradient through the last M steps" (``grad_last=M``) uses ``Policy.last(M, prefix="detach")``: the early steps run
the denoiser without a graph, but the solver's linear skip path x' = a·x + b·D stays differentiable. The noise then
still gets a gradient, ∂x_{K−M}/∂ε = √(1+σ₀²)·∏ a_i (for Euler ∏ a_i = σ_{K−M}/σ₀), i.e. the early denoiser
Jacobians are treated as zero. With prefix "no_grad" the graph would be cut at step K−M and ε would get no gradient
at all, so that semantics is useless here.

The batch is a set of independent problems: every per-sample quantity (reward, regulariser, gradient clip, best
iterate, renormalisation) is computed per row, so a batch of B equals B separate runs (except with L-BFGS, whose
line search couples the rows).
"""
import dataclasses
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from .runner import Cancelled, Policy, noise_scaling, sample

OPTIMIZERS = ("sgd", "adam", "lbfgs")


@dataclass
class Chain:
    """The map ε -> (latent, image) that noise methods optimise and search: noise scaling, the core runner, decode.

    model:       denoiser ``model(x, sigma, **extra) -> x̂0`` (CFGDenoiser for guidance).
    sigmas:      the schedule, n+1 values ending in 0 (one entry pair per step).
    decode:      latent (model space) -> images (B, 3, H, W) in [0, 1], differentiable; None: the latent is the image.
    latent:      start latent in model space (img2img); None for pure noise.
    max_denoise: scale the noise by √(1+σ₀²) (ComfyUI's max_denoise, σ₀ ≥ σ_max) instead of σ₀ (ε/v models).
    seed:        the ancestral-noise seed; fixed, so every evaluation of the same ε gives the same sample. It is the
                 seed a NOISE object carries, which ComfyUI's samplers use for their ancestral noise.
    channels:    the model's latent channel count, checked against the noise.
    interrupts:  exceptions that mean "the user cancelled" inside ``run`` (a host adds its own).
    """

    model: object
    sigmas: torch.Tensor
    decode: object = None
    step: object = "euler"
    flow: bool = False
    latent: torch.Tensor = None
    max_denoise: bool = True
    extra_args: dict = None
    seed: int = 0
    channels: int = None
    dtype: torch.dtype = None
    interrupts: tuple = (Cancelled,)

    @property
    def steps(self):
        return len(self.sigmas) - 1

    def check_noise(self, noise):
        if noise.ndim < 3:
            raise ValueError(f"noise must be batched latents (B, C, ...), got shape {tuple(noise.shape)}")
        if self.channels is not None and noise.shape[1] != self.channels:
            raise ValueError(f"the latent has {noise.shape[1]} channels but the model expects {self.channels}: "
                             f"use an empty latent made for this model (its own Empty Latent node) instead")
        if self.latent is not None and self.latent.shape[1:] != noise.shape[1:]:
            raise ValueError(f"noise shape {tuple(noise.shape)} does not match the start latent "
                             f"{tuple(self.latent.shape)}")

    def start(self, noise):
        """x at sigmas[0], exactly as ComfyUI's KSAMPLER builds it from a NOISE tensor."""
        noise = noise.to(self.dtype) if self.dtype is not None else noise
        latent = None if self.latent is None else self.latent.to(noise)
        return noise_scaling(self.sigmas[0].to(noise), noise, latent, self.flow, self.max_denoise)

    def run(self, noise, policy=None, callback=None, cancel=None, x=None, sigmas=None, generator=None):
        """Sample from ε (or from an explicit state ``x`` down a sub-schedule ``sigmas``) with the core runner."""
        x = self.start(noise) if x is None else x
        sigmas = self.sigmas if sigmas is None else sigmas
        if generator is None:
            generator = torch.Generator(device=x.device).manual_seed(self.seed)
        return sample(self.model, x, sigmas, self.step, policy, self.extra_args, callback, cancel,
                      generator=generator, flow=self.flow)

    def images(self, latent):
        return latent if self.decode is None else self.decode(latent)

    def counted(self):
        """(a copy of this chain whose denoiser counts its calls, the counter): budgets of noise search."""
        counter = CallCounter(self.model)
        return dataclasses.replace(self, model=counter), counter


class CallCounter:
    """Wraps a denoiser and counts its calls (one per sampler step; a batched CFG call counts once)."""

    def __init__(self, model):
        self.model, self.calls = model, 0
        self.flow = getattr(model, "flow", False)

    def __call__(self, x, sigma, **extra):
        self.calls += 1
        return self.model(x, sigma, **extra)


def reward_scorer(reward, prompts=None):
    """images -> Tensor[B], higher is better, for a Reward ``reward(images, prompts)`` (rewards protocol).
    Fails early, with the fix, when a text reward gets no prompt."""
    if getattr(reward, "needs_text", False) and not prompts:
        name = getattr(reward, "name", type(reward).__name__)
        raise ValueError(f"reward {name!r} scores image-text agreement and needs the prompt: pass the prompt "
                         f"text (in ComfyUI connect the prompt string to the reward / node)")

    def score(images):
        texts = [prompts] * images.shape[0] if isinstance(prompts, str) else prompts
        r = reward(images, texts)
        if r.shape != (images.shape[0],):
            raise ValueError(f"a reward must return one score per image, shape ({images.shape[0]},), got "
                             f"{tuple(r.shape)}")
        return r
    return score


def chi_regulariser(noise):
    """−log χ_d(‖ε‖) + const = ½‖ε‖² − (d−1)·log‖ε‖ per sample; minimal at ‖ε‖ = √(d−1), the typical shell of
    a d-dimensional standard normal. Keeps ε in distribution (ReNO's guard against reward hacking)."""
    d = noise[0].numel()
    n = noise.flatten(1).float().norm(dim=1)
    return 0.5 * n**2 - (d - 1) * n.log()


def noise_norms(noise):
    return noise.detach().flatten(1).float().norm(dim=1)


def step_policy(grad_last=None, checkpoint_steps=False):
    """Gradient through every step, or through the last ``grad_last`` with the linear path kept (module doc)."""
    if grad_last is None or grad_last <= 0:
        return Policy.all(checkpoint=checkpoint_steps)
    return Policy.last(grad_last, prefix="detach", checkpoint=checkpoint_steps)


def evaluate(chain, score, noise, policy=None, checkpoint_reward=False, cancel=None):
    """One render + reward: (latent, images, rewards[B]). With ``checkpoint_reward`` the decoder and reward towers
    keep no activations; they are recomputed in backward."""
    latent = chain.run(noise, policy, cancel=cancel).x

    def decode_and_score(x):
        images = chain.images(x)
        return images, score(images)

    if checkpoint_reward and torch.is_grad_enabled():
        images, rewards = checkpoint(decode_and_score, latent, use_reentrant=False)
    else:
        images, rewards = decode_and_score(latent)
    return latent, images, rewards


@dataclass
class NoiseResult:
    """The best noise per sample and what it renders to. ``history`` is the reward of every evaluation (ReNO) or
    the best reward after every round (search), shaped (rounds, B); ``norms`` the ‖ε‖ per evaluation."""

    noise: torch.Tensor
    latent: torch.Tensor
    images: torch.Tensor
    reward: torch.Tensor
    history: torch.Tensor
    seed: int
    calls: int = 0
    cancelled: bool = False
    norms: torch.Tensor = None
    extra: dict = field(default_factory=dict)

    def best_so_far(self):
        """Running maximum of the history: non-decreasing by construction of best-iterate tracking."""
        return self.history.cummax(0).values


class BestTracker:
    """Per-sample best (noise, latent, image, reward) over evaluations; a tie keeps the earlier one."""

    def __init__(self):
        self.noise = self.latent = self.images = self.reward = None

    @staticmethod
    def _pick(mask, new, old):
        return torch.where(mask.view(-1, *[1] * (new.ndim - 1)).to(new.device), new.detach(), old)

    def offer(self, noise, latent, images, rewards):
        rewards = rewards.detach().float()
        if self.reward is None:
            self.noise, self.latent = noise.detach().clone(), latent.detach().clone()
            self.images, self.reward = images.detach().clone(), rewards.clone()
            return torch.ones_like(rewards, dtype=torch.bool)
        better = rewards > self.reward
        self.noise = self._pick(better, noise, self.noise)
        self.latent = self._pick(better, latent, self.latent)
        self.images = self._pick(better, images, self.images)
        self.reward = torch.where(better, rewards, self.reward)
        return better

    def result(self, history, seed, **kw):
        if self.reward is None:
            raise Cancelled(0)
        return NoiseResult(self.noise, self.latent, self.images, self.reward, torch.stack(history).cpu(), seed, **kw)


def make_optimizer(name, params, lr, momentum=0.9):
    """ReNO's choices: SGD-Nesterov (default), Adam (eps 1e-2), L-BFGS (history 3, strong-Wolfe line search)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, eps=1e-2)
    if name == "lbfgs":
        return torch.optim.LBFGS(params, lr=lr, max_iter=10, history_size=3, line_search_fn="strong_wolfe")
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def clip_per_sample(grad, max_norm):
    """clip_grad_norm_ applied to every sample's gradient separately (equal to it for batch 1)."""
    norms = grad.flatten(1).norm(dim=1)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    grad.mul_(scale.view(-1, *[1] * (grad.ndim - 1)))


class _Stop(Exception):
    """Internal: the evaluation budget is spent (cancelled=False) or the user cancelled inside an optimiser step."""

    def __init__(self, cancelled):
        super().__init__("cancelled" if cancelled else "budget spent")
        self.cancelled = cancelled


OOM_HINT = ("turn on checkpoint_steps and checkpoint_reward, lower the batch, use fewer steps, or set grad_last "
            "to a small number of steps")


def raise_oom(error, what, hint=OOM_HINT):
    """Re-raise an out-of-memory error with the settings that reduce memory."""
    raise RuntimeError(f"out of memory during {what}: {hint}. ({str(error).splitlines()[0][:200]})") from error


def is_oom(error):
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def optimise_noise(chain, reward, noise, prompts=None, iterations=50, lr=5.0, optimizer="sgd", momentum=0.9,
                   grad_clip=0.1, reg_weight=0.01, grad_last=None, checkpoint_steps=False, checkpoint_reward=False,
                   renormalise=False, perturbation=0.0, callback=None, cancel=None):
    """ReNO / DOODL-style gradient ascent on the initial noise. Returns the best iterate per sample (NoiseResult).

    iterations:   evaluations (render + reward); the last one is not followed by an update, as in ReNO.
    reg_weight:   λ of the χ_d regulariser (0 disables it).
    grad_last:    gradient through the last M steps only (None: all steps); see the module doc for semantics.
    renormalise:  after each update rescale every sample's ε to its initial norm (DOODL).
    perturbation: std of Gaussian noise added to ε after each update (DOODL uses 1e-4); seeded from chain.seed.
    callback:     called after each evaluation with dict(iteration, total, rewards, best_reward, best_images, norms).
    cancel:       polled before each evaluation; truthy -> stop and return the best so far (cancelled=True).
    """
    score = reward_scorer(reward, prompts)
    chain.check_noise(noise)
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    leaf = noise.detach().float().clone().requires_grad_(True)
    opt = make_optimizer(optimizer, [leaf], lr, momentum)
    policy = step_policy(grad_last, checkpoint_steps)
    initial_norm = noise_norms(leaf)
    perturb_gen = torch.Generator(device=leaf.device).manual_seed(chain.seed + 1)
    best, history, norms = BestTracker(), [], []

    def measure(with_grad):
        if cancel is not None and cancel():
            raise _Stop(True)
        with torch.set_grad_enabled(with_grad):
            latent, images, rewards = evaluate(chain, score, leaf, policy, checkpoint_reward, cancel)
        best.offer(leaf, latent, images, rewards)
        history.append(rewards.detach().float())
        norms.append(noise_norms(leaf))
        if callback is not None:
            callback({"iteration": len(history), "total": iterations, "rewards": history[-1],
                      "best_reward": best.reward, "best_images": best.images, "norms": norms[-1]})
        return rewards

    def closure():
        if len(history) >= iterations - 1:
            raise _Stop(False)               # budget spent (only L-BFGS asks for more evaluations per step)
        opt.zero_grad()
        rewards = measure(True)
        loss = -rewards.sum()
        if reg_weight:
            loss = loss + reg_weight * chi_regulariser(leaf).sum()
        loss.backward()
        if grad_clip:
            clip_per_sample(leaf.grad, grad_clip)
        return loss

    cancelled = False
    try:
        while len(history) < iterations - 1:
            try:
                opt.step(closure)
            except _Stop as stop:
                if stop.cancelled:
                    raise
                break
            with torch.no_grad():
                if perturbation:
                    leaf.add_(torch.randn(leaf.shape, generator=perturb_gen, device=leaf.device) * perturbation)
                if renormalise:
                    leaf.mul_((initial_norm / noise_norms(leaf)).view(-1, *[1] * (leaf.ndim - 1)))
        measure(False)                       # the final iterate: evaluated, never updated
    except (_Stop, *chain.interrupts):
        cancelled = True
    except RuntimeError as e:
        if is_oom(e):
            raise_oom(e, f"noise optimisation (batch {leaf.shape[0]}, {chain.steps} steps)")
        raise
    return best.result(history, chain.seed, calls=len(history) * chain.steps, cancelled=cancelled,
                       norms=torch.stack(norms).cpu() if norms else None)


def reno(chain, reward, noise, prompts=None, **kw):
    """ReNO with its defaults (SGD-Nesterov lr 5, clip 0.1, 50 iterations, χ_d λ = 0.01)."""
    return optimise_noise(chain, reward, noise, prompts, **kw)


def doodl(chain, reward, noise, prompts=None, iterations=50, lr=0.1, grad_last=None, perturbation=1e-4,
          checkpoint_steps=True, reg_weight=0.0, **kw):
    """DOODL-style multi-step optimisation: checkpointed chain, renormalised noise, small perturbations."""
    return optimise_noise(chain, reward, noise, prompts, iterations=iterations, lr=lr, grad_last=grad_last,
                          perturbation=perturbation, checkpoint_steps=checkpoint_steps, reg_weight=reg_weight,
                          renormalise=True, **kw)


def noise_gradient(chain, reward, noise, prompts=None, reg_weight=0.0, grad_last=None, checkpoint_steps=False,
                   checkpoint_reward=False):
    """d(reward − λ·χ_d)/dε summed over the batch: the ascent direction one iteration uses (before clipping)."""
    score = reward_scorer(reward, prompts)
    leaf = noise.detach().float().clone().requires_grad_(True)
    with torch.enable_grad():
        _, _, rewards = evaluate(chain, score, leaf, step_policy(grad_last, checkpoint_steps), checkpoint_reward)
        objective = rewards.sum() - reg_weight * chi_regulariser(leaf).sum()
        (grad,) = torch.autograd.grad(objective, leaf)
    return grad
