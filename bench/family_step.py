"""One DRaFT-1 training step of an SDXL-shaped and a Flux-shaped random model at native resolution (1024²), batch 1,
bf16, LoRA r8 on the attention projections, a CLIP-L-sized reward: seconds per step and peak GPU memory, to set
beside what a 24 GB card holds (docs/memory.md estimates the same steps from meta-device forwards).

Standalone path (TorchBundle over diffusers modules, as ``rewardlab train`` runs diffusers folders): the grad step
and the VAE decode are recomputed in backward. ``blocks`` rows also recompute each block of the network in its own
backward (what ComfyUI's path does with checkpointing on; here a bench-side patch of the blocks' forwards with the
runner's ``recompute_in_backward``), which is what lets the large models fit.

  SDXL  UNet 2.6B, CFG 5 (batch 2 per image), 50 steps on the "leading" discrete schedule
  Flux  dev-shaped transformer 11.9B (19 double + 38 single blocks), guidance-distilled (no CFG batch), 28 steps,
        flow schedule with shift 3.16 (the dynamic shift at 4096 image tokens)

    python bench/family_step.py [--families sdxl flux] [--blocks on off]
    python bench/family_step.py --tiny          # CPU smoke run with small shapes
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import measure  # noqa: E402
from draft_step import AestheticLikeReward, emit, environment  # noqa: E402
from reno import SD_VAE, SDXL_UNET, TINY_SDXL_UNET  # noqa: E402

from rewardlab.samplers import DiscreteDenoiser, FlowDenoiser  # noqa: E402
from rewardlab.samplers.runner import checkpointed  # noqa: E402
from rewardlab.samplers.sigmas import scaled_linear_model_sigmas  # noqa: E402
from rewardlab.training.bundle import TorchBundle  # noqa: E402
from rewardlab.training.draft import DraftConfig, Trainer  # noqa: E402
from rewardlab.training.lora import remove_lora  # noqa: E402
from rewardlab.training.pipelines import FluxNet  # noqa: E402

FLUX = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56))
TINY_FLUX = dict(FLUX, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
FLUX_VAE = dict(SD_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
TINY_VAE = dict(SD_VAE, block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=16)
BLOCK_CLASSES = ("ResnetBlock2D", "Transformer2DModel", "Downsample2D", "Upsample2D", "FluxTransformerBlock",
                 "FluxSingleTransformerBlock")


def checkpoint_blocks(network):
    """Recompute each block of a diffusers network in its own backward (patches the blocks' forwards); returns
    the patched blocks (``del block.forward`` undoes a patch)."""
    blocks = [m for m in network.modules() if type(m).__name__ in BLOCK_CLASSES]
    for m in blocks:
        m.forward = checkpointed(m.forward)
    return blocks


def vae_decoder(vae, scale, shift, dtype):
    def decode(z):
        return (vae.decode((z / scale + shift).to(dtype)).sample.float() / 2 + 0.5).clamp(0, 1)
    return decode


def build_sdxl(tiny, device, dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    cfg = TINY_SDXL_UNET if tiny else SDXL_UNET
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(cfg).to(dtype).eval().requires_grad_(False)
        vae = AutoencoderKL.from_config(TINY_VAE if tiny else SD_VAE).to(dtype).eval().requires_grad_(False)
    latent = cfg["sample_size"]
    size = latent * 2 ** (len(vae.config.block_out_channels) - 1)
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    g = torch.Generator().manual_seed(3)
    text = torch.randn(1, 77, cfg["cross_attention_dim"], generator=g).to(device, dtype)
    pool = torch.randn(1, pooled, generator=g).to(device, dtype)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=dtype, device=device)

    def encode(prompts):
        n = len(prompts)
        zero = all(p == "" for p in prompts)          # SDXL's empty negative is zeros
        t, p = (torch.zeros_like(text), torch.zeros_like(pool)) if zero else (text, pool)
        return {"encoder_hidden_states": t.expand(n, -1, -1),
                "added_cond_kwargs": {"text_embeds": p.expand(n, -1), "time_ids": time_ids.expand(n, -1)}}

    den = DiscreteDenoiser(unet, torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000,
                                                                  dtype=torch.float64) ** 2, 0)).to(device)
    bundle = TorchBundle(den, encode, vae_decoder(vae, 0.13025, 0.0, dtype), (4, latent, latent),
                         model_sigmas=scaled_linear_model_sigmas(), lora_root=unet, device=device,
                         checkpoint_decode=True)
    return unet, bundle, dict(cfg=5.0, steps=50, scheduler="leading", size=size)


def build_flux(tiny, device, dtype):
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)                    # 12B parameters: never materialise them in fp32
    try:
        with torch.device(device):
            net = FluxTransformer2DModel(**(TINY_FLUX if tiny else FLUX)).eval().requires_grad_(False)
            vae = AutoencoderKL.from_config(dict(TINY_VAE, latent_channels=16, use_quant_conv=False,
                                                 use_post_quant_conv=False) if tiny else FLUX_VAE)
            vae = vae.to(dtype).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(old)
    c = net.config
    latent = 16 if tiny else 128
    size = latent * 2 ** (len(vae.config.block_out_channels) - 1)
    g = torch.Generator().manual_seed(3)
    text = torch.randn(1, 8 if tiny else 512, c.joint_attention_dim, generator=g).to(device, dtype)
    pool = torch.randn(1, c.pooled_projection_dim, generator=g).to(device, dtype)

    def encode(prompts):
        n = len(prompts)
        return {"encoder_hidden_states": text.expand(n, -1, -1), "pooled_projections": pool.expand(n, -1),
                "guidance": torch.full((n,), 3.5, device=device, dtype=torch.float32)}

    model = FlowDenoiser(FluxNet(net), num_train_timesteps=1)
    bundle = TorchBundle(model, encode, vae_decoder(vae, 0.3611, 0.1159, dtype), (16, latent, latent),
                         flow_shift=3.16, lora_root=net, device=device, checkpoint_decode=True)
    return net, bundle, dict(cfg=1.0, steps=28, scheduler="simple", size=size)


def step_row(bundle, reward, settings, steps, device, reps):
    cfg = DraftConfig(method="draft_k", k=1, steps=steps, scheduler=settings["scheduler"], cfg=settings["cfg"],
                      batch_size=1, rank=8, targets="attention", lr=1e-4, precision="bf16", checkpointing=True,
                      max_grad_norm=1.0)
    trainer = Trainer(bundle, reward, cfg, prompts=["a photo"])
    try:
        runs = []
        for _ in range(1 + reps):
            with measure(device) as m:
                trainer.train_step()
            runs.append(m)
    finally:
        remove_lora(bundle.lora_root, trainer.adapters)
    timed = runs[1:] or runs
    return dict(min_s=min(r["s"] for r in timed), first_s=runs[0]["s"],
                peak_GiB=max(r["peak_GiB"] for r in timed), growth_GiB=max(r["growth_GiB"] for r in timed),
                lora_M=sum(p.numel() for p in trainer.params) / 1e6)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small shapes on the CPU (smoke run)")
    ap.add_argument("--families", nargs="+", default=["sdxl", "flux"], choices=("sdxl", "flux"))
    ap.add_argument("--blocks", nargs="+", default=["on", "off"], choices=("on", "off"),
                    help="block checkpointing settings to time, in this order")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the family's; 3 with --tiny)")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--device", default=None, help="default: cuda when available (cpu with --tiny)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        reward = AestheticLikeReward(args.tiny, dtype).to(device, dtype)   # open_clip builds on the CPU
    emit(args.out, what="family_setup", device=device, tiny=args.tiny, **environment(device))
    for family in args.families:
        torch.manual_seed(0)
        net, bundle, settings = (build_sdxl if family == "sdxl" else build_flux)(args.tiny, device, dtype)
        steps = args.steps or (3 if args.tiny else settings["steps"])
        params = sum(p.numel() for p in net.parameters()) / 1e9
        for blocks in args.blocks:
            patched = checkpoint_blocks(net) if blocks == "on" else []
            head = dict(what="family_step", family=family, blocks=blocks, B=1, K=1, steps=steps, cfg=settings["cfg"],
                        size=settings["size"], params_B=params, device=device, dtype=str(dtype).replace("torch.", ""),
                        tiny=args.tiny, n_blocks=len(patched))
            try:
                row = step_row(bundle, reward, settings, steps, device, args.reps)
                # a 24 GB card has 22.35 GiB, of which the CUDA context and allocator slack take about 0.8
                row["fits_24GB"] = row["peak_GiB"] <= 21.5 if device == "cuda" else None
                emit(args.out, **head, **row)
            except torch.cuda.OutOfMemoryError as e:
                emit(args.out, **head, error="OOM: " + str(e)[:200])
            finally:
                for m in patched:
                    del m.forward
            if device == "cuda":
                torch.cuda.empty_cache()
        del net, bundle
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
