"""Cost of RewardLab's trajectory runner over raw UNet calls, no grad, same UNet, noise and steps.

Three loops per model, measured in one run: (1) raw UNet calls only (the floor), (2) our runner with CFG
(runner.sample + CFGDenoiser + DiscreteDenoiser), (3) the equivalent diffusers scheduler loop
(DDIMScheduler.step, CFG by hand). Prints one JSON line per model; ratios are against (1) and (3).

    python bench/sampler_overhead.py                 # tiny UNet + SD1.5-shaped UNet at a small latent (CPU)
    python bench/sampler_overhead.py --sd-res 512    # on a GPU: SD1.5-shaped at 512²
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import timed_interleaved  # noqa: E402
from rewardlab.samplers import CFGDenoiser, DiscreteDenoiser, sample
from rewardlab.samplers.sigmas import leading


def build_unet(kind):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if kind == "tiny":
        return UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                    attention_head_dim=8, norm_num_groups=8,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")), 32
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2), 768


def bench(kind, res, steps, batch, device, dtype, reps):
    from diffusers import DDIMScheduler

    unet, ctx = build_unet(kind)
    unet = unet.to(device, dtype).eval().requires_grad_(False)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    lat = res // 8
    noise = torch.randn(batch, 4, lat, lat, generator=g).to(device, dtype)
    cond = torch.randn(batch, 77 if kind != "tiny" else 8, ctx, generator=g).to(device, dtype)
    uncond = torch.zeros_like(cond)
    both = torch.cat([uncond, cond])

    def raw():
        x = torch.cat([noise, noise])
        for t in sched.timesteps:
            unet(x, t, encoder_hidden_states=both)

    den = CFGDenoiser(DiscreteDenoiser.from_scheduler(unet, sched), {"encoder_hidden_states": cond},
                      {"encoder_hidden_states": uncond}, scale=7.5)
    sigmas = leading(steps, den.model.model_sigmas)
    sigmas[-1] = den.model.model_sigmas[0]

    def ours():
        sample(den, noise * (1 + sigmas[0] ** 2) ** 0.5, sigmas, "ddim")

    def diffusers_loop():
        x = noise
        for t in sched.timesteps:
            eu, ec = unet(torch.cat([x, x]), t, encoder_hidden_states=both).sample.chunk(2)
            x = sched.step(eu + 7.5 * (ec - eu), t, x).prev_sample

    with torch.no_grad():
        best = timed_interleaved({"raw": raw, "ours": ours, "diffusers": diffusers_loop}, device, reps)
    t_raw, t_ours, t_diff = best["raw"], best["ours"], best["diffusers"]
    return {"bench": "sampler_overhead", "model": kind, "res": res, "steps": steps, "batch": batch,
            "device": str(device), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "dtype": str(dtype).replace("torch.", ""), "raw_unet_s": round(t_raw, 4), "runner_s": round(t_ours, 4),
            "diffusers_loop_s": round(t_diff, 4), "runner_over_raw": round(t_ours / t_raw, 4),
            "runner_over_diffusers": round(t_ours / t_diff, 4)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--sd-res", type=int, default=None, help="SD1.5-shaped resolution (default: 512 on GPU, 64 on CPU)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-sd", action="store_true", help="only the tiny UNet")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    print(json.dumps(bench("tiny", 64, args.steps, args.batch, device, dtype, args.reps)), flush=True)
    if not args.skip_sd:
        res = args.sd_res or (512 if device.type == "cuda" else 64)
        print(json.dumps(bench("sd15", res, args.steps, args.batch, device, dtype, args.reps)), flush=True)


if __name__ == "__main__":
    main()
