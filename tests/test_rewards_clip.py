"""open_clip rewards (aesthetic v1/v2, HPSv2, CLIP score) on tiny random models: weight files written in the published
layouts, loaded through the registry, scored against open_clip's own model + preprocessing on 8-bit PIL images."""
import dataclasses
import logging
import os
import sys
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from safetensors.torch import save_file

from rewardlab.rewards import RewardWeightsError, registry
from rewardlab.rewards.preprocess import OPENAI_MEAN, OPENAI_STD

sys.path.insert(0, os.path.dirname(__file__))   # pytest runs with --import-mode=importlib
from _rewards_fixtures import SIZES, TINY_CLIP, reference_clip, rel_err, smooth_image, to_tensor  # noqa: E402

PROMPTS = ["a cat on a sofa", "a red car on a mountain road", "snowy mountains at dawn", "abstract art", "a dog"]
TINY = {  # tiny registry entries: the real entries' file names and loaders, with the tiny open_clip config
    "tiny-aesthetic-v2": ("aesthetic-v2", {}),
    "tiny-aesthetic-v1": ("aesthetic-v1", {}),
    "tiny-hps-v2.1": ("hps-v2.1", {}),
    "tiny-clipscore": ("clipscore-vit-h-14", {}),
    "tiny-clipscore-100": ("clipscore-vit-l-14", {}),
}


def aesthetic_mlp_reference(dim):
    """The published improved-aesthetic-predictor MLP (ReLUs commented out upstream)."""
    return torch.nn.Sequential(torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                               torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                               torch.nn.Linear(64, 16), torch.nn.Linear(16, 1)).eval()


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Reference models and a reward folder holding tiny weight files in the published formats."""
    folder = tmp_path_factory.mktemp("rewards")
    clip = reference_clip(seed=1)
    torch.manual_seed(2)
    mlp, linear = aesthetic_mlp_reference(16), torch.nn.Linear(16, 1).eval()
    with torch.no_grad():   # random heads are nearly constant: spread the scores like real ones (~5 +- 1)
        mlp[-1].weight.mul_(1000.0), mlp[-1].bias.fill_(5.0), linear.weight.mul_(20.0), linear.bias.fill_(5.0)
    state = {k: v.contiguous() for k, v in clip.state_dict().items()}
    save_file(state, str(folder / "ViT-L-14-quickgelu-openai.safetensors"))                  # open_clip state dict
    torch.save(OrderedDict((f"layers.{k}", v) for k, v in mlp.state_dict().items()),          # layers.{0,2,4,6,7}
               folder / "sac+logos+ava1-l14-linearMSE.pth")
    torch.save(OrderedDict(linear.state_dict()), folder / "sa_0_4_vit_l_14_linear.pth")        # weight, bias
    torch.save({"state_dict": {k: v.half() for k, v in state.items()}}, folder / "HPS_v2.1_compressed.pt")  # fp16
    (folder / "clipscore-vit-h-14").mkdir()
    save_file(state, str(folder / "clipscore-vit-h-14" / "open_clip_model.safetensors"))     # HF hub file name
    for name, (base, extra) in TINY.items():
        spec = registry.get_spec(base)
        files = spec.files
        if base == "clipscore-vit-h-14":       # the tiny entry keeps the real HF file name in its subfolder
            files = tuple(dataclasses.replace(wf, names=("nothing-here.safetensors",)) for wf in files)
        registry.register(dataclasses.replace(spec, name=name, config={**spec.config, **TINY_CLIP, **extra}, files=files))
    (folder / "tiny-clipscore").symlink_to(folder / "clipscore-vit-h-14")
    hps_clip = reference_clip(seed=1)
    hps_clip.load_state_dict({k: v.half().float() for k, v in state.items()})   # what the fp16 file holds
    yield {"folder": str(folder), "clip": clip, "hps_clip": hps_clip, "mlp": mlp, "linear": linear}
    for name in TINY:
        registry.unload(name)
        registry._SPECS.pop(name, None)


def load(world, name, **kw):
    return registry.load_reward(name, "cpu", folder=world["folder"], **kw)


@pytest.fixture(scope="session")
def images():
    return [smooth_image(h, w, i) for i, (h, w) in enumerate(SIZES)]


def _tokens(texts):
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32")(texts)


def _openclip_transform():
    import open_clip

    return open_clip.image_transform(224, is_train=False)   # Resize(224, bicubic) + CenterCrop + Normalize on PIL


def _hps_transform(pil):
    """HPSv2 eval transform: ToTensor -> ResizeMaxSize(224) (tensor, bicubic, zero pad) -> Normalize."""
    x = TF.to_tensor(pil)
    h, w = x.shape[-2:]
    s = 224 / max(h, w)
    if s != 1:
        nh, nw = round(h * s), round(w * s)
        x = TF.resize(x, [nh, nw], TF.InterpolationMode.BICUBIC)
        ph, pw = 224 - nh, 224 - nw
        x = TF.pad(x, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0)
    return TF.normalize(x, OPENAI_MEAN, OPENAI_STD)


def ours(reward, images, prompts=None):
    return torch.cat([reward(to_tensor(im), prompts[i] if prompts else None) for i, im in enumerate(images)])


# --- parity on identical weights -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,head", [("tiny-aesthetic-v2", "mlp"), ("tiny-aesthetic-v1", "linear")])
def test_aesthetic_matches_open_clip_pipeline(world, images, name, head):
    tf = _openclip_transform()
    with torch.no_grad():
        emb = F.normalize(world["clip"].encode_image(torch.stack([tf(im) for im in images])), dim=-1)
        ref = world[head](emb).squeeze(-1)
    err = rel_err(ours(load(world, name), images), ref)
    print(f"{name}: relative error {err:.1e}, score std {ref.std():.2f}")
    assert ref.std() > 0.05 and err < 1e-3


def test_hps_matches_reference_pipeline(world, images):
    with torch.no_grad():
        img = F.normalize(world["hps_clip"].encode_image(torch.stack([_hps_transform(im) for im in images])), dim=-1)
        txt = F.normalize(world["hps_clip"].encode_text(_tokens(PROMPTS)), dim=-1)
        ref = (img * txt).sum(-1)
    reward = load(world, "tiny-hps-v2.1")
    assert reward.needs_text and reward.preprocess.mode == "longest_pad"
    err = rel_err(ours(reward, images, PROMPTS), ref)
    print(f"hps: relative error {err:.1e}")
    assert err < 1e-3


@pytest.mark.parametrize("name", ["tiny-clipscore", "tiny-clipscore-100"])
def test_clip_score_matches_open_clip_forward(world, images, name):
    tf = _openclip_transform()
    with torch.no_grad():
        out = world["clip"](torch.stack([tf(im) for im in images]), _tokens(PROMPTS))
        img, txt, logit_scale = out if isinstance(out, tuple) else (out["image_features"], out["text_features"], out["logit_scale"])
        scale = logit_scale if name == "tiny-clipscore" else 100.0
        ref = scale * (img * txt).sum(-1)
    err = rel_err(ours(load(world, name), images, PROMPTS), ref)
    print(f"{name}: relative error {err:.1e}")
    assert err < 1e-3


def test_clip_score_for_any_model_name_and_no_clamp(world, images):
    from rewardlab.rewards.clip_models import clip_score

    path = world["folder"] + "/ViT-L-14-quickgelu-openai.safetensors"
    reward = clip_score("ViT-B-32", path, scale=2.5, quick_gelu=True, overrides=TINY_CLIP["overrides"])
    x = to_tensor(images[0]).requires_grad_(True)
    cos = load(world, "tiny-clipscore-100")(x, "a cat") / 100
    assert torch.allclose(reward(x, "a cat"), 2.5 * cos, atol=1e-5)
    # A misaligned image keeps its (negative) score and its gradient: no max(cos, 0) in the path.
    f = reward.image_features(x).detach()
    g = torch.Generator().manual_seed(0)
    away = F.normalize(-f + 0.5 * F.normalize(torch.randn(f.shape, generator=g), dim=-1), dim=-1)
    reward.text_features = lambda prompts: away
    s = reward(x, "a cat")
    s.sum().backward()
    assert s.item() == pytest.approx(2.5 * (f * away).sum().item(), abs=1e-5) and s.item() < -1.0
    assert x.grad.abs().max() > 1e-4


def test_batch_of_mixed_prompts_equals_one_by_one(world, images):
    reward = load(world, "tiny-hps-v2.1")
    batch = torch.cat([to_tensor(im.resize((200, 150))) for im in images[:3]])
    together = reward(batch, PROMPTS[:3])
    alone = torch.cat([reward(batch[i:i + 1], PROMPTS[i]) for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-5)
    assert torch.allclose(reward(batch, PROMPTS[0]), reward(batch, [PROMPTS[0]] * 3))
    with pytest.raises(ValueError, match="give a prompt"):
        reward(batch)


# --- loading -------------------------------------------------------------------------------------------------------

def test_mismatched_files_give_clear_errors(world, tmp_path):
    bad = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {"visual.proj": torch.zeros(3, 3), "logit_scale": torch.zeros(())}}, bad)
    with pytest.raises(RewardWeightsError) as err:
        registry.build_reward("tiny-hps-v2.1", registry.resolve_files("tiny-hps-v2.1", str(tmp_path)))
    msg = str(err.value)
    assert "tiny-hps-v2.1" in msg and "missing keys" in msg and "shape mismatches" in msg and "visual.class_embedding" in msg
    # the v2 MLP head file in the v1 slot
    (tmp_path / "aesthetic").mkdir()
    files = {"clip": world["folder"] + "/ViT-L-14-quickgelu-openai.safetensors",
             "head": world["folder"] + "/sac+logos+ava1-l14-linearMSE.pth"}
    with pytest.raises(RewardWeightsError, match=r"tiny-aesthetic-v1.*layers\.0\.weight.*Expected keys: weight \(1, 16\)"):
        registry.build_reward("tiny-aesthetic-v1", files)


def test_a_transformers_clip_in_the_aesthetic_slot_says_what_the_file_holds(world, tmp_path):
    """Issue 14: a transformers-layout CLIP given as the aesthetic CLIP was reported as '296 missing keys'."""
    hf = tmp_path / "ViT-L-14-quickgelu-openai.safetensors"
    save_file({"vision_model.embeddings.patch_embedding.weight": torch.zeros(4, 3, 2, 2),
               "vision_model.post_layernorm.weight": torch.zeros(4),
               "text_model.final_layer_norm.weight": torch.zeros(4),
               "visual_projection.weight": torch.zeros(4, 4)}, str(hf))
    files = {"clip": str(hf), "head": world["folder"] + "/sac+logos+ava1-l14-linearMSE.pth"}
    with pytest.raises(RewardWeightsError) as err:
        registry.build_reward("tiny-aesthetic-v2", files)
    msg = str(err.value)
    assert "has no visual.* keys: the file holds a transformers (Hugging Face) CLIPModel: vision_model.*" in msg
    assert "open_clip" in msg and "missing keys" not in msg
    # the same file as an HPS / CLIP-score weight file: the mismatch report starts with what the file holds
    with pytest.raises(RewardWeightsError, match="the file holds a transformers .*CLIPModel"):
        registry.build_reward("tiny-clipscore", {"weights": str(hf)})


def test_open_clip_random_init_notice_is_silenced_only_when_weights_follow(world, caplog):
    """Issue 14: every HPS / aesthetic load logged open_clip's 'No pretrained weights loaded ... initialized
    randomly', though the weights are loaded right after."""
    from rewardlab.rewards.clip_models import build_open_clip

    notice = "No pretrained weights loaded"
    with caplog.at_level(logging.WARNING):
        registry.build_reward("tiny-hps-v2.1", registry.resolve_files("tiny-hps-v2.1", world["folder"]))
        registry.build_reward("tiny-aesthetic-v2", registry.resolve_files("tiny-aesthetic-v2", world["folder"]))
    assert not [r for r in caplog.records if notice in r.getMessage()]
    with caplog.at_level(logging.WARNING):
        build_open_clip(TINY_CLIP)                                # truly random: the notice stays
    assert [r for r in caplog.records if notice in r.getMessage()]
    assert not logging.getLogger().filters


def test_missing_weights_name_the_expected_files(world, tmp_path, monkeypatch):
    monkeypatch.delenv("REWARDLAB_MODELS", raising=False)
    with pytest.raises(FileNotFoundError, match=r"HPS_v2.1_compressed.pt.*xswu/HPSv2"):
        registry.load_reward("hps-v2.1", "cpu", folder=str(tmp_path))


def test_open_clip_quickgelu_is_forced_for_openai_weights(world):
    import open_clip

    assert registry.get_spec("aesthetic-v2").config["clip_model"].endswith("-quickgelu")
    act = type(load(world, "tiny-aesthetic-v2").visual.transformer.resblocks[0].mlp.gelu)
    assert act is open_clip.transformer.QuickGELU


# --- gradients -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(TINY))
def test_gradient_ascent_on_pixels_raises_reward(world, name):
    reward = load(world, name)
    prompts = PROMPTS[:2] if reward.needs_text else None
    x = torch.cat([to_tensor(smooth_image(150, 190, 7)), to_tensor(smooth_image(150, 190, 8))]).requires_grad_(True)
    start = reward(x, prompts).detach()
    opt = torch.optim.Adam([x], lr=0.01)
    for _ in range(4):
        opt.zero_grad()
        (-reward(x, prompts).sum()).backward()
        assert torch.isfinite(x.grad).all() and (x.grad.flatten(1).abs().sum(1) > 0).all()
        opt.step()
    assert (reward(x.detach(), prompts) > start).all()


def test_gradient_checkpointing_gives_the_same_gradient(world):
    reward = load(world, "tiny-hps-v2.1")
    x = to_tensor(smooth_image(180, 240, 3)).requires_grad_(True)

    def grad():
        x.grad = None
        reward(x, "a cat").sum().backward()
        return x.grad.clone()

    plain = grad()
    reward.set_grad_checkpointing(True)
    try:
        assert reward.visual.transformer.grad_checkpointing
        assert torch.allclose(grad(), plain, atol=1e-6)
    finally:
        reward.set_grad_checkpointing(False)


def test_text_features_cached_in_inference_mode_do_not_break_backward(world):
    reward = load(world, "tiny-clipscore")
    x = to_tensor(smooth_image(120, 160, 4))
    with torch.inference_mode():
        first = reward(x, "a unique prompt")      # ComfyUI scoring node
    y = x.clone().requires_grad_(True)
    reward(y, "a unique prompt").sum().backward()  # later optimisation with the same prompt
    assert y.grad.abs().sum() > 0 and torch.allclose(first, reward(x, "a unique prompt"))


def test_half_precision_weights_still_score_close(world):
    x = to_tensor(smooth_image(200, 200, 5))
    fp32 = load(world, "tiny-clipscore")(x, "a dog")
    bf16 = load(world, "tiny-clipscore", dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16(x, "a dog").dtype == torch.float32
    assert rel_err(bf16(x, "a dog"), fp32) < 0.05
