"""Gradient-free noise search against any reward, differentiable or not (Ma et al. 2025, docs/methods.md).

- random:     best-of-N over i.i.d. noises.
- zero_order: N neighbours of a pivot noise within a step size, move the pivot to the best one, repeat.
- paths:      a beam of partial trajectories; at fork steps every path is re-noised back ``backtrack`` steps with
              fresh noise, each branch is solved forward to the next fork, scored on its x̂0 prediction, and the
              best ``beam`` paths per sample continue.

All three: run under no_grad through the core runner (``Chain.run``), spend at most ``budget`` denoiser calls
(counted by wrapping the model; one call per sampler step, a CFG call counts once), report the best reward after
every round, are reproducible from ``seed`` (candidate noises come from a private generator), and never return a
worse sample than the given noise: that noise (the pivot / seed-0 sample) is always a candidate. Samples in the
batch are independent problems, selected per row.

For random and zero-order search the returned noise, fed into the same sampler and sigmas with the chain's
ancestral seed, reproduces the returned latent. Path search injects fresh noise mid-trajectory, so its latent is
only reproducible from the noise where the unforked path (the given noise) won; ``extra["from_given_noise"]`` says
per sample where that is the case.
"""
import torch

from ..samplers.runner import Cancelled
from .chain import BestTracker, evaluate, is_oom, raise_oom, reward_scorer

METHODS = ("random", "zero_order", "paths")


def _check_budget(budget, need, what):
    if budget < need:
        raise ValueError(f"a budget of {budget} denoiser calls is too small: {what} needs at least {need}; "
                         f"raise the budget")


def _expand(mask, like):
    return mask.view(-1, *[1] * (like.ndim - 1)).to(like.device)


def perturb(pivot, step_size, generator):
    """A neighbour (pivot + λ·u)/√(1+λ²), u ~ N(0, I): variance-preserving, so it stays a unit-variance noise;
    λ = 0 gives the pivot, large λ an independent noise. Its distance from the pivot is ≈ λ·√d."""
    u = torch.randn(pivot.shape, generator=generator, device=generator.device).to(pivot)
    return (pivot + step_size * u) / (1 + step_size**2) ** 0.5


def _generator(noise, seed):
    return torch.Generator(device=noise.device).manual_seed(seed)


class _Search:
    """Shared bookkeeping: scorer, counter, best tracker, per-round history, callback and cancel."""

    def __init__(self, chain, reward, noise, prompts, budget, callback, cancel):
        self.score = reward_scorer(reward, prompts)
        chain.check_noise(noise)
        if budget is None or budget < 1:
            raise ValueError(f"budget must be a positive number of denoiser calls, got {budget}")
        self.chain, self.counter = chain.counted()
        self.budget, self.callback, self.cancel = budget, callback, cancel
        self.best, self.history = BestTracker(), []
        self.cancelled = False

    def left(self):
        return self.budget - self.counter.calls

    def check_cancel(self):
        if self.cancel is not None and self.cancel():
            raise Cancelled(len(self.history))

    def evaluate(self, noise):
        self.check_cancel()
        latent, images, rewards = evaluate(self.chain, self.score, noise, cancel=self.cancel)
        self.best.offer(noise, latent, images, rewards)
        return rewards.float()

    def end_round(self, value=None, **info):
        self.history.append((self.best.reward if value is None else value).clone())
        if self.callback is not None:
            self.callback({"round": len(self.history), "calls": self.counter.calls, "budget": self.budget,
                           "best_reward": self.best.reward, "best_images": self.best.images, **info})

    def result(self, **extra):
        return self.best.result(self.history, self.chain.seed, calls=self.counter.calls, cancelled=self.cancelled,
                                extra=extra)


def _run(search, body, what):
    """Run a search body under no_grad; cancel returns the best so far, OOM gets a clear message."""
    try:
        with torch.no_grad():
            return body()
    except (Cancelled, *search.chain.interrupts):
        search.cancelled = True
        return search.result()
    except RuntimeError as e:
        if is_oom(e):
            raise_oom(e, what, "lower the batch or the image size (search keeps no gradients, so checkpointing "
                               "does not help)")
        raise


def random_search(chain, reward, noise, budget, prompts=None, seed=0, callback=None, cancel=None):
    """Best-of-N: the given noise, then i.i.d. noises from ``seed``, N = budget // steps."""
    search = _Search(chain, reward, noise, prompts, budget, callback, cancel)
    _check_budget(budget, chain.steps, f"one sample of {chain.steps} steps")
    gen = _generator(noise, seed)

    def body():
        candidate = noise
        while search.left() >= chain.steps:
            search.evaluate(candidate)
            search.end_round()
            candidate = torch.randn(noise.shape, generator=gen, device=gen.device).to(noise)
        return search.result()
    return _run(search, body, "random noise search")


def zero_order_search(chain, reward, noise, budget, prompts=None, seed=0, neighbours=4, step_size=0.25,
                      callback=None, cancel=None):
    """Zero-order search: score the pivot, then per round ``neighbours`` perturbations of it (see ``perturb``);
    per sample the pivot moves to the best neighbour if it beats the pivot. Stops when the budget is spent."""
    search = _Search(chain, reward, noise, prompts, budget, callback, cancel)
    _check_budget(budget, chain.steps, f"the pivot sample of {chain.steps} steps")
    if neighbours < 1:
        raise ValueError(f"neighbours must be >= 1, got {neighbours}")
    gen = _generator(noise, seed)

    def body():
        pivot, pivot_reward = noise, search.evaluate(noise)
        search.end_round(pivot_reward=pivot_reward)
        while search.left() >= chain.steps:
            k = min(neighbours, search.left() // chain.steps)
            round_best, round_noise = pivot_reward, pivot
            for _ in range(k):
                candidate = perturb(pivot, step_size, gen)
                rewards = search.evaluate(candidate)
                better = rewards > round_best
                round_noise = torch.where(_expand(better, candidate), candidate, round_noise)
                round_best = torch.where(better, rewards, round_best)
            pivot, pivot_reward = round_noise, round_best
            search.end_round(pivot_reward=pivot_reward)
        return search.result()
    return _run(search, body, "zero-order noise search")


def _renoise(x, sigma, sigma_up, flow, generator):
    """Forward-noise a state from σ up to σ_up > σ with fresh noise (the fork of path search).
    ε/v models (x = x0 + σε): add √(σ_up² − σ²)·ξ. Flow (x = (1−σ)x0 + σε): rescale the data part, then top up."""
    xi = torch.randn(x.shape, generator=generator, device=generator.device).to(x)
    if not flow:
        return x + (sigma_up**2 - sigma**2).clamp(min=0) ** 0.5 * xi
    keep = (1 - sigma_up) / (1 - sigma)
    return keep * x + (sigma_up**2 - (keep * sigma) ** 2).clamp(min=0) ** 0.5 * xi


def path_plan_cost(steps, forks, beam, branches, backtrack):
    """Denoiser calls of a path search: the given noise's full sample, the other initial paths up to the first
    fork, then per fork and path: (branches − 1) re-solves of ``backtrack`` steps and ``branches`` advances."""
    cost = steps + (beam - 1) * forks[0]
    for j, f in enumerate(forks):
        nxt = forks[j + 1] if j + 1 < len(forks) else steps
        cost += beam * ((branches - 1) * min(backtrack, f) + branches * (nxt - f))
    return cost


def default_forks(steps):
    """Fork at every step from a quarter of the way down to the last but one (at least step 1)."""
    return list(range(max(1, steps // 4), steps)) or [1]


def path_search(chain, reward, noise, budget, prompts=None, seed=0, branches=4, forks=None, backtrack=1,
                callback=None, cancel=None):
    """Search over paths. The beam width is the largest that fits the budget (see ``path_plan_cost``); the
    given noise's unforked sample is computed first and always stays a candidate. ``history`` rows: that
    sample's reward, then the best x̂0 score of the beam after each fork, then the final best reward."""
    search = _Search(chain, reward, noise, prompts, budget, callback, cancel)
    n = chain.steps
    if n < 2:
        raise ValueError("path search forks trajectories between steps and needs at least 2 sampling steps")
    forks = sorted(set(forks or default_forks(n)))
    if forks[0] < 1 or forks[-1] >= n:
        raise ValueError(f"fork steps must lie in 1..{n - 1}, got {forks}")
    if branches < 1 or backtrack < 1:
        raise ValueError("branches and backtrack must be >= 1")
    _check_budget(budget, path_plan_cost(n, forks, 1, branches, backtrack),
                  f"path search with {branches} branches at forks {forks}")
    beam = 1
    while path_plan_cost(n, forks, beam + 1, branches, backtrack) <= budget:
        beam += 1
    gen = _generator(noise, seed)
    chain, sigmas = search.chain, chain.sigmas           # the counted chain from here on

    def advance(x, a, b):
        """Solve one path from step a to step b; returns (x_b, image to score: x̂0, or the sample at the end)."""
        traj = chain.run(None, x=x, sigmas=sigmas[a:b + 1], generator=gen, cancel=search.cancel)
        return traj.x, (traj.x if b == n else traj.denoised)

    def score(latent):
        return search.score(chain.images(latent)).float()

    def body():
        # The given noise, unforked: the fallback sample, and its state at the first fork seeds the beam for free.
        states = {}
        reference = chain.run(noise, callback=lambda d: states.__setitem__(d["i"] + 1, d["x"]), cancel=search.cancel)
        ref_latent = reference.x
        ref_images = chain.images(ref_latent)
        search.best.offer(noise, ref_latent, ref_images, search.score(ref_images))
        search.end_round(beam=beam)

        starts = [noise] + [torch.randn(noise.shape, generator=gen, device=gen.device).to(noise)
                            for _ in range(beam - 1)]
        xs = [states[forks[0]]] + [advance(chain.start(e), 0, forks[0])[0] for e in starts[1:]]
        origin = [torch.full((noise.shape[0],), i, device=noise.device) for i in range(beam)]
        for j, f in enumerate(forks):
            nxt = forks[j + 1] if j + 1 < len(forks) else n
            back = f - min(backtrack, f)
            cand_x, cand_score, cand_origin = [], [], []
            for x, o in zip(xs, origin):
                branch = [x] + [advance(_renoise(x, sigmas[f], sigmas[back], chain.flow, gen), back, f)[0]
                                for _ in range(branches - 1)]
                for b in branch:
                    x_next, scored = advance(b, f, nxt)
                    cand_x.append(x_next)
                    cand_score.append(score(scored))
                    cand_origin.append(o)
            xs, origin, top_score = _keep_top(cand_x, cand_score, cand_origin, beam)
            search.end_round(top_score, beam=beam, fork=f)
        finals = torch.stack(xs)
        rewards = torch.stack([score(x) for x in xs])          # ends are samples: their score is their reward
        top = rewards.argmax(0)
        rows = torch.arange(noise.shape[0], device=noise.device)
        winner = finals[top, rows]
        win_origin = torch.stack(origin)[top, rows]
        win_noise = torch.stack(starts)[win_origin.long(), rows]
        improved = search.best.offer(win_noise, winner, chain.images(winner), rewards[top, rows])
        search.end_round(beam=beam)
        return search.result(from_given_noise=(~improved).cpu(), beam=beam)
    return _run(search, body, "path noise search")


def _keep_top(xs, scores, origins, k):
    """Per sample, the k best candidates: states, the index of the initial noise they came from, best score."""
    scores, xs, origins = torch.stack(scores), torch.stack(xs), torch.stack(origins)
    top = scores.topk(min(k, len(scores)), dim=0)                  # (k, B)
    rows = torch.arange(xs.shape[1], device=xs.device)
    return ([xs[i, rows] for i in top.indices], [origins[i.to(origins.device), rows] for i in top.indices],
            top.values[0])


def noise_search(method, chain, reward, noise, budget, prompts=None, seed=0, **kw):
    """Dispatch by name: 'random', 'zero_order' or 'paths'."""
    fns = {"random": random_search, "zero_order": zero_order_search, "paths": path_search}
    if method not in fns:
        raise ValueError(f"unknown search method {method!r}; choose one of {', '.join(METHODS)}")
    return fns[method](chain, reward, noise, budget, prompts=prompts, seed=seed, **kw)
