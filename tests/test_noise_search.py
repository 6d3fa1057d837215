"""Gradient-free noise search (random, zero-order, paths) on toy denoisers with a non-differentiable reward."""
import os
import sys

import pytest
import torch

from rewardlab.noise.chain import CallCounter
from rewardlab.noise.search import (default_forks, noise_search, path_plan_cost, perturb)

sys.path.insert(0, os.path.dirname(__file__))   # pytest runs with --import-mode=importlib
from _noise_fixtures import RankReward, TargetReward, TextReward, noise, toy_chain

METHODS = ["random", "zero_order", "paths"]
CASES = [("eps", "euler_ancestral"), ("v", "dpmpp_2m"), ("flow", "euler")]


def seed0_reward(chain, reward, eps):
    with torch.no_grad():
        return reward(chain.images(chain.run(eps).x))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind,step", CASES)
def test_search_never_worse_than_seed0_within_budget_and_reproducible(method, kind, step):
    chain = toy_chain(kind, steps=4, step=step, cfg=2.5, batch=2, seed=1)
    reward, eps = RankReward(), noise(2)
    a = noise_search(method, chain, reward, eps, budget=40, seed=3)
    b = noise_search(method, chain, reward, eps, budget=40, seed=3)
    assert a.calls <= 40
    assert (a.reward >= seed0_reward(chain, reward, eps)).all()
    assert torch.equal(a.noise, b.noise) and torch.equal(a.reward, b.reward) and torch.equal(a.history, b.history)
    assert a.reward.dtype == torch.float32 and a.history.shape[1] == 2


def test_search_finds_better_than_seed0_and_depends_on_seed():
    chain = toy_chain("eps", steps=2, cfg=2.0)
    reward, eps = TargetReward(), noise()
    base = seed0_reward(chain, reward, eps)
    a = noise_search("random", chain, reward, eps, budget=20, seed=0)
    b = noise_search("random", chain, reward, eps, budget=20, seed=1)
    assert a.reward > base and b.reward > base
    assert not torch.equal(a.noise, b.noise)
    assert a.calls == 20 and len(a.history) == 10                 # N = budget // steps candidates, one per round


@pytest.mark.parametrize("method", ["random", "zero_order"])
def test_search_noise_reproduces_its_sample(method):
    chain = toy_chain("eps", steps=3, step="euler_ancestral", cfg=3.0, batch=2, seed=11)
    res = noise_search(method, chain, TargetReward(), noise(2), budget=30, seed=2)
    with torch.no_grad():
        latent = chain.run(res.noise).x
    assert (chain.images(latent) - res.images).abs().max() <= 1e-4
    assert torch.allclose(TargetReward()(chain.images(latent)), res.reward, atol=1e-4)


def test_zero_order_moves_the_pivot_only_to_better_neighbours():
    chain = toy_chain("v", steps=2)
    seen = []
    res = noise_search("zero_order", chain, TargetReward(), noise(), budget=2 * 9, neighbours=4, step_size=0.5,
                       callback=seen.append)
    pivots = torch.stack([d["pivot_reward"][0] for d in seen])
    assert len(pivots) == 3                               # pivot, then two rounds of 4 neighbours
    assert (pivots[1:] >= pivots[:-1]).all() and pivots[-1] > pivots[0]
    assert res.reward[0] == pivots[-1]


def test_perturb_preserves_unit_variance_and_step_size_controls_distance():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 64, 64, generator=g)
    near, far = perturb(z, 0.1, g), perturb(z, 1.0, g)
    assert abs(near.std().item() - 1) < 0.02 and abs(far.std().item() - 1) < 0.02
    assert (near - z).norm() < (far - z).norm()


def test_path_search_spends_its_planned_budget_and_reports_rounds():
    chain = toy_chain("eps", steps=4, cfg=2.0)
    forks = default_forks(4)
    budget = path_plan_cost(4, forks, beam=2, branches=3, backtrack=1)
    res = noise_search("paths", chain, RankReward(), noise(), budget=budget, branches=3)
    assert res.extra["beam"] == 2 and res.calls == budget
    assert len(res.history) == 1 + len(forks) + 1          # seed-0 sample, one per fork, final


def test_call_counter_counts_one_call_per_step_with_cfg():
    chain = toy_chain("eps", steps=5, cfg=3.0)
    counter = CallCounter(chain.model)
    with torch.no_grad():
        chain.__class__(counter, chain.sigmas).run(noise())
    assert counter.calls == 5


@pytest.mark.parametrize("method", METHODS)
def test_zero_and_too_small_budget_are_clear_errors(method):
    chain = toy_chain("eps", steps=4)
    with pytest.raises(ValueError, match="budget"):
        noise_search(method, chain, RankReward(), noise(), budget=0)
    with pytest.raises(ValueError, match="raise the budget"):
        noise_search(method, chain, RankReward(), noise(), budget=3)


def test_search_bad_inputs():
    chain = toy_chain("eps", steps=2)
    with pytest.raises(ValueError, match="channels"):
        noise_search("random", chain, RankReward(), torch.randn(1, 16, 8, 8), budget=10)
    with pytest.raises(ValueError, match="needs the prompt"):
        noise_search("random", chain, TextReward(), noise(), budget=10)
    with pytest.raises(ValueError, match="unknown search method"):
        noise_search("beam", chain, RankReward(), noise(), budget=10)


def test_search_cancel_returns_best_so_far():
    chain = toy_chain("eps", steps=2)
    seen = []
    res = noise_search("random", chain, TargetReward(), noise(), budget=100, callback=seen.append,
                       cancel=lambda: len(seen) >= 4)
    assert res.cancelled and len(res.history) == 4 and res.calls == 8


def test_search_out_of_memory_is_a_clear_error():
    class Hungry(RankReward):
        def __call__(self, images, prompts=None):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with pytest.raises(RuntimeError, match="lower the batch"):
        noise_search("random", toy_chain("eps", steps=2), Hungry(), noise(), budget=4)
