"""The trajectory runner's gradient policies against plain-autograd references, plus steps and schedules."""
import pytest
import torch
from torch import nn

from rewardlab.samplers import Cancelled, ModuleDenoiser, Policy, sample, sigma_schedule
from rewardlab.samplers import scaled_linear_model_sigmas, steps
from rewardlab.samplers.sigmas import SCHEDULER_NAMES, exponential, karras


class ToyNet(nn.Module):
    """ε-predictor with σ-conditioning; nonlinear so that Jacobians matter."""

    def __init__(self, c=3):
        super().__init__()
        self.a = nn.Conv2d(c, 8, 3, padding=1)
        self.b = nn.Conv2d(8, c, 3, padding=1)

    def forward(self, x, sigma):
        h = self.a(x / (sigma.view(-1, 1, 1, 1) ** 2 + 1).sqrt())
        return self.b(torch.tanh(h + sigma.log().view(-1, 1, 1, 1)))


@pytest.fixture()
def setup():
    torch.manual_seed(0)
    net = ToyNet()
    model = ModuleDenoiser(net, "eps")
    sigmas = sigma_schedule("karras", 5, scaled_linear_model_sigmas())
    x = torch.randn(2, 3, 6, 6) * sigmas[0]
    return net, model, sigmas, x


def loss_of(x):
    return (x ** 2).mean()


def grads(net):
    return [p.grad.clone() for p in net.parameters()]


def reference_last_k(model, x, sigmas, k):
    """Plain autograd: the first n-k steps are computed and then detached."""
    n = len(sigmas) - 1
    for i in range(n):
        if i == n - k:
            x = x.detach()
        s = sigmas[i].expand(x.shape[0])
        d = model(x, s)
        x = x + (x - d) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_last_k_gradient_equals_reference(setup, k, use_checkpoint):
    net, model, sigmas, x = setup
    loss_of(reference_last_k(model, x, sigmas, k)).backward()
    ref = grads(net)
    net.zero_grad()
    loss_of(sample(model, x, sigmas, "euler", Policy.last(k, checkpoint=use_checkpoint)).x).backward()
    for a, b in zip(grads(net), ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_last_k_uses_only_last_k_calls(setup):
    """Changing a parameter's effect on early steps must not change DRaFT-K's gradient: count grad-tracked calls."""
    net, model, sigmas, x = setup
    tracked = []
    net.a.register_forward_hook(lambda m, i, o: tracked.append(o.requires_grad))
    sample(model, x, sigmas, "euler", Policy.last(2)).x
    assert tracked == [False, False, False, True, True]


def test_stop_grad_input_gradient(setup):
    """DRTune: D = model(sg(x)) at selected steps; x' = x + (x - D)/σ·Δσ keeps the linear path."""
    net, model, sigmas, x = setup
    chosen = {1, 3}
    n = len(sigmas) - 1
    xr = x.clone().requires_grad_(True)
    xx = xr
    for i in range(n):
        s = sigmas[i].expand(2)
        if i in chosen:
            d = model(xx.detach(), s)
        else:
            with torch.no_grad():
                d = model(xx, s)
        xx = xx + (xx - d) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    loss_of(xx).backward()
    ref, ref_x = grads(net), xr.grad.clone()
    net.zero_grad()
    x2 = x.clone().requires_grad_(True)
    out = sample(model, x2, sigmas, "euler", Policy.at(chosen, stop_grad_input=True, prefix="detach"))
    loss_of(out.x).backward()
    for a, b in zip(grads(net), ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x2.grad, ref_x)


def test_gradient_reaches_initial_noise(setup):
    net, model, sigmas, x = setup
    net.requires_grad_(False)
    noise = (x / sigmas[0]).clone().requires_grad_(True)
    out = sample(model, noise * sigmas[0], sigmas, "dpmpp_2m", Policy.all(checkpoint=True))
    loss_of(out.x).backward()
    assert noise.grad is not None and noise.grad.abs().sum() > 0 and torch.isfinite(noise.grad).all()
    # The full-graph gradient equals the checkpointed one.
    g_ckpt = noise.grad.clone()
    noise.grad = None
    loss_of(sample(model, noise * sigmas[0], sigmas, "dpmpp_2m", Policy.all()).x).backward()
    torch.testing.assert_close(noise.grad, g_ckpt)


def test_no_grad_prefix_cuts_noise_gradient_but_detach_prefix_keeps_linear_path(setup):
    net, model, sigmas, x = setup
    noise = x.clone().requires_grad_(True)
    out = sample(model, noise, sigmas, "euler", Policy.last(1))
    loss_of(out.x).backward()
    assert noise.grad is None
    out = sample(model, noise, sigmas, "euler", Policy.last(1, prefix="detach"))
    loss_of(out.x).backward()
    assert noise.grad is not None and noise.grad.abs().sum() > 0


def test_ambient_no_grad_is_respected(setup):
    net, model, sigmas, x = setup
    with torch.no_grad():
        out = sample(model, x, sigmas, "euler", Policy.all())
    assert not out.x.requires_grad


def test_returns_last_denoised_and_calls_back(setup):
    net, model, sigmas, x = setup
    seen = []
    with torch.no_grad():
        out = sample(model, x, sigmas, "euler", callback=seen.append)
        last = model(seen[-2]["x"], sigmas[-2].expand(2))
    assert [s["i"] for s in seen] == list(range(5))
    torch.testing.assert_close(out.denoised, last)
    torch.testing.assert_close(out.x, out.denoised)     # the final Euler step to σ=0 lands on x̂0


def test_cancel_stops_at_requested_step(setup):
    net, model, sigmas, x = setup
    calls = []
    with pytest.raises(Cancelled) as e:
        sample(model, x, sigmas, "euler", cancel=lambda: len(calls) >= 3, callback=calls.append)
    assert e.value.step == 3


def test_ancestral_reproducible_with_generator_and_ddim_eta_is_ancestral(setup):
    net, model, sigmas, x = setup
    with torch.no_grad():
        a = sample(model, x, sigmas, "euler_ancestral", generator=torch.Generator().manual_seed(3)).x
        b = sample(model, x, sigmas, "euler_ancestral", generator=torch.Generator().manual_seed(3)).x
        c = sample(model, x, sigmas, "euler_ancestral", generator=torch.Generator().manual_seed(4)).x
        d = sample(model, x, sigmas, steps.get_step("ddim", eta=1.0), generator=torch.Generator().manual_seed(3)).x
        e = sample(model, x, sigmas, "ddim").x
        f = sample(model, x, sigmas, "euler").x
    assert torch.equal(a, b) and not torch.allclose(a, c)
    torch.testing.assert_close(a, d)
    torch.testing.assert_close(e, f)


def test_ddim_eta_noise_matches_closed_form():
    """σ_up of DDIM(η) in σ-space: η·σ'·sqrt(σ² − σ'²)/σ, and σ_down² + σ_up² = σ'²."""
    s, s1 = torch.tensor(3.0), torch.tensor(1.5)
    down, up = steps.ancestral_sigmas(s, s1, 0.5)
    torch.testing.assert_close(up, 0.5 * s1 * (s**2 - s1**2).sqrt() / s)
    torch.testing.assert_close(down**2 + up**2, s1**2)


def test_schedules():
    ms = scaled_linear_model_sigmas()
    k = karras(6, 0.1, 10.0, rho=7.0)
    ramp = torch.linspace(0, 1, 6)
    torch.testing.assert_close(k[:-1], (10 ** (1 / 7) + ramp * (0.1 ** (1 / 7) - 10 ** (1 / 7))) ** 7)
    e = exponential(5, 0.1, 10.0)
    torch.testing.assert_close(e[:-1].log().diff(), torch.full((4,), (0.1 / 10.0) ** 0.25).log())
    for name in SCHEDULER_NAMES:
        s = sigma_schedule(name, 7, ms)
        assert len(s) == 8 and s[-1] == 0 and (s.diff() < 0).all(), name
        if not name.startswith("ays_"):                  # AYS: the published (rounded, family-specific) table
            assert s[0] <= ms[-1] * (1 + 1e-6)
    torch.testing.assert_close(sigma_schedule("simple", 4, ms)[:-1], ms[[999, 749, 499, 249]])
    with pytest.raises(ValueError, match="unknown schedule"):
        sigma_schedule("nope", 4, ms)
    with pytest.raises(ValueError, match="model_sigmas"):
        sigma_schedule("normal", 4)


class InPlaceNet(nn.Module):
    """A block that adds its residuals in place, as Flux's and MMDiT's blocks do (``x += f(norm(x))``)."""

    def __init__(self, c=3, in_place=True):
        super().__init__()
        self.norm = nn.GroupNorm(1, c, affine=False)         # saves its input for backward
        self.f = nn.Conv2d(c, c, 3, padding=1)
        self.g = nn.Conv2d(c, c, 1)
        self.in_place = in_place

    def forward(self, x, sigma):
        h = x / (sigma.view(-1, 1, 1, 1) ** 2 + 1).sqrt()
        h = h * 1.0                                           # a tensor with history, updated below
        if self.in_place:
            h += self.f(self.norm(h))
            h += self.g(torch.tanh(self.norm(h)))
        else:
            h = h + self.f(self.norm(h))
            h = h + self.g(torch.tanh(self.norm(h)))
        return h


@pytest.mark.parametrize("checkpoint", [False, True])
def test_models_that_update_tensors_in_place_get_exact_gradients(checkpoint):
    """Plain autograd refuses these models and torch's non-reentrant checkpoint returns a wrong input gradient;
    the runner's grad calls save copies of activations, so both modes equal the out-of-place model."""
    torch.manual_seed(0)
    net = InPlaceNet()
    ref_net = InPlaceNet(in_place=False)
    ref_net.load_state_dict(net.state_dict())
    sigmas = sigma_schedule("karras", 4, scaled_linear_model_sigmas())

    def run(module):
        x = (torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1)) * sigmas[0]).requires_grad_(True)
        out = sample(ModuleDenoiser(module, "eps"), x, sigmas, "euler", Policy.all(checkpoint=checkpoint)).x
        params = list(module.parameters())
        return torch.autograd.grad(loss_of(out), [x] + params)     # autograd.grad with explicit inputs works too

    for got, want in zip(run(net), run(ref_net)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_checkpointed_calls_keep_no_activations_and_respect_stop_grad_input(setup):
    net, model, sigmas, x = setup
    seen = []

    def counting(a, s):
        seen.append(torch.is_grad_enabled())
        return model(a, s)

    policy = Policy.at([1, 3], stop_grad_input=True, prefix="detach", checkpoint=True)
    out = sample(counting, x, sigmas, "euler", policy)
    calls = len(seen)
    loss_of(out.x).backward()
    assert len(seen) == calls + 2                  # the two grad steps ran once more, in backward
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_checkpointed_blocks_nest_inside_a_checkpointed_step():
    """Blocks of a model recomputed in backward (tuples in and out, extra tensors) inside a step that is itself
    recomputed: the same gradients as plain autograd."""
    from rewardlab.samplers.runner import recompute_in_backward

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.f, self.g = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 1)

        def forward(self, h, other, scale):
            h = h * 1.0
            h += self.f(torch.tanh(h)) * scale
            return h, other + self.g(h)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])

        def forward(self, x, sigma):
            h, other = x / (sigma.view(-1, 1, 1, 1) ** 2 + 1).sqrt(), torch.zeros_like(x)
            for block in self.blocks:
                h, other = block(h, other, scale=sigma.view(-1, 1, 1, 1).log())
            return h + other

    torch.manual_seed(0)
    net = Net()
    sigmas = sigma_schedule("karras", 3, scaled_linear_model_sigmas())

    def grads(checkpoint):
        x = (torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(2)) * sigmas[0]).requires_grad_(True)
        out = sample(ModuleDenoiser(net, "eps"), x, sigmas, "euler", Policy.all(checkpoint=checkpoint)).x
        return torch.autograd.grad(loss_of(out), [x, *net.parameters()])

    plain = grads(False)
    for block in net.blocks:                  # what host.grad.checkpoint_blocks does to a ComfyUI model
        forward = block.forward
        block.forward = lambda *a, _f=forward, **k: recompute_in_backward(_f, *a, **k)
    for got, want in zip(grads(True), plain):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_a_checkpointed_function_may_update_its_input_in_place():
    """Flux's blocks add to their ``txt`` input in place; the recomputation must accept that too."""
    from rewardlab.samplers.runner import inplace_safe, recompute_in_backward
    w = torch.randn(4, 4, requires_grad=True)

    def block(h):
        h += torch.tanh(h @ w)
        return h

    def run(checkpoint):
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
        h = x * 2
        if checkpoint:
            out = recompute_in_backward(block, h)
        else:
            with inplace_safe():
                out = block(h * 1.0)
        return torch.autograd.grad(out.square().sum(), [x, w])

    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want)


def test_recomputed_activations_go_as_soon_as_their_block_is_done(monkeypatch):
    """Gradient with respect to the input only, while the blocks' modulation layers require grad (as in ComfyUI's
    DiT and UNet blocks): the modulation branch never runs in backward, and it must not keep the block's recomputed
    activations alive until the whole backward ends (it did: SDXL-fixture peak 4.0 GiB instead of 1.0)."""
    import weakref

    from rewardlab.samplers import runner

    recomputing, copies = [], {}         # block index -> weak references to what its recomputation saved
    alive_later = {}                     # block index -> copies of block i + 1 still alive when block i recomputes
    snapshot = runner._snapshot

    def tracked(t):
        out = snapshot(t)
        if out is not t:
            copies.setdefault(recomputing[-1], []).append(weakref.ref(out))
        return out

    monkeypatch.setattr(runner, "_snapshot", tracked)

    class Block(nn.Module):
        def __init__(self, i):
            super().__init__()
            self.i, self.lin, self.mod = i, nn.Linear(64, 64), nn.Linear(4, 64)

        def forward(self, h, cond):
            recomputing.append(self.i)
            alive_later[self.i] = sum(ref() is not None and ref().shape[0] == 8 for ref in copies.get(self.i + 1, []))
            scale = torch.sigmoid(self.mod(cond))        # depends on weights only: never runs in backward
            out = h + torch.tanh(self.lin(h)) * scale
            recomputing.pop()
            return out

    torch.manual_seed(0)
    blocks = [Block(i) for i in range(3)]
    cond, x = torch.randn(1, 4), torch.randn(8, 64, requires_grad=True)

    def input_grad(checkpoint):
        h = x
        for block in blocks:
            h = runner.checkpointed(block.forward)(h, cond) if checkpoint else block(h, cond)
        return torch.autograd.grad(h.square().sum(), x)[0]

    want = input_grad(False)
    alive_later.clear()
    torch.testing.assert_close(input_grad(True), want)
    assert set(copies) == {0, 1, 2}                      # every block was recomputed ...
    assert alive_later[0] == 0 and alive_later[1] == 0   # ... and its activations were gone before the next one


def test_align_your_steps_is_the_published_table_and_log_linear_in_between():
    from rewardlab.samplers.sigmas import AYS_SIGMAS, align_your_steps, sigma_schedule
    ten = sigma_schedule("ays_sd15", 10)
    assert torch.allclose(ten[:-1], torch.tensor(AYS_SIGMAS["sd15"][:-1]))    # the howto page's values, then 0
    assert ten[-1] == 0 and len(ten) == 11
    assert torch.allclose(sigma_schedule("ays_sdxl", 10)[:4], torch.tensor([14.615, 6.315, 3.771, 2.181]))
    assert float(sigma_schedule("ays_svd", 10)[0]) == 700.0
    twenty = align_your_steps(20, "sdxl")
    table = torch.tensor(AYS_SIGMAS["sdxl"])
    assert torch.allclose(twenty[0:-1:2], table[:-1], rtol=1e-5)             # grid points fall on the table
    mids = (table[:-1] * table[1:]).sqrt()                                     # log-linear: geometric means between
    assert torch.allclose(twenty[1::2], mids, rtol=1e-5)
    five = align_your_steps(5, "sd15")                                         # fewer steps than the table
    expect = torch.tensor([AYS_SIGMAS["sd15"][i] for i in (0, 2, 4, 6, 8)])
    assert torch.allclose(five[:-1], expect, rtol=1e-5) and five[-1] == 0
    with pytest.raises(ValueError, match="publishes schedules for sd15"):
        align_your_steps(10, "flux")
