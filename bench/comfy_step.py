"""One DRaFT training step through ComfyUI (the DRaFT Train LoRA node's path: ComfyBundle, a grad-ready clone of the
MODEL, the guider bridge, block checkpointing), on the same random SD1.5-shaped model and settings as
``bench/draft_step.py``'s standalone rows (prints JSON lines).

The full-size model is the diffusers SD1.5 UNet and VAE of draft_step.py, loaded through ComfyUI's own
``load_diffusion_model_state_dict`` and ``VAE(sd=...)`` (which read diffusers keys), so both paths run the same
weights; the schedule is ComfyUI's ``ddim_uniform`` (draft_step.py: diffusers' "leading" spacing, the same steps up
to rounding). ``--tiny`` uses a small ldm-format UNet on the CPU (a smoke run of the same code).

    COMFYUI_PATH=/path/to/ComfyUI python bench/comfy_step.py [--batches 4 1] [--steps 50]
    COMFYUI_PATH=/path/to/ComfyUI python bench/comfy_step.py --tiny
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import measure  # noqa: E402
from draft_step import AestheticLikeReward, emit, environment, sd15_unet, sd_vae  # noqa: E402


def load_comfyui(cpu):
    path = os.environ.get("COMFYUI_PATH")
    if not path or not os.path.isdir(os.path.join(path, "comfy")):
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout")
    sys.path.insert(0, path)
    from comfy.cli_args import args
    args.cpu = cpu                                 # must precede comfy.model_management
    import comfy.model_management  # noqa: F401


def tiny_ldm_unet():
    """An SD1.5-class ldm UNet with one level (what ComfyUI detects as SD1.5 from its keys), randomly initialised."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1],
                     channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
                     transformer_depth_middle=1, context_dim=768, num_heads=8, use_linear_in_transformer=False,
                     use_spatial_transformer=True, legacy=False, operations=comfy.ops.disable_weight_init)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02 if p.ndim >= 2 else
                    torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p))
    return unet


def build(tiny, device, dtype):
    import comfy.sd

    torch.manual_seed(0)
    with torch.device(device):
        unet = tiny_ldm_unet() if tiny else sd15_unet(False)
        vae = sd_vae(False)                       # ComfyUI detects the VAE from the full SD layout's keys
        reward = AestheticLikeReward(tiny, dtype).to(device, dtype)   # open_clip builds on the CPU
    unet_sd = {k: v.detach().to("cpu", dtype) for k, v in unet.state_dict().items()}
    vae_sd = {k: v.detach().to("cpu", dtype) for k, v in vae.state_dict().items()}
    del unet, vae
    with torch.inference_mode():                  # as ComfyUI's loaders run
        model = comfy.sd.load_diffusion_model_state_dict(unet_sd, model_options={"dtype": dtype})
        vae = comfy.sd.VAE(sd=vae_sd, dtype=dtype)
    if model is None:
        raise RuntimeError("ComfyUI did not recognise the UNet state dict")
    g = torch.Generator().manual_seed(1)
    cond = [[torch.randn(1, 77, 768, generator=g).to(dtype), {}]]
    uncond = [[torch.randn(1, 77, 768, generator=g).to(dtype), {}]]
    return model, vae, reward, cond, uncond


def step_row(model, vae, reward, cond, uncond, batch, steps, size, reps, device, blocks):
    from rewardlab.host.bundle import ComfyBundle
    from rewardlab.host.grad import grad_enabled
    from rewardlab.training.draft import DraftConfig, Trainer
    from rewardlab.training.lora import ATTENTION_TARGETS

    cfg = DraftConfig(method="draft_k", k=1, steps=steps, scheduler="ddim_uniform", cfg=7.5, batch_size=batch,
                      rank=4, alpha=4, targets=ATTENTION_TARGETS, lr=1e-4, precision="bf16", checkpointing=True,
                      max_grad_norm=1.0)
    bundle = ComfyBundle(model, vae, size, size, cond, uncond, checkpoint_blocks=blocks)
    runs = []
    with torch.inference_mode(), grad_enabled():
        trainer = Trainer(bundle, reward, cfg, prompts=["a photo"])
        try:
            for _ in range(1 + reps):
                with measure(device) as m:
                    trainer.train_step()
                runs.append(m)
        finally:
            bundle.release()
    timed = runs[1:]
    return dict(min_s=min(r["s"] for r in timed), first_s=runs[0]["s"],
                peak_GiB=max(r["peak_GiB"] for r in timed), growth_GiB=max(r["growth_GiB"] for r in timed))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small ldm UNet on the CPU (smoke run)")
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 1])
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default 50; 3 with --tiny)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--no-blocks", action="store_true", help="also time without block checkpointing")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available, cpu with --tiny)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cuda = (args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")).startswith("cuda")
    load_comfyui(cpu=not cuda)
    import rewardlab.host  # noqa: F401  (installs ComfyUI's runtime)
    import comfy.model_management as mm

    device = str(mm.get_torch_device())
    dtype = torch.bfloat16 if cuda else torch.float32
    steps = args.steps or (3 if args.tiny else 50)
    size = 64 if args.tiny else 512
    model, vae, reward, cond, uncond = build(args.tiny, device, dtype)
    reward = reward.to(device)
    common = dict(device=device, dtype=str(dtype).replace("torch.", ""), steps=steps, latent=size // 8,
                  tiny=args.tiny)
    emit(args.out, what="comfy_setup", **environment(device), **common)
    for batch in args.batches:
        for blocks in (True, False) if args.no_blocks else (True,):
            head = dict(what="comfy_step", B=batch, method="draft_k", K=1, mode="eager", checkpoint_blocks=blocks,
                        **common)
            try:
                emit(args.out, **head, **step_row(model, vae, reward, cond, uncond, batch, steps, size, args.reps,
                                                  device, blocks))
            except torch.cuda.OutOfMemoryError as e:
                emit(args.out, **head, error="OOM: " + str(e)[:200])
                mm.soft_empty_cache()


if __name__ == "__main__":
    main()
