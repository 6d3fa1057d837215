"""The ComfyUI bridge's host-free parts (no ComfyUI needed): RunnerSampler's wiring around our runner, the one
guider bridge (run_in_guider), the NOISE object, and the SAMPLER node. The same code is checked against real ComfyUI
in tests/comfyui/."""
from types import SimpleNamespace

import pytest
import torch

from rewardlab.host.bridge import RunnerSampler, run_in_guider
from rewardlab.host.noise import OptimisedNoise
from rewardlab.nodes.sampler_nodes import RewardLabSampler
from rewardlab.samplers.runner import Cancelled, Policy, noise_scaling, sample

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


SCALE = 0.5           # the fake latent format's scale factor


class FakeGuider:
    """Stands in for comfy's CFGGuider: as a sampler sees it (callable model_wrap returning x̂0, inner_model with
    model_sampling and latent format), and ``sample`` as CFGGuider.sample calls a sampler (extra_args with
    model_options and seed, the result scaled back with process_latent_out)."""

    def __init__(self, model_sampling):
        self.inner_model = SimpleNamespace(model_sampling=model_sampling,
                                           latent_format=SimpleNamespace(latent_channels=4),
                                           process_latent_out=lambda x: x / SCALE)
        self.conds, self.seen = {}, []

    def __call__(self, x, sigma, model_options=None, seed=None):
        self.seen.append((sigma.shape, seed, model_options))
        return x * 0.5 / (1 + sigma.view(-1, 1, 1, 1) ** 2) + 0.1

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        extra_args = {"model_options": {"transformer_options": {"sample_sigmas": sigmas}}, "seed": seed}
        out = sampler.sample(self, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
        return self.inner_model.process_latent_out(out.float())


def _noise(seed=0):
    return torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(seed))


def test_runner_sampler_scales_noise_then_runs_our_runner():
    guider, noise = FakeGuider(EPS()), _noise()
    calls = []
    out = RunnerSampler("euler").sample(guider, SIGMAS, {"model_options": {}, "seed": 3},
                                           lambda i, x0, x, n: calls.append((i, n)), noise, torch.zeros_like(noise))
    # σ0 = σ_max: pure-noise start, x_T = sqrt(1+σ0²)·noise, as ComfyUI's EPS.noise_scaling(max_denoise=True)
    ref = sample(guider, noise * (1 + SIGMAS[0] ** 2) ** 0.5, SIGMAS, "euler").x
    torch.testing.assert_close(out, ref)
    assert calls == [(0, 3), (1, 3), (2, 3)]                  # ComfyUI's callback(step, x0, x, total_steps)
    assert guider.seen[0] == ((2,), 3, {})                    # per-batch sigma; model_options/seed passed through


def test_ancestral_noise_is_seeded_from_the_guider_seed():
    guider, noise, latent = FakeGuider(EPS()), _noise(), torch.zeros(2, 4, 3, 3)

    def run(seed):
        return RunnerSampler("euler_ancestral").sample(guider, SIGMAS, {"seed": seed}, None, noise, latent)

    ref = sample(guider, noise * (1 + SIGMAS[0] ** 2) ** 0.5, SIGMAS, "euler_ancestral",
                 generator=torch.Generator().manual_seed(5)).x
    torch.testing.assert_close(run(5), ref)
    assert (run(6) - ref).abs().max() > 1e-3


def test_flow_models_get_flow_scaling_and_steps():
    guider, noise, latent = FakeGuider(CONST()), _noise(), torch.full((2, 4, 3, 3), 0.3)
    sigmas = torch.tensor([1.0, 0.6, 0.2, 0.0])
    out = RunnerSampler("euler_ancestral", seed=1).sample(guider, sigmas, {}, None, noise, latent)
    ref = sample(guider, noise_scaling(sigmas[0], noise, latent, flow=True), sigmas, "euler_ancestral", flow=True,
                 generator=torch.Generator().manual_seed(1)).x
    torch.testing.assert_close(out, ref)


def test_cancel_stops_the_run_and_the_last_trajectory_is_kept():
    guider = FakeGuider(EPS())
    with pytest.raises(Cancelled):
        RunnerSampler("euler", cancel=lambda: True).sample(guider, SIGMAS, {}, None, _noise(), torch.zeros(2, 4, 3, 3))
    s = RunnerSampler("dpmpp_2m")
    s.sample(guider, SIGMAS, {}, None, _noise(), torch.zeros(2, 4, 3, 3))
    assert s.last.denoised.shape == (2, 4, 3, 3)
    with pytest.raises(ValueError, match="choose one of"):
        RunnerSampler("heun")


def test_optimised_noise_is_a_noise_object():
    z = _noise(1)
    noise = OptimisedNoise(7, z.requires_grad_(True) * 2)
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
    assert isinstance(s, RunnerSampler) and (s.step, s.eta) == ("ddim", None)
    assert node.get_sampler("euler_ancestral", 0.5)[0].eta == 0.5


# --- run_in_guider: the one bridge ------------------------------------------------------------------------------

def test_run_in_guider_hands_the_body_the_chain_the_runner_sampler_samples_with():
    """A body that samples from a noise inside the guider gets what stock SamplerCustomAdvanced + RewardLab Sampler
    return for that NOISE: the same noise scaling, max_denoise, step and ancestral seed (here: euler_ancestral)."""
    noise, latent = _noise(3), torch.zeros(2, 4, 3, 3)
    replay = FakeGuider(EPS()).sample(noise, latent, RunnerSampler("euler_ancestral"), SIGMAS, seed=9)

    def body(chain):
        assert chain.max_denoise and not chain.flow and chain.seed == 9 and chain.channels == 4
        return chain.returned(chain.run(noise).x)

    got = run_in_guider(FakeGuider(EPS()), body, latent, SIGMAS, seed=9, step="euler_ancestral")
    torch.testing.assert_close(got, replay)
    other = run_in_guider(FakeGuider(EPS()), body_for(noise), latent, SIGMAS, seed=10, step="euler_ancestral")
    assert (other - replay).abs().max() > 1e-3           # the seed is the guider's


def body_for(noise):
    return lambda chain: chain.returned(chain.run(noise).x)


def test_run_in_guider_partial_denoise_and_flow_use_the_models_own_noise_scaling():
    latent = torch.full((2, 4, 3, 3), 0.3)
    # σ0 below σ_max: an img2img start, x = latent + σ0·noise (no sqrt(1+σ²))
    sigmas = SIGMAS[1:]
    chain = run_in_guider(FakeGuider(EPS()), lambda c: c, latent, sigmas, seed=0)
    assert not chain.max_denoise
    torch.testing.assert_close(chain.start(_noise()), latent + sigmas[0] * _noise())
    flow_sigmas = torch.tensor([1.0, 0.6, 0.2, 0.0])
    chain = run_in_guider(FakeGuider(CONST()), lambda c: c, latent, flow_sigmas, seed=0)
    assert chain.flow
    torch.testing.assert_close(chain.start(_noise()), noise_scaling(flow_sigmas[0], _noise(), latent, flow=True))


def test_backward_inside_the_body_recomputes_checkpointed_steps_with_the_guider_alive():
    """The guider is alive during the body, so a backward that recomputes checkpointed model calls works there;
    the model sees model_options and the seed on every call, the recomputation included."""
    def grads(checkpoint):
        guider = FakeGuider(EPS())
        leaf = _noise(4).requires_grad_(True)

        def body(chain):
            x = chain.run(leaf, Policy.all(checkpoint=checkpoint)).x
            x.square().sum().backward()
            return len(guider.seen)

        with torch.enable_grad():
            calls = run_in_guider(guider, body, torch.zeros(2, 4, 3, 3), SIGMAS, seed=1)
        assert all(opts is not None and "transformer_options" in opts and seed == 1 for _, seed, opts in guider.seen)
        return leaf.grad, calls

    (plain, n_plain), (ckpt, n_ckpt) = grads(False), grads(True)
    torch.testing.assert_close(ckpt, plain)
    assert plain.abs().sum() > 0 and n_ckpt == 2 * n_plain     # every step recomputed once in backward


def test_run_in_guider_returns_normal_tensors_and_decodes_in_vae_space():
    seen = []

    def decode(z):
        seen.append(z)
        return z[:, :3].clamp(0, 1)

    with torch.inference_mode():
        images = run_in_guider(FakeGuider(EPS()), lambda c: c.images(torch.ones(2, 4, 3, 3)), torch.zeros(2, 4, 3, 3),
                               SIGMAS, decode=decode)
    assert not images.is_inference()
    torch.testing.assert_close(seen[0], torch.ones(2, 4, 3, 3) / SCALE)   # decode gets the VAE-space latent


def test_run_in_guider_keeps_the_callers_grad_mode():
    """Leaving inference mode switches grad mode on in torch; the bridge must not (a no-grad caller stays no-grad)."""
    def grad_mode(chain):
        return torch.is_grad_enabled()

    latent = torch.zeros(2, 4, 3, 3)
    with torch.inference_mode():
        assert run_in_guider(FakeGuider(EPS()), grad_mode, latent, SIGMAS) is False
    with torch.no_grad():
        assert run_in_guider(FakeGuider(EPS()), grad_mode, latent, SIGMAS) is False
    with torch.enable_grad():
        assert run_in_guider(FakeGuider(EPS()), grad_mode, latent, SIGMAS) is True
