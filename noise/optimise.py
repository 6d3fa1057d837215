"""Noise optimisation: change where sampling starts instead of changing the model (docs/methods.md).

    ε (leaf, unit variance) ─► noise_scaling ─► samplers.sample (the one runner) ─► decode ─► reward
                  ▲                                                                        │
                  ╰──────────── SGD-Nesterov / Adam / L-BFGS on −reward + λ·χ_d(‖ε‖) ───────╯

- ReNO (Eyring et al. 2024): one- or few-step chain, SGD-Nesterov (momentum 0.9), lr 5, grad-norm clip 0.1,
  50 evaluations, χ_d regulariser λ·(½‖ε‖² − (d−1)·log‖ε‖) per sample, the ancestral generator re-seeded identically
  every iteration, and the BEST iterate by reward (regulariser excluded) is returned, not the last. The reward is
  ReNO's weighted sum (HPS 5, ImageReward 1, PickScore 0.05, CLIP 0.01: rewards/losses.py reno_weighted).
- DOODL (Wallace et al. 2023) optimiser over a multi-step chain: heavy-ball SGD (momentum 0.9, no Nesterov) with
  step 1, every gradient element clipped to ±1e-3, ε renormalised to its initial norm after every update, a 1e-4
  Gaussian kick, and the LAST iterate returned. The chain is the chosen sampler with per-step checkpointing, not
  DOODL's invertible EDICT coupling (docs/methods.md §2.3).

``RENO_PAPER`` and ``DOODL_PAPER`` hold the two recipes (the ReNO node's presets).

"Gradient through the last M steps" (``grad_last=M``) uses ``Policy.last(M, prefix="detach")``: the early steps run
the denoiser without a graph, but the solver's linear skip path x' = a·x + b·D stays differentiable. The noise then
still gets a gradient, ∂x_{K−M}/∂ε = √(1+σ₀²)·∏ a_i (for Euler ∏ a_i = σ_{K−M}/σ₀), i.e. the early denoiser
Jacobians are treated as zero. With prefix "no_grad" the graph would be cut at step K−M and ε would get no gradient
at all, so that semantics is useless here.

The batch is a set of independent problems: every per-sample quantity (reward, regulariser, gradient clip, best
iterate, renormalisation) is computed per row, so a batch of B equals B separate runs (except with L-BFGS, whose
line search couples the rows).
"""
import torch

from ..samplers.runner import Policy
from .chain import BestTracker, evaluate, is_oom, raise_oom, reward_scorer

OPTIMIZERS = ("sgd", "sgd_momentum", "adam", "lbfgs")    # sgd = SGD-Nesterov (ReNO), sgd_momentum = heavy ball (DOODL)
CLIP_MODES = ("norm", "value")
KEEP = ("best", "last")

# ReNO: ExplainableML/ReNO arguments.py. DOODL: salesforce/DOODL doodl.py, gen() defaults. docs/methods.md §2.1, §2.3.
RENO_PAPER = dict(iterations=50, lr=5.0, optimizer="sgd", momentum=0.9, grad_clip=0.1, clip="norm", reg_weight=0.01,
                  keep="best", renormalise=False, perturbation=0.0, grad_last=None)
DOODL_PAPER = dict(iterations=50, lr=1.0, optimizer="sgd_momentum", momentum=0.9, grad_clip=1e-3, clip="value",
                   reg_weight=0.0, keep="last", renormalise=True, perturbation=1e-4, grad_last=None,
                   checkpoint_steps=True)


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


def make_optimizer(name, params, lr, momentum=0.9):
    """ReNO's choices: SGD-Nesterov (default), Adam (eps 1e-2), L-BFGS (history 3, strong-Wolfe line search); and
    DOODL's heavy-ball SGD (buffer b = μ·b + g, step −lr·b: PyTorch's SGD without Nesterov or dampening)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0)
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=False)
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


def clip_gradient(grad, limit, mode="norm"):
    """ReNO: the L2 norm of each sample's gradient ≤ limit. DOODL: every element within ±limit."""
    if mode == "norm":
        clip_per_sample(grad, limit)
    elif mode == "value":
        grad.clamp_(-limit, limit)
    else:
        raise ValueError(f"clip must be one of {', '.join(CLIP_MODES)}, got {mode!r}")


class _Stop(Exception):
    """Internal: the evaluation budget is spent (cancelled=False) or the user cancelled inside an optimiser step."""

    def __init__(self, cancelled):
        super().__init__("cancelled" if cancelled else "budget spent")
        self.cancelled = cancelled


OOM_HINT = ("turn on checkpoint_steps and checkpoint_reward, lower the batch, use fewer steps, or set grad_last "
            "to a small number of steps")


def optimise_noise(chain, reward, noise, prompts=None, iterations=50, lr=5.0, optimizer="sgd", momentum=0.9,
                   grad_clip=0.1, reg_weight=0.01, grad_last=None, checkpoint_steps=False, checkpoint_reward=False,
                   renormalise=False, perturbation=0.0, callback=None, cancel=None, clip="norm", keep="best"):
    """ReNO / DOODL gradient ascent on the initial noise. Returns the best (or last) iterate per sample (NoiseResult).

    iterations:   evaluations (render + reward); the last one is not followed by an update, as in ReNO.
    reg_weight:   λ of the χ_d regulariser (0 disables it).
    grad_last:    gradient through the last M steps only (None: all steps); see the module doc for semantics.
    renormalise:  after each update rescale every sample's ε to its initial norm (DOODL).
    perturbation: std of Gaussian noise added to ε after each update (DOODL uses 1e-4); seeded from chain.seed.
    clip:         "norm" (ReNO: per-sample L2 norm ≤ grad_clip) or "value" (DOODL: every element within ±grad_clip).
    keep:         "best" iterate by reward (ReNO) or the "last" evaluated one (DOODL).
    callback:     called after each evaluation with dict(iteration, total, rewards, best_reward, best_images, norms).
    cancel:       polled before each evaluation; truthy -> stop and return the best so far (cancelled=True).
    """
    score = reward_scorer(reward, prompts)
    chain.check_noise(noise)
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if clip not in CLIP_MODES:
        raise ValueError(f"clip must be one of {', '.join(CLIP_MODES)}, got {clip!r}")
    leaf = noise.detach().float().clone().requires_grad_(True)
    opt = make_optimizer(optimizer, [leaf], lr, momentum)
    policy = step_policy(grad_last, checkpoint_steps)
    initial_norm = noise_norms(leaf)
    perturb_gen = torch.Generator(device=leaf.device).manual_seed((chain.seed + 1) % 2**64)   # seeds go to 2**64 - 1
    best, history, norms = BestTracker(keep), [], []

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
            clip_gradient(leaf.grad, grad_clip, clip)
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
            raise_oom(e, f"noise optimisation (batch {leaf.shape[0]}, {chain.steps} steps)", OOM_HINT)
        raise
    return best.result(history, chain.seed, calls=len(history) * chain.steps, cancelled=cancelled,
                       norms=torch.stack(norms).cpu() if norms else None)


def reno(chain, reward, noise, prompts=None, **kw):
    """ReNO with its published settings (RENO_PAPER: SGD-Nesterov lr 5, norm clip 0.1, 50 iterations, χ_d λ 0.01,
    best iterate); keywords override them. Weight a reward ensemble with rewards.losses.reno_weighted first."""
    return optimise_noise(chain, reward, noise, prompts, **{**RENO_PAPER, **kw})


def doodl(chain, reward, noise, prompts=None, **kw):
    """DOODL's optimiser (DOODL_PAPER: heavy-ball SGD, step 1, element clip ±1e-3, renormalised noise, 1e-4 kicks,
    last iterate) over a checkpointed multi-step chain; keywords override the settings."""
    return optimise_noise(chain, reward, noise, prompts, **{**DOODL_PAPER, **kw})


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
