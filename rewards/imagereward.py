"""ImageReward v1.0 (Xu et al., 2023), reimplemented without the ``image-reward`` package (rewards/README.md).

  image tokens = BLIP ViT-L/16 (all 197 tokens after the final LayerNorm)         timm VisionTransformer
  text state   = BLIP "MED" BERT-base over the prompt, every layer cross-attending  transformers BlipTextModel
                 to the image tokens; self-attention stays bidirectional            (called with is_decoder=False)
  reward       = (mlp(text_state[:, 0]) - 0.16717362830052426) / 1.0333394966054072
The MLP head is five Linear layers with no activation between them (the ReLUs are commented out upstream), so it
is affine. The module tree mirrors the published checkpoint (``blip.visual_encoder``, ``blip.text_encoder``,
``mlp.layers``), so ``ImageReward.pt`` loads key for key.
"""
import os
from functools import partial

from torch import nn

from .base import Reward
from .lazy_init import empty_module
from .preprocess import OPENAI_MEAN, OPENAI_STD, Preprocess
from .weights import RewardWeightsError, load_into, read_state_dict

# Standardisation of the raw head output, from the published ImageReward.py.
SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
BERT_BASE_UNCASED_VOCAB = 30522
MAX_PROMPT_TOKENS = 35   # the published tokenizer call: padding="max_length", truncation=True, max_length=35

# The published model: BLIP ViT-L/16 at 224 px and med_config.json (BERT-base, vocab 30522 + [DEC] + [ENC]).
VISION_CONFIG = {"img_size": 224, "patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16}
TEXT_CONFIG = {"vocab_size": 30524, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
               "intermediate_size": 3072, "max_position_embeddings": 512, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
               "pad_token_id": 0}
HEAD_WIDTHS = (1024, 128, 64, 16, 1)
HEAD_DROPOUT = (0.2, 0.2, 0.1)   # dropout after the first three Linear layers (inactive: rewards run in eval mode)
# The parts of the published checkpoint that scoring uses. It also holds BLIP's contrastive projections
# (blip.vision_proj, blip.text_proj) and, from older transformers, the position_ids buffer: both are dropped.
USED_PREFIXES = ("blip.visual_encoder.", "blip.text_encoder.", "mlp.layers.")
LAYOUT = ("flat state dict of ImageReward.pt (THUDM/ImageReward): blip.visual_encoder.* (BLIP ViT-L/16, timm names), "
          "blip.text_encoder.* (BLIP med.py BERT with crossattention), mlp.layers.{0,2,4,6,7}.{weight,bias}")
TOKENIZER_HELP = ("ImageReward needs the bert-base-uncased tokenizer: put its vocab.txt (huggingface.co/google-bert/"
                  "bert-base-uncased, Apache-2.0) next to the ImageReward weights or in a 'bert-base-uncased' folder "
                  "there or beside their folder")


class ImageReward(Reward):
    """ImageReward: BLIP image tokens, read by a cross-attending BERT over the prompt, through an affine head."""

    name = "imagereward"
    needs_text = True
    input_size = 224
    score_range = (-2.0, 2.0)

    def __init__(self, blip, mlp, tokenizer, max_length=MAX_PROMPT_TOKENS):
        super().__init__()
        self.blip = blip      # .visual_encoder (timm ViT), .text_encoder (BlipTextModel)
        self.mlp = mlp        # .layers (nn.Sequential)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.input_size = blip.visual_encoder.patch_embed.img_size[0]
        self.preprocess = Preprocess(size=self.input_size, mode="shortest", mean=OPENAI_MEAN, std=OPENAI_STD)
        self.freeze()

    def tokenize(self, prompts):
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        return tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)

    def image_tokens(self, images):
        """All ViT tokens after the final norm, (B, 1 + patches, vision width)."""
        return self.blip.visual_encoder.forward_features(self.preprocess(images).to(self.dtype))

    def score(self, images, prompts):
        image_tokens = self.image_tokens(images)
        input_ids, attention_mask = self.tokenize(prompts)
        # is_decoder=False: the layers still cross-attend (they were built as a decoder) but self-attention is
        # bidirectional, as in BLIP's text *encoder*. All image tokens are attended (no image mask).
        text = self.blip.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                      encoder_hidden_states=image_tokens, is_decoder=False)
        raw = self.mlp.layers(text.last_hidden_state[:, 0]).float()
        return ((raw - SCORE_MEAN) / SCORE_STD).squeeze(-1)


# --- building ---------------------------------------------------------------------------------------------------

def build_visual_encoder(config=None):
    """BLIP's ViT (pre-norm blocks, qkv bias, LayerNorm eps 1e-6, cls token + learned positions, final norm): timm's
    VisionTransformer has the same structure and parameter names. No head: the reward reads all tokens."""
    from timm.models.vision_transformer import VisionTransformer

    cfg = {**VISION_CONFIG, **(config or {})}
    return VisionTransformer(img_size=cfg["img_size"], patch_size=cfg["patch_size"], embed_dim=cfg["embed_dim"],
                             depth=cfg["depth"], num_heads=cfg["num_heads"], mlp_ratio=cfg.get("mlp_ratio", 4.0),
                             qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=0, global_pool="")


def build_text_encoder(config=None, vision_width=VISION_CONFIG["embed_dim"]):
    """BLIP's med.py BERT (no token-type embeddings, a cross-attention block per layer whose keys/values read the
    vision width): transformers ``BlipTextModel`` built as a decoder so the cross-attention exists, no pooler."""
    from transformers import BlipTextConfig, BlipTextModel

    cfg = BlipTextConfig(**{**TEXT_CONFIG, **(config or {})}, encoder_hidden_size=vision_width, is_decoder=True)
    return BlipTextModel(cfg, add_pooling_layer=False)


def build_head(width):
    """The published MLP: Linear layers at indices 0, 2, 4, 6, 7 of ``layers`` with dropout between, no activation."""
    dims = (width,) + HEAD_WIDTHS
    modules = []
    for i in range(len(HEAD_WIDTHS)):
        modules.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(HEAD_DROPOUT):
            modules.append(nn.Dropout(HEAD_DROPOUT[i]))
    head = nn.Module()
    head.layers = nn.Sequential(*modules)
    return head


def build(vision=None, text=None, tokenizer=None, max_length=MAX_PROMPT_TOKENS):
    """ImageReward with random weights; ``vision`` / ``text`` override ``VISION_CONFIG`` / ``TEXT_CONFIG``."""
    blip = nn.Module()
    blip.visual_encoder = build_visual_encoder(vision)
    blip.text_encoder = build_text_encoder(text, vision_width=blip.visual_encoder.embed_dim)
    mlp = build_head(blip.text_encoder.config.hidden_size)
    return ImageReward(blip, mlp, tokenizer if tokenizer is not None else bert_tokenizer(), max_length)


# --- weights and tokenizer -----------------------------------------------------------------------------------------

def published_state_dict(state, model_name="imagereward"):
    """The tensors of a published ImageReward state dict that the reward uses; within those parts, the strict
    check of ``load_into`` still reports every missing, unexpected or misshapen tensor."""
    if not all(any(k.startswith(prefix) for k in state) for prefix in USED_PREFIXES):
        raise RewardWeightsError(
            f"{model_name}: this file is not an ImageReward checkpoint: it lacks some of the 'blip.visual_encoder.*', "
            f"'blip.text_encoder.*', 'mlp.layers.*' keys (found e.g. {list(state)[:4]}). Expected layout: {LAYOUT}.")
    return {k: v for k, v in state.items() if k.startswith(USED_PREFIXES) and not k.endswith("position_ids")}


def load_imagereward(path, vision=None, text=None, tokenizer=None, model_name="imagereward"):
    """ImageReward from ``ImageReward.pt`` (read with ``weights_only=True``) or a .safetensors with the same keys.
    The tokenizer is read from local files: the weight file's folder, its 'bert-base-uncased' subfolder, or the
    Hugging Face cache."""
    state = published_state_dict(read_state_dict(path, model=model_name, layout=LAYOUT), model_name)
    tokenizer = tokenizer if tokenizer is not None else bert_tokenizer(os.path.dirname(path))
    reward = empty_module(lambda: build(vision, text, tokenizer))   # every weight is loaded next
    load_into(reward, state, model=model_name, path=path, layout=LAYOUT)
    return reward


def load(name, config, files):
    """Registry loader: ``files['weights']`` is ImageReward.pt; an optional ``files['tokenizer']`` is a vocab.txt;
    ``config`` may override 'vision'/'text' (tests use tiny ones) and name a 'tokenizer' folder."""
    folder = os.path.dirname(files["tokenizer"]) if files.get("tokenizer") else config.get("tokenizer")
    tokenizer = bert_tokenizer(folder) if folder else None
    return load_imagereward(files["weights"], config.get("vision"), config.get("text"), tokenizer, model_name=name)


def bert_tokenizer(folder=None, hf_cache=True):
    """BLIP's tokenizer from local files only: BERT (uncased) WordPiece from ``vocab.txt``, plus the two tokens BLIP
    adds ([DEC] as bos, [ENC]); ImageReward keeps [CLS] first. Searches ``folder``, a 'bert-base-uncased' folder
    inside it or beside it (e.g. models/rewards/bert-base-uncased for models/rewards/imagereward/ImageReward.pt), then
    (``hf_cache``) an already downloaded bert-base-uncased in the Hugging Face cache."""
    from transformers import BertTokenizer

    places = (folder, os.path.join(folder, "bert-base-uncased"), os.path.join(os.path.dirname(folder), "bert-base-uncased"))
    candidates = list(dict.fromkeys(places)) if folder else []
    for candidate in candidates:
        vocab = os.path.join(candidate, "vocab.txt")
        if os.path.isfile(vocab):
            with open(vocab, encoding="utf-8") as f:
                size = sum(1 for line in f if line.strip())
            return _add_blip_tokens(_checked(BertTokenizer.from_pretrained(candidate, local_files_only=True), size, vocab))
    if hf_cache:
        try:
            cached = BertTokenizer.from_pretrained("bert-base-uncased", local_files_only=True)
            return _add_blip_tokens(_checked(cached, BERT_BASE_UNCASED_VOCAB, "the Hugging Face cache"))
        except (OSError, ValueError, RewardWeightsError):
            pass
    searched = ", ".join(candidates) or "(no folder given)"
    raise RewardWeightsError(f"{TOKENIZER_HELP}. Searched: {searched}" + (" and the Hugging Face cache." if hf_cache else "."))


def _checked(tokenizer, size, source):
    # transformers 5 returns an empty tokenizer (special tokens only) instead of failing when files are missing.
    if tokenizer.vocab_size != size:
        raise RewardWeightsError(f"{TOKENIZER_HELP}. The tokenizer read from {source} has {tokenizer.vocab_size} tokens, "
                         f"expected {size}.")
    return tokenizer


def _add_blip_tokens(tokenizer):
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer
