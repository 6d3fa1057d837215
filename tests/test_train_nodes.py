"""DRaFT node pieces that run without ComfyUI: LoRA mixing and saving on LORA_MODEL dicts, the preview grid,
the curve plot, and the node schemas (every input has a tooltip, method labels map onto trainer methods)."""
import os

import pytest
import torch
from torch import nn

from rewardlab import runtime
from rewardlab.host.bundle import ComfyBundle
from rewardlab.nodes import train_nodes as tn
from rewardlab.plots import image_grid, training_curve
from rewardlab.training import checkpoints as ckpt
from rewardlab.training.lora import apply_lora, inject_lora, lora_state_dict, mix_lora_state_dicts


def trained_lora(seed):
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    adapters = inject_lora(net, rank=2, alpha=1.0, targets=("0", "2"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapters.values():
            a.up.copy_(torch.randn(a.up.shape, generator=g))
    return lora_state_dict(adapters)


def delta(sd, prefix):
    r = sd[f"{prefix}.lora_up.weight"].shape[1]
    return sd[f"{prefix}.lora_up.weight"] @ sd[f"{prefix}.lora_down.weight"] * (float(sd[f"{prefix}.alpha"]) / r)


def test_mix_node_gives_the_weighted_sum_of_deltas():
    a, b = trained_lora(0), trained_lora(1)
    mixed = mix_lora_state_dicts([(a, 0.7), (b, -1.5)])
    for p in ("diffusion_model.0", "diffusion_model.2"):
        torch.testing.assert_close(delta(mixed, p), 0.7 * delta(a, p) - 1.5 * delta(b, p), rtol=1e-5, atol=1e-6)
    # and it applies to a model like any LoRA file
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    base = net[0].weight.detach().clone()
    apply_lora(net, mixed)
    torch.testing.assert_close(net[0].weight, base + delta(mixed, "diffusion_model.0"))


def test_save_node_writes_under_output_loras_and_refuses_traversal(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime.current(), "output_directory", lambda: str(tmp_path))
    lora = trained_lora(0)
    out = tn.RewardLabSaveRewardLoRA().save(lora, "../../evil")
    path = out["result"][0]
    assert path == os.path.join(str(tmp_path), "loras", "evil.safetensors") and os.path.exists(path)
    loaded = ckpt.load_lora_file(path)
    assert loaded.keys() == lora.keys()
    assert all(torch.equal(loaded[k], lora[k]) for k in lora)


def test_preview_grid_and_curve_are_comfy_images():
    imgs = torch.rand(5, 3, 8, 8)
    grid = image_grid(imgs)
    assert grid.shape == (1, 2 * 8 + 2, 3 * 8 + 2 * 2, 3)
    torch.testing.assert_close(grid[0, :8, :8].movedim(-1, 0), imgs[0])
    torch.testing.assert_close(grid[0, 10:18, 10:18].movedim(-1, 0), imgs[4])
    log = [{"step": i + 1, "reward": 0.1 * i, "loss": -0.1 * i, **({"heldout_reward": 0.05 * i} if i % 2 else {})}
           for i in range(6)]
    curve = training_curve(log)
    assert curve.ndim == 4 and curve.shape[0] == 1 and curve.shape[-1] == 3 and 0 <= curve.min() <= curve.max() <= 1


def test_node_schemas():
    for cls in tn.NODE_CLASS_MAPPINGS.values():
        for section in cls.INPUT_TYPES().values():
            for name, spec in section.items():
                assert spec[1].get("tooltip"), f"{cls.__name__}.{name} lacks a tooltip"
        assert cls.CATEGORY.startswith("RewardLab/") and len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
    train = tn.RewardLabDRaFTTrainLoRA.INPUT_TYPES()["required"]
    defaults = {k: train[k][1]["default"] for k in ("k", "lv_n", "learning_rate", "rank", "batch_size")}
    assert defaults == {"k": 1, "lv_n": 2, "learning_rate": 4e-4, "rank": 8, "batch_size": 4}   # DRaFT defaults


def test_comfy_bundle_needs_conditioning_or_clip():
    with pytest.raises(ValueError, match="CONDITIONING"):
        ComfyBundle(model=None, vae=None, width=512, height=512)
