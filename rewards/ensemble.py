"""A weighted ensemble of rewards, itself a Reward: r = sum_i w_i * normalise_i(r_i).

Reward scales differ by two orders of magnitude (HPS ~0.27, aesthetic ~5, PickScore ~21), so each member can be
normalised before weighting:
  none     r_i unchanged (weights carry the scale, as in ReNO)
  range    (r_i - lo_i) / (hi_i - lo_i) with the member's typical score_range
  running  (r_i - mean_i) / std_i with running statistics (exponential moving average over the batches seen;
           the first batch initialises them). Statistics are buffers, updated without gradient.
"""
import torch

from .base import Reward

NORMALISATIONS = ("none", "range", "running")


class RewardEnsemble(Reward):
    def __init__(self, rewards, weights=None, normalise="none", momentum=0.1):
        super().__init__()
        if not rewards:
            raise ValueError("an ensemble needs at least one reward")
        if normalise not in NORMALISATIONS:
            raise ValueError(f"unknown normalisation {normalise!r}; use one of {NORMALISATIONS}")
        weights = [1.0] * len(rewards) if weights is None else [float(w) for w in weights]
        if len(weights) != len(rewards):
            raise ValueError(f"got {len(weights)} weights for {len(rewards)} rewards")
        self.members = torch.nn.ModuleList(rewards)
        self.weights, self.normalise, self.momentum = weights, normalise, momentum
        self.name = " + ".join(f"{w:g}*{r.name}" for r, w in zip(rewards, weights))
        self.needs_text = any(r.needs_text for r in rewards)
        self.input_size = max((r.input_size or 0 for r in rewards), default=0) or None
        self.score_range = self._combined_range()
        n = len(rewards)
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.last_components = {}

    def _combined_range(self):
        if self.normalise == "running":
            return (-sum(abs(w) for w in self.weights), sum(abs(w) for w in self.weights))
        ranges = [(0.0, 1.0) if self.normalise == "range" else r.score_range for r in self.members]
        lo = sum(min(w * a, w * b) for w, (a, b) in zip(self.weights, ranges))
        hi = sum(max(w * a, w * b) for w, (a, b) in zip(self.weights, ranges))
        return (lo, hi)

    def components(self, images, prompts):
        """{member name: raw scores Tensor[B]} (differentiable)."""
        return {f"{i}:{r.name}": r(images, prompts if r.needs_text else None) for i, r in enumerate(self.members)}

    def _normalised(self, i, r, scores):
        if self.normalise == "range":
            lo, hi = r.score_range
            return (scores - lo) / (hi - lo)
        if self.normalise == "running":
            mean, var = self.running_mean[i].clone(), self.running_var[i].clone()
            return (scores - mean) / (var.sqrt() + 1e-8)
        return scores

    @torch.no_grad()
    def _update_stats(self, raw):
        # Buffers are replaced, not updated in place: under ComfyUI's inference mode they become inference
        # tensors, which may not be modified in place later (they are cloned before use in _normalised).
        batch = torch.stack([s.detach().float() for s in raw], 0).to(self.running_mean.device)   # (members, B)
        mean = batch.mean(1)
        var = batch.var(1, unbiased=False).clamp_min(1e-8) if batch.shape[1] > 1 else None
        if int(self.seen) == 0:
            self.running_mean = mean
            self.running_var = var if var is not None else torch.ones_like(mean)
        else:
            self.running_mean = torch.lerp(self.running_mean.clone(), mean, self.momentum)
            if var is not None:
                self.running_var = torch.lerp(self.running_var.clone(), var, self.momentum)
        self.seen = self.seen.clone() + 1

    def score(self, images, prompts):
        raw = list(self.components(images, prompts).values())
        if self.normalise == "running":
            self._update_stats(raw)
        self.last_components = {f"{i}:{r.name}": s.detach() for i, (r, s) in enumerate(zip(self.members, raw))}
        return sum(w * self._normalised(i, r, s.float())
                   for i, (r, w, s) in enumerate(zip(self.members, self.weights, raw)))
