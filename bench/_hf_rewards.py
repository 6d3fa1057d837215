"""PickScore and ImageReward for bench/rewards.py: builders (random weights) and the reference pipelines.

References, on the same modules and weights as ours:
  pickscore    PIL: transformers CLIPImageProcessor (PIL backend) -> CLIPModel features, logit_scale.exp() * cos
               tensor: torchvision Resize/CenterCrop/Normalize on tensors (ReNO-style) -> the same
  imagereward  PIL: the published _transform (torchvision on PIL) -> the published forward (ViT tokens -> BERT with
               cross-attention -> CLS -> MLP -> standardise); tensor: torchvision tensor transforms -> the same
Tokenisation is the published call (PickScore: padding=True, max_length=77; ImageReward: max_length=35) inside
the timed reference, as it is inside ours.
"""
import os
import tempfile

import torch
import torch.nn.functional as F

OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
KINDS = ("pickscore", "imagereward")

FULL = {"pickscore": {"clip_model": "PickScore CLIP-H/14 (transformers)", "clip_config": None},
        "imagereward": {"clip_model": "ImageReward BLIP ViT-L/16 + BERT-base", "vision": None, "text": None}}
TINY = {"pickscore": {"clip_model": "tiny transformers CLIP", "clip_config": {
            "projection_dim": 16,
            "text_config": {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                            "num_hidden_layers": 2, "max_position_embeddings": 77, "hidden_act": "gelu"},
            "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                              "num_hidden_layers": 2, "image_size": 224, "patch_size": 14, "hidden_act": "gelu"}}},
        "imagereward": {"clip_model": "tiny BLIP ViT + BERT",
                        "vision": {"img_size": 224, "patch_size": 16, "embed_dim": 48, "depth": 2, "num_heads": 4},
                        "text": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                 "intermediate_size": 64}}}


def synthetic_bert_vocab(size=30522):
    """A folder with a vocab.txt of ``size`` entries in BERT's layout (specials, words, ##pieces): the real
    bert-base-uncased vocabulary cannot be downloaded here, and speed only depends on the padded length (35)."""
    folder = tempfile.mkdtemp(prefix="rewardlab-bench-bert-")
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["a", "photo", "of", "object", "number"] + [str(i) for i in range(10)]
    words += [f"{x}{y}{z}" for x in letters for y in letters for z in letters]
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + [f"##{w}" for w in words]
    with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(words[:size]) + "\n")
    return folder


def build(kind, config):
    from rewardlab.rewards import imagereward, pickscore

    torch.manual_seed(0)
    if kind == "pickscore":
        return pickscore.build(config["clip_config"]).freeze()
    tiny = config["vision"] is not None
    tokenizer = imagereward.bert_tokenizer(synthetic_bert_vocab(40 if tiny else 30522), hf_cache=False)
    text = dict(config["text"] or {}, vocab_size=len(tokenizer))
    return imagereward.build(config["vision"], text, tokenizer).freeze()


def reference_parts(kind, reward):
    """(model, PIL transform, tensor transform) as the reference pipelines use them."""
    import torchvision.transforms as T

    tensor_tf = T.Compose([T.Resize(224, T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.Normalize(OPENAI_MEAN, OPENAI_STD)])
    if kind == "pickscore":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        processor = CLIPImageProcessorPil()

        def pil_tf(im):
            return processor(images=im, return_tensors="pt")["pixel_values"][0]

        return reward.clip, pil_tf, tensor_tf
    published = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                           T.Normalize(OPENAI_MEAN, OPENAI_STD)])
    return reward.blip, published, tensor_tf


def reference_score(kind, reward, x_model, prompts):
    device = x_model.device
    if kind == "pickscore":
        clip = reward.clip
        text = reward.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
        img, txt = clip.get_image_features(pixel_values=x_model), clip.get_text_features(**text)
        img, txt = (f if torch.is_tensor(f) else f.pooler_output for f in (img, txt))
        cos = (F.normalize(img.float(), dim=-1) * F.normalize(txt.float(), dim=-1)).sum(-1)
        return clip.logit_scale.exp().float() * cos
    blip = reward.blip
    text = reward.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt").to(device)
    image_embeds = blip.visual_encoder.forward_features(x_model)
    image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device)
    out = blip.text_encoder(text.input_ids, attention_mask=text.attention_mask, encoder_hidden_states=image_embeds,
                            encoder_attention_mask=image_atts, is_decoder=False)
    raw = reward.mlp.layers(out.last_hidden_state[:, 0, :]).float()
    return ((raw - 0.16717362830052426) / 1.0333394966054072).squeeze(-1)
