"""Reward nodes called like ComfyUI calls them: IMAGE tensors (B, H, W, C), batch > 1, per-image prompts, inside
torch.inference_mode()."""
import os
import sys

import pytest
import torch

from rewardlab.host.services import auto_dtype
from rewardlab.nodes import reward_nodes as rn
from rewardlab.rewards import registry, simple
from rewardlab.rewards.base import Reward

sys.path.insert(0, os.path.dirname(__file__))   # pytest runs with --import-mode=importlib
from _rewards_fixtures import TINY_CLIP  # noqa: E402

HUES = {"red": 0.0, "green": 120.0, "blue": 240.0}


class ColourWordReward(Reward):
    """A text reward without weights: how well each image matches the colour named by its prompt."""

    name = "colour-word"
    needs_text = True
    score_range = (-1.0, 1.0)

    def score(self, images, prompts):
        return torch.cat([simple.target_hue(images[i:i + 1], HUES[p]) for i, p in enumerate(prompts)])


def solid(*colours, h=16, w=24):
    """An IMAGE batch (B, H, W, 3) of solid colours."""
    return torch.stack([torch.tensor(c).view(1, 1, 3).expand(h, w, 3) for c in colours]).float()


RGB = solid((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def test_score_node_uses_one_prompt_per_image_over_the_whole_batch():
    node = rn.RewardLabScoreImages()
    scores, mean, table = node.score(ColourWordReward(), RGB, "red\ngreen\nblue\n", batch_size=2)
    assert scores == pytest.approx([1.0, 1.0, 1.0], abs=1e-5) and mean == pytest.approx(1.0, abs=1e-5)
    shuffled, _, table = node.score(ColourWordReward(), RGB, "blue\nred\ngreen", batch_size=2)
    assert all(s < 0 for s in shuffled)
    assert "blue" in table.splitlines()[2] and "green" in table.splitlines()[4] and "mean" in table.splitlines()[-1]
    broadcast, _, _ = node.score(ColourWordReward(), RGB, "green")
    assert broadcast[1] == pytest.approx(1.0, abs=1e-5) and broadcast[0] < 0 and broadcast[2] < 0


def test_prompt_count_and_missing_prompt_errors():
    node = rn.RewardLabScoreImages()
    with pytest.raises(ValueError, match="one line per image"):
        node.score(ColourWordReward(), RGB, "red\ngreen")
    with pytest.raises(ValueError, match="give a prompt"):
        node.score(ColourWordReward(), RGB, "  \n")
    scores, _, _ = node.score(registry.build_reward("brightness"), RGB, "")   # text-free rewards need none
    assert scores == pytest.approx([0.299, 0.587, 0.114], abs=1e-5)


def test_rank_node_sorts_selects_top_k_and_reorders_latents():
    images = solid(*[(v, v, v) for v in (0.3, 0.9, 0.1, 0.6)])
    latent = {"samples": torch.arange(4.0).view(4, 1, 1, 1).expand(4, 4, 2, 3).clone(), "batch_index": [10, 11, 12, 13]}
    reward = rn.RewardLabLoadReward().load("brightness", device="cpu")[0]
    out, lat, scores, table = rn.RewardLabRankImages().rank(reward, images, "", top_k=3, latent=latent)
    assert out.shape == (3, 16, 24, 3)
    assert out[:, 0, 0, 0].tolist() == pytest.approx([0.9, 0.6, 0.3])
    assert scores == pytest.approx([0.9, 0.6, 0.3], abs=1e-5)
    assert lat["samples"][:, 0, 0, 0].tolist() == [1.0, 3.0, 0.0] and lat["batch_index"] == [11, 13, 10]
    assert [int(line.split()[1]) for line in table.splitlines()[2:5]] == [1, 3, 0]
    worst, none, scores, _ = rn.RewardLabRankImages().rank(reward, images, "", top_k=0, order="worst first")
    assert worst[:, 0, 0, 0].tolist() == pytest.approx([0.1, 0.3, 0.6, 0.9]) and none is None and len(scores) == 4


def test_rank_node_with_per_image_prompts():
    out, _, scores, _ = rn.RewardLabRankImages().rank(ColourWordReward(), RGB, "blue\ngreen\nred", top_k=1)
    assert out[0, 0, 0].tolist() == pytest.approx([0.0, 1.0, 0.0]) and scores[0] == pytest.approx(1.0, abs=1e-5)


def test_combine_node_is_the_weighted_sum():
    a = rn.RewardLabWeightFreeReward().build("target-hue", hue_degrees=120.0)[0]
    b = rn.RewardLabWeightFreeReward().build("brightness")[0]
    with torch.inference_mode():
        combined = rn.RewardLabCombineRewards().combine(a, 2.0, "none", reward_2=b, weight_2=-1.0)[0]
        scores, _, table = rn.RewardLabScoreImages().score(combined, RGB, "")
    x = RGB.movedim(-1, 1)
    assert scores == pytest.approx((2 * a(x) - b(x)).tolist(), abs=1e-5)
    assert "0:target-hue" in table and "1:brightness" in table


def test_gradient_node_in_inference_mode_shows_where_the_reward_looks():
    images = torch.full((2, 16, 24, 3), 0.5)
    images[:, :, :12] = 0.2                                     # left half dark
    with torch.inference_mode():                                # as in ComfyUI: inputs and models are built here
        images = images.clone()
        reward = rn.RewardLabWeightFreeReward().build("brightness", brightness_target=0.8)[0]
        heat, overlay, scores = rn.RewardLabRewardGradient().gradient(reward, images, "", mode="signed", gamma=1.0)
    assert heat.shape == overlay.shape == (2, 16, 24, 3) and len(scores) == 2
    assert heat.min() >= 0 and heat.max() <= 1 and heat[..., 0].max() == pytest.approx(1.0)
    assert heat[..., 2].max() == 0                              # brightening raises the score everywhere: all red


def test_gradient_node_with_a_clip_reward_and_per_image_prompts():
    from rewardlab.rewards.clip_models import build_hps

    with torch.inference_mode(False):
        torch.manual_seed(0)
        reward = build_hps(TINY_CLIP).freeze()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 64, 96, 3, generator=g)
    with torch.inference_mode():
        heat, overlay, scores = rn.RewardLabRewardGradient().gradient(reward, images, "a cat\na dog\na car", batch_size=2)
        alone = rn.RewardLabScoreImages().score(reward, images[1:2], "a dog")[0]
    assert heat.shape == (3, 64, 96, 3) and torch.isfinite(heat).all()
    assert (heat.flatten(1).amax(1) > 0.5).all()                # every image gets its own, normalised map
    assert scores[1] == pytest.approx(alone[0], abs=1e-5)


def test_load_node_caches_weight_free_and_reports_missing_weights(tmp_path, monkeypatch):
    monkeypatch.delenv("REWARDLAB_MODELS", raising=False)
    node = rn.RewardLabLoadReward()
    first = node.load("sharpness", "fp32", "cpu")[0]
    assert node.load("sharpness", "fp32", "cpu")[0] is first
    with pytest.raises(FileNotFoundError, match=r"sac\+logos\+ava1-l14-linearMSE|ViT-L-14-quickgelu-openai"):
        node.load("aesthetic-v2", "auto", "cpu", folder=str(tmp_path))
    assert auto_dtype(torch.device("cpu")) == torch.float32
    assert "unloaded" in rn.RewardLabUnloadRewards().unload("sharpness")[0]
    assert node.load("sharpness", "fp32", "cpu")[0] is not first
    assert "model_name" in rn.RewardLabUnloadRewards.INPUT_TYPES()["required"]


def test_nodes_are_registered():
    import rewardlab

    for name in ("RewardLabLoadReward", "RewardLabCombineRewards", "RewardLabScoreImages", "RewardLabRankImages",
                 "RewardLabRewardGradient", "RewardLabWeightFreeReward", "RewardLabUnloadRewards"):
        assert name in rewardlab.NODE_CLASS_MAPPINGS and name in rewardlab.NODE_DISPLAY_NAME_MAPPINGS


def test_rank_node_with_a_latent_of_another_batch_is_a_clear_error():
    """Issue 14: Rank Images with 3 images and a 1-sample latent raised an IndexError."""
    reward = registry.build_reward("brightness")
    with pytest.raises(ValueError, match="LATENT holds 1 sample\\(s\\) but there are 3 images: connect the latent"):
        rn.RewardLabRankImages().rank(reward, RGB, "", top_k=2, latent={"samples": torch.zeros(1, 4, 2, 3)})


def test_nan_scores_rank_last_in_both_orders():
    """A reward that fails on one image (NaN) must never make it the 'best' (torch sorts NaN as the largest)."""
    class NaNOnGreen(Reward):
        name = "nan-on-green"

        def score(self, images, prompts):
            s = images.mean((1, 2, 3))
            return torch.where(images[:, 1].mean((1, 2)) > 0.5, torch.full_like(s, float("nan")), s)

    images = solid((0.9, 0.1, 0.1), (0.0, 1.0, 0.0), (0.1, 0.1, 0.1))
    for order, first in (("best first", 0), ("worst first", 2)):
        out, _, scores, table = rn.RewardLabRankImages().rank(NaNOnGreen(), images, "", top_k=0, order=order)
        assert out[0, 0, 0].tolist() == pytest.approx(images[first, 0, 0].tolist()) and scores[-1] != scores[-1]


def test_tiny_images_fail_clearly_in_the_score_nodes():
    """Issue 14: tiny images (1x1 with sharpness) failed inside conv2d; the nodes now say what to do."""
    sharp = rn.RewardLabWeightFreeReward().build("sharpness")[0]
    for call in (lambda: rn.RewardLabScoreImages().score(sharp, solid((0.5, 0.5, 0.5), h=1, w=1)),
                 lambda: rn.RewardLabRankImages().rank(sharp, solid((0.5, 0.5, 0.5), h=2, w=2)),
                 lambda: rn.RewardLabRewardGradient().gradient(sharp, solid((0.5, 0.5, 0.5), h=3, w=64))):
        with pytest.raises(ValueError, match="pixels are too small for this reward \\(at least 4x4\\); upscale"):
            call()


def test_load_node_names_a_folder_that_does_not_exist(tmp_path):
    with pytest.raises(ValueError, match="folder .*nope' does not exist"):
        rn.RewardLabLoadReward().load("brightness", "fp32", "cpu", folder=str(tmp_path / "nope"))


def test_an_empty_image_batch_is_a_clear_error():
    reward = registry.build_reward("brightness")
    with pytest.raises(ValueError, match="IMAGE batch is empty"):
        rn.RewardLabScoreImages().score(reward, torch.zeros(0, 8, 8, 3))
