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
    out = tn.RewardLabSaveRewardLoRA().save(lora, "styles/mine")
    path = out["result"][0]
    assert path == os.path.join(str(tmp_path), "loras", "styles", "mine.safetensors") and os.path.exists(path)
    assert out["ui"]["text"] == ["saved as styles/mine.safetensors"]
    loaded = ckpt.load_lora_file(path)
    assert loaded.keys() == lora.keys()
    assert all(torch.equal(loaded[k], lora[k]) for k in lora)
    for bad in ("../../evil", "/tmp/evil", "..", "", "  ", "a//b"):
        with pytest.raises(ValueError, match="LoRA name"):
            tn.RewardLabSaveRewardLoRA().save(lora, bad)
    assert sorted(os.listdir(tmp_path)) == ["loras"]


def test_names_that_once_collided_are_refused_or_kept_apart(tmp_path, monkeypatch):
    """Issue 14: '..', '' and spaces all became rewardlab.safetensors and 'sub/dir/name' became 'name'."""
    monkeypatch.setattr(runtime.current(), "output_directory", lambda: str(tmp_path))
    save = tn.RewardLabSaveRewardLoRA().save
    for bad, says in (("..", "'..'"), ("", "empty"), ("   ", "empty"), ("x" * 300, "shorten it"),
                      ("NUL", "reserved"), ("con.txt", "reserved"), ("my:lora", "':'"), ("tab\there", "cannot hold"),
                      ("C:/x", "absolute")):
        with pytest.raises(ValueError, match=says):
            save(trained_lora(0), bad)
    a = save(trained_lora(0), "sub/dir/name")["result"][0]
    b = save(trained_lora(1), "name")["result"][0]
    assert a != b and a.endswith(os.path.join("loras", "sub", "dir", "name.safetensors"))


def test_save_node_never_replaces_another_runs_lora_unless_told(tmp_path, monkeypatch):
    """Issue 14: a Save Reward LoRA named like an earlier DRaFT run replaced that run's LoRA and left its state."""
    monkeypatch.setattr(runtime.current(), "output_directory", lambda: str(tmp_path))
    run = ckpt.run_files("rewardlab_draft")                     # an earlier DRaFT run: a LoRA and its state
    ckpt.save_checkpoint(trained_lora(0), {"step": 3, "optimizer": {}}, run.prepare().lora, state_path=run.state)
    out = tn.RewardLabSaveRewardLoRA().save(trained_lora(1), "rewardlab_draft")
    assert out["result"][0] == os.path.join(str(tmp_path), "loras", "rewardlab_draft_00001.safetensors")
    assert out["ui"]["text"] == ["saved as rewardlab_draft_00001.safetensors"]
    assert torch.equal(ckpt.load_lora_file(run.lora)["diffusion_model.0.lora_up.weight"],
                       trained_lora(0)["diffusion_model.0.lora_up.weight"]) and os.path.exists(run.state)
    again = tn.RewardLabSaveRewardLoRA().save(trained_lora(1), "rewardlab_draft")["result"][0]
    assert again.endswith("rewardlab_draft_00002.safetensors")
    replaced = tn.RewardLabSaveRewardLoRA().save(trained_lora(1), "rewardlab_draft", overwrite=True)["result"][0]
    assert replaced == run.lora and not os.path.exists(run.state)          # the stale state went with its LoRA
    assert torch.equal(ckpt.load_lora_file(run.lora)["diffusion_model.0.lora_up.weight"],
                       trained_lora(1)["diffusion_model.0.lora_up.weight"])


def test_output_loras_holds_only_loras_and_old_state_files_are_moved_out(tmp_path, monkeypatch):
    """Issue 14: ComfyUI's LoRA list showed *.state.pt files (LoraLoader lists every .pt in a LoRA folder)."""
    monkeypatch.setattr(runtime.current(), "output_directory", lambda: str(tmp_path))
    loras = tmp_path / "loras"
    (loras / "sub").mkdir(parents=True)
    for stem in ("old", "sub/older"):                                  # the layout of earlier versions
        ckpt.save_lora_file(trained_lora(0), str(loras / f"{stem}.safetensors"))
        torch.save({"step": 1, "optimizer": {}}, str(loras / f"{stem}.state.pt"))
    tn.RewardLabSaveRewardLoRA().save(trained_lora(1), "new")
    listed = sorted(str(p.relative_to(loras)) for p in loras.rglob("*") if p.is_file())
    assert listed == ["new.safetensors", "old.safetensors", "sub/older.safetensors"]
    assert (tmp_path / "rewardlab_state" / "old.state.pt").exists()
    assert (tmp_path / "rewardlab_state" / "sub" / "older.state.pt").exists()


def test_draft_node_checks_name_and_prompts_before_any_work(tmp_path, monkeypatch):
    """Issue 14: a 300-character name trained fully and then failed with 'File name too long'; an empty prompt
    list trained on "" without a word. Both now fail at once (model=None: nothing was touched)."""
    monkeypatch.setattr(runtime.current(), "output_directory", lambda: str(tmp_path))
    args = dict(model=None, vae=None, reward=object(), prompts="a cat", sampler="euler", scheduler="normal",
                width=64, height=64, name="ok", method="DRaFT-K", k=1, lv_n=2, learning_rate=1e-3, rank=2,
                training_steps=1, save_every=0, seed=0, steps=2, cfg=1.0, batch_size=1)
    node = tn.RewardLabDRaFTTrainLoRA()
    with pytest.raises(ValueError, match="shorten it to at most 200 bytes"):
        node.train(**{**args, "name": "x" * 300})
    with pytest.raises(ValueError, match="prompts box is empty, but CLIP encodes them"):
        node.train(**{**args, "prompts": " \n ", "clip": object()})
    with pytest.raises(ValueError, match="K=3 exceeds the 2 sampling steps"):
        node.train(**{**args, "k": 3})
    assert not (tmp_path / "loras").exists() or not os.listdir(tmp_path / "loras")


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


def test_bad_names_are_refused_when_the_prompt_is_queued():
    """VALIDATE_INPUTS: ComfyUI checks the name before any node of the prompt runs (no training before the error)."""
    for cls in (tn.RewardLabDRaFTTrainLoRA, tn.RewardLabSaveRewardLoRA):
        assert cls.VALIDATE_INPUTS(name="my_lora") is True and cls.VALIDATE_INPUTS(name=None) is True   # None: linked
        assert "shorten it" in cls.VALIDATE_INPUTS(name="x" * 300)
        assert "'..'" in cls.VALIDATE_INPUTS(name="..")
