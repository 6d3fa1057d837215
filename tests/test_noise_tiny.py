"""ReNO and noise search on the embedded tiny text-to-image model with a weight-free reward ensemble."""
import pytest
import torch

from rewardlab.rewards.ensemble import RewardEnsemble
from rewardlab.rewards.simple import build as build_simple
from rewardlab.samplers import sigma_schedule
from rewardlab.noise import Chain, reno
from rewardlab.noise.search import noise_search

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def tiny():
    from rewardlab.tiny.model import WEIGHTS, load_tiny
    if not WEIGHTS.exists():
        pytest.skip("the embedded tiny model (tiny/tiny_model.safetensors) is not built in this checkout")
    return load_tiny()


def _ensemble():
    red = build_simple("red", {"kind": "target_colour", "colour": (1.0, 0.0, 0.0)})
    sat = build_simple("saturation", {"kind": "saturation"})
    return RewardEnsemble([red, sat], [1.0, 0.5])


def _chain(tiny, steps, step="euler", seed=0):
    sigmas = sigma_schedule("karras", steps, tiny.model_sigmas.cpu())
    return Chain(tiny.guided([PROMPT], cfg=3.0), sigmas, decode=tiny.decode, step=step, seed=seed, channels=3)


def test_reno_raises_ensemble_reward_on_the_tiny_model(tiny):
    chain, reward = _chain(tiny, steps=2), _ensemble()
    eps = tiny.initial_noise(1, seed=0)
    res = reno(chain, reward, eps, iterations=8, lr=5.0)
    best = res.best_so_far()[:, 0]
    assert (best[1:] >= best[:-1]).all()
    # ReNO found a better noise than the seed's (measured +3.6e-4 in 8 clipped steps; float noise is ~1e-7).
    assert best[-1] > res.history[0, 0] + 1e-4
    with torch.no_grad():                                      # the NOISE contract on the embedded model
        images = chain.images(chain.run(res.noise).x)
    assert (images - res.images).abs().max() <= 1e-4
    assert torch.allclose(reward(images), res.reward, atol=1e-4)


def test_search_on_the_tiny_model_never_worse_than_seed(tiny):
    chain, reward = _chain(tiny, steps=3, step="euler_ancestral", seed=4), _ensemble()
    eps = tiny.initial_noise(1, seed=0)
    with torch.no_grad():
        base = reward(chain.images(chain.run(eps).x))
    res = noise_search("zero_order", chain, reward, eps, budget=12, seed=0)
    assert res.calls <= 12 and (res.reward >= base).all()
