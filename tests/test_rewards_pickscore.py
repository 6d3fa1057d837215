"""PickScore against the reference pipeline (transformers CLIPModel + CLIPImageProcessor) on identical tiny weights."""
import copy
import dataclasses
import os
import sys

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))   # pytest runs with --import-mode=importlib
from _rewards_fixtures import SIZES, rel_err, smooth_image, to_tensor, assert_bf16_close, assert_checkpointing_recomputes, assert_gradient_ascent_raises
from rewardlab.rewards import pickscore
from rewardlab.rewards import registry
from rewardlab.rewards.weights import RewardWeightsError

# A CLIP with the PickScore layout (224 px, patch 14, full CLIP vocabulary) but 32 wide and 2 layers deep.
TINY = {
    "projection_dim": 16,
    "text_config": {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                    "num_hidden_layers": 2, "max_position_embeddings": 77, "hidden_act": "gelu"},
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                      "image_size": 224, "patch_size": 14, "hidden_act": "gelu"},
}
PROMPTS = ["a photo of a cat", "An astronaut riding a horse on the Moon, 4k!", "a red bicycle", "abstract art",
           "a bowl of soup"]


@pytest.fixture(scope="module")
def tokenizer():
    return pickscore.clip_tokenizer()


@pytest.fixture(scope="module")
def reference():
    """The reference CLIPModel; logit_scale moved off its init value so a missing exp() or scale would show."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(**TINY)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.1)
    return model


@pytest.fixture(scope="module")
def reward(reference, tokenizer):
    return pickscore.PickScore(copy.deepcopy(reference), tokenizer)


@pytest.fixture(scope="module")
def images():
    return [smooth_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]


def reference_scores(model, pixel_values, prompts):
    """PickScore's published inference: logit_scale.exp() * cosine of get_image/text_features. Token ids from
    open_clip's own tokenizer (independent of ours): same ids, and the pooled feature is read at the first EOT."""
    import open_clip

    def pooled(out):
        return out if torch.is_tensor(out) else out.pooler_output

    with torch.no_grad():
        img = pooled(model.get_image_features(pixel_values=pixel_values))
        txt = pooled(model.get_text_features(input_ids=open_clip.get_tokenizer("ViT-H-14")(prompts)))
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        return model.logit_scale.exp() * (img * txt).sum(-1)


def test_open_clip_vocabulary_gives_open_clip_token_ids(tokenizer):
    import open_clip

    ours = tokenizer(PROMPTS + ["word " * 100], padding="max_length", max_length=77, truncation=True,
                     return_tensors="pt")["input_ids"]
    theirs = open_clip.get_tokenizer("ViT-H-14")(PROMPTS + ["word " * 100])
    for a, b in zip(ours, theirs):
        n = int((b != 0).sum())   # open_clip pads with 0, HF with <|endoftext|>
        assert torch.equal(a[:n], b[:n])
        assert b[n - 1] == 49407


def test_unusable_tokenizer_files_fall_back_to_the_open_clip_vocabulary(tmp_path, tokenizer):
    (tmp_path / "vocab.json").write_text("{}")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    fallback = pickscore.clip_tokenizer(str(tmp_path))
    assert fallback.vocab_size == 49408
    assert fallback(PROMPTS)["input_ids"] == tokenizer(PROMPTS)["input_ids"]


def test_parity_with_processor_on_the_same_float_images(reward, reference, images):
    """≤ 1e-3 relative: the reference CLIPImageProcessor resizes the same float image tensors (no 8-bit rounding)."""
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_dict({"do_resize": True, "size": {"shortest_edge": 224}, "resample": 3,
                                              "do_center_crop": True, "crop_size": {"height": 224, "width": 224}})
    ours, refs = [], []
    for pil, prompt in zip(images, PROMPTS):
        x = to_tensor(pil)
        pixels = processor(images=[x[0]], do_rescale=False, return_tensors="pt")["pixel_values"]
        refs.append(reference_scores(reference, pixels, [prompt]))
        ours.append(reward(x, prompt))
    ours, refs = torch.cat(ours), torch.cat(refs)
    assert rel_err(ours, refs) <= 1e-3, (ours, refs)
    assert refs.std() > 0.1 * refs.abs().max()   # the scores really differ between images and prompts


def test_batch_with_per_image_prompts_matches_one_by_one(reward, images):
    batch = torch.cat([to_tensor(im.resize((320, 256))) for im in images])
    together = reward(batch, PROMPTS)
    alone = torch.cat([reward(batch[i:i + 1], PROMPTS[i]) for i in range(len(PROMPTS))])
    assert together.shape == (len(PROMPTS),)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    assert together.std() > 0


def test_pil_processor_path_within_8bit_tolerance(reward, reference, images):
    """Against the PIL processor on 8-bit images: pixels within the documented 8-bit tolerance (rewards/README.md)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil()
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    ours, refs = [], []
    for pil, prompt in zip(images, PROMPTS):
        ref_pixels = processor(images=[pil], return_tensors="pt")["pixel_values"]
        diff = ((reward.preprocess(to_tensor(pil)) - ref_pixels) * std).abs()   # in [0, 1] pixel units
        assert diff.max() < 0.03 and diff.mean() < 0.002, (pil.size, diff.max(), diff.mean())
        ours.append(reward(to_tensor(pil), prompt))
        refs.append(reference_scores(reference, ref_pixels, [prompt]))
    assert rel_err(torch.cat(ours), torch.cat(refs)) < 1e-2


def test_crop_offset_follows_transformers_not_torchvision():
    """517x333 -> 347x224: transformers crops at (347-224)//2 = 61, torchvision would round 61.5 to 62."""
    x = torch.rand(1, 3, 517, 333)
    ours = pickscore.clip_processor_transform(x)
    resized = torch.nn.functional.interpolate(x, (347, 224), mode="bicubic", antialias=True).clamp(0, 1)
    mean, std = torch.tensor(pickscore.OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(pickscore.OPENAI_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(ours, (resized[..., 61:285, :] - mean) / std)


def test_load_from_published_folder_layout(tmp_path, reference, tokenizer, images):
    """A folder as on the Hub (model.safetensors + config.json + tokenizer files) loads to identical scores."""
    reference.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    loaded = pickscore.load_pickscore(str(tmp_path))
    x = torch.cat([to_tensor(im.resize((256, 224))) for im in images[:3]])
    expected = pickscore.PickScore(copy.deepcopy(reference), tokenizer)(x, PROMPTS[:3])
    torch.testing.assert_close(loaded(x, PROMPTS[:3]), expected, rtol=1e-6, atol=1e-6)


def test_registry_entry_loads_a_bare_weight_file(tmp_path, reference, images):
    """The real 'pickscore' entry (tiny config): only the weights file in a reward folder (old exports also hold
    position_ids); config from the entry, tokenizer from open_clip's vocabulary."""
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(state, str(tmp_path / "PickScore_v1.safetensors"))
    registry.register(dataclasses.replace(registry.get_spec("pickscore"), name="pickscore-tiny-test",
                                          config={"clip_config": TINY}))
    try:
        loaded = registry.load_reward("pickscore-tiny-test", "cpu", folder=str(tmp_path))
        x = to_tensor(images[1])
        ref = reference_scores(reference, loaded.preprocess(x), [PROMPTS[1]])
        assert loaded.name == "pickscore-tiny-test" and not any(p.requires_grad for p in loaded.parameters())
        torch.testing.assert_close(loaded(x, PROMPTS[1]), ref, rtol=1e-5, atol=1e-5)
    finally:
        registry.unload("pickscore-tiny-test")
        registry._SPECS.pop("pickscore-tiny-test", None)


def test_mismatched_files_give_a_clear_error(tmp_path, reference):
    wrong = tmp_path / "wrong.safetensors"
    save_file({"blip.visual_encoder.cls_token": torch.zeros(1, 1, 8)}, str(wrong))
    with pytest.raises(RewardWeightsError, match=r"pickscore.*do not match.*Expected keys: .*text_model"):
        pickscore.load_pickscore(str(wrong), config=TINY)
    good = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(good))
    wider = copy.deepcopy(TINY)
    wider["vision_config"]["hidden_size"] = 48
    with pytest.raises(RewardWeightsError, match="shape mismatches"):
        pickscore.load_pickscore(str(good), config=wider)


def test_gradients_are_finite_and_ascent_raises_the_score(reward, images):
    assert_gradient_ascent_raises(reward, to_tensor(images[2]), PROMPTS[2])


def test_half_precision_weights_score_close_to_fp32(reward, images):
    assert_bf16_close(reward, to_tensor(images[0]), PROMPTS[2])


def test_grad_checkpointing_recomputes_the_vision_layers_with_identical_results(reward, images):
    assert_checkpointing_recomputes(reward, reward.clip.vision_model.encoder.layers[0].mlp, to_tensor(images[4]), PROMPTS[4])
