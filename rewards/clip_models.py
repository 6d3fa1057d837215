"""open_clip-based rewards: LAION aesthetic (v1 linear, v2 MLP), HPSv2 / HPSv2.1, CLIP score.

Every model here is: a builder from a config dict (random weights), a loader (builder + weight files), and a
``score``. Config keys:
  clip_model   open_clip model name ("ViT-L-14-quickgelu", "ViT-H-14", or any name open_clip.list_models() knows)
  overrides    optional open_clip constructor overrides (embed_dim, vision_cfg, text_cfg) - tests build tiny models
               this way; tiny widths need vision_cfg["head_width"], or open_clip builds "num_heads=0"
  quick_gelu   force QuickGELU (OpenAI weights). open_clip 3.x no longer forces it for 'openai' weights and only
               logs a warning; the "-quickgelu" model names set it too.
  mode, mean, std, antialias, size, clamp   preprocessing overrides (default: the model's open_clip preprocess cfg)
"""
import torch
import torch.nn.functional as F

from .base import Reward
from .preprocess import Preprocess, from_open_clip
from .weights import RewardWeightsError, describe_layout, load_into, read_state_dict, skip_init, weights_follow


def build_open_clip(config):
    """A randomly initialised open_clip model (fp32, CPU) for ``config``; no download ever happens here."""
    import open_clip

    name = config["clip_model"]
    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {name!r}; see open_clip.list_models()")
    return open_clip.create_model(name, pretrained=None, pretrained_text=False,
                                  force_quick_gelu=bool(config.get("quick_gelu", False)), **config.get("overrides", {}))


def preprocess_for(model, config, mode=None, clamp=True):
    base = from_open_clip(model, mode=config.get("mode", mode), size=config.get("size"))
    return Preprocess(size=base.size, mode=base.mode, mean=tuple(config.get("mean", base.mean)),
                      std=tuple(config.get("std", base.std)), antialias=bool(config.get("antialias", True)),
                      clamp=bool(config.get("clamp", clamp)))


def _square(size):
    return int(size[0] if isinstance(size, (tuple, list)) else size)


class ClipImageReward(Reward):
    """Shared image path: differentiable preprocessing -> open_clip image tower -> L2-normalised fp32 features."""

    def __init__(self, visual, preprocess):
        super().__init__()
        self.visual = visual
        self.preprocess = preprocess
        self.input_size = preprocess.size

    def image_features(self, images):
        x = self.preprocess(images).to(self.dtype)
        return F.normalize(self.visual(x).float(), dim=-1)


class ClipTextImageReward(ClipImageReward):
    """Adds the text tower, with a small per-prompt feature cache (prompts are constant during optimisation)."""

    needs_text = True

    def __init__(self, clip, preprocess, tokenizer):
        super().__init__(clip.visual, preprocess)
        self.clip = clip
        self.tokenizer = tokenizer

    def _encode_text(self, prompts):
        tokens = self.tokenizer(prompts).to(self.device)
        return F.normalize(self.clip.encode_text(tokens).float(), dim=-1)

    def text_features(self, prompts):
        return self.cached_text_features(prompts, self._encode_text)

    def cosine(self, images, prompts):
        return (self.image_features(images) * self.text_features(prompts)).sum(-1)


def _tokenizer(config, clip):
    import open_clip

    return open_clip.get_tokenizer(config["clip_model"], context_length=clip.context_length)


# --- LAION aesthetic -------------------------------------------------------------------------------------------

class AestheticMLP(torch.nn.Module):
    """improved-aesthetic-predictor head; the ReLUs are commented out upstream, so it is one affine map.
    Module indices match the published keys layers.{0,2,4,6,7}."""

    def __init__(self, dim=768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


class AestheticReward(ClipImageReward):
    """score = head(normalize(encode_image(x))); v2 head = AestheticMLP, v1 head = Linear(dim, 1). ~1-10 scale."""

    score_range = (3.0, 8.0)

    def __init__(self, visual, preprocess, head):
        super().__init__(visual, preprocess)
        self.head = head

    def score(self, images, prompts):
        f = self.image_features(images)
        return self.head(f.to(self.head_dtype)).squeeze(-1)

    @property
    def head_dtype(self):
        return next(self.head.parameters()).dtype


def build_aesthetic(config):
    clip = build_open_clip(config)
    dim = clip.visual.output_dim
    head = AestheticMLP(dim) if config.get("head", "mlp") == "mlp" else torch.nn.Linear(dim, 1)
    return AestheticReward(clip.visual, preprocess_for(clip, config), head)


def load_aesthetic(name, config, files):
    """files: clip (open_clip state dict; only visual.* is used) and head (MLP or linear head state dict)."""
    with skip_init(), weights_follow():   # every parameter used is overwritten by the strict load below
        reward = build_aesthetic(config)
    clip_state = read_state_dict(files["clip"], name, "open_clip CLIP state dict with visual.* keys")
    visual = {k[len("visual."):]: v for k, v in clip_state.items() if k.startswith("visual.")}
    if not visual:
        holds = describe_layout(clip_state) or f"keys such as {sorted(clip_state)[:3]}"
        raise RewardWeightsError(
            f"{name}: {files['clip']} has no visual.* keys: the file holds {holds}, but the aesthetic head needs the "
            f"image tower of an open_clip {config['clip_model']} state dict (visual.conv1.weight, visual.proj, ...). "
            f"Use the open_clip file (e.g. open_clip_model.safetensors from huggingface.co/timm/"
            f"vit_large_patch14_clip_224.openai, saved as one of the accepted names).")
    load_into(reward.visual, visual, name, files["clip"], f"visual.* keys of open_clip {config['clip_model']}")
    head_layout = "layers.{0,2,4,6,7}.{weight,bias}" if config.get("head", "mlp") == "mlp" else "weight, bias"
    load_into(reward.head, read_state_dict(files["head"], name, head_layout), name, files["head"], head_layout)
    return reward


# --- HPSv2 / HPSv2.1 ---------------------------------------------------------------------------------------------

class HPSReward(ClipTextImageReward):
    """HPS = cos(image, text) of the fine-tuned open_clip ViT-H-14, no logit scale; longest-side-pad preprocessing."""

    score_range = (0.2, 0.32)

    def score(self, images, prompts):
        return self.cosine(images, prompts)


def build_hps(config):
    clip = build_open_clip(config)
    # HPS resizes the float tensor after ToTensor, so bicubic overshoot is not clamped (unlike PIL): clamp=False.
    return HPSReward(clip, preprocess_for(clip, config, mode="longest_pad", clamp=False), _tokenizer(config, clip))


def load_hps(name, config, files):
    """files: weights = the published {'state_dict': ...} .pt (fp16) or a safetensors conversion of it."""
    with skip_init(), weights_follow():   # every parameter used is overwritten by the strict load below
        reward = build_hps(config)
    path = files["weights"]
    load_into(reward.clip, read_state_dict(path, name, "{'state_dict': open_clip state dict}"), name, path,
              f"open_clip {config['clip_model']} state dict, optionally nested under 'state_dict'")
    return reward


# --- CLIP score ------------------------------------------------------------------------------------------------

class ClipScoreReward(ClipTextImageReward):
    """scale * cos(image, text) with scale = logit_scale.exp() ("logit_scale") or a number (100 = torchmetrics,
    2.5 = Hessel et al.). No max(., 0) clamp: it would zero the gradient of exactly the images to be improved."""

    score_range = (15.0, 35.0)

    def __init__(self, clip, preprocess, tokenizer, scale="logit_scale"):
        super().__init__(clip, preprocess, tokenizer)
        self.scale = scale

    def score(self, images, prompts):
        scale = self.clip.logit_scale.exp().float() if self.scale == "logit_scale" else float(self.scale)
        return scale * self.cosine(images, prompts)


def build_clipscore(config):
    clip = build_open_clip(config)
    return ClipScoreReward(clip, preprocess_for(clip, config), _tokenizer(config, clip), config.get("scale", "logit_scale"))


def load_clipscore(name, config, files):
    with skip_init(), weights_follow():   # every parameter used is overwritten by the strict load below
        reward = build_clipscore(config)
    path = files.get("weights") or files["clip"]
    load_into(reward.clip, read_state_dict(path, name, "open_clip state dict"), name, path,
              f"open_clip {config['clip_model']} state dict")
    return reward


def clip_score(clip_model, weights, scale="logit_scale", device="cpu", dtype=torch.float32, **config):
    """CLIP score for any open_clip model name and a local open_clip state-dict file (no registry entry needed),
    e.g. ``clip_score("ViT-B-16", "/models/ViT-B-16.safetensors", scale=100.0)``."""
    with torch.inference_mode(False):
        reward = load_clipscore(f"clipscore-{clip_model}", {"clip_model": clip_model, "scale": scale, **config},
                                {"weights": weights})
        reward.name = f"clipscore-{clip_model}"
        return reward.to(device=device, dtype=dtype).freeze()
