"""DRaFT-family reward fine-tuning of a LoRA: one training loop over the core runner.

Every method is one or two calls of ``samplers.sample`` with a gradient ``Policy`` (docs/methods.md):

  draft      DRaFT, grad through every step                 Policy.all()
  draft_k    DRaFT-K, grad through the last K steps         Policy.last(K)
  draft_lv   DRaFT-LV(n): no-grad chain to x0, then n re-noisings x0 + σ1·ε_i through the last step with grad;
             the objective is the SUM of the n rewards (the paper's Algorithm 2)
  alignprop  AlignProp: K ~ Uniform{k_min … k_max} drawn once per trajectory (default: the whole chain)  Policy.last(K)
  refl       ReFL: no-grad to a step m drawn from a range, one grad call, reward on its x̂0
  drtune     DRTune: grad at K evenly spaced steps (random offset per trajectory) with stop-grad on the denoiser
             input; the linear skip path between steps stays differentiable
                                                             Policy.at(steps, stop_grad_input=True, prefix="detach")

The loss is loss_scale·(−reward), or loss_scale·ReLU(reward_cap − reward) (ReFL's hinge, loss="hinge"), plus an
optional DRaFT+ ε-space L2 penalty to the frozen base: at each grad call the same denoiser runs again with LoRA
scale 0 under no_grad on the same x and σ, and ‖(D − D_base)/σ‖² is added (x̂0 difference over σ = ε difference for
ε/v models, velocity for flow). ``preset="paper"`` sets every hyperparameter of the chosen method as published
(training/options.py PRESETS; sources in docs/methods.md).

Randomness is private (no global RNG): every micro-batch draws from its own generator seeded by (seed, global
micro-batch index), so the RNG state at any point is a function of the step. A resumed run therefore draws exactly
what the uninterrupted run would have drawn (the checkpoint stores step, seed, optimiser state and the LoRA), and
data parallelism over N ranks draws exactly what one process accumulating N micro-batches draws.
"""
import contextlib
import hashlib
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import runtime
from ..rewards.base import prompt_lines
from ..samplers import Cancelled, Policy, noise_scaling, sample
from . import checkpoints as ckpt
from .lora import load_lora_state_dict, lora_parameters, lora_state_dict

PRECISIONS = ("fp32", "bf16", "fp16")
LOSSES = ("negative", "hinge")
PRESET_NAMES = ("custom", "paper")


@dataclass
class DraftConfig:
    method: str = "draft_k"
    preset: str = "custom"        # "paper": the method's published hyperparameters override the fields below
    k: int = 1                    # DRaFT-K: grad steps; DRTune: number of sparse grad steps
    k_min: int = 1                # AlignProp: smallest K
    k_max: int = 0                # AlignProp: largest K (0: the number of sampling steps, the paper's range)
    lv_n: int = 2                 # DRaFT-LV: re-noised copies of the final sample
    lv_reduction: str = "sum"     # DRaFT-LV: "sum" of the n rewards (paper) or "mean" (1/n of its gradient)
    refl_first: int = -1          # ReFL: the step m is drawn from [refl_first, refl_last]; -1: the last quarter
    refl_last: int = -1
    drtune_offset: str = "random"  # DRTune: "random" start of the evenly spaced steps per trajectory, or "fixed"
    steps: int = 20               # sampling steps per trajectory
    sampler: str = "euler"        # euler == DDIM(η=0) in σ-space
    scheduler: str = "normal"
    cfg: float = 7.5
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 4e-4
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.999)
    max_grad_norm: float = 1.0    # 0 disables clipping
    rank: int = 8
    alpha: float = None           # None: alpha = rank (scale 1)
    targets: object = "attention"  # a choice in lora.TARGET_CHOICES (by model family), suffixes, a regex, or None
    targets_regex: str = ""       # when set, a regular expression on layer names that overrides ``targets``
    train_steps: int = 100
    seed: int = 0
    shuffle: bool = True
    precision: str = "bf16"       # bf16/fp16 autocast is used on CUDA only
    checkpointing: bool = True    # recompute each grad-step denoiser call in backward
    kl_weight: float = 0.0        # DRaFT+ ε-L2 penalty to the frozen base
    loss: str = "negative"        # "negative": −reward; "hinge": ReLU(reward_cap − reward) (ReFL)
    reward_cap: float = 2.0       # the hinge's cap (ReFL: 2, in ImageReward units)
    loss_scale: float = 1.0       # multiplies the reward loss (ReFL's grad_scale 1e-3; AlignProp's loss_coeff 0.01)
    heldout_every: int = 0        # score the held-out prompts every N steps (0: never)
    early_stop_patience: int = 0  # stop after N held-out evaluations without improvement (0: never)
    save_every: int = 50          # checkpoint every N steps (0: only at the end); needs a lora_path
    compile_prefix: str = None    # torch.compile backend for no-grad denoiser calls ("inductor"); None: eager
    cuda_graphs: bool = False     # replay the no-grad denoiser calls from CUDA graphs (CUDA only; see TorchBundle)

    def __post_init__(self):
        if self.preset not in PRESET_NAMES:
            raise ValueError(f"preset must be one of {', '.join(PRESET_NAMES)}, got {self.preset!r}")
        if self.preset == "paper":
            from .options import paper_values        # the table lives with the user-facing options
            for name, value in paper_values(self.method).items():
                setattr(self, name, value)

    def validate(self):
        def need(ok, msg):
            if not ok:
                raise ValueError(msg)
        need(self.method in METHODS, f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        need(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        need(self.loss in LOSSES, f"loss must be one of {LOSSES}, got {self.loss!r}")
        need(self.loss_scale > 0, "loss_scale must be > 0")
        need(self.steps >= 1, "steps (sampling steps) must be >= 1")
        need(1 <= self.k, f"K must be >= 1, got {self.k}")
        need(self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1")
        need(self.lr > 0, "lr must be > 0")
        need(self.rank >= 1, "LoRA rank must be >= 1")
        need(not self.cuda_graphs or self.compile_prefix in (None, "inductor"),
             f"cuda_graphs works with compile_prefix 'inductor' (its reduce-overhead mode) or none (the cudagraphs "
             f"backend), not {self.compile_prefix!r}; drop one of the two")
        problem = METHODS[self.method].check(self)
        need(problem is None, problem)

    def refl_span(self):
        """ReFL's range of m: the last quarter of the chain unless set (ReFL: steps 30…39 of 40)."""
        first = self.refl_first if self.refl_first >= 0 else self.steps - max(1, self.steps // 4)
        last = self.refl_last if self.refl_last >= 0 else self.steps - 1
        return first, last

    def alignprop_span(self):
        """AlignProp's range of K: [k_min, k_max], k_max = 0 meaning every step (K ~ Uniform over the chain)."""
        return self.k_min, self.k_max if self.k_max > 0 else self.steps


@dataclass
class Plan:
    """Everything random about one micro-batch, drawn up front (tests rebuild the reference from it)."""
    step: int
    micro: int
    prompts: list
    noise: torch.Tensor            # unit noise for x_T, CPU
    seed: int                      # for ancestral-step noise inside the runner
    k: int = None                  # AlignProp's K for this trajectory
    m: int = None                  # ReFL's step
    steps: tuple = None            # DRTune's trained steps for this trajectory
    lv_noise: list = field(default_factory=list)


# --- the methods: one record each ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    """One DRaFT-family method, in one place: its settings check, what it draws per micro-batch, and how a plan
    becomes rewarded images with the graph attached.

    check(config)            -> None, or a message naming the fix
    draw(config, gen, shape) -> extra Plan fields ({"k": ...}); drawn from the micro-batch's private generator
    render(trainer, plan, den, hook) -> (images, rewards); ``hook`` is the runner's on_grad_call (DRaFT+ penalty)
    """
    name: str
    label: str
    check: Callable = field(default=lambda c: None)
    draw: Callable = field(default=lambda c, g, shape: {})
    render: Callable = None


def _k_within_steps(c):
    if c.k > c.steps:
        return f"K={c.k} exceeds the {c.steps} sampling steps; lower K or raise steps"
    return None


def _trajectory(policy):
    """A single-trajectory method: sample with ``policy(config, plan)`` (checkpointed as configured) and reward the
    final image."""
    def render(trainer, plan, den, hook):
        c = trainer.cfg
        x = trainer.run(den, trainer.start(plan), trainer.schedule(), policy(c, plan), plan, hook).x
        images = trainer.bundle.decode(x)
        return images, trainer.reward(images, plan.prompts)
    return render


def _render_lv(trainer, plan, den, hook):
    """DRaFT-LV: a no-grad chain to x0, then n re-noisings x0 + σ1·ε_i through the last step with grad.
    Returns the rewards of every copy, (n, B): the loss sums them (Algorithm 2) or averages them."""
    b, sig = trainer.bundle, trainer.schedule()
    with torch.no_grad():
        x0 = trainer.run(den, trainer.start(plan), sig, Policy.none(), plan).x
    last = torch.stack([sig[-2], sig[-1]])
    images, rewards = [], []
    for eps in plan.lv_noise:
        x1 = noise_scaling(last[0], eps.to(b.device), x0, flow=b.flow, max_denoise=False)
        img = b.decode(trainer.run(den, x1, last, Policy.all(checkpoint=trainer.cfg.checkpointing), plan, hook).x)
        images.append(img)
        rewards.append(trainer.reward(img, plan.prompts))
    return torch.cat(images), torch.stack(rewards)


def _render_refl(trainer, plan, den, hook):
    """ReFL: no grad down to step m, one grad call there; the reward scores that call's x̂0."""
    policy = Policy.last(1, checkpoint=trainer.cfg.checkpointing)
    traj = trainer.run(den, trainer.start(plan), trainer.schedule()[: plan.m + 2], policy, plan, hook)
    images = trainer.bundle.decode(traj.denoised)
    return images, trainer.reward(images, plan.prompts)


def _render_drtune(trainer, plan, den, hook):
    """DRTune: θ-gradients at the plan's steps with the *network* input stop-gradiented; the parametrisation's skip
    path c_skip·x (and the solver's linear path) carries the reward gradient back to the earlier trained steps."""
    c = trainer.cfg
    policy = Policy.at(plan.steps, stop_grad_input=True, prefix="detach", checkpoint=c.checkpointing,
                       input_skip=trainer.bundle.skip)
    x = trainer.run(den, trainer.start(plan), trainer.schedule(), policy, plan, hook).x
    images = trainer.bundle.decode(x)
    return images, trainer.reward(images, plan.prompts)


def _check_alignprop(c):
    lo, hi = c.alignprop_span()
    if not 1 <= lo <= hi <= c.steps:
        return (f"AlignProp draws K from [k_min, k_max] = [{lo}, {hi}], which must lie in [1, steps = {c.steps}]; "
                f"lower k_min/k_max or set k_max to 0 (every step)")
    return None


def _check_lv(c):
    if c.lv_n < 1:
        return "DRaFT-LV needs n >= 1 re-noised copies"
    return None if c.lv_reduction in ("sum", "mean") else "lv_reduction must be 'sum' (paper) or 'mean'"


def _check_drtune(c):
    problem = _k_within_steps(c)
    if problem is None and c.drtune_offset not in ("random", "fixed"):
        problem = "drtune_offset must be 'random' (paper) or 'fixed'"
    return problem


def _draw_drtune(c, g, shape):
    """DRTune's K evenly spaced steps, shifted by a random offset per trajectory so every step gets trained."""
    stride, room = drtune_stride(c.steps, c.k)
    offset = int(torch.randint(0, room + 1, (), generator=g)) if c.drtune_offset == "random" else room
    return {"steps": tuple(offset + j * stride for j in range(min(c.k, c.steps)))}


def _check_refl(c):
    lo, hi = c.refl_span()
    return None if 0 <= lo <= hi < c.steps else f"ReFL step range must lie in [0, {c.steps - 1}], got {(lo, hi)}"


METHODS = {m.name: m for m in (
    Method("draft_k", "DRaFT-K", check=_k_within_steps,
           render=_trajectory(lambda c, p: Policy.last(c.k, checkpoint=c.checkpointing))),
    Method("draft_lv", "DRaFT-LV", check=_check_lv,
           draw=lambda c, g, shape: {"lv_noise": [torch.randn(shape, generator=g) for _ in range(c.lv_n)]},
           render=_render_lv),
    Method("draft", "DRaFT (full)", render=_trajectory(lambda c, p: Policy.all(checkpoint=c.checkpointing))),
    Method("alignprop", "AlignProp", check=_check_alignprop,
           draw=lambda c, g, shape: {"k": int(torch.randint(c.alignprop_span()[0], c.alignprop_span()[1] + 1, (),
                                                            generator=g))},
           render=_trajectory(lambda c, p: Policy.last(p.k, checkpoint=c.checkpointing))),
    Method("refl", "ReFL", check=_check_refl,
           draw=lambda c, g, shape: {"m": int(torch.randint(c.refl_span()[0], c.refl_span()[1] + 1, (), generator=g))},
           render=_render_refl),
    Method("drtune", "DRTune", check=_check_drtune, draw=_draw_drtune, render=_render_drtune),
)}


class NonFiniteLoss(RuntimeError):
    pass


class TrainingStopped(RuntimeError):
    """Training ended early for ``reason`` in {"nan", "oom", "cancelled"}; the last good checkpoint is kept."""

    def __init__(self, reason, message, step, checkpoint=None):
        super().__init__(message)
        self.reason, self.step, self.checkpoint = reason, step, checkpoint


@dataclass
class TrainResult:
    status: str                    # "completed" | "early_stopped"
    step: int
    log: list
    checkpoint: str = None
    best_heldout: float = None


def derive_seed(*parts):
    """A 63-bit seed from any parts (stable across processes and platforms)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _generator(*parts):
    return torch.Generator().manual_seed(derive_seed(*parts))


@contextlib.contextmanager
def lora_scale(adapters, scale):
    """Temporarily set every adapter's strength (0 = the frozen base model)."""
    old = {n: a.scale for n, a in adapters.items()}
    for a in adapters.values():
        a.scale = scale
    try:
        yield
    finally:
        for n, a in adapters.items():
            a.scale = old[n]


def _dist():
    """(rank, world size) when torch.distributed is initialised (torchrun), else (0, 1)."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


class Trainer:
    """Reward fine-tuning of a LoRA on a model bundle (see training/bundle.py).

    reward:      ``reward(images_bchw01, prompts) -> Tensor[B]`` (higher is better), differentiable
    prompts:     training prompts, cycled (shuffled per epoch when config.shuffle)
    heldout:     prompts scored every ``heldout_every`` steps with fixed noise (reward-hacking monitor)
    lora_path:   where checkpoints go (``<name>.safetensors``); None: no saving
    state_path:  where the training state goes (default ``checkpoints.default_state_path``: rewardlab_state/ beside
                 the LoRA; hosts whose LoRA folder a loader lists pass a path outside it)
    on_step:     called with each step's log record and the trainer (progress bars, previews)
    cancel:      called before every step and every sampling step; truthy stops training cleanly
    free_memory: called after an OOM / NaN / cancel (ComfyUI: host.free_memory)
    run_name:    the run's name in training/status.py (GET /rewardlab/training?name=), e.g. the LoRA's name;
                 each Trainer reports under a fresh run id, and a new run of the same name resets its status
    """

    def __init__(self, bundle, reward, config=None, prompts=("",), heldout=(), lora_path=None, on_step=None,
                 cancel=None, free_memory=None, adapters=None, run_name="default", run_id=None, state_path=None):
        self.cfg = config or DraftConfig()
        self.cfg.validate()
        if not prompts:
            raise ValueError("give at least one training prompt")
        self.bundle, self.reward = bundle, reward
        self.prompts, self.heldout = list(prompts), list(heldout)
        self.lora_path, self.on_step, self.cancel = lora_path, on_step, cancel
        self.run_name, self.run_id = run_name, run_id or f"{run_name}-{uuid.uuid4().hex[:8]}"
        self._reported = False
        self.state_path = state_path or (ckpt.default_state_path(lora_path) if lora_path else None)
        self.free_memory = free_memory or runtime.current().free_memory
        c = self.cfg
        self.adapters = adapters if adapters is not None else self._seeded(
            lambda: bundle.add_lora(c.rank, c.alpha, c.targets_regex or c.targets))
        self.params = lora_parameters(self.adapters)
        for p in self.params:
            p.requires_grad_(True)
        self.opt = torch.optim.AdamW(self.params, lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay)
        self.sigmas = bundle.sigmas(c.steps, c.scheduler)
        if c.compile_prefix or c.cuda_graphs:
            if not hasattr(bundle, "compile_prefix"):
                raise ValueError("compile_prefix and cuda_graphs need a torch bundle (tiny / diffusers); turn them off "
                                 "for this host")
            bundle.compile_prefix(c.compile_prefix, cuda_graphs=c.cuda_graphs)
        self.rank, self.world = _dist()
        self.is_main = self.rank == 0          # under torchrun only rank 0 logs, saves and plots
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(c.precision)
        use_amp = self.amp_dtype is not None and bundle.device.type == "cuda"
        self.amp_dtype = self.amp_dtype if use_amp else None
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.step, self.log = 0, []
        self.best_heldout, self.bad_evals, self.saved_step = None, 0, None
        self._pending = None          # a checkpoint taken after a step, written once a finite loss vouches for it
        self.last_images = None
        self._perms = {}

    def _seeded(self, make):
        """Run ``make`` (the LoRA init) with the global RNG seeded from config.seed and restored afterwards, so every
        data-parallel rank, and every rerun, starts from the same adapters."""
        cuda = torch.cuda.is_initialized()        # LoRA weights on a GPU imply an initialised CUDA
        seed = derive_seed(self.cfg.seed, "lora-init")
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else []):
            torch.random.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.manual_seed_all(seed)
            return make()

    # --- what a step draws -------------------------------------------------------------------------------------

    def _prompt(self, j):
        """The j-th prompt of the stream: epochs of the list, each in its own seeded shuffled order."""
        n = len(self.prompts)
        epoch, pos = divmod(j, n)
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(n, generator=_generator(self.cfg.seed, "epoch", epoch))
                           if self.cfg.shuffle else torch.arange(n)}
        return self.prompts[int(self._perms[epoch][pos])]

    def plan(self, step, micro=0):
        c = self.cfg
        # The global micro-batch index: N ranks × 1 micro-batch draw exactly what 1 rank × N micro-batches draws.
        index = (step * c.grad_accum + micro) * self.world + self.rank
        g = _generator(c.seed, "batch", index)
        prompts = [self._prompt(index * c.batch_size + b) for b in range(c.batch_size)]
        shape = (c.batch_size, *self.bundle.latent_shape)
        noise, seed = torch.randn(shape, generator=g), int(torch.randint(0, 2**62, (), generator=g))
        return Plan(step, micro, prompts, noise, seed, **METHODS[c.method].draw(c, g, shape))

    # --- the loss ----------------------------------------------------------------------------------------------

    def _autocast(self):
        """bf16/fp16 autocast on the bundle's device; ``amp_dtype`` is None (no autocast) off CUDA."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.bundle.device.type, dtype=self.amp_dtype)

    # --- pieces the method records use ----------------------------------------------------------------------

    def schedule(self):
        return self.sigmas.to(self.bundle.device)

    def start(self, plan):
        """x at the first sigma from the plan's unit noise (pure noise: the sampler's full-denoise scaling)."""
        return noise_scaling(self.schedule()[0], plan.noise.to(self.bundle.device), flow=self.bundle.flow)

    def run(self, den, x, sigmas, policy, plan, hook=None):
        """The core runner with the plan's ancestral seed and the trainer's cancel hook."""
        return sample(den, x, sigmas, step=self.cfg.sampler, policy=policy, flow=self.bundle.flow,
                      generator=torch.Generator().manual_seed(plan.seed), cancel=self.cancel, on_grad_call=hook)

    def _penalty_hook(self, den, penalties):
        """DRaFT+: at each grad call, ‖(D − D_base)/σ‖² against the frozen model on the same x and σ."""
        if self.cfg.kl_weight <= 0:
            return None

        def hook(x, sigma, denoised):
            with torch.no_grad(), lora_scale(self.adapters, 0.0):
                base = den(x, sigma.expand(x.shape[0]))
            penalties.append(((denoised - base) / sigma.to(denoised.dtype)).float().square().mean())
        return hook

    def images_and_rewards(self, plan, den, penalties=None):
        """Sample ``plan`` with the method's gradient policy through the guided denoiser ``den``;
        returns (images, rewards) with the graph attached."""
        penalties = [] if penalties is None else penalties
        with self._autocast():
            return METHODS[self.cfg.method].render(self, plan, den, self._penalty_hook(den, penalties))

    def reward_loss(self, r):
        """Per-trajectory loss of rewards ``r`` (B,), or (n, B) for DRaFT-LV's n copies of each trajectory, whose
        per-copy losses are summed (paper) or averaged (lv_reduction)."""
        c = self.cfg
        per = torch.relu(c.reward_cap - r) if c.loss == "hinge" else -r
        if per.ndim == 2:
            per = per.sum(0) if c.lv_reduction == "sum" else per.mean(0)
        return c.loss_scale * per.mean()

    def _loss(self, plan, den):
        penalties = []
        images, r = self.images_and_rewards(plan, den, penalties)
        r = r.float()
        loss = self.reward_loss(r)
        kl = torch.stack(penalties).mean() if penalties else None
        if kl is not None:
            loss = loss + self.cfg.kl_weight * kl
        info = {"reward": float(r.detach().mean()), "kl": float(kl.detach()) if kl is not None else None,
                "images": images.detach(), "k": plan.k, "m": plan.m}
        return loss, info

    def loss(self, plan):
        """(loss, info) for one micro-batch; the loss carries the graph to the LoRA parameters. Only for hosts
        whose denoiser outlives the session (torch bundles); training uses ``micro_step``."""
        return self.bundle.session(plan.prompts, self.cfg.cfg, lambda den: self._loss(plan, den))

    def micro_step(self, plan, scale=1.0):
        """Loss and backward of one micro-batch inside one bundle session. Returns its info (loss as a float;
        a non-finite loss skips the backward)."""
        def body(den):
            loss, info = self._loss(plan, den)
            info["loss"] = float(loss.detach())
            if math.isfinite(info["loss"]):
                self._backward(loss * scale)
            return info
        return self.bundle.session(plan.prompts, self.cfg.cfg, body)

    # --- one optimiser step ------------------------------------------------------------------------------------

    def _backward(self, loss):
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _sync(self, bad):
        """Average LoRA gradients over data-parallel ranks (plain all-reduce: no wrapper module, as docs/methods.md
        §11 advises) and agree on whether any rank saw a non-finite loss."""
        if self.world == 1:
            return bad
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in self.params]
                         + [torch.tensor([float(bad)], device=self.params[0].device)])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in self.params:
            p.grad = flat[offset: offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        return bool(flat[-1] > 0)

    def train_step(self):
        """One optimiser step over ``grad_accum`` micro-batches. Returns the step's log record."""
        c, t0 = self.cfg, time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        infos, bad = [], False
        for micro in range(c.grad_accum):
            info = self.micro_step(self.plan(self.step, micro), 1.0 / c.grad_accum)
            if not math.isfinite(info["loss"]):
                bad = True
                break
            infos.append(info)
        bad = self._sync(bad)
        if bad:
            raise NonFiniteLoss(f"the loss became NaN/Inf at step {self.step + 1}")
        self._write_pending()             # a finite loss with the current weights: the pending checkpoint is good
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        norm = torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm if c.max_grad_norm > 0 else math.inf)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        elif not torch.isfinite(norm):
            raise NonFiniteLoss(f"the LoRA gradient became NaN/Inf at step {self.step + 1}")
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if not self.weights_finite():
            raise NonFiniteLoss(f"the LoRA weights became NaN/Inf in the update of step {self.step + 1}")
        self.last_images = infos[-1]["images"].float().cpu()
        self.step += 1
        def mean(key):
            return sum(i[key] for i in infos) / len(infos) if infos[0][key] is not None else None
        return self._mean_over_ranks(
            {"step": self.step, "loss": mean("loss"), "reward": mean("reward"), "kl": mean("kl"),
             "grad_norm": float(norm), "k": infos[-1]["k"], "m": infos[-1]["m"], "seconds": time.perf_counter() - t0})

    def _mean_over_ranks(self, record, keys=("loss", "reward", "kl")):
        """The step record with its loss, reward and KL averaged over data-parallel ranks (one all-reduce), so the
        log shows the whole global batch, as one process accumulating every rank's micro-batches would."""
        present = [k for k in keys if record.get(k) is not None]
        if self.world == 1 or not present:
            return record
        values = torch.tensor([record[k] for k in present], dtype=torch.float64, device=self.params[0].device)
        torch.distributed.all_reduce(values)
        return {**record, **{k: float(v) / self.world for k, v in zip(present, values.tolist())}}

    # --- evaluation --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample_images(self, prompts, seed=0, scale=None):
        """Full no-grad trajectories for ``prompts`` with fixed noise; ``scale`` overrides the LoRA strength
        (0 = the base model). Returns (images, rewards)."""
        c, b = self.cfg, self.bundle
        ctx = lora_scale(self.adapters, scale) if scale is not None else contextlib.nullcontext()
        images, rewards = [], []
        sig = self.sigmas.to(b.device)
        with ctx, self._autocast():
            for start in range(0, len(prompts), c.batch_size):
                chunk = list(prompts[start: start + c.batch_size])
                noise = torch.randn((len(chunk), *b.latent_shape), generator=_generator(seed, "eval", start))
                x = noise_scaling(sig[0], noise.to(b.device), flow=b.flow)
                anc = torch.Generator().manual_seed(derive_seed(seed, "anc", start))
                traj = b.session(chunk, c.cfg, lambda den: sample(den, x, sig, step=c.sampler, flow=b.flow,
                                                                  policy=Policy.none(), generator=anc))
                img = b.decode(traj.x).float()
                images.append(img.cpu())
                rewards.append(self.reward(img, chunk).float().cpu())
        return torch.cat(images), torch.cat(rewards)

    def evaluate(self, prompts=None, seed=12345, scale=None):
        """Mean reward on ``prompts`` (default: the held-out set) with fixed noise."""
        prompts = self.heldout if prompts is None else list(prompts)
        return float(self.sample_images(prompts, seed, scale)[1].mean())

    # --- checkpoints -------------------------------------------------------------------------------------------
    # A checkpoint holds the weights after step N. It is taken after step N but written only once a finite loss has
    # been computed with those weights: by step N + 1, or by one no-grad check when training ends or stops. So a
    # diverged update (finite but huge weights whose next loss is NaN) never overwrites the last good checkpoint.

    def state_dict(self):
        c = self.cfg
        return {"step": self.step, "seed": c.seed, "method": c.method, "optimizer": self.opt.state_dict(),
                "log": self.log, "best_heldout": self.best_heldout, "bad_evals": self.bad_evals,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "lora_settings": {"rank": c.rank, "alpha": c.alpha,
                                  "targets": list(c.targets) if isinstance(c.targets, tuple) else c.targets},
                "lora": self.lora_state_dict()}

    def lora_state_dict(self):
        """The trained LoRA in the bundle's file key format."""
        return lora_state_dict(self.adapters, key=self.bundle.lora_key)

    def weights_finite(self):
        return bool(torch.stack([torch.isfinite(p).all() for p in self.params]).all())     # one device sync

    def _metadata(self, step):
        return {"rewardlab_method": self.cfg.method, "rewardlab_step": step, "rewardlab_rank": self.cfg.rank}

    def _snapshot(self):
        """CPU copies of the LoRA and the state now (the optimiser keeps updating its tensors in place)."""
        return {"step": self.step, "lora": ckpt.cpu_copy(self.lora_state_dict()),
                "state": ckpt.cpu_copy(self.state_dict())}

    def _write(self, snap, path=None, state_path=None):
        """Write a snapshot to this run's files, or to ``path`` (with ``state_path``, default beside it)."""
        if path is None:
            path, state_path = self.lora_path, self.state_path
        if self.rank == 0:
            ckpt.save_checkpoint(snap["lora"], snap["state"], path, self._metadata(snap["step"]), state_path)
        if path == self.lora_path:
            self.saved_step = snap["step"]

    def _write_pending(self):
        snap, self._pending = self._pending, None
        if snap is not None:
            self._write(snap)

    def loss_is_finite(self):
        """One no-grad loss of the next step's micro-batch with the current weights, without the cancel hook: it
        vouches for a checkpoint when training ends or stops."""
        cancel, self.cancel = self.cancel, None
        try:
            with torch.no_grad():
                plan = self.plan(self.step)
                loss, _ = self.bundle.session(plan.prompts, self.cfg.cfg, lambda den: self._loss(plan, den))
                return self.weights_finite() and math.isfinite(float(loss))
        finally:
            self.cancel = cancel

    def save(self, path=None, state_path=None):
        """Write the LoRA (ComfyUI keys) and the state, atomically, if the current weights give a finite loss;
        returns the path, or None when nothing was written. Only rank 0 writes."""
        target = path or self.lora_path
        if target is None:
            return None
        if self._pending is not None and self._pending["step"] == self.step:
            self._pending = None
        if not self.loss_is_finite():
            return None
        self._write(self._snapshot(), path, state_path)
        return target

    def resume(self, path=None, state_path=None):
        """Continue from a checkpoint written by ``save``: same LoRA, optimiser state, step and log. The learning
        rate, betas and weight decay are this trainer's settings (a resume may lower the learning rate). A state
        of other settings (seed, method, rank, alpha, targets) is refused with the fix."""
        path = path or self.lora_path
        sd, state = ckpt.load_checkpoint(path, state_path or (self.state_path if path == self.lora_path else None))
        if state is not None:
            self._check_resumable(path, state)
            sd = state.get("lora") or sd
        self._check_lora_layout(path, sd)
        load_lora_state_dict(self.adapters, sd, key=self.bundle.lora_key)
        if state is None:
            return self
        try:
            self.opt.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise ValueError(f"the training state of {path} does not fit this LoRA ({e}); resume with the settings "
                             f"it was trained with, or train under a new name") from None
        c = self.cfg
        for group in self.opt.param_groups:
            group.update(lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.log = int(state["step"]), list(state["log"])
        self.best_heldout, self.bad_evals = state["best_heldout"], int(state["bad_evals"])
        self.saved_step = self.step
        return self

    def _check_resumable(self, path, state):
        c = self.cfg
        now = {"seed": c.seed, "method": c.method}
        saved = {"seed": state.get("seed"), "method": state.get("method")}
        settings = state.get("lora_settings")
        if settings is not None:
            targets = list(c.targets) if isinstance(c.targets, tuple) else c.targets
            now.update(rank=c.rank, alpha=c.alpha, targets=targets)
            saved.update(settings)
        differ = [k for k in now if saved.get(k) != now[k]]
        if differ:
            was = ", ".join(f"{k}={saved.get(k)!r}" for k in differ)
            asked = ", ".join(f"{k}={now[k]!r}" for k in differ)
            raise ValueError(f"checkpoint {path!r} was written with {was}, but this run asks for {asked}; resume "
                             f"with the settings it was trained with, or train under a new name")

    def _check_lora_layout(self, path, sd):
        """The file's LoRA modules and shapes must be exactly the adapters' (rank and targets as trained)."""
        want = {k: tuple(v.shape) for k, v in self.lora_state_dict().items()}
        have = {k: tuple(v.shape) for k, v in sd.items()}
        if want == have:
            return
        extra, missing = sorted(set(have) - set(want)), sorted(set(want) - set(have))
        shapes = sorted(k for k in set(have) & set(want) if have[k] != want[k])
        parts = [f"{len(extra)} entries this run has no module for (e.g. {extra[0]})" if extra else "",
                 f"no weights for {len(missing)} of this run's entries (e.g. {missing[0]})" if missing else "",
                 f"{len(shapes)} shapes differ (e.g. {shapes[0]}: file {have[shapes[0]]}, run {want[shapes[0]]})"
                 if shapes else ""]
        raise ValueError(f"the LoRA in {path} does not match this run's LoRA: {'; '.join(p for p in parts if p)}. "
                         f"Resume with the rank and targets it was trained with, or train under a new name")

    # --- the loop ----------------------------------------------------------------------------------------------

    def _heldout(self, record):
        """Score the held-out prompts; True when early stopping should end training."""
        c = self.cfg
        if not (self.heldout and c.heldout_every and self.step % c.heldout_every == 0):
            return False
        value = self.evaluate()
        record["heldout_reward"] = value
        if self.best_heldout is None or value > self.best_heldout:
            self.best_heldout, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
        return bool(c.early_stop_patience and self.bad_evals >= c.early_stop_patience)

    def _stop_message(self, reason, detail):
        c = self.cfg
        if self.saved_step is not None:
            kept = f"the last good checkpoint is {self.lora_path} (step {self.saved_step}); resume continues from it"
        elif self.lora_path is None or not c.save_every:
            kept = "no checkpoint had been saved yet (set save_every to keep intermediate LoRAs)"
        else:
            kept = "no checkpoint was kept (one is written only once the next loss with its weights is finite)"
        if reason == "oom":
            fix = (f"out of GPU memory at step {self.step}: lower batch_size (now {c.batch_size}), K (now {c.k}) or "
                   f"the resolution (latent {tuple(self.bundle.latent_shape)}), use grad_accum for a larger effective "
                   f"batch, or enable checkpointing (now {'on' if c.checkpointing else 'off'})")
        elif reason == "nan":
            fix = (f"{detail}: lower the learning rate (now {c.lr:g}), keep grad clipping on (max_grad_norm now "
                   f"{c.max_grad_norm:g}), or lower K (now {c.k})"
                   + (", or train in bf16/fp32 instead of fp16" if self.amp_dtype == torch.float16 else ""))
        else:
            fix = f"training was cancelled at step {self.step}"
        return f"RewardLab DRaFT: {fix}; {kept}."

    def _settle_pending(self, vouched):
        """On a stop: write the pending checkpoint if a no-grad loss with its weights (the current ones) is finite;
        after a NaN/Inf those weights are the ones that failed, so it is dropped."""
        snap, self._pending = self._pending, None
        if snap is None or not vouched or snap["step"] != self.step:
            return
        try:
            good = self.loss_is_finite()
        except Exception:                 # out of memory again, an interrupt from the host, ...: not vouched for
            good = False
        if good:
            self._write(snap)

    def train(self, steps=None):
        """Train until ``steps`` (default config.train_steps) optimiser steps are done, or early stop.
        Raises TrainingStopped on NaN/Inf, out-of-memory or cancel, after freeing memory."""
        total = self.cfg.train_steps if steps is None else steps
        status, stop = "completed", None
        if not self._reported:
            _status("start", self.run_id, name=self.run_name, step=self.step, total=total)
            self._reported = True
        try:
            while self.step < total:
                if self.cancel is not None and self.cancel():
                    raise Cancelled(self.step)
                record = self.train_step()
                early = self._heldout(record)
                self.log.append(record)
                if self.lora_path is not None and self.cfg.save_every and self.step % self.cfg.save_every == 0:
                    self._pending = self._snapshot()
                _status("update", self.run_id, step=self.step, total=total, record=record,
                        last_checkpoint=self.lora_path if self.saved_step is not None else None)
                if self.on_step is not None:
                    self.on_step(record, self)
                if early:
                    status = "early_stopped"
                    break
            if self.lora_path is not None and self.save() is None:
                raise NonFiniteLoss(f"the LoRA after the last step (step {self.step}) gives a NaN/Inf loss")
        except torch.cuda.OutOfMemoryError as e:
            stop = ("oom", str(e).splitlines()[0] if str(e) else "")
        except NonFiniteLoss as e:
            stop = ("nan", str(e))
        except Cancelled:
            stop = ("cancelled", "")
        finally:
            self.opt.zero_grad(set_to_none=True)
        if stop is not None:              # the exception (and the graph its frames hold) is gone by now
            self.free_memory()
            self._settle_pending(vouched=stop[0] != "nan")
            _status("finish", self.run_id, status=stop[0], step=self.step)
            raise TrainingStopped(stop[0], self._stop_message(*stop), self.step,
                                  self.lora_path if self.saved_step is not None else None)
        _status("finish", self.run_id, status=status, step=self.step)
        return TrainResult(status, self.step, self.log, self.lora_path if self.saved_step is not None else None,
                           self.best_heldout)


def training_prompts(text, encoded_by_clip, reward):
    """The prompt lines of a prompt box; an empty box is an error when the prompts are used (a text encoder encodes
    them, or the reward reads text). With a fixed conditioning and an image-only reward they are never read."""
    lines = prompt_lines(text)
    if lines:
        return lines
    if encoded_by_clip or getattr(reward, "needs_text", False):
        user = "CLIP encodes them" if encoded_by_clip else f"the reward {getattr(reward, 'name', '')!r} reads text"
        raise ValueError(f"DRaFT: the prompts box is empty, but {user}: write at least one training prompt "
                         "(one per line)")
    return [""]


def drtune_stride(n, k):
    """(stride, room) of DRTune's evenly spaced steps over n sampling steps: K steps ⌊n/K⌋ apart, starting at an
    offset in [0, room]; the paper draws the offset per iteration (room = stride − 1 when K divides n)."""
    k = max(1, min(k, n))
    stride = n // k
    return stride, n - 1 - (k - 1) * stride


def drtune_steps(n, k, offset=None):
    """DRTune's trained step indices: K steps ⌊n/K⌋ apart from ``offset`` (default: the last possible start, so
    the last step is included)."""
    stride, room = drtune_stride(n, k)
    offset = room if offset is None else offset
    if not 0 <= offset <= room:
        raise ValueError(f"DRTune offset must lie in [0, {room}] for {min(k, n)} steps out of {n}")
    return [offset + j * stride for j in range(max(1, min(k, n)))]


def _status(fn_name, run_id, **fields):
    """Report to training/status.py (the run registry behind GET /rewardlab/training) when it is present."""
    try:
        from . import status
    except ImportError:
        return
    fn = getattr(status, fn_name, None)
    if fn is not None:
        fn(run_id, **fields)
