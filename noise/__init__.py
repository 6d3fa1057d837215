"""Methods that change where sampling starts instead of the model: noise optimisation (ReNO, DOODL) and
gradient-free noise search. Both work on a ``Chain`` (noise/chain.py), which a host builds."""
from .chain import BestTracker, CallCounter, Chain, NoiseResult, evaluate, reward_scorer
from .optimise import (DOODL_PAPER, OPTIMIZERS, RENO_PAPER, chi_regulariser, doodl, noise_gradient, optimise_noise,
                       reno)
from .search import METHODS, noise_search

__all__ = ["BestTracker", "CallCounter", "Chain", "NoiseResult", "evaluate", "reward_scorer", "OPTIMIZERS",
           "DOODL_PAPER", "RENO_PAPER", "chi_regulariser", "doodl", "noise_gradient", "optimise_noise", "reno", "METHODS", "noise_search"]
