"""The ComfyUI bridge's host-free parts (no ComfyUI needed): RunnerSampler's wiring around our runner, the NOISE
object, and the SAMPLER node. The same code is checked against real ComfyUI in tests/comfyui/."""
from types import SimpleNamespace

import pytest
import torch

from rewardlab.nodes import host_sampling as hs
from rewardlab.nodes.sampler_nodes import RewardLabSampler
from rewardlab.samplers.runner import Cancelled, noise_scaling, sample

SIGMAS = torch.tensor([14.6146, 3.0, 0.7, 0.0])


class EPS:            # ComfyUI composes model_sampling from a schedule class and a prediction class by these names
    sigma_max = torch.tensor(14.6146)

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return noise_scaling(sigma, noise, latent_image, flow=False, max_denoise=max_denoise)

    def inverse_noise_scaling(self, sigma, latent):
        return latent


class CONST(EPS):
    sigma_max = torch.tensor(1.0)

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return noise_scaling(sigma, noise, latent_image, flow=True)


class FakeGuider:
    """Stands in for comfy's CFGGuider as a sampler sees it: callable model_wrap returning x̂0."""

    def __init__(self, model_sampling):
        self.inner_model, self.conds, self.seen = SimpleNamespace(model_sampling=model_sampling), {}, []

    def __call__(self, x, sigma, model_options=None, seed=None):
        self.seen.append((sigma.shape, seed))
        return x * 0.5 / (1 + sigma.view(-1, 1, 1, 1) ** 2) + 0.1


def _noise(seed=0):
    return torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(seed))


def test_runner_sampler_scales_noise_then_runs_our_runner():
    guider, noise = FakeGuider(EPS()), _noise()
    calls = []
    out = hs.RunnerSampler("euler").sample(guider, SIGMAS, {"model_options": {}, "seed": 3},
                                           lambda i, x0, x, n: calls.append((i, n)), noise, torch.zeros_like(noise))
    # σ0 = σ_max: pure-noise start, x_T = sqrt(1+σ0²)·noise, as ComfyUI's EPS.noise_scaling(max_denoise=True)
    ref = sample(guider, noise * (1 + SIGMAS[0] ** 2) ** 0.5, SIGMAS, "euler").x
    torch.testing.assert_close(out, ref)
    assert calls == [(0, 3), (1, 3), (2, 3)]                  # ComfyUI's callback(step, x0, x, total_steps)
    assert guider.seen[0] == ((2,), 3)                        # per-batch sigma; model_options/seed passed through


def test_ancestral_noise_is_seeded_from_the_guider_seed():
    guider, noise, latent = FakeGuider(EPS()), _noise(), torch.zeros(2, 4, 3, 3)

    def run(seed):
        return hs.RunnerSampler("euler_ancestral").sample(guider, SIGMAS, {"seed": seed}, None, noise, latent)

    ref = sample(guider, noise * (1 + SIGMAS[0] ** 2) ** 0.5, SIGMAS, "euler_ancestral",
                 generator=torch.Generator().manual_seed(5)).x
    torch.testing.assert_close(run(5), ref)
    assert (run(6) - ref).abs().max() > 1e-3


def test_flow_models_get_flow_scaling_and_steps():
    guider, noise, latent = FakeGuider(CONST()), _noise(), torch.full((2, 4, 3, 3), 0.3)
    sigmas = torch.tensor([1.0, 0.6, 0.2, 0.0])
    out = hs.RunnerSampler("euler_ancestral", seed=1).sample(guider, sigmas, {}, None, noise, latent)
    ref = sample(guider, noise_scaling(sigmas[0], noise, latent, flow=True), sigmas, "euler_ancestral", flow=True,
                 generator=torch.Generator().manual_seed(1)).x
    torch.testing.assert_close(out, ref)


def test_cancel_stops_the_run_and_the_last_trajectory_is_kept():
    guider = FakeGuider(EPS())
    with pytest.raises(Cancelled):
        hs.RunnerSampler("euler", cancel=lambda: True).sample(guider, SIGMAS, {}, None, _noise(), torch.zeros(2, 4, 3, 3))
    s = hs.RunnerSampler("dpmpp_2m")
    s.sample(guider, SIGMAS, {}, None, _noise(), torch.zeros(2, 4, 3, 3))
    assert s.last.denoised.shape == (2, 4, 3, 3)
    with pytest.raises(ValueError, match="choose one of"):
        hs.RunnerSampler("heun")


def test_optimised_noise_is_a_noise_object():
    z = _noise(1)
    noise = hs.OptimisedNoise(7, z.requires_grad_(True) * 2)
    got = noise.generate_noise({"samples": torch.zeros(2, 4, 3, 3)})
    assert noise.seed == 7 and got.device.type == "cpu" and not got.requires_grad
    torch.testing.assert_close(got, z.detach() * 2)
    got.zero_()                                              # callers get a copy, the NOISE stays reusable
    torch.testing.assert_close(noise.generate_noise({"samples": torch.zeros(2, 4, 3, 3)}), z.detach() * 2)
    with pytest.raises(ValueError, match="same latent size and batch"):
        noise.generate_noise({"samples": torch.zeros(1, 4, 3, 3)})


def test_sampler_node_builds_runner_samplers():
    node = RewardLabSampler()
    assert all("tooltip" in opts for _, opts in RewardLabSampler.INPUT_TYPES()["required"].values())
    (s,) = node.get_sampler("ddim", -1.0)
    assert isinstance(s, hs.RunnerSampler) and (s.step, s.eta) == ("ddim", None)
    assert node.get_sampler("euler_ancestral", 0.5)[0].eta == 0.5
