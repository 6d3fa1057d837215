"""ReNO bench: seconds per image and peak memory of noise optimisation, RewardLab against a plain eager loop.

Setup (issue 5): an SD2.1-shaped random-weight UNet (the SD-Turbo architecture), 1 step at 512², 50 iterations,
reward ensemble of HPS-shaped (open_clip ViT-H-14) + PickScore-shaped (transformers CLIP-H) + aesthetic-shaped
(open_clip ViT-L-14 + MLP head) random towers, weights HPS 5 / PickScore 0.05 / aesthetic 1; SGD-Nesterov lr 5,
clip 0.1, χ_d λ 0.01. Also a 4-step SDXL-shaped chain at 1024² (euler_ancestral, trailing, per-step checkpointing).
Weights are random (no downloads): speed and memory do not depend on their values.

Rows (one JSON object each):
  eager_baseline   the straightforward loop: UNet -> x0 -> VAE decode -> ensemble -> backward -> clip -> step,
                   written out by hand here (no checkpointing, no compile), in the same dtype
  rewardlab        noise.optimise.optimise_noise (the library path), with --compile for the UNet, VAE decoder
                   and reward towers; its first-iteration reward is compared with the eager baseline's
  sdxl_4step       rewardlab on the SDXL-shaped chain

    python bench/reno.py --tiny               # CPU smoke run: tiny configs, 3 iterations
    python bench/reno.py --compile default    # GPU: the full bench (bf16)
"""
import argparse
import json
import resource
import time

import torch

SD21_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
                 cross_attention_dim=1024, use_linear_projection=True,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
                 transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)

TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 attention_head_dim=8, cross_attention_dim=32, norm_num_groups=16, use_linear_projection=True,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_SDXL_UNET = dict(TINY_UNET, addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=32 + 6 * 8)
TINY_VAE = dict(SD_VAE, block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=16, sample_size=16)
TINY_CLIP = {"quick_gelu": True, "overrides": dict(
    embed_dim=16, vision_cfg={"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2})}
TINY_PICK = {"projection_dim": 16,
             "text_config": {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                             "num_hidden_layers": 2, "max_position_embeddings": 77},
             "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                               "num_hidden_layers": 2, "image_size": 224, "patch_size": 32}}
WEIGHTS = {"hps": 5.0, "pickscore": 0.05, "aesthetic": 1.0}
PROMPT = "a photo of a red fox reading a newspaper in a cafe"


def build_rewards(tiny, device, dtype):
    from rewardlab.rewards import clip_models, pickscore
    from rewardlab.rewards.ensemble import RewardEnsemble

    torch.manual_seed(0)
    hps = clip_models.build_hps({"clip_model": "ViT-B-32", **TINY_CLIP} if tiny else {"clip_model": "ViT-H-14"})
    aes = clip_models.build_aesthetic({"clip_model": "ViT-B-32", "head": "mlp", **TINY_CLIP} if tiny
                                      else {"clip_model": "ViT-L-14-quickgelu", "head": "mlp"})
    pick = pickscore.build(TINY_PICK if tiny else None)
    members = [hps, pick, aes]
    for r in members:
        r.freeze().set_grad_checkpointing(False)
    ensemble = RewardEnsemble(members, [WEIGHTS["hps"], WEIGHTS["pickscore"], WEIGHTS["aesthetic"]])
    return ensemble.to(device, dtype).freeze()


def build_unet(config, device, dtype):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(1)
    return UNet2DConditionModel.from_config(config).to(device, dtype).eval().requires_grad_(False)


def build_vae(config, device, dtype):
    from diffusers import AutoencoderKL
    torch.manual_seed(2)
    return AutoencoderKL.from_config(config).to(device, dtype).eval().requires_grad_(False)


def make_decode(vae, dtype):
    """Latent (model space) -> image in [0, 1]; straight-through clamp so saturated pixels keep their gradient."""
    def decode(z):
        raw = vae.decode((z / 0.18215).to(dtype)).sample.float()
        linear = (raw + 1) / 2
        return linear + (linear.clamp(0, 1) - linear).detach()
    return decode


def conditioning(config, batch, device, dtype, tiny):
    g = torch.Generator().manual_seed(3)
    extra = {"encoder_hidden_states": torch.randn(batch, 77, config["cross_attention_dim"], generator=g).to(device, dtype)}
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        size = config["sample_size"] * 8
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, generator=g).to(device, dtype),
                                      "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch,
                                                               dtype=dtype, device=device)}
    return extra


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20       # process peak RSS (only grows)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class Denoiser(torch.nn.Module):
    """SD-style ε-UNet as a k-diffusion x̂0 denoiser with the model's dtype (the library's DiscreteDenoiser)."""

    def __init__(self, unet, dtype):
        super().__init__()
        from rewardlab.samplers import DiscreteDenoiser
        from diffusers import DDPMScheduler
        sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        self.inner = DiscreteDenoiser(unet, sched.alphas_cumprod, "epsilon")
        self.dtype, self.flow = dtype, False

    @property
    def model_sigmas(self):
        return self.inner.model_sigmas

    def forward(self, x, sigma, **extra):
        return self.inner(x.to(self.dtype), sigma.to(self.dtype), **extra).float()


def eager_baseline(unet_denoiser, decode, reward, noise, sigma, extra, iterations):
    """The straightforward loop (ReNO's structure), one UNet call per iteration: the reference to beat."""
    eps = noise.clone().requires_grad_(True)
    opt = torch.optim.SGD([eps], lr=5.0, momentum=0.9, nesterov=True)
    d = eps[0].numel()
    rewards = []
    for it in range(iterations):
        x = eps * (sigma**2 + 1) ** 0.5
        x0 = unet_denoiser(x, sigma.expand(x.shape[0]), **extra)
        r = reward(decode(x0), [PROMPT] * x.shape[0])
        rewards.append(r.detach().float())
        if it == iterations - 1:
            break
        n = eps.flatten(1).norm(dim=1)
        loss = -r.sum() + 0.01 * (0.5 * n**2 - (d - 1) * n.log()).sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([eps], 0.1)
        opt.step()
    return torch.stack(rewards)


def timed(fn, device):
    reset_peak(device)
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t, peak_gib(device)


def maybe_compile(module, mode):
    """torch.compile with inductor (default / reduce-overhead = CUDA graphs / max-autotune), or the aot_eager
    backend, which traces forward + backward without code generation (a quick CPU check of graph capture)."""
    if mode == "none":
        return module
    if mode == "aot_eager":
        return torch.compile(module, backend="aot_eager")
    return torch.compile(module, mode=None if mode == "default" else mode)


def compile_towers(reward, mode):
    """Compile each member's image tower: open_clip rewards call ``.visual``, PickScore calls
    ``clip.vision_model`` (through get_image_features). Text features are cached, so text towers stay eager."""
    for r in reward.members:
        if hasattr(r, "visual"):
            r.visual = maybe_compile(r.visual, mode)
        elif hasattr(getattr(r, "clip", None), "vision_model"):
            r.clip.vision_model = maybe_compile(r.clip.vision_model, mode)


def run_sd21(args, device, dtype, report):
    from rewardlab.samplers import sigma_schedule
    from rewardlab.noise import Chain, optimise_noise

    unet_cfg, vae_cfg = (TINY_UNET, TINY_VAE) if args.tiny else (SD21_UNET, SD_VAE)
    unet, vae = build_unet(unet_cfg, device, dtype), build_vae(vae_cfg, device, dtype)
    reward = build_rewards(args.tiny, device, dtype)
    denoiser = Denoiser(unet, dtype).to(device)
    extra = conditioning(unet_cfg, args.batch, device, dtype, args.tiny)
    size = unet_cfg["sample_size"]
    noise = torch.randn(args.batch, 4, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    sigmas = sigma_schedule("trailing", 1, denoiser.model_sigmas.cpu()).to(device)
    rows = []
    if not args.skip_baseline:
        base_rewards, secs, peak = timed(lambda: eager_baseline(denoiser, make_decode(vae, dtype), reward, noise,
                                                                sigmas[0], extra, args.iterations), device)
        rows.append(dict(row="eager_baseline", s_per_image=secs / args.batch, peak_gib=peak,
                         first_reward=float(base_rewards[0].mean()), best_reward=float(base_rewards.max(0).values.mean())))
        report(rows[-1])
    # RewardLab: the library loop, optionally with compiled UNet / decoder / reward towers.
    unet_c = maybe_compile(unet, args.compile)
    vae.decoder = maybe_compile(vae.decoder, args.compile)
    compile_towers(reward, args.compile)
    chain = Chain(Denoiser(unet_c, dtype).to(device), sigmas, decode=make_decode(vae, dtype), step="euler",
                  extra_args=extra, channels=4)
    if args.compile != "none":      # warm-up compiles outside the timing (2 iterations: forward + backward)
        optimise_noise(chain, reward, noise, PROMPT, iterations=2, checkpoint_reward=args.checkpoint_reward,
                       checkpoint_steps=args.checkpoint_steps)
    res, secs, peak = timed(lambda: optimise_noise(chain, reward, noise, PROMPT, iterations=args.iterations,
                                                   checkpoint_reward=args.checkpoint_reward,
                                                   checkpoint_steps=args.checkpoint_steps), device)
    row = dict(row="rewardlab", compile=args.compile, checkpoint_steps=args.checkpoint_steps,
               checkpoint_reward=args.checkpoint_reward, s_per_image=secs / args.batch, peak_gib=peak,
               first_reward=float(res.history[0].mean()), best_reward=float(res.reward.mean()))
    if rows:
        row["speedup_vs_eager"] = rows[0]["s_per_image"] / row["s_per_image"]
        row["first_reward_abs_diff_vs_eager"] = abs(row["first_reward"] - rows[0]["first_reward"])
    rows.append(row)
    report(row)
    return rows


def run_sdxl(args, device, dtype, report):
    from rewardlab.samplers import sigma_schedule
    from rewardlab.noise import Chain, optimise_noise

    unet_cfg, vae_cfg = (TINY_SDXL_UNET, TINY_VAE) if args.tiny else (SDXL_UNET, SD_VAE)
    unet, vae = build_unet(unet_cfg, device, dtype), build_vae(vae_cfg, device, dtype)
    reward = build_rewards(args.tiny, device, dtype)
    denoiser = Denoiser(maybe_compile(unet, args.compile), dtype).to(device)
    vae.decoder = maybe_compile(vae.decoder, args.compile)
    compile_towers(reward, args.compile)
    size = unet_cfg["sample_size"]
    noise = torch.randn(args.batch, 4, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    sigmas = sigma_schedule("trailing", 4, denoiser.model_sigmas.cpu()).to(device)
    chain = Chain(denoiser, sigmas, decode=make_decode(vae, dtype), step="euler_ancestral",
                  extra_args=conditioning(unet_cfg, args.batch, device, dtype, args.tiny), channels=4)
    res, secs, peak = timed(lambda: optimise_noise(chain, reward, noise, PROMPT, iterations=args.iterations,
                                                   checkpoint_steps=True, checkpoint_reward=True), device)
    row = dict(row="sdxl_4step", compile=args.compile, s_per_image=secs / args.batch, peak_gib=peak,
               first_reward=float(res.history[0].mean()), best_reward=float(res.reward.mean()))
    report(row)
    return [row]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny configs on CPU (smoke run)")
    p.add_argument("--iterations", type=int, default=None, help="default 50 (3 with --tiny)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--compile", choices=("none", "default", "reduce-overhead", "max-autotune", "aot_eager"), default="none")
    p.add_argument("--checkpoint-reward", action="store_true", help="recompute decoder + rewards in backward")
    p.add_argument("--checkpoint-steps", action="store_true", help="recompute the UNet call in backward")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--no-sdxl", action="store_true", help="skip the 4-step SDXL-shaped chain")
    p.add_argument("--device", default=None, help="default: cuda when available (cpu with --tiny)")
    p.add_argument("--out", default=None, help="also append every JSON line to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    args.iterations = args.iterations or (3 if args.tiny else 50)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    meta = dict(what="reno", device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", dtype=str(dtype),
                iterations=args.iterations, batch=args.batch, tiny=args.tiny,
                peak_measure="cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS")

    def report(row):                      # each row as soon as it is measured (a time limit keeps the earlier ones)
        line = json.dumps({**meta, **row})
        print(line, flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(line + "\n")

    rows = run_sd21(args, device, dtype, report)
    if not args.no_sdxl:
        rows += run_sdxl(args, device, dtype, report)
    return rows


if __name__ == "__main__":
    main()
