"""Adaptive Guidance bench: network evaluations and wall time per image against constant CFG at equal steps.

One run of each on the same seeds and prompts, through the core runner (samplers.sample) with GuidedDenoiser:
  cfg        constant CFG (cond + uncond every step)
  adaptive   the same, plus AdaptiveGuidance(threshold) — once cos(cond, uncond) ≥ threshold, later steps run the
             conditional branch only (Castillo et al. 2312.12487 report ~25% less compute)
Evaluations are network rows per image (a CFG step costs 2, a conditional-only step 1), counted at the denoiser.

    python bench/guidance.py                      # CPU: the embedded tiny model (random-weight stand-in if absent)
    python bench/guidance.py --model sd15         # GPU: SD1.5-shaped UNet (random weights) at 64×64 latents
Prints one JSON object.
"""
import argparse
import json
import time

import torch

from rewardlab.samplers import noise_scaling, sigma_schedule
from rewardlab.samplers.denoisers import DiscreteDenoiser
from rewardlab.samplers.guidance import AdaptiveGuidance, GuidedDenoiser
from rewardlab.samplers.guidance.context import table_progress

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
PROMPTS = ["a red circle on a blue background", "a yellow square on a black background",
           "a white cross on a green background", "a blue triangle on a yellow background"]


class Counted(torch.nn.Module):
    """Counts network rows (evaluations) and calls of the wrapped denoiser."""

    def __init__(self, den):
        super().__init__()
        self.den, self.rows, self.calls = den, 0, 0

    def forward(self, x, sigma, **kw):
        self.rows += x.shape[0]
        self.calls += 1
        return self.den(x, sigma, **kw)


def tiny_setup(device, batch, path=None):
    """The embedded tiny model (or one saved in ``path``), or the same architecture with random weights when the
    weights are not shipped."""
    from rewardlab.tiny import model as tiny
    try:
        model = tiny.load_tiny(device, path)
        name = "tiny (embedded weights)" if path is None else f"tiny (weights from {path})"
    except FileNotFoundError:
        from rewardlab.tiny.text import TinyTextEncoder
        torch.manual_seed(0)
        config = dict(unet=dict(tiny.DEFAULT_UNET), text=dict(tiny.DEFAULT_TEXT), schedule=dict(tiny.DEFAULT_SCHEDULE))
        model = tiny.TinyModel(tiny.build_unet(config["unet"]), TinyTextEncoder(**config["text"]),
                               tiny.ddpm_scheduler().alphas_cumprod, config).to(device).eval().requires_grad_(False)
        name = "tiny architecture, random weights (tiny_model.safetensors not found)"
    cond, uncond = model.encode(PROMPTS[:batch]), model.encode([""] * batch)
    size = model.image_size
    return name, model.denoiser, cond, uncond, (3, size, size)


def sd15_setup(device, batch, dtype):
    from diffusers import UNet2DConditionModel
    from rewardlab.samplers.sigmas import scaled_linear_model_sigmas
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).to(device).eval().requires_grad_(False)
    if dtype != torch.float32:
        unet = unet.to(dtype)
    g = torch.Generator().manual_seed(1)
    cond = {"encoder_hidden_states": torch.randn(batch, 77, 768, generator=g).to(device, dtype)}
    uncond = {"encoder_hidden_states": torch.zeros(batch, 77, 768).to(device, dtype)}
    sig = scaled_linear_model_sigmas().double()
    den = DiscreteDenoiser(unet, 1 / (1 + sig**2)).to(device)
    return "SD1.5-shaped UNet, random weights", den, cond, uncond, (4, 64, 64)


def run(den, cond, uncond, shape, batch, steps, cfg, gates, device, seed, dtype):
    counted = Counted(den)
    guided = GuidedDenoiser(counted, cond, uncond, scale=cfg, gates=gates, kind="eps",
                            model_progress=table_progress(den.model_sigmas.cpu()))
    sigmas = sigma_schedule("karras", steps, den.model_sigmas.cpu()).to(device)
    g = torch.Generator().manual_seed(seed)
    x = noise_scaling(sigmas[0], torch.randn(batch, *shape, generator=g).to(device, dtype))
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        traj, grun = guided.sample(x, sigmas)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    trace = next((v for k, v in grun.state.items() if k[0] == "adaptive_guidance_trace"), None)
    latch = next((v for k, v in grun.state.items() if k[0] == "adaptive_guidance"), None)
    return traj.x, {"evaluations_per_image": counted.rows / batch, "denoiser_calls": counted.calls,
                    "seconds_per_image": round(seconds / batch, 4), "latched_at_step": latch,
                    "cosine_trace": None if trace is None else [round(c, 5) for _, c in trace]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "sd15"], default="tiny")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--threshold", type=float, default=AdaptiveGuidance().threshold)
    ap.add_argument("--space", default=AdaptiveGuidance().space)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny-path", default=None, help="folder with tiny_model.safetensors (default: the shipped one)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if (args.model == "sd15" and device.type == "cuda") else torch.float32
    if args.model == "tiny":
        name, den, cond, uncond, shape = tiny_setup(device, args.batch, args.tiny_path)
    else:
        name, den, cond, uncond, shape = sd15_setup(device, args.batch, dtype)
    common = (den, cond, uncond, shape, args.batch, args.steps, args.cfg)
    run(*common, (), device, args.seed, dtype)                           # warm-up (allocator, kernels)
    x_cfg, cfg = run(*common, (), device, args.seed, dtype)
    gate = AdaptiveGuidance(args.threshold, args.space)
    x_ag, ag = run(*common, (gate,), device, args.seed, dtype)
    saved = round(1 - ag["evaluations_per_image"] / cfg["evaluations_per_image"], 6)   # 1 - 32/40 is 0.19999…
    print(json.dumps({
        "bench": "adaptive_guidance_vs_cfg", "model": name, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "steps": args.steps, "cfg": args.cfg, "batch": args.batch, "threshold": args.threshold, "space": args.space,
        "constant_cfg": {k: v for k, v in cfg.items() if k not in ("latched_at_step", "cosine_trace")},
        "adaptive": ag, "evaluations_saved": round(saved, 4),
        "wall_time_saved": round(1 - ag["seconds_per_image"] / cfg["seconds_per_image"], 4),
        "final_sample_mean_abs_diff": round(float((x_ag.float() - x_cfg.float()).abs().mean()), 5),
        "target_met": saved >= 0.20,
    }, indent=1))


if __name__ == "__main__":
    main()
