"""PickScore v1 (Kirstain et al., 2023): a CLIP-H fine-tuned on Pick-a-Pic human preferences.

score = logit_scale.exp() * cos(image embedding, text embedding); typically about 20-23 (rewards/README.md).
The model is a transformers ``CLIPModel`` loaded from the published Hugging Face ``model.safetensors``
(yuvalkirstain/PickScore_v1). Preprocessing is the reference ``CLIPImageProcessor`` (shorter side to 224,
bicubic, centre crop, OpenAI mean/std), made differentiable (``clip_processor_transform``).
"""
import gzip
import json
import logging
import os
from functools import partial

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from .base import Reward
from .lazy_init import empty_module
from .preprocess import OPENAI_MEAN, OPENAI_STD, normalize, resize
from .weights import load_into, read_state_dict

# yuvalkirstain/PickScore_v1 config.json (CLIP-H/14, GELU); used when no config.json sits next to the weights.
PICKSCORE_V1_CONFIG = {
    "projection_dim": 1024,
    "text_config": {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                    "num_hidden_layers": 24, "max_position_embeddings": 77, "hidden_act": "gelu"},
    "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16,
                      "num_hidden_layers": 32, "image_size": 224, "patch_size": 14, "hidden_act": "gelu"},
}
LAYOUT = ("transformers CLIPModel state dict (HF model.safetensors of yuvalkirstain/PickScore_v1): "
          "text_model.*, vision_model.*, visual_projection.weight, text_projection.weight, logit_scale")
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
CLIP_VOCAB_SIZE = 49408
log = logging.getLogger("rewardlab")


class PickScore(Reward):
    """PickScore on a transformers ``CLIPModel`` and a CLIP BPE tokenizer."""

    name = "pickscore"
    needs_text = True
    input_size = 224
    score_range = (18.0, 24.0)

    def __init__(self, clip, tokenizer):
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.input_size = clip.config.vision_config.image_size
        self.freeze()

    def set_grad_checkpointing(self, enable=True):
        """Recompute each vision layer during backward instead of storing its activations. transformers' own
        checkpointing acts only in training mode, and a reward stays in eval mode, so the layers are wrapped here."""
        self.grad_checkpointing = bool(enable)
        for layer in self.clip.vision_model.encoder.layers:
            if enable:
                layer.forward = partial(_checkpointed, type(layer).forward.__get__(layer))
            else:
                layer.__dict__.pop("forward", None)
        return self

    def preprocess(self, images):
        return clip_processor_transform(images, self.input_size)

    def tokenize(self, prompts):
        max_length = self.clip.config.text_config.max_position_embeddings
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)

    def _encode_text(self, prompts):
        input_ids, attention_mask = self.tokenize(prompts)
        features = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(_pooled(features).float(), dim=-1)

    def text_embeddings(self, prompts):
        return self.cached_text_features(prompts, self._encode_text)

    def image_embeddings(self, images):
        pixels = self.preprocess(images).to(self.dtype)
        return F.normalize(_pooled(self.clip.get_image_features(pixel_values=pixels)).float(), dim=-1)

    def score(self, images, prompts):
        cosine = (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)
        return self.clip.logit_scale.float().exp() * cosine


def clip_processor_transform(images, size=224):
    """The reference ``CLIPImageProcessor``, differentiable: shorter side to ``size`` (longer side
    int(size * long / short)), bicubic with antialias in fp32, clamp to [0, 1] as an 8-bit image would be, centre
    crop, OpenAI mean/std. The crop offset is floor((side - size) / 2) as in transformers; torchvision's CenterCrop
    rounds instead (1 px apart when the difference is odd), so the shared ``Preprocess`` is not used here."""
    x = images.float()
    h, w = x.shape[-2:]
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    if (nh, nw) != (h, w):
        x = resize(x, (nh, nw))
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size].clamp(0, 1)
    return normalize(x, OPENAI_MEAN, OPENAI_STD)


def _checkpointed(forward, *args, **kwargs):
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def _pooled(features):
    """transformers 5 returns an output object from get_*_features (projected embedding in pooler_output); 4.x a tensor."""
    return features if torch.is_tensor(features) else features.pooler_output


# --- tokenizer ------------------------------------------------------------------------------------------------

def clip_tokenizer(folder=None):
    """A transformers ``CLIPTokenizer`` from local files only: the tokenizer files in ``folder`` when present,
    else one built from open_clip's bundled BPE vocabulary, which gives the same token ids (no download)."""
    from transformers import CLIPTokenizer

    if folder and any(all(os.path.isfile(os.path.join(folder, f)) for f in names) for names in TOKENIZER_FILES):
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        # transformers 5 yields a special-tokens-only tokenizer instead of failing on unusable files.
        if tokenizer.vocab_size == CLIP_VOCAB_SIZE:
            return tokenizer
        log.warning("RewardLab: the CLIP tokenizer files in %s hold %d tokens, not %d; using open_clip's vocabulary",
                    folder, tokenizer.vocab_size, CLIP_VOCAB_SIZE)
    vocab, merges = open_clip_bpe_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges)


def open_clip_bpe_vocab():
    """(vocab, merges) in the HF CLIP layout from open_clip's ``bpe_simple_vocab_16e6.txt.gz``.

    The CLIP vocabulary is: the 256 byte symbols, the same with the end-of-word marker '</w>', one token per
    merge (the first 48894 merge lines after the header), then the start and end tokens: 49408 ids.
    """
    import open_clip
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


# --- building and loading ---------------------------------------------------------------------------------------

def build(config=None, tokenizer=None):
    """PickScore with random weights from a ``CLIPConfig`` or its dict (default: the PickScore_v1 CLIP-H)."""
    from transformers import CLIPModel

    return PickScore(CLIPModel(_clip_config(config)), tokenizer or clip_tokenizer())


def load_pickscore(path, config=None, model_name="pickscore"):
    """PickScore from ``path``: a folder holding ``model.safetensors`` (+ optional ``config.json`` and tokenizer
    files, as on the Hugging Face repo) or the weight file itself. Without config.json the PickScore_v1 CLIP-H
    config is used; without tokenizer files, open_clip's bundled vocabulary."""
    from transformers import CLIPModel

    weights = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
    folder = os.path.dirname(weights)
    config = config or _config_json(folder) or PICKSCORE_V1_CONFIG
    clip = empty_module(lambda: CLIPModel(_clip_config(config)))   # every weight is loaded next
    state = read_state_dict(weights, model=model_name, layout=LAYOUT)
    # position_ids are buffers the model rebuilds; older exports saved them, newer ones do not.
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    load_into(clip, state, model=model_name, path=weights, layout=LAYOUT)
    return PickScore(clip, clip_tokenizer(folder))


def load(name, config, files):
    """Registry loader: ``files['weights']`` is the model.safetensors; ``config['clip_config']`` overrides the
    model config (tests use tiny ones)."""
    return load_pickscore(files["weights"], config.get("clip_config"), model_name=name)


def _clip_config(config):
    from transformers import CLIPConfig

    if isinstance(config, CLIPConfig):
        return config
    return CLIPConfig(**(PICKSCORE_V1_CONFIG if config is None else config))


def _config_json(folder):
    """The CLIP config dict in ``folder``/config.json, or None (absent, or the config of another kind of model)."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    return config if config.get("model_type") == "clip" else None

