"""Reward nodes: load, combine, score, rank, and look at reward gradients. Custom type REWARD_MODEL = a Reward
module (images BCHW in [0, 1] + prompts -> Tensor[B]). Every node handles the whole batch, in chunks."""
import os

import torch

from .. import runtime
from ..host.services import auto_dtype, bchw_to_image, image_to_bchw, resolve_device
from ..plots import heat_colours
from ..rewards import registry
from ..rewards.base import split_prompts
from ..rewards.scoring import reward_gradient, score_batch, score_table

CATEGORY = "RewardLab/Rewards"
DTYPES = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEVICES = ("auto", "gpu", "cpu")
PROMPTS_TOOLTIP = ("Prompt(s) the images are judged against: one line for all images, or one line per image (in batch "
                   "order). Ignored by rewards that do not use text.")
BATCH_TOOLTIP = "Images scored per forward pass; lower it if you run out of memory."


def _reward_input(tooltip="A reward model from Load Reward Model or Combine Rewards."):
    return ("REWARD_MODEL", {"tooltip": tooltip})


def _prompts_input():
    return ("STRING", {"multiline": True, "default": "", "tooltip": PROMPTS_TOOLTIP})


def _batch_input():
    return ("INT", {"default": 8, "min": 1, "max": 256, "tooltip": BATCH_TOOLTIP})


# --- nodes ----------------------------------------------------------------------------------------------------

class RewardLabLoadReward:
    DESCRIPTION = ("Loads a reward model by name from the reward folders (ComfyUI models/rewards, or the folder given). "
                   "Models are cached across runs per name, device and dtype; weight-free rewards need no files.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("REWARD_MODEL",)
    RETURN_NAMES = ("reward",)
    OUTPUT_TOOLTIPS = ("The reward model: images + prompts -> one score per image, higher is better.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": (registry.list_rewards(), {"tooltip": "Which reward. Learned models need their weight files "
                                                         "in models/rewards (the error message lists the expected names)."}),
                "dtype": (list(DTYPES), {"default": "auto", "tooltip": "Weights precision. auto: bf16/fp16 on GPU, fp32 on "
                                         "CPU. Preprocessing always runs in fp32."}),
                "device": (list(DEVICES), {"default": "auto", "tooltip": "auto: ComfyUI's device; gpu: require a GPU; cpu."}),
            },
            "optional": {
                "folder": ("STRING", {"default": "", "tooltip": "Extra folder to search for weight files (searched after "
                                      "models/rewards)."}),
                "allow_download": ("BOOLEAN", {"default": False, "tooltip": "Download missing weights from the Hugging Face "
                                               "hub into models/rewards. Off by default: nothing is downloaded unless you ask."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip": "Recompute the image tower in backward "
                                                       "to save memory when optimising through the reward (slower)."}),
            },
        }

    def load(self, model_name, dtype="auto", device="auto", folder="", allow_download=False, gradient_checkpointing=False):
        folder = folder.strip()
        if folder and not os.path.isdir(folder):
            raise ValueError(f"Load Reward Model: folder {folder!r} does not exist (or is not a folder): give an "
                             f"existing folder with the weight files, or leave it empty to search models/rewards")
        dev = resolve_device(device)
        reward = registry.load_reward(model_name, dev, DTYPES[dtype] or auto_dtype(dev), folder or None,
                                     allow_download)
        reward.set_grad_checkpointing(gradient_checkpointing)
        return (reward,)


class RewardLabWeightFreeReward:
    DESCRIPTION = ("A weight-free differentiable reward with its parameters (target colour, hue, brightness, JPEG "
                   "quality). Useful as a cheap objective and for testing workflows.")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = ("REWARD_MODEL",)
    RETURN_NAMES = ("reward",)
    OUTPUT_TOOLTIPS = ("The reward model (no text needed).",)
    KINDS = ("saturation", "brightness", "colourfulness", "target-colour", "target-hue", "sharpness",
             "jpeg-compressibility", "jpeg-incompressibility")

    @classmethod
    def INPUT_TYPES(cls):
        unit = {"min": 0.0, "max": 1.0, "step": 0.01}
        return {"required": {
            "kind": (list(cls.KINDS), {"tooltip": "saturation: mean HSV saturation; brightness: mean luma (or closeness "
                                       "to the target); colourfulness: Hasler-Suesstrunk; target-colour / target-hue: "
                                       "closeness to the colour / hue below; sharpness: Laplacian variance; jpeg-*: "
                                       "differentiable JPEG size proxy."}),
            "red": ("FLOAT", {"default": 1.0, **unit, "tooltip": "target-colour: red component in [0, 1]."}),
            "green": ("FLOAT", {"default": 0.0, **unit, "tooltip": "target-colour: green component in [0, 1]."}),
            "blue": ("FLOAT", {"default": 0.0, **unit, "tooltip": "target-colour: blue component in [0, 1]."}),
            "hue_degrees": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 360.0, "step": 1.0,
                                      "tooltip": "target-hue: 0 red, 60 yellow, 120 green, 180 cyan, 240 blue, 300 magenta."}),
            "brightness_target": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 1.0, "step": 0.01, "tooltip":
                                            "brightness: target mean luma in [0, 1]; -1 = no target (brighter is better)."}),
            "jpeg_quality": ("INT", {"default": 95, "min": 1, "max": 100, "tooltip": "jpeg-*: JPEG quality whose "
                                     "quantisation table weights the DCT coefficients."}),
        }}

    def build(self, kind, red=1.0, green=0.0, blue=0.0, hue_degrees=0.0, brightness_target=-1.0, jpeg_quality=95):
        config = {"target-colour": {"colour": (red, green, blue)}, "target-hue": {"hue_degrees": hue_degrees},
                  "brightness": {"target": None if brightness_target < 0 else brightness_target},
                  "jpeg-compressibility": {"quality": jpeg_quality},
                  "jpeg-incompressibility": {"quality": jpeg_quality}}.get(kind, {})
        return (registry.build_reward(kind, config=config, device=runtime.current().device()),)


class RewardLabCombineRewards:
    DESCRIPTION = ("Weighted sum of up to four rewards, optionally normalising each first (reward scales differ by "
                   "100x: HPS ~0.27, aesthetic ~5, PickScore ~21). The result is a reward model again.")
    CATEGORY = CATEGORY
    FUNCTION = "combine"
    RETURN_TYPES = ("REWARD_MODEL",)
    RETURN_NAMES = ("reward",)
    OUTPUT_TOOLTIPS = ("sum_i weight_i * normalise(reward_i).",)

    @classmethod
    def INPUT_TYPES(cls):
        def weight(i):
            return ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                              "tooltip": f"Weight of reward {i} (ReNO uses HPS 5, ImageReward 1, PickScore 0.05, CLIP 0.01)."})
        optional = {}
        for i in (2, 3, 4):
            optional[f"reward_{i}"] = _reward_input(f"Optional reward {i}.")
            optional[f"weight_{i}"] = weight(i)
        return {"required": {"reward_1": _reward_input("First reward."), "weight_1": weight(1),
                             "normalise": (["none", "range", "running"], {"default": "none", "tooltip":
                                           "none: raw scores; range: map each reward's typical range to [0, 1]; running: "
                                           "standardise with running mean/std of the scores seen."})},
                "optional": optional}

    def combine(self, reward_1, weight_1, normalise="none", **kwargs):
        from ..rewards.ensemble import RewardEnsemble

        rewards, weights = [reward_1], [weight_1]
        for i in (2, 3, 4):
            if kwargs.get(f"reward_{i}") is not None:
                rewards.append(kwargs[f"reward_{i}"])
                weights.append(kwargs.get(f"weight_{i}", 1.0))
        with torch.inference_mode(False):   # its running-statistics buffers must be normal tensors
            ensemble = RewardEnsemble(rewards, weights, normalise).to(rewards[0].device)
        return (ensemble,)


class RewardLabScoreImages:
    DESCRIPTION = "Scores every image of the batch with a reward: per-image scores, their mean and a readable table."
    CATEGORY = CATEGORY
    FUNCTION = "score"
    RETURN_TYPES = ("FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("scores", "mean", "table")
    OUTPUT_IS_LIST = (True, False, False)
    OUTPUT_TOOLTIPS = ("One score per image, in batch order (a list).", "Mean score of the batch.",
                       "Text table of the scores (and ensemble members), for a Show Text / preview node.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"reward": _reward_input(), "images": ("IMAGE", {"tooltip": "The images to score (whole batch)."}),
                             "prompts": _prompts_input()},
                "optional": {"batch_size": _batch_input()}}

    def score(self, reward, images, prompts="", batch_size=8):
        x = image_to_bchw(images)
        lines = split_prompts(prompts, x.shape[0])
        scores, parts = score_batch(reward, x, lines, batch_size, with_components=True)
        table = score_table(scores, lines, parts, title=f"reward: {reward.name}")
        return ([float(s) for s in scores], float(scores.mean()), table)


class RewardLabRankImages:
    DESCRIPTION = ("Sorts an image batch by reward and keeps the top k (best first, or worst first). An optional "
                   "latent batch is reordered the same way.")
    CATEGORY = CATEGORY
    FUNCTION = "rank"
    RETURN_TYPES = ("IMAGE", "LATENT", "FLOAT", "STRING")
    RETURN_NAMES = ("images", "latent", "scores", "table")
    OUTPUT_IS_LIST = (False, False, True, False)
    OUTPUT_TOOLTIPS = ("The top-k images, sorted.", "The matching latents (only when a latent was connected).",
                       "Scores of the returned images, in output order.", "Ranking table with the original indices.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"reward": _reward_input(), "images": ("IMAGE", {"tooltip": "The candidate images."}),
                             "prompts": _prompts_input(),
                             "top_k": ("INT", {"default": 1, "min": 0, "max": 4096,
                                               "tooltip": "How many images to keep; 0 keeps all (a full sort)."}),
                             "order": (["best first", "worst first"], {"default": "best first",
                                                                       "tooltip": "Keep the highest or the lowest scores."})},
                "optional": {"latent": ("LATENT", {"tooltip": "Optional latents of the same batch, reordered alike."}),
                             "batch_size": _batch_input()}}

    def rank(self, reward, images, prompts="", top_k=1, order="best first", latent=None, batch_size=8):
        x = image_to_bchw(images)
        if latent is not None and latent["samples"].shape[0] != x.shape[0]:
            raise ValueError(f"Rank Images: the LATENT holds {latent['samples'].shape[0]} sample(s) but there are "
                             f"{x.shape[0]} images: connect the latent these images were decoded from (same batch), "
                             f"or leave 'latent' unconnected")
        lines = split_prompts(prompts, x.shape[0])
        scores, _ = score_batch(reward, x, lines, batch_size)
        idx = rank_order(scores, best_first=order == "best first")
        if top_k:
            idx = idx[:top_k]
        table = score_table(scores, lines, order=idx.tolist(), title=f"reward: {reward.name} ({order})")
        out_latent = None
        if latent is not None:
            out_latent = {**latent, "samples": latent["samples"][idx.to(latent["samples"].device)]}
            for key in ("noise_mask", "batch_index"):
                if key in latent and torch.is_tensor(latent[key]) and latent[key].shape[0] == x.shape[0]:
                    out_latent[key] = latent[key][idx.to(latent[key].device)]
                elif key == "batch_index" and isinstance(latent.get(key), list):
                    out_latent[key] = [latent[key][i] for i in idx.tolist()]
        return (images[idx.to(images.device)], out_latent, [float(scores[i]) for i in idx], table)


def rank_order(scores, best_first=True):
    """Indices sorting ``scores`` best (or worst) first; NaN scores (a reward that failed on an image) come last
    in both orders, never ahead of a real score. Ties keep batch order."""
    idx = torch.argsort(scores.nan_to_num(0.0), descending=best_first, stable=True)
    return idx[torch.argsort(torch.isnan(scores[idx]).int(), stable=True)]


class RewardLabRewardGradient:
    DESCRIPTION = ("Shows what a reward 'looks at': the gradient of the score with respect to each pixel, as a heatmap "
                   "and an overlay on the image. Bright = changing this pixel changes the score most.")
    CATEGORY = CATEGORY
    FUNCTION = "gradient"
    RETURN_TYPES = ("IMAGE", "IMAGE", "FLOAT")
    RETURN_NAMES = ("heatmap", "overlay", "scores")
    OUTPUT_IS_LIST = (False, False, True)
    OUTPUT_TOOLTIPS = ("Gradient heatmap per image (magnitude: black-red-yellow-white; signed: red raises the score when "
                       "brightened, blue when darkened).", "The heatmap blended over the image.", "Per-image scores.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"reward": _reward_input(), "images": ("IMAGE", {"tooltip": "Images to explain."}),
                             "prompts": _prompts_input(),
                             "mode": (["magnitude", "signed"], {"default": "magnitude", "tooltip":
                                      "magnitude: |gradient| summed over colour channels; signed: the summed gradient."}),
                             "overlay_strength": ("FLOAT", {"default": 0.6, "min": 0.0, "max": 1.0, "step": 0.05,
                                                            "tooltip": "Opacity of the heatmap in the overlay output."}),
                             "gamma": ("FLOAT", {"default": 0.5, "min": 0.1, "max": 2.0, "step": 0.05, "tooltip":
                                       "Contrast: heat = (|g| / max|g|) ** gamma; below 1 shows weak gradients too."})},
                "optional": {"batch_size": _batch_input()}}

    def gradient(self, reward, images, prompts="", mode="magnitude", overlay_strength=0.6, gamma=0.5, batch_size=8):
        x = image_to_bchw(images)
        grads, scores = reward_gradient(reward, x, split_prompts(prompts, x.shape[0]), batch_size)
        if mode == "magnitude":
            g = grads.abs().sum(1, keepdim=True)
            g = g / g.flatten(1).amax(1).clamp_min(1e-20).view(-1, 1, 1, 1)
            heat = heat_colours(g.pow(gamma))
        else:
            g = grads.sum(1, keepdim=True)
            g = g / g.abs().flatten(1).amax(1).clamp_min(1e-20).view(-1, 1, 1, 1)
            mag = g.abs().pow(gamma)
            heat = torch.cat([mag * (g > 0), torch.zeros_like(g), mag * (g < 0)], 1)
        overlay = (1 - overlay_strength) * x.cpu() + overlay_strength * heat
        return (bchw_to_image(heat), bchw_to_image(overlay), [float(s) for s in scores])


class RewardLabUnloadRewards:
    DESCRIPTION = "Frees the cached reward models (all, or one name) and their GPU memory."
    CATEGORY = CATEGORY
    FUNCTION = "unload"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    OUTPUT_TOOLTIPS = ("How many cached models were dropped.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model_name": (["all"] + registry.list_rewards(), {"default": "all",
                                            "tooltip": "Which cached model to unload; all = every cached reward model."})}}

    def unload(self, model_name="all"):
        n = registry.unload(None if model_name == "all" else model_name)
        return (f"unloaded {n} cached reward model(s)",)


NODE_CLASS_MAPPINGS = {
    "RewardLabLoadReward": RewardLabLoadReward,
    "RewardLabWeightFreeReward": RewardLabWeightFreeReward,
    "RewardLabCombineRewards": RewardLabCombineRewards,
    "RewardLabScoreImages": RewardLabScoreImages,
    "RewardLabRankImages": RewardLabRankImages,
    "RewardLabRewardGradient": RewardLabRewardGradient,
    "RewardLabUnloadRewards": RewardLabUnloadRewards,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "RewardLabLoadReward": "Load Reward Model",
    "RewardLabWeightFreeReward": "Weight-free Reward",
    "RewardLabCombineRewards": "Combine Rewards",
    "RewardLabScoreImages": "Score Images",
    "RewardLabRankImages": "Rank / Select Best Images",
    "RewardLabRewardGradient": "Reward Gradient Heatmap",
    "RewardLabUnloadRewards": "Unload Reward Models",
}
