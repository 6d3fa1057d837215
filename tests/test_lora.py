"""LoRA injection, ComfyUI key format, save/load round trip, merge/unmerge, scaling and mixing."""
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rewardlab.training import lora


class Block(nn.Module):
    """Module names shaped like a ComfyUI ldm UNet (input_blocks.1.1.proj_in, ...transformer_blocks.0.attn1.to_q)."""

    def __init__(self):
        super().__init__()
        self.proj_in = nn.Conv2d(4, 8, 1)
        self.to_q = nn.Linear(8, 8, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(8, 8)])
        self.conv = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        h = self.proj_in(x)
        b, c, hh, ww = h.shape
        t = h.flatten(2).transpose(1, 2)
        t = self.to_out[0](self.to_q(t))
        return self.conv(t.transpose(1, 2).reshape(b, c, hh, ww))


class Tree(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_blocks = nn.ModuleList([nn.Identity(), nn.ModuleList([nn.Identity(), Block()])])

    def forward(self, x):
        return self.input_blocks[1][1](x)


TARGETS = ("proj_in", "to_q", "to_out.0", "conv")


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return Tree()


def randomise(adapters):
    for a in adapters.values():
        nn.init.normal_(a.up, std=0.1)


def test_injection_starts_at_base_and_trains_only_adapters(model):
    x = torch.randn(2, 4, 5, 5)
    base = model(x)
    adapters = lora.inject_lora(model, rank=2, targets=TARGETS)
    assert set(adapters) == {f"input_blocks.1.1.{t}" for t in TARGETS}
    torch.testing.assert_close(model(x), base)                 # up = 0 at init
    model(x).square().mean().backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.split(".")[-1] in ("up", "down") for n in trainable)
    assert all(a.up.grad is not None for a in adapters.values())


def test_keys_follow_comfyui_format(model):
    adapters = lora.inject_lora(model, rank=2, alpha=4, targets=TARGETS)
    sd = lora.lora_state_dict(adapters)
    expected = set()
    for t in TARGETS:
        k = f"diffusion_model.input_blocks.1.1.{t}"
        expected |= {f"{k}.lora_up.weight", f"{k}.lora_down.weight", f"{k}.alpha"}
    assert set(sd) == expected
    k = "diffusion_model.input_blocks.1.1.conv"
    assert sd[f"{k}.lora_up.weight"].shape == (4, 2) and sd[f"{k}.lora_down.weight"].shape == (2, 8 * 3 * 3)
    assert sd[f"{k}.alpha"].ndim == 0 and float(sd[f"{k}.alpha"]) == 4.0
    assert "lora_unet_input_blocks_1_1_to_q.alpha" in lora.lora_state_dict(adapters, key=lora.kohya_key)


def test_save_load_round_trip(model, tmp_path):
    x = torch.randn(2, 4, 5, 5)
    adapters = lora.inject_lora(model, rank=3, alpha=1.5, targets=TARGETS)
    randomise(adapters)
    want = model(x)
    save_file(lora.lora_state_dict(adapters), tmp_path / "l.safetensors")

    torch.manual_seed(0)
    fresh = Tree()
    lora.apply_lora(fresh, load_file(tmp_path / "l.safetensors"))
    torch.testing.assert_close(fresh(x), want)

    torch.manual_seed(0)
    resumed = Tree()
    ad2 = lora.inject_lora(resumed, rank=3, alpha=1.5, targets=TARGETS)
    assert len(lora.load_lora_state_dict(ad2, load_file(tmp_path / "l.safetensors"))) == len(TARGETS)
    torch.testing.assert_close(resumed(x), want)


def test_merge_equals_wrapped_forward_and_unmerge_restores(model):
    x = torch.randn(2, 4, 5, 5)
    base = model(x).detach()
    adapters = lora.inject_lora(model, rank=2, targets=TARGETS)
    randomise(adapters)
    wrapped = model(x).detach()
    assert not torch.allclose(wrapped, base)
    lora.merge(model, adapters)
    torch.testing.assert_close(model(x), wrapped)
    lora.unmerge(model, adapters)
    torch.testing.assert_close(model(x), wrapped)
    lora.set_scale(adapters, 0.0)
    torch.testing.assert_close(model(x), base, rtol=1e-5, atol=1e-6)
    lora.remove_lora(model, adapters, merge=False)
    torch.testing.assert_close(model(x), base, rtol=1e-5, atol=1e-6)


def test_scale_is_linear_in_the_delta(model):
    adapters = lora.inject_lora(model, rank=2, targets=TARGETS)
    randomise(adapters)
    a = next(iter(adapters.values()))
    w0 = torch.zeros(a.shape)
    d1 = a(w0).clone()
    a.scale = -2.0
    torch.testing.assert_close(a(w0), -2 * d1)


def test_mix_is_weighted_sum_of_deltas(model):
    ad1 = lora.inject_lora(model, rank=2, alpha=1.0, targets=TARGETS)
    randomise(ad1)
    sd1 = lora.lora_state_dict(ad1)
    randomise(ad1)
    sd2 = lora.lora_state_dict(ad1)
    mixed = lora.split_lora_state_dict(lora.mix_lora_state_dicts([(sd1, 0.7), (sd2, -0.3)]))

    def delta(sd, prefix):
        g = lora.split_lora_state_dict(sd)[prefix]
        r = g["up"].shape[1]
        return g["up"] @ g["down"] * (float(g["alpha"]) / r)

    for prefix in mixed:
        torch.testing.assert_close(delta({f"{prefix}.{k}": v for k, v in (
            ("lora_up.weight", mixed[prefix]["up"]), ("lora_down.weight", mixed[prefix]["down"]),
            ("alpha", mixed[prefix]["alpha"]))}, prefix), 0.7 * delta(sd1, prefix) - 0.3 * delta(sd2, prefix))


def test_bad_files_give_clear_errors(model):
    adapters = lora.inject_lora(model, rank=2, targets=TARGETS)
    with pytest.raises(ValueError, match="unexpected keys"):
        lora.load_lora_state_dict(adapters, {"model.weight": torch.zeros(1)})
    sd = lora.lora_state_dict(lora.inject_lora(Tree(), rank=4, targets=TARGETS))
    with pytest.raises(ValueError, match="shape mismatch"):
        lora.load_lora_state_dict(adapters, sd)
    with pytest.raises(ValueError, match="match no module"):
        lora.apply_lora(Tree(), {"diffusion_model.nope.lora_up.weight": torch.zeros(2, 1),
                                 "diffusion_model.nope.lora_down.weight": torch.zeros(1, 2)})
    with pytest.raises(ValueError, match="no Linear/Conv layer"):
        lora.inject_lora(Tree(), targets=("missing",))
