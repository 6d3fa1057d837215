"""Benchmark of one DRaFT training step (seconds per optimiser step, peak memory), RewardLab's trainer vs the
TRL 0.23.1 anchor ``trl.models.modeling_sd_base.pipeline_step_with_grad`` on the same random model.

Setup (issue 4): an SD1.5-shaped random-weight UNet (860M), 512² (latent 64²), DDIM 50 steps (η = 0, the "leading"
spacing diffusers uses for SD), CFG 7.5, LoRA r4 on the attention projections, bf16, batch 1 and 4,
DRaFT-K for K ∈ {1, 10, 50} and DRaFT-LV n=2. The reward is an aesthetic-style scorer of the same size as the usual
one (random CLIP ViT-L/14 image tower + MLP head) on the VAE-decoded image; the step and the VAE decode are
recomputed in backward (TorchBundle with checkpoint_decode; the ComfyUI path checkpoints block by block instead).

Speed levers of RewardLab's no-grad prefix (``--modes``; DraftConfig.compile_prefix / cuda_graphs):
  eager               plain PyTorch
  compile             torch.compile of the denoiser for calls without grad (``--compile-backend``, inductor)
  cudagraphs          the eager kernels captured in CUDA graphs (torch's cudagraphs backend; CUDA only)
  compile+cudagraphs  inductor's reduce-overhead mode: compiled kernels, captured (CUDA only)
Rows of a non-eager mode also report ``prefix_rel_err``: the relative L2 difference between images sampled without
grad through that prefix and through the eager one (same LoRA, same noise).

Memory: on CUDA ``peak_GiB`` is max_memory_allocated during a step (weights included, as in the TRL protocol) and
``growth_GiB`` that minus what was allocated before it. On the CPU ``growth_GiB`` is the growth of the process's
peak RSS over its RSS before the step (the kernel's high-water mark, reset per step): activation memory does not
depend on the device, so the ratio to TRL is a first check of the memory target.

    python bench/draft_step.py                 # GPU, full size, in one process (RewardLab rows, then TRL's)
    python bench/draft_step.py --tiny          # CPU smoke run with small shapes (exercises the same code)
    python bench/draft_step.py --isolate --latent 16 --steps 4 --batches 1 --ks 1 --lv-n 0 --reps 1 \\
        --out bench/results/draft_step_cpu.jsonl   # CPU memory check: each side in its own process, with ratios

The anchor runs only when ``trl`` (0.23.1) and ``peft`` are importable (install them with ``pip install --no-deps
--target DIR trl==0.23.1 peft accelerate`` and put DIR on PYTHONPATH); it adds a PEFT LoRA of the same rank and
targets to the same UNet, fixed truncation K=1, after RewardLab's runs (or in its own process with ``--isolate``).
"""
import argparse
import gc
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import MALLOC_ENV, measure  # noqa: E402

from rewardlab.samplers import DiscreteDenoiser  # noqa: E402
from rewardlab.samplers.sigmas import scaled_linear_model_sigmas  # noqa: E402
from rewardlab.training.bundle import TorchBundle  # noqa: E402
from rewardlab.training.draft import DraftConfig, Trainer  # noqa: E402
from rewardlab.training.lora import ATTENTION_TARGETS, remove_lora  # noqa: E402

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MODES = {"eager": (False, False), "compile": (True, False), "cudagraphs": (False, True),
         "compile+cudagraphs": (True, True)}          # mode -> (compile the prefix, capture it in CUDA graphs)


def emit(out=None, **kw):
    line = json.dumps(kw)
    print(line, flush=True)
    if out:
        with open(out, "a", encoding="utf-8") as f:
            f.write(line + "\n")


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


def build(tiny, device, dtype, latent=None):
    """Models with random weights, initialised on ``device`` (fast on a GPU); ``latent``: the latent side (default:
    the UNet's sample size, 64 = 512² for SD1.5)."""
    torch.manual_seed(0)
    with torch.device(device):
        unet = sd15_unet(tiny).requires_grad_(False).eval().to(dtype)
        vae = sd_vae(tiny).requires_grad_(False).eval().to(dtype)
        reward = AestheticLikeReward(tiny, dtype).to(device, dtype)   # open_clip builds on the CPU
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
    latent = latent or unet.config.sample_size
    bundle = TorchBundle(den, encode, decode, (4, latent, latent), model_sigmas=scaled_linear_model_sigmas(),
                         lora_root=unet, device=device, checkpoint_decode=True)
    return unet, vae, reward, bundle, (cond, uncond)


def timed(fn, device, warm=1, reps=2):
    """Seconds and memory of ``reps`` calls after ``warm`` warm-up calls (the first call's are reported too: with a
    compiled prefix it includes the compilation)."""
    first = []
    for _ in range(warm):
        with measure(device) as m:
            fn()
        first.append(m)
    runs = []
    for _ in range(reps):
        with measure(device) as m:
            fn()
        runs.append(m)
    times = sorted(r["s"] for r in runs)
    row = dict(min_s=times[0], med_s=times[len(times) // 2], first_s=first[0]["s"] if first else None,
               min_cpu_s=min(r["cpu_s"] for r in runs),
               peak_GiB=max(r["peak_GiB"] for r in runs), growth_GiB=max(r["growth_GiB"] for r in runs),
               first_growth_GiB=first[0]["growth_GiB"] if first else None)
    if "exact" in runs[0]:
        row["peak_reset"] = all(r["exact"] for r in first + runs)
    return row


def prefix_agreement(trainer, bundle, batch):
    """Images sampled without grad through the fast prefix against the eager prefix (same LoRA, same noise)."""
    prompts = ["a photo"] * batch
    fast_images, fast_rewards = trainer.sample_images(prompts)
    fast = bundle.__dict__.pop("_fast")
    try:
        eager_images, eager_rewards = trainer.sample_images(prompts)
    finally:
        bundle._fast = fast
    return {"prefix_rel_err": float((fast_images - eager_images).norm() / eager_images.norm()),
            "prefix_reward_abs_diff": float((fast_rewards - eager_rewards).abs().max())}


def bench_rewardlab(bundle, reward, device, batch, method, k, steps, reps, mode="eager", backend="inductor",
                    lv_n=2):
    compiled, graphs = MODES[mode]
    cfg = DraftConfig(method=method, k=k, lv_n=lv_n, steps=steps, scheduler="leading", cfg=7.5, batch_size=batch,
                      rank=4, alpha=4, targets=ATTENTION_TARGETS, lr=1e-4, precision="bf16", checkpointing=True,
                      max_grad_norm=1.0, compile_prefix=backend if compiled else None, cuda_graphs=graphs)
    trainer = Trainer(bundle, reward, cfg, prompts=["a photo"])
    try:
        row = timed(trainer.train_step, device, reps=reps)
        if "_fast" in bundle.__dict__:
            row.update(prefix_agreement(trainer, bundle, batch))
        elif mode != "eager":
            row["fell_back"] = "eager prefix (no CUDA device for the graphs)"
    finally:
        remove_lora(bundle.lora_root, trainer.adapters)
        bundle.__dict__.pop("_fast", None)          # the next run starts eager again
        if mode != "eager":
            torch._dynamo.reset()                   # drop compiled code and CUDA-graph pools
        del trainer
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return row


def trl_anchor(unet, vae, reward, embs, device, dtype, steps, k):
    """TRL 0.23.1's AlignProp/DRaFT-K step with fixed truncation, with a PEFT LoRA added to ``unet`` (it stays):
    returns ``batch -> step function``."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from peft import LoraConfig
    from trl.models.modeling_sd_base import pipeline_step_with_grad

    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=list(ATTENTION_TARGETS)))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                          clip_sample=False, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def for_batch(batch, latent):
        cond, uncond = (e.expand(batch, -1, -1) for e in embs)
        latents = torch.randn(batch, 4, latent, latent, generator=torch.Generator().manual_seed(0)).to(device, dtype)

        def step():
            with torch.autocast(device.split(":")[0], dtype=dtype, enabled=device.startswith("cuda")):
                out = pipeline_step_with_grad(pipe, prompt_embeds=cond, negative_prompt_embeds=uncond,
                                              num_inference_steps=steps, guidance_scale=7.5, eta=0.0,
                                              truncated_backprop=True, truncated_backprop_rand=False,
                                              truncated_backprop_timestep=steps - k, gradient_checkpoint=True,
                                              output_type="pt", latents=latents.clone(), height=latent * pipe.vae_scale_factor,
                                              width=latent * pipe.vae_scale_factor)
                loss = -reward(out.images).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    return for_batch


def environment(device):
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run_rewardlab(args, built, device, steps, common):
    unet, vae, reward, bundle, embs = built
    runs = [("draft_k", k) for k in sorted({min(k, steps) for k in args.ks})]
    runs += [("draft_lv", 1)] if args.lv_n else []
    for batch in args.batches:
        for method, k in runs:
            for mode in args.modes:
                head = dict(what="rewardlab_step", B=batch, method=method, K=k,
                            n=args.lv_n if method == "draft_lv" else None, mode=mode, **common)
                try:
                    row = bench_rewardlab(bundle, reward, device, batch, method, k, steps, args.reps, mode,
                                          args.compile_backend, args.lv_n)
                    emit(args.out, **head, **row)
                except torch.cuda.OutOfMemoryError as e:
                    emit(args.out, **head, error="OOM: " + str(e)[:200])
                    torch.cuda.empty_cache()


def run_trl(args, built, device, dtype, steps, common):
    unet, vae, reward, bundle, embs = built
    try:
        for_batch = trl_anchor(unet, vae, reward, embs, device, dtype, steps, 1)
    except ImportError as e:
        emit(args.out, what="trl_anchor_step", skipped=f"trl/peft not importable: {e}", **common)
        return
    for batch in args.batches:
        try:
            row = timed(for_batch(batch, bundle.latent_shape[-1]), device, reps=args.reps)
            emit(args.out, what="trl_anchor_step", B=batch, K=1, **common, **row)
        except Exception as e:  # noqa: BLE001 — the anchor is third-party code; report and go on
            emit(args.out, what="trl_anchor_step", B=batch, error=repr(e)[:300], **common)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()


def isolate(args, argv):
    """Each side in its own process (batch by batch), so that peaks do not mix; then one row of ratios per batch."""
    base = [a for a in argv if a not in ("--isolate",)]
    base = _drop_option(_drop_option(_drop_option(base, "--out"), "--batches"), "--worker")
    env = {**os.environ, **MALLOC_ENV}
    emit(args.out, what="isolate_run", argv=" ".join(["bench/draft_step.py", *argv]), env=MALLOC_ENV,
         threads=os.environ.get("OMP_NUM_THREADS"), cpus=os.cpu_count())
    for batch in args.batches:
        rows = {}
        for side in ("ours", "trl"):
            cmd = [sys.executable, os.path.abspath(__file__), *base, "--worker", side, "--batches", str(batch)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            for line in proc.stdout.splitlines():
                if line.startswith("{"):
                    row = json.loads(line)
                    emit(args.out, **row)
                    rows.setdefault(row["what"], []).append(row)
            if proc.returncode:
                emit(args.out, what="worker_failed", side=side, B=batch, returncode=proc.returncode,
                     stderr=proc.stderr[-1500:])
        ours = [r for r in rows.get("rewardlab_step", []) if r.get("method") == "draft_k" and r.get("K") == 1
                and r.get("mode") == "eager" and "min_s" in r]
        trl = [r for r in rows.get("trl_anchor_step", []) if "min_s" in r]
        if ours and trl:
            o, t = ours[0], trl[0]
            emit(args.out, what="compare_ours_vs_trl", B=batch, device=o["device"], steps=o["steps"],
                 latent=o["latent"], ours_s=o["min_s"], trl_s=t["min_s"], s_ratio=o["min_s"] / t["min_s"],
                 ours_cpu_s=o.get("min_cpu_s"), trl_cpu_s=t.get("min_cpu_s"),
                 cpu_s_ratio=o["min_cpu_s"] / t["min_cpu_s"] if "min_cpu_s" in o and "min_cpu_s" in t else None,
                 ours_growth_GiB=o["growth_GiB"], trl_growth_GiB=t["growth_GiB"],
                 growth_ratio=o["growth_GiB"] / t["growth_GiB"], ours_peak_GiB=o["peak_GiB"],
                 trl_peak_GiB=t["peak_GiB"])


def _drop_option(argv, name):
    """argv without ``name`` and the values after it."""
    out, skip = [], False
    for a in argv:
        if a == name:
            skip = True
            continue
        if skip and not a.startswith("--"):
            continue
        skip = False
        out.append(a)
    return out


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small shapes on CPU (smoke run)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 10, 50])
    ap.add_argument("--lv-n", type=int, default=2, help="DRaFT-LV re-noised copies (0: no DRaFT-LV row)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default 50; 4 with --tiny)")
    ap.add_argument("--latent", type=int, default=None, help="latent side (default: 64 = 512², 8 with --tiny)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["eager"], choices=list(MODES),
                    help="RewardLab prefix modes to time (see above)")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compile modes")
    ap.add_argument("--no-trl", action="store_true", help="skip the TRL anchor")
    ap.add_argument("--worker", choices=("all", "ours", "trl"), default="all",
                    help="run RewardLab's rows, TRL's, or both (RewardLab's first)")
    ap.add_argument("--isolate", action="store_true",
                    help="run each side and batch in its own process (clean CPU peaks) and print the ratios")
    ap.add_argument("--out", default=None, help="also append every JSON line to this file")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.isolate:
        return isolate(args, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    steps = args.steps or (4 if args.tiny else 50)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    built = build(args.tiny, device, dtype, args.latent)
    unet, bundle = built[0], built[3]
    common = dict(device=device, dtype=str(dtype).replace("torch.", ""), steps=steps, latent=bundle.latent_shape[-1],
                  tiny=args.tiny)
    if args.worker in ("all", "ours"):
        emit(args.out, what="setup", unet_M=sum(p.numel() for p in unet.parameters()) / 1e6, **environment(device),
             **common)
        run_rewardlab(args, built, device, steps, common)
    if args.worker in ("all", "trl") and not args.no_trl:
        run_trl(args, built, device, dtype, steps, common)


if __name__ == "__main__":
    main()
