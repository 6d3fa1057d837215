"""The toolkit every noise method shares: the map ε -> (latent, image), call counting, best-iterate tracking.

    ε (unit variance) ─► noise scaling ─► samplers.sample (the one runner) ─► decode ─► images

``Chain`` is that map. Hosts build it: the torch host from a denoiser and a decode function, the ComfyUI host
inside a guider (host/bridge.py), where noise scaling, ``max_denoise`` and the ancestral seed are exactly those of
the sampler that later replays the noise. Noise optimisation (noise/optimise.py) and search (noise/search.py)
only ever see a Chain.
"""
import dataclasses
from dataclasses import dataclass, field

import torch

from ..samplers.runner import Cancelled, noise_scaling, recompute_in_backward, sample


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
    scale_noise: ``fn(sigma, noise, latent) -> x``: the host's own noise scaling (ComfyUI's model_sampling); None uses
                 ``runner.noise_scaling`` with ``flow`` and ``max_denoise``.
    output:      final sample (model space) -> what the host hands back (ComfyUI: its VAE latent space); identity
                 by default.
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
    scale_noise: object = None
    output: object = None

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
        if self.scale_noise is not None:
            return self.scale_noise(self.sigmas[0].to(noise), noise, torch.zeros_like(noise) if latent is None else latent)
        return noise_scaling(self.sigmas[0].to(noise), noise, latent, self.flow, self.max_denoise)

    def run(self, noise, policy=None, callback=None, cancel=None, x=None, sigmas=None, generator=None):
        """Sample from ε (or from an explicit state ``x`` down a sub-schedule ``sigmas``) with the core runner."""
        x = self.start(noise) if x is None else x
        sigmas = self.sigmas if sigmas is None else sigmas
        if generator is None and self.seed is not None:
            generator = torch.Generator(device=x.device).manual_seed(int(self.seed))
        return sample(self.model, x, sigmas, self.step, policy, self.extra_args, callback, cancel,
                      generator=generator, flow=self.flow)

    def denoiser(self):
        """The model with the chain's extra arguments bound: ``fn(x, sigma) -> x̂0``."""
        model, extra = self.model, self.extra_args or {}
        return lambda x, sigma, **kw: model(x, sigma, **extra, **kw)

    def images(self, latent):
        return latent if self.decode is None else self.decode(latent)

    def returned(self, latent):
        """A final sample as the host returns it (see ``output``)."""
        return latent if self.output is None else self.output(latent)

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


def evaluate(chain, score, noise, policy=None, checkpoint_reward=False, cancel=None):
    """One render + reward: (latent, images, rewards[B]). With ``checkpoint_reward`` the decoder and reward towers
    keep no activations; they are recomputed in backward."""
    latent = chain.run(noise, policy, cancel=cancel).x

    def decode_and_score(x):
        images = chain.images(x)
        return images, score(images)

    if checkpoint_reward and torch.is_grad_enabled():
        images, rewards = recompute_in_backward(decode_and_score, latent)
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
    """Per-sample best (noise, latent, image, reward) over evaluations; a tie keeps the earlier one.
    keep="last" keeps the latest evaluation instead (DOODL returns its last iterate)."""

    def __init__(self, keep="best"):
        if keep not in ("best", "last"):
            raise ValueError(f"keep must be 'best' or 'last', got {keep!r}")
        self.keep = keep
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
        if self.keep == "best":
            better = (rewards > self.reward) | (self.reward.isnan() & ~rewards.isnan())    # a NaN best is replaced
        else:
            better = torch.ones_like(rewards, dtype=torch.bool)
        self.noise = self._pick(better, noise, self.noise)
        self.latent = self._pick(better, latent, self.latent)
        self.images = self._pick(better, images, self.images)
        self.reward = torch.where(better, rewards, self.reward)
        return better

    def result(self, history, seed, **kw):
        if self.reward is None:
            raise Cancelled(0)
        return NoiseResult(self.noise, self.latent, self.images, self.reward, torch.stack(history).cpu(), seed, **kw)


def raise_oom(error, what, hint):
    """Re-raise an out-of-memory error with the settings that reduce memory."""
    raise RuntimeError(f"out of memory during {what}: {hint}. ({str(error).splitlines()[0][:200]})") from error


def is_oom(error):
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()
