"""Reward throughput: RewardLab's differentiable rewards against the reference pipelines, same weights, same run.

Per model and dtype, images/s at batch B (default 8) for:
  ours_fwd         RewardLab reward on float BCHW images (no grad)
  ours_fwd_bwd     the same with the gradient w.r.t. the pixels (what training / noise optimisation needs)
  ref_pil_fwd      the reference: 8-bit PIL images -> open_clip's own eval transform (or HPS's) -> open_clip model
                   (non-differentiable; the PIL conversion is included, as in the official scorers)
  ref_tensor_fwd   open_clip model on tensors preprocessed with torchvision tensor transforms (ReNO-style)
  ref_tensor_fwd_bwd   the same, with backward to the pixels
plus peak memory (CUDA: max allocated; CPU: process peak RSS, which only grows, so it is not per-pipeline) and the
score agreement. Timings are the best of --reps rounds, measured round-robin.
Weights are random (no downloads): speed does not depend on their values.

    python bench/rewards.py --tiny            # CPU: tiny open_clip configs (what CI machines can run)
    python bench/rewards.py                   # GPU: ViT-L-14 (aesthetic), ViT-H-14 (HPS, CLIP score); fp32/fp16/bf16
Prints one JSON object per (model, dtype) line.
"""
import argparse
import json
import os
import resource
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import timed_interleaved
import _hf_rewards as hf   # PickScore and ImageReward (transformers/timm models and their references)

TINY = {"clip_model": "ViT-B-32", "quick_gelu": True, "overrides": dict(
    embed_dim=16, vision_cfg={"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2})}
FULL = {"aesthetic": {"clip_model": "ViT-L-14-quickgelu", "head": "mlp"}, "hps": {"clip_model": "ViT-H-14"},
        "clipscore": {"clip_model": "ViT-H-14", "scale": "logit_scale"}, **hf.FULL}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build(kind, config):
    from rewardlab.rewards import clip_models

    if kind in hf.KINDS:
        return hf.build(kind, config)
    torch.manual_seed(0)
    return {"aesthetic": clip_models.build_aesthetic, "hps": clip_models.build_hps,
            "clipscore": clip_models.build_clipscore}[kind](config).freeze()


def reference_parts(kind, reward):
    """(open_clip model sharing our weights, PIL transform, tensor transform) as the reference pipelines use them."""
    import open_clip
    import torchvision.transforms as T

    if kind in hf.KINDS:
        return hf.reference_parts(kind, reward)
    model = reward.clip if kind != "aesthetic" else None
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    if kind == "hps":   # HPSv2: ToTensor -> ResizeMaxSize(224) -> Normalize
        def pil_tf(im):
            return tensor_tf(T.functional.to_tensor(im)[None])[0]

        def tensor_tf(x):
            h, w = x.shape[-2:]
            s = 224 / max(h, w)
            nh, nw = round(h * s), round(w * s)
            x = T.functional.resize(x, [nh, nw], T.InterpolationMode.BICUBIC)
            x = T.functional.pad(x, [(224 - nw) // 2, (224 - nh) // 2, 224 - nw - (224 - nw) // 2, 224 - nh - (224 - nh) // 2])
            return T.functional.normalize(x, mean, std)
    else:
        pil_tf = open_clip.image_transform(224, is_train=False)
        tensor_tf = T.Compose([T.Resize(224, T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.Normalize(mean, std)])
    return model, pil_tf, tensor_tf


def reference_score(kind, reward, x_model, tokens):
    """The reference forward: open_clip encode_image / encode_text + the published head or formula."""
    if kind in hf.KINDS:   # ``tokens`` are the prompts: these references tokenise with the published call
        return hf.reference_score(kind, reward, x_model, tokens)
    if kind == "aesthetic":
        return reward.head(F.normalize(reward.visual(x_model).float(), dim=-1).to(reward.head_dtype)).squeeze(-1)
    clip = reward.clip
    img = F.normalize(clip.encode_image(x_model).float(), dim=-1)
    txt = F.normalize(clip.encode_text(tokens).float(), dim=-1)
    cos = (img * txt).sum(-1)
    return cos if kind == "hps" else clip.logit_scale.exp().float() * cos


def peak_memory(device, fn):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    fn()
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)   # process peak RSS, MiB


def bench(kind, config, dtype_name, device, batch, size, reps):
    from PIL import Image

    dtype = DTYPES[dtype_name]
    reward = build(kind, config).to(device, dtype)
    model, pil_tf, tensor_tf = reference_parts(kind, reward)
    g = torch.Generator().manual_seed(0)
    x = F.interpolate(torch.rand(batch, 3, size // 16, size // 16, generator=g), (size, size), mode="bicubic").clamp(0, 1)
    pils = [Image.fromarray((xi.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for xi in x]
    x = torch.stack([torch.from_numpy(np.array(p)) for p in pils]).permute(0, 3, 1, 2).float().div(255).to(device)
    prompts = [f"a photo of object number {i}" for i in range(batch)] if reward.needs_text else None
    tokens = prompts if kind in hf.KINDS else reward.tokenizer(prompts).to(device) if reward.needs_text else None

    def ours_fwd():
        with torch.no_grad():
            return reward(x, prompts)

    def ours_bwd():
        xi = x.clone().requires_grad_(True)
        reward(xi, prompts).sum().backward()
        return xi.grad

    def ref_pil():
        with torch.no_grad():
            batch_in = torch.stack([pil_tf(p) for p in pils]).to(device, dtype)
            return reference_score(kind, reward, batch_in, tokens)

    def ref_tensor_fwd():
        with torch.no_grad():
            return reference_score(kind, reward, tensor_tf(x).to(dtype), tokens)

    def ref_tensor_bwd():
        xi = x.clone().requires_grad_(True)
        reference_score(kind, reward, tensor_tf(xi).to(dtype), tokens).sum().backward()
        return xi.grad

    row = {"model": kind, "clip": config["clip_model"], "dtype": dtype_name, "device": str(device), "batch": batch,
           "image_size": size}
    fns = {"ours_fwd": ours_fwd, "ours_fwd_bwd": ours_bwd, "ref_pil_fwd": ref_pil, "ref_tensor_fwd": ref_tensor_fwd,
           "ref_tensor_fwd_bwd": ref_tensor_bwd}
    for label, seconds in timed_interleaved(fns, device, reps).items():
        row[f"{label}_img_s"] = round(batch / seconds, 2)
    row["ours_fwd_bwd_peak_mib"] = peak_memory(device, ours_bwd)
    row["ref_tensor_fwd_bwd_peak_mib"] = peak_memory(device, ref_tensor_bwd)
    ours, ref = ours_fwd().float(), ref_pil().float()
    row["max_rel_diff_vs_ref_pil"] = float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    row["grad_finite_nonzero"] = bool(torch.isfinite(ours_bwd()).all() and ours_bwd().abs().sum() > 0)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny open_clip configs (CPU-friendly)")
    ap.add_argument("--models", default="aesthetic,hps,clipscore,pickscore,imagereward")
    ap.add_argument("--dtypes", default=None, help="comma list of fp32,fp16,bf16 (default: all on GPU, fp32 on CPU)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=512, help="input image side (SD-like outputs)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtypes = args.dtypes.split(",") if args.dtypes else (["fp32", "fp16", "bf16"] if device.type == "cuda" else ["fp32"])
    for kind in args.models.split(","):
        config = dict(TINY, **({"head": "mlp"} if kind == "aesthetic" else {})) if args.tiny else FULL[kind]
        config = hf.TINY[kind] if args.tiny and kind in hf.KINDS else config
        for dt in dtypes:
            print(json.dumps(bench(kind, config, dt, device, args.batch, args.size, args.reps)), flush=True)


if __name__ == "__main__":
    main()
