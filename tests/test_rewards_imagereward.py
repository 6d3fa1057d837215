"""ImageReward against a reference assembly of timm/transformers modules that follows the published forward
(ImageReward.py: visual_encoder -> text_encoder(ids, mask, image tokens) -> CLS -> MLP -> standardise)."""
import dataclasses
import os
import sys
from functools import partial

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))   # pytest runs with --import-mode=importlib
from _rewards_fixtures import SIZES, rel_err, smooth_image, to_tensor, assert_bf16_close, assert_checkpointing_recomputes, assert_gradient_ascent_raises
from rewardlab.rewards import imagereward
from rewardlab.rewards import registry
from rewardlab.rewards.weights import RewardWeightsError

# The published numbers, typed from ImageReward.py / med_config.json rather than imported from the module.
MEAN, STD = 0.16717362830052426, 1.0333394966054072
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
VOCAB = ("[PAD] [unused0] [UNK] [CLS] [SEP] [MASK] a an the of on in with photo painting picture cat dog horse "
         "astronaut moon red blue green big small riding sitting , . ! ##s ##ing ##ed").split()
# BLIP ViT-L/16 layout at 224 px (197 tokens), 48 wide; a 32-wide BERT, so cross-attention K/V read 48 -> 32.
VISION = {"img_size": 224, "patch_size": 16, "embed_dim": 48, "depth": 2, "num_heads": 4}
PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the moon", "a red dog sitting", "a blue painting",
           "the big green horse!"]


def text_config(tokenizer):
    return {"vocab_size": len(tokenizer), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 64, "max_position_embeddings": 40, "initializer_range": 0.3,
            "bos_token_id": tokenizer.convert_tokens_to_ids("[DEC]"), "sep_token_id": tokenizer.sep_token_id}


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return folder


@pytest.fixture(scope="module")
def tokenizer(vocab_dir):
    """BLIP's init_tokenizer: BertTokenizer + [DEC] as bos + [ENC] as an additional special token."""
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(vocab_dir), local_files_only=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


class Reference(nn.Module):
    """The published model, assembled independently: BLIP's create_vit as a timm VisionTransformer, BLIP's med
    BertModel as BlipTextModel (decoder layers, used as an encoder), the MLP exactly as in ImageReward.py."""

    def __init__(self, tokenizer):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer
        from transformers import BlipTextConfig, BlipTextModel

        self.tokenizer = tokenizer
        self.visual_encoder = VisionTransformer(**VISION, mlp_ratio=4, qkv_bias=True, num_classes=0, global_pool="",
                                                norm_layer=partial(nn.LayerNorm, eps=1e-6))
        config = BlipTextConfig(**text_config(tokenizer), encoder_hidden_size=VISION["embed_dim"], is_decoder=True)
        self.text_encoder = BlipTextModel(config, add_pooling_layer=False)
        self.mlp = nn.Sequential(nn.Linear(32, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                 nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
        # BLIP_Pretrain also holds contrastive projections; the checkpoint carries them, scoring ignores them.
        self.vision_proj, self.text_proj = nn.Linear(48, 16), nn.Linear(32, 16)
        for layer in self.mlp:   # a head wide enough that the image and prompt visibly move the score
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=1.0 / layer.in_features ** 0.5)
                nn.init.zeros_(layer.bias)
        self.eval()

    @torch.no_grad()
    def forward(self, pixel_values, prompt):
        text = self.tokenizer(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        image_embeds = self.visual_encoder.forward_features(pixel_values)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
        out = self.text_encoder(text.input_ids, attention_mask=text.attention_mask, encoder_hidden_states=image_embeds,
                                encoder_attention_mask=image_atts, is_decoder=False)
        return ((self.mlp(out.last_hidden_state[:, 0, :]) - MEAN) / STD).squeeze(-1)

    def published_state_dict(self):
        """Keys and nesting of ImageReward.pt: blip.{visual_encoder,text_encoder,vision_proj,text_proj}.*, mlp.layers.*,
        plus the position_ids buffer that older transformers saved."""
        state = {}
        for prefix, module in (("blip.visual_encoder.", self.visual_encoder), ("blip.text_encoder.", self.text_encoder),
                               ("blip.vision_proj.", self.vision_proj), ("blip.text_proj.", self.text_proj),
                               ("mlp.layers.", self.mlp)):
            state.update({prefix + k: v.clone() for k, v in module.state_dict().items()})
        state["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]
        return state


def tensor_pixels(x):
    """The published transform (Resize(224, bicubic) + CenterCrop + Normalize) with torchvision on the float tensor;
    clamped to [0, 1] as the 8-bit PIL image of the published path is."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    x = TF.center_crop(TF.resize(x, 224, InterpolationMode.BICUBIC, antialias=True), 224).clamp(0, 1)
    return TF.normalize(x, OPENAI_MEAN, OPENAI_STD)


def pil_pixels(pil):
    """The published _transform(224) on an 8-bit PIL image."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                      T.Normalize(OPENAI_MEAN, OPENAI_STD)])(pil)[None]


@pytest.fixture(scope="module")
def reference(tokenizer):
    torch.manual_seed(0)
    return Reference(tokenizer)


@pytest.fixture(scope="module")
def weights_file(reference, vocab_dir):
    """A tiny ImageReward.pt in the published layout, next to the tokenizer's vocab.txt."""
    path = vocab_dir / "ImageReward.pt"
    torch.save(reference.published_state_dict(), path)
    return path


@pytest.fixture(scope="module")
def reward(weights_file, tokenizer):
    return imagereward.load_imagereward(str(weights_file), vision=VISION, text=text_config(tokenizer))


@pytest.fixture(scope="module")
def images():
    return [smooth_image(h, w, seed=10 + i) for i, (h, w) in enumerate(SIZES)]


def test_parity_on_the_same_float_images(reward, reference, images):
    ours = torch.cat([reward(to_tensor(pil), prompt) for pil, prompt in zip(images, PROMPTS)])
    refs = torch.cat([reference(tensor_pixels(to_tensor(pil)), prompt) for pil, prompt in zip(images, PROMPTS)])
    assert rel_err(ours, refs) <= 1e-3, (ours, refs)
    one_prompt = torch.cat([reference(tensor_pixels(to_tensor(pil)), PROMPTS[0]) for pil in images])
    assert refs.std() > 0.1 and one_prompt.std() > 0.1   # the scores really depend on the image and the prompt


def test_pil_path_within_8bit_tolerance(reward, reference, images):
    ours, refs = [], []
    for pil, prompt in zip(images, PROMPTS):
        ref_pixels = pil_pixels(pil)
        diff = ((reward.preprocess(to_tensor(pil)) - ref_pixels) * torch.tensor(OPENAI_STD).view(1, 3, 1, 1)).abs()
        assert diff.max() < 0.03 and diff.mean() < 0.002, (pil.size, diff.max(), diff.mean())
        ours.append(reward(to_tensor(pil), prompt))
        refs.append(reference(ref_pixels, prompt))
    assert rel_err(torch.cat(ours), torch.cat(refs)) < 1e-2


def test_batch_with_per_image_prompts_matches_one_by_one(reward, images):
    batch = torch.cat([to_tensor(im.resize((300, 240))) for im in images])
    together = reward(batch, PROMPTS)
    alone = torch.cat([reward(batch[i:i + 1], PROMPTS[i]) for i in range(len(PROMPTS))])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_text_encoder_is_bidirectional_and_ignores_padding(reward, images):
    x = to_tensor(images[0])
    # The score is read at [CLS], the first token: with causal self-attention it could not see the prompt's words.
    assert (reward(x, "a photo of a cat") - reward(x, "a photo of a dog")).abs() > 1e-4
    shorter = imagereward.ImageReward(reward.blip, reward.mlp, reward.tokenizer, max_length=12)
    torch.testing.assert_close(shorter(x, "a photo of a cat"), reward(x, "a photo of a cat"), rtol=1e-5, atol=1e-5)


def med_bert_by_hand(state, input_ids, attention_mask, image_tokens, heads=4, eps=1e-12):
    """BLIP's med.py text encoder written out: post-LayerNorm BERT layers (bidirectional self-attention with the
    padding mask, cross-attention to all image tokens, GELU feed-forward), from the checkpoint tensors."""
    import torch.nn.functional as F

    def linear(x, name):
        return F.linear(x, state[name + ".weight"], state[name + ".bias"])

    def norm(x, name):
        return F.layer_norm(x, x.shape[-1:], state[name + ".weight"], state[name + ".bias"], eps)

    def attention(x, context, name, mask):
        def split(t):
            return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

        q, k, v = (split(linear(src, f"{name}.self.{p}")) for src, p in ((x, "query"), (context, "key"), (context, "value")))
        weights = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + mask).softmax(-1)
        out = (weights @ v).transpose(1, 2).reshape(x.shape)
        return norm(linear(out, f"{name}.output.dense") + x, f"{name}.output.LayerNorm")

    positions = torch.arange(input_ids.shape[1])
    h = norm(state["embeddings.word_embeddings.weight"][input_ids] + state["embeddings.position_embeddings.weight"][positions],
             "embeddings.LayerNorm")
    pad_mask = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layer.")})
    for i in layers:
        name = f"encoder.layer.{i}"
        h = attention(h, h, f"{name}.attention", pad_mask)
        h = attention(h, image_tokens, f"{name}.crossattention", 0.0)
        h = norm(linear(F.gelu(linear(h, f"{name}.intermediate.dense")), f"{name}.output.dense") + h, f"{name}.output.LayerNorm")
    return h


def test_blip_text_model_computes_bert_with_cross_attention_as_in_med(reward):
    """BlipTextModel called with is_decoder=False is exactly med.py's encoder, so ImageReward.pt maps key for key."""
    torch.manual_seed(3)
    input_ids, attention_mask = reward.tokenize(["a photo of a cat", "an astronaut riding a horse on the moon"])
    image_tokens = torch.randn(2, 197, VISION["embed_dim"])
    with torch.no_grad():
        ours = reward.blip.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                        encoder_hidden_states=image_tokens, is_decoder=False).last_hidden_state
        by_hand = med_bert_by_hand(reward.blip.text_encoder.state_dict(), input_ids, attention_mask, image_tokens)
    keep = attention_mask.bool()   # padded positions are never read
    torch.testing.assert_close(ours[keep], by_hand[keep], rtol=1e-4, atol=1e-4)


def blip_vit_by_hand(state, pixels, heads=4, patch=16, eps=1e-6):
    """BLIP's vit.py written out: patch conv, [CLS] + learned positions, pre-norm blocks (qkv attention, GELU MLP),
    final LayerNorm; all tokens returned."""
    import torch.nn.functional as F

    def norm(x, name):
        return F.layer_norm(x, x.shape[-1:], state[name + ".weight"], state[name + ".bias"], eps)

    x = F.conv2d(pixels, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + state["pos_embed"]
    blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
    for i in blocks:
        b = f"blocks.{i}"
        B, N, C = x.shape
        qkv = F.linear(norm(x, f"{b}.norm1"), state[f"{b}.attn.qkv.weight"], state[f"{b}.attn.qkv.bias"])
        q, k, v = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = x + F.linear(out, state[f"{b}.attn.proj.weight"], state[f"{b}.attn.proj.bias"])
        hidden = F.gelu(F.linear(norm(x, f"{b}.norm2"), state[f"{b}.mlp.fc1.weight"], state[f"{b}.mlp.fc1.bias"]))
        x = x + F.linear(hidden, state[f"{b}.mlp.fc2.weight"], state[f"{b}.mlp.fc2.bias"])
    return norm(x, "norm")


def test_timm_vit_computes_the_blip_vit(reward):
    """timm's VisionTransformer as built here is BLIP's create_vit, so blip.visual_encoder.* maps key for key."""
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = reward.blip.visual_encoder.forward_features(pixels)
        by_hand = blip_vit_by_hand(reward.blip.visual_encoder.state_dict(), pixels)
    assert ours.shape == (2, 197, VISION["embed_dim"])
    torch.testing.assert_close(ours, by_hand, rtol=1e-4, atol=1e-4)


def test_registry_entry_finds_the_tokenizer_next_to_the_weights(weights_file, reference, tokenizer, images):
    """The real 'imagereward' entry (tiny config): ImageReward.pt found in the reward folder, vocab.txt beside it."""
    registry.register(dataclasses.replace(registry.get_spec("imagereward"), name="imagereward-tiny-test",
                                          config={"vision": VISION, "text": text_config(tokenizer)}))
    try:
        loaded = registry.load_reward("imagereward-tiny-test", "cpu", folder=str(weights_file.parent))
        x = to_tensor(images[3])
        assert loaded.name == "imagereward-tiny-test" and loaded.needs_text
        torch.testing.assert_close(loaded(x, PROMPTS[3]), reference(tensor_pixels(x), PROMPTS[3]), rtol=1e-4, atol=1e-5)
    finally:
        registry.unload("imagereward-tiny-test")
        registry._SPECS.pop("imagereward-tiny-test", None)


def test_mismatched_or_unsafe_files_give_clear_errors(tmp_path, reference, tokenizer):
    clip_like = tmp_path / "clip.pt"
    torch.save({"text_model.embeddings.token_embedding.weight": torch.zeros(4, 2)}, clip_like)
    with pytest.raises(RewardWeightsError, match=r"imagereward.*not an ImageReward checkpoint.*blip.visual_encoder"):
        imagereward.load_imagereward(str(clip_like), VISION, text_config(tokenizer), tokenizer)

    deeper = tmp_path / "deeper.pt"
    torch.save(reference.published_state_dict(), deeper)
    with pytest.raises(RewardWeightsError, match=r"imagereward.*unexpected keys.*blocks\.1.*Expected keys: blip\.visual"):
        imagereward.load_imagereward(str(deeper), {**VISION, "depth": 1}, text_config(tokenizer), tokenizer)

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    evil = tmp_path / "evil.pt"
    torch.save({"mlp.layers.0.weight": Payload()}, evil)
    with pytest.raises(RewardWeightsError, match="refused"):
        imagereward.load_imagereward(str(evil), VISION, text_config(tokenizer), tokenizer)


def test_tokenizer_is_found_in_a_bert_folder_beside_the_weights_folder(tmp_path):
    (tmp_path / "bert-base-uncased").mkdir()
    (tmp_path / "bert-base-uncased" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tok = imagereward.bert_tokenizer(str(tmp_path / "imagereward"), hf_cache=False)
    assert tok("a red dog")["input_ids"] == [3, 6, 21, 17, 4]   # [CLS] a red dog [SEP]


def test_missing_tokenizer_names_the_file_to_add(tmp_path, monkeypatch):
    with pytest.raises(RewardWeightsError, match="vocab.txt"):
        imagereward.bert_tokenizer(str(tmp_path), hf_cache=False)
    # transformers 5 answers a missing cache entry with an empty tokenizer (special tokens only), not an error.
    from transformers import BertTokenizer

    empty = BertTokenizer(vocab={t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])})
    monkeypatch.setattr(BertTokenizer, "from_pretrained", classmethod(lambda cls, *a, **k: empty))
    with pytest.raises(RewardWeightsError, match="vocab.txt"):
        imagereward.bert_tokenizer(str(tmp_path), hf_cache=True)


def test_gradients_are_finite_and_ascent_raises_the_score(reward, images):
    assert_gradient_ascent_raises(reward, to_tensor(images[1]), PROMPTS[1])


def test_half_precision_weights_score_close_to_fp32(reward, images):
    assert_bf16_close(reward, to_tensor(images[0]), PROMPTS[1])


def test_grad_checkpointing_recomputes_the_vision_layers_with_identical_results(reward, images):
    assert_checkpointing_recomputes(reward, reward.blip.visual_encoder.blocks[0].mlp, to_tensor(images[4]), PROMPTS[4])
