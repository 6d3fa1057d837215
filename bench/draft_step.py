"""Benchmark of one DRaFT training step (seconds per optimiser step, peak GPU memory), RewardLab's trainer vs the
TRL 0.23.1 anchor ``trl.models.modeling_sd_base.pipeline_step_with_grad`` on the same random model.

Setup (issue 4): an SD1.5-shaped random-weight UNet (860M), 512² (latent 64²), DDIM 50 steps (η = 0, the "leading"
spacing diffusers uses for SD), CFG 7.5, LoRA r4 on the attention projections, bf16, batch 1 and 4,
DRaFT-K for K ∈ {1, 10, 50} and DRaFT-LV n=2. The reward is an aesthetic-style scorer of the same size as the usual
one (random CLIP ViT-L/14 image tower + MLP head) on the VAE-decoded image; the VAE decoder is checkpointed.

    python bench/draft_step.py                 # GPU, full size (prints one JSON line per measurement)
    python bench/draft_step.py --tiny          # CPU smoke run with small shapes (exercises the same code)

The anchor runs only when ``trl`` (0.23.1, installed without dependencies) and ``peft`` are importable; it uses a
copy of the same UNet with a PEFT LoRA of the same rank and targets, fixed truncation K=1.
"""
import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F

from rewardlab.samplers import DiscreteDenoiser
from rewardlab.samplers.sigmas import scaled_linear_model_sigmas
from rewardlab.training.bundle import TorchBundle
from rewardlab.training.draft import DraftConfig, Trainer
from rewardlab.training.lora import ATTENTION_TARGETS

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def emit(**kw):
    print(json.dumps(kw), flush=True)


def sd15_unet(tiny):
    from diffusers import UNet2DConditionModel
    if tiny:
        return UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                    attention_head_dim=4, norm_num_groups=8)
    # the SD1.5 architecture (diffusers defaults are SD1.x's block layout)
    return UNet2DConditionModel(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                                cross_attention_dim=768, attention_head_dim=8)


def sd_vae(tiny):
    from diffusers import AutoencoderKL
    if tiny:
        return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                             layers_per_block=1)
    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2)


class AestheticLikeReward(torch.nn.Module):
    """Random CLIP image tower + MLP head: the compute of a LAION-aesthetic reward, differentiable."""

    def __init__(self, tiny, dtype):
        super().__init__()
        if tiny:
            self.tower = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 4, 4), torch.nn.GELU(),
                                             torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
            width, self.size = 16, 32
        else:
            import open_clip
            self.tower = open_clip.create_model("ViT-L-14", pretrained=None).visual
            width, self.size = 768, 224
        self.head = torch.nn.Sequential(torch.nn.Linear(width, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1))
        self.dtype = dtype
        self.requires_grad_(False).eval()

    def forward(self, images, prompts=None):
        x = F.interpolate(images.float(), size=self.size, mode="bilinear", antialias=True, align_corners=False)
        e = self.tower(((x - self.mean) / self.std).to(self.dtype)).float()
        e = e / e.norm(dim=-1, keepdim=True)
        return self.head(e.to(self.dtype)).float().squeeze(-1)


def build(tiny, device, dtype):
    torch.manual_seed(0)
    unet = sd15_unet(tiny).requires_grad_(False).eval().to(device, dtype)
    vae = sd_vae(tiny).requires_grad_(False).eval().to(device, dtype)
    reward = AestheticLikeReward(tiny, dtype).to(device, dtype)
    ctx = unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(1, 77, ctx, generator=g).to(device, dtype)
    uncond = torch.randn(1, 77, ctx, generator=g).to(device, dtype)

    def encode(prompts):       # fixed embeddings stand in for the text encoder (not part of the timed step)
        return {"encoder_hidden_states": torch.cat([uncond if p == "" else cond for p in prompts])}

    def decode(z):
        return (vae.decode(z.to(dtype) / 0.18215).sample.float() / 2 + 0.5).clamp(0, 1)

    den = DiscreteDenoiser(unet, torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000,
                                                                  dtype=torch.float64) ** 2, 0)).to(device)
    latent = unet.config.sample_size
    bundle = TorchBundle(den, encode, decode, (4, latent, latent), model_sigmas=scaled_linear_model_sigmas(),
                         lora_root=unet, device=device, checkpoint_decode=True)
    return unet, vae, reward, bundle, (cond, uncond)


def timed(fn, device, warm=1, reps=2):
    cuda = device.startswith("cuda")
    for _ in range(warm):
        fn()
    times, peak = [], 0.0
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
            peak = max(peak, torch.cuda.max_memory_allocated() / 2**30)
        times.append(time.perf_counter() - t0)
    return min(times), sorted(times)[len(times) // 2], peak


def bench_rewardlab(bundle, reward, device, batch, method, k, steps, reps, compile_prefix=None):
    cfg = DraftConfig(method=method, k=k, lv_n=2, steps=steps, scheduler="leading", cfg=7.5, batch_size=batch,
                      rank=4, alpha=4, targets=ATTENTION_TARGETS, lr=1e-4, precision="bf16", checkpointing=True,
                      max_grad_norm=1.0, compile_prefix=compile_prefix)
    trainer = Trainer(bundle, reward, cfg, prompts=["a photo"])
    try:
        best, med, peak = timed(trainer.train_step, device, reps=reps)
    finally:
        from rewardlab.training.lora import remove_lora
        remove_lora(bundle.lora_root, trainer.adapters)
        bundle.__dict__.pop("_fast", None)          # the next run starts eager again
    return best, med, peak


def bench_trl(unet, vae, reward, embs, device, dtype, batch, steps, k, reps):
    """TRL 0.23.1's AlignProp/DRaFT-K step with fixed truncation, on a copy of the same UNet."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from peft import LoraConfig
    from trl.models.modeling_sd_base import pipeline_step_with_grad

    trl_unet = copy.deepcopy(unet)
    trl_unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=list(ATTENTION_TARGETS)))
    params = [p for p in trl_unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                          clip_sample=False, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=trl_unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    cond, uncond = (e.expand(batch, -1, -1) for e in embs)
    latents = torch.randn(batch, 4, unet.config.sample_size, unet.config.sample_size,
                          generator=torch.Generator().manual_seed(0)).to(device, dtype)

    def step():
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=device.startswith("cuda")):
            out = pipeline_step_with_grad(pipe, prompt_embeds=cond, negative_prompt_embeds=uncond,
                                          num_inference_steps=steps, guidance_scale=7.5, eta=0.0,
                                          truncated_backprop=True, truncated_backprop_rand=False,
                                          truncated_backprop_timestep=steps - k, gradient_checkpoint=True,
                                          output_type="pt", latents=latents.clone())
            loss = -reward(out.images).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        return timed(step, device, reps=reps)
    finally:
        del trl_unet, pipe, opt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small shapes on CPU (smoke run)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 10, 50])
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default 50; 4 with --tiny)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--no-trl", action="store_true", help="skip the TRL anchor")
    ap.add_argument("--compile-prefix", default=None,
                    help="also time runs with the no-grad prefix compiled by this torch.compile backend (inductor)")
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    steps = args.steps or (4 if args.tiny else 50)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    unet, vae, reward, bundle, embs = build(args.tiny, device, dtype)
    emit(what="setup", device=device, dtype=str(dtype), steps=steps, tiny=args.tiny,
         unet_M=sum(p.numel() for p in unet.parameters()) / 1e6,
         gpu=torch.cuda.get_device_name() if device.startswith("cuda") else None)
    runs = [("draft_k", k) for k in sorted({min(k, steps) for k in args.ks})] + [("draft_lv", 1)]
    modes = [None] + ([args.compile_prefix] if args.compile_prefix else [])
    for batch in args.batches:
        for method, k in runs:
            for mode in modes:
                try:
                    best, med, peak = bench_rewardlab(bundle, reward, device, batch, method, k, steps, args.reps, mode)
                    emit(what="rewardlab_step", B=batch, method=method, K=k, n=2 if method == "draft_lv" else None,
                         compile_prefix=mode, min_s=best, med_s=med, peak_GiB=peak)
                except torch.cuda.OutOfMemoryError as e:
                    emit(what="rewardlab_step", B=batch, method=method, K=k, error="OOM: " + str(e)[:200])
                    torch.cuda.empty_cache()
        if not args.no_trl:
            try:
                best, med, peak = bench_trl(unet, vae, reward, embs, device, dtype, batch, steps, 1, args.reps)
                emit(what="trl_anchor_step", B=batch, K=1, min_s=best, med_s=med, peak_GiB=peak)
            except ImportError as e:
                emit(what="trl_anchor_step", B=batch, skipped=f"trl/peft not importable: {e}")
            except Exception as e:  # noqa: BLE001 — the anchor is third-party code; report and go on
                emit(what="trl_anchor_step", B=batch, error=repr(e)[:300])


if __name__ == "__main__":
    main()
