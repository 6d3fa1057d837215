"""Reward -> loss transforms from the literature (lower is better; all per-sample, Tensor[B] -> Tensor[B]).

  negative   -r                      DRaFT, DDPO-style maximisation
  target     |target - r|            AlignProp (aesthetic target 10)
  hinge      relu(cap - r)           ReFL (ImageReward, cap 2): no push once an image is good enough
  offset     offset - r              ReNO (HPS 1 - r, ImageReward 2 - r, PickScore 30 - r, CLIP 100 - r,
                                     aesthetic 10 - r); same gradient as -r, but a readable, mostly positive loss
Each is multiplied by ``weight`` (ReNO: HPS 5.0, ImageReward 1.0, CLIP 0.01, PickScore 0.05).
"""
from dataclasses import dataclass

import torch

FORMS = ("negative", "target", "hinge", "offset")

# ReNO (ExplainableML/ReNO@bd6f6ac rewards/*.py, arguments.py): offset and default weight per reward family.
RENO_OFFSETS = {"hps": 1.0, "imagereward": 2.0, "pickscore": 30.0, "clipscore": 100.0, "aesthetic": 10.0}
RENO_WEIGHTS = {"hps": 5.0, "imagereward": 1.0, "clipscore": 0.01, "pickscore": 0.05, "aesthetic": 0.0}


def family(name):
    """'hps-v2.1' -> 'hps', 'clipscore-vit-h-14' -> 'clipscore', 'aesthetic-v2' -> 'aesthetic'."""
    for key in RENO_OFFSETS:
        if name.startswith(key):
            return key
    return name


def reward_loss(r, form="negative", value=None, weight=1.0):
    """Per-sample loss from rewards ``r``; ``value`` is the target (target), cap (hinge) or offset (offset)."""
    if form == "negative":
        loss = -r
    elif form in ("target", "hinge", "offset"):
        if value is None:
            raise ValueError(f"loss form {form!r} needs a value (the {'cap' if form == 'hinge' else form})")
        loss = {"target": lambda: (value - r).abs(), "hinge": lambda: torch.relu(value - r), "offset": lambda: value - r}[form]()
    else:
        raise ValueError(f"unknown loss form {form!r}; use one of {FORMS}")
    return weight * loss


@dataclass
class RewardLoss:
    """A reward plus how to turn it into a loss: ``loss(images, prompts) -> (loss Tensor[B], reward Tensor[B])``."""

    reward: torch.nn.Module
    form: str = "negative"
    value: float = None
    weight: float = 1.0

    def __call__(self, images, prompts=None):
        r = self.reward(images, prompts)
        return reward_loss(r, self.form, self.value, self.weight), r

    @classmethod
    def reno(cls, reward, weight=None):
        """ReNO's loss for a reward: offset - r with ReNO's default weight for its family."""
        fam = family(getattr(reward, "name", ""))
        if fam not in RENO_OFFSETS:
            raise ValueError(f"ReNO defines no offset for {fam!r}; use one of {sorted(RENO_OFFSETS)}")
        return cls(reward, "offset", RENO_OFFSETS[fam], RENO_WEIGHTS[fam] if weight is None else weight)


def reno_weighted(reward):
    """ReNO's objective Σ_i λ_i·R_i with its default weights per reward family (RENO_WEIGHTS), as a reward: an
    ensemble (Combine Rewards, normalise "none") gets its weights replaced, a single reward is wrapped. The offsets
    (1 − HPS, 2 − ImageReward, ...) do not change gradients and are left out."""
    from .ensemble import RewardEnsemble
    members = list(reward.members) if isinstance(reward, RewardEnsemble) else [reward]
    if isinstance(reward, RewardEnsemble) and reward.normalise != "none":
        raise ValueError("ReNO weights raw scores: set Combine Rewards' normalise to 'none', or use preset custom")
    weights = []
    for member in members:
        name = getattr(member, "name", "")
        weight = RENO_WEIGHTS.get(family(name))
        if not weight:
            known = ", ".join(k for k, v in RENO_WEIGHTS.items() if v)
            raise ValueError(f"ReNO defines no weight for the reward {name!r} (it weights {known}); remove it or use "
                             "preset custom with your own weights")
        weights.append(weight)
    return RewardEnsemble(members, weights, "none")


def total_loss(terms, images, prompts=None):
    """Sum of several RewardLoss terms: (loss Tensor[B], {reward name: reward Tensor[B]})."""
    total, rewards = 0.0, {}
    for term in terms:
        loss, r = term(images, prompts)
        total = total + loss
        rewards[getattr(term.reward, "name", f"reward{len(rewards)}")] = r.detach()
    return total, rewards
