"""Differentiable image rewards: images BCHW in [0, 1] + prompts -> Tensor[B], higher is better.

Cheap to import: model libraries (open_clip, transformers) are imported only when a model is built.
"""
from .base import Reward, normalize_prompts
from .ensemble import RewardEnsemble
from .losses import RewardLoss, reward_loss, total_loss
from .registry import RewardSpec, WeightFile, cached, get_spec, list_rewards, load_reward, register, unload
from .weights import RewardWeightsError

__all__ = ["Reward", "normalize_prompts", "RewardEnsemble", "RewardLoss", "reward_loss", "total_loss", "RewardSpec",
           "WeightFile", "cached", "get_spec", "list_rewards", "load_reward", "register", "unload", "RewardWeightsError"]
