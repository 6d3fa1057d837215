"""Reward models live in ComfyUI's memory manager: a loaded reward is a ModelPatcher in current_loaded_models, the
manager can unload it to make room for another model (simulated with a memory budget, as on a full GPU), it comes
back on its next use, and both Unload Reward Models and ComfyUI's own unload release it."""
import pytest
import torch

from rewardlab.nodes.reward_nodes import RewardLabUnloadRewards
from rewardlab.rewards import registry
from rewardlab.rewards.base import Reward
from rewardlab.rewards.registry import RewardSpec


class ConvReward(Reward):
    """A reward with weights (a conv and a linear head), standing in for a CLIP-size model."""
    name = "conv-test"

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.head = torch.nn.Linear(8, 1)

    def score(self, images, prompts):
        return self.head(self.conv(images).mean((2, 3)))[:, 0]


def build(name, config, files):
    torch.manual_seed(0)
    return ConvReward()


@pytest.fixture()
def reward(comfy, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "rewardlab.rewards.conv_test_loader", sys.modules[__name__])
    registry.register(RewardSpec("conv-test", "conv_test_loader:build"))
    with torch.inference_mode():
        r = registry.load_reward("conv-test", device="cpu")
    yield r
    registry.unload("conv-test")


def loaded_patchers():
    import comfy.model_management as mm
    return [lm.model for lm in mm.current_loaded_models]


def reward_patcher(reward):
    return next((p for p in loaded_patchers() if getattr(p.model, "reward", None) is reward), None)


def test_reward_is_managed_offloaded_under_memory_pressure_and_restored_on_use(comfy, reward, unet, monkeypatch):
    import comfy.model_management as mm
    assert reward_patcher(reward) is not None                  # registered with ComfyUI's memory manager
    # a full accelerator: free memory is what is left of a budget once the loaded models are counted
    budget = 2 * mm.module_size(reward) + 1
    monkeypatch.setattr(mm, "get_free_memory",
                        lambda dev=None, torch_free_too=False: budget - sum(lm.model_loaded_memory()
                                                                            for lm in mm.current_loaded_models))
    mm.free_memory(budget, torch.device("cpu"))             # what load_models_gpu does before loading a big model
    assert reward_patcher(reward) is None                    # the reward was offloaded, nothing ran out of memory
    images = torch.rand(2, 3, 16, 16)
    with torch.inference_mode():
        scores = reward(images)
    assert scores.shape == (2,) and reward_patcher(reward) is not None      # back on its next use


def test_unload_node_and_comfy_unload_all_release_the_reward(comfy, reward):
    import comfy.model_management as mm
    assert reward_patcher(reward) is not None
    mm.unload_all_models()                                   # ComfyUI's "free memory" / POST /free
    assert reward_patcher(reward) is None
    with torch.inference_mode():
        reward(torch.rand(1, 3, 8, 8))
    assert reward_patcher(reward) is not None
    assert RewardLabUnloadRewards().unload("conv-test")[0].startswith("unloaded 1")
    assert reward_patcher(reward) is None and not [k for k in registry.cached() if k[0] == "conv-test"]


def test_memory_table_checks_its_estimate_on_a_fixture():
    """bench/memory_table.py --fixtures: the meta-device estimate next to the RSS a real grad call keeps, for the SD3
    fixture in child processes. Block checkpointing must keep less, in the estimate and in the measurement."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(repo / "bench" / "memory_table.py"), "--fixtures", "sd3"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["family"], r["latent"]) for r in rows] == [("sd3", 32), ("sd3", 64)], proc.stdout + proc.stderr
    for r in rows:
        assert "error" not in r, r
        assert r["rss_kept_gib"] > 0 and r["estimate_saved_gib"] > 0
        assert r["estimate_blocks_kept_gib"] < r["estimate_saved_gib"]
        assert r["rss_blocks_kept_gib"] < r["rss_kept_gib"]
    assert rows[1]["estimate_saved_gib"] > 2 * rows[0]["estimate_saved_gib"]   # 4x the tokens
    assert rows[1]["rss_kept_gib"] > rows[0]["rss_kept_gib"]
