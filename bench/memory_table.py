"""Memory of a DRaFT-1 step per model family, at its native resolution, in bf16 (prints JSON lines).

Needs a ComfyUI checkout (COMFYUI_PATH): the models are ComfyUI's own classes with the published configurations,
built on the ``meta`` device (no memory, no weights). For each family it reports

  params            diffusion-model parameters
  lora_params       LoRA parameters at rank 8 for each targets choice (training.lora.family_targets)
  saved_gib         what one model call that records gradients saves for backward, counted with saved-tensor hooks
                    on a meta forward (batch 2 with CFG; 1 for guidance-distilled Flux): activations, and the
                    weights the layers keep (``weight_copies_gib``: ComfyUI layers on a grad-ready clone work on a
                    copy of each weight, so those are extra memory)
  vae_saved_gib     the same for the differentiable VAE decode of one image
  saved_blocks_gib  the same with the model's blocks recomputed in backward (checkpointing on, in ComfyUI)
  estimate_gib      weights + saved + weight copies + VAE decode + LoRA training state (16 bytes/param) + a
                    CLIP-L-sized reward (0.9 GiB): the peak of a DRaFT-1 step when only the step is recomputed
  estimate_blocks_tiled_gib   the same with block checkpointing and a VAE decode in 512 px tiles

Attention is counted with PyTorch's math kernel (meta tensors), which keeps the attention matrix; flash attention on
a GPU keeps only its log-sum-exp, so real activations are smaller where sequences are long.

    COMFYUI_PATH=/path/to/ComfyUI python bench/memory_table.py [--families sd15 sdxl sd3 flux lumina2]

``--fixtures`` checks the method against measurement: for the small models of tests/comfyui/families.py (the same
classes, random weights, fp32, on the CPU) at two latent sizes it prints, beside the meta-device estimate, what a real
grad call keeps in RSS once its forward is done (under the runner's ``inplace_safe``, as DRaFT runs it), with and
without block checkpointing, and the peak RSS growth of the checkpointed call's backward. Each measurement runs in
its own process, with glibc told to return freed memory at once (bench/_timing.py).
"""
import argparse
import gc
import json
import os
import subprocess
import sys

GIB = 2 ** 30
HERE = os.path.dirname(os.path.abspath(__file__))


def load_comfyui():
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout")
    sys.path.insert(0, path)
    from comfy.cli_args import args
    args.cpu, args.use_pytorch_cross_attention = True, True       # meta tensors: no memory-dependent attention
    import comfy.model_management  # noqa: F401


def families(torch, ops):
    """name -> (builder, inputs(batch) -> kwargs of forward, latent (C, H, W), distilled)."""
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.lumina.model import NextDiT
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    def meta(*shape):
        return torch.randn(*shape, device="meta", dtype=torch.bfloat16)

    def unet(**kw):
        return lambda: UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320,
                                 use_spatial_transformer=True, legacy=False, operations=ops,
                                 dtype=torch.bfloat16, **kw)

    return {
        "sd15": (unet(num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                      transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
                      context_dim=768, num_heads=8, use_linear_in_transformer=False),
                 lambda b: dict(context=meta(b, 77, 768)), (4, 64, 64), False),
        "sdxl": (unet(num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                      transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10,
                      context_dim=2048, num_head_channels=64, use_linear_in_transformer=True, adm_in_channels=2816,
                      num_classes="sequential"),
                 lambda b: dict(context=meta(b, 77, 2048), y=meta(b, 2816)), (4, 128, 128), False),
        "sd3": (lambda: MMDiT(in_channels=16, out_channels=16, patch_size=2, depth=24, adm_in_channels=2048,
                              context_embedder_config={"target": "torch.nn.Linear",
                                                       "params": {"in_features": 4096, "out_features": 1536}},
                              pos_embed_max_size=192, num_patches=192 * 192, pos_embed_scaling_factor=None,
                              operations=ops, dtype=torch.bfloat16),
                lambda b: dict(context=meta(b, 333, 4096), y=meta(b, 2048)), (16, 128, 128), False),
        "flux": (lambda: Flux(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                              hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38,
                              axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
                              operations=ops, dtype=torch.bfloat16),
                 lambda b: dict(context=meta(b, 512, 4096), y=meta(b, 768),
                                guidance=torch.ones(b, device="meta")), (16, 128, 128), True),
        "lumina2": (lambda: NextDiT(patch_size=2, in_channels=16, dim=2304, n_layers=26, n_heads=24, n_kv_heads=8,
                                    qk_norm=True, cap_feat_dim=2304, axes_dims=[32, 32, 32], axes_lens=[300, 512, 512],
                                    operations=ops, dtype=torch.bfloat16),
                    lambda b: dict(context=meta(b, 256, 2304), num_tokens=256), (16, 128, 128), False),
    }


def saved_bytes(torch, run):
    """(bytes of activations, bytes of tensors without history (weights, inputs)) saved for backward by ``run()``."""
    totals = {"activations": 0, "weights": 0}

    def pack(t):
        totals["activations" if t.grad_fn is not None else "weights"] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return totals["activations"], totals["weights"]


def tensor_bytes(value):
    import torch
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    return 0


def saved_with_blocks(torch, model, run):
    """Saved bytes of one grad call with every block recomputed in backward (host.grad.checkpoint_blocks):
    (what the call keeps outside the blocks plus the blocks' inputs, the largest block's own activations: alive
    while that block is recomputed)."""
    from rewardlab.host.grad import model_blocks
    per_block, inputs = [], [0]
    for _, block in model_blocks(model):
        def counted(*args, _forward=block.forward, **kwargs):
            box = {}
            acts, _ = saved_bytes(torch, lambda: box.setdefault("out", _forward(*args, **kwargs)))
            per_block.append(acts)
            inputs[0] += tensor_bytes(args) + tensor_bytes(kwargs)
            return box["out"]
        block.forward = counted
    outside, _ = saved_bytes(torch, run)
    return outside + inputs[0], max(per_block, default=0)


def vae_decoder_saved(torch, ops, latent):
    from comfy.ldm.modules.diffusionmodules.model import Decoder
    c, h, w = latent
    with torch.device("meta"):
        dec = Decoder(ch=128, out_ch=3, ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0,
                      in_channels=3, resolution=256, z_channels=c, double_z=True).to(torch.bfloat16)
    z = torch.randn(1, c, h, w, device="meta", dtype=torch.bfloat16, requires_grad=True)
    acts, _ = saved_bytes(torch, lambda: dec(z))
    return acts


def lora_params(torch, model, rank=8):
    from rewardlab.training.lora import TARGET_CHOICES, family_targets
    modules = dict(model.named_modules())
    out = {}
    for choice in TARGET_CHOICES:
        total = 0
        for t in family_targets(model, choice):
            w = modules[t.module].weight
            rows = t.rows[1] if t.rows else w.shape[0]
            total += rank * (rows + w[0].numel())
        out[choice] = total
    return out


def row(name, spec, torch, ops):
    build, inputs, latent, distilled = spec
    with torch.device("meta"):
        model = build()
    batch = 1 if distilled else 2
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(batch, *latent, device="meta", dtype=torch.bfloat16, requires_grad=True)
    t = torch.ones(batch, device="meta")
    acts, weights = saved_bytes(torch, lambda: model(x, t, **inputs(batch)))
    blocks = sum(saved_with_blocks(torch, model, lambda: model(x, t, **inputs(batch))))
    vae = vae_decoder_saved(torch, ops, latent)
    vae_tile = vae_decoder_saved(torch, ops, (latent[0], 64, 64))        # 512 px tiles, one alive at a time
    lora = lora_params(torch, model)
    fixed = 2 * params + 16 * lora["attention"] + 0.9 * GIB               # weights, LoRA training state, reward
    return {"family": name, "resolution": latent[-1] * 8, "params_b": round(params / 1e9, 3),
            "lora_params_m_rank8": {k: round(v / 1e6, 2) for k, v in lora.items()},
            "lora_file_mib_rank8_fp32": {k: round(4 * v / 2 ** 20, 1) for k, v in lora.items()},
            "cfg_batch": batch, "saved_gib": round(acts / GIB, 2), "weight_copies_gib": round(weights / GIB, 2),
            "saved_blocks_gib": round(blocks / GIB, 2), "vae_saved_gib": round(vae / GIB, 2),
            "vae_tiled_saved_gib": round(vae_tile / GIB, 2),
            "estimate_gib": round((fixed + acts + weights + vae) / GIB, 1),
            "estimate_blocks_tiled_gib": round((fixed + blocks + vae_tile) / GIB, 1)}


# --- the estimate against measurement, on the test fixtures ----------------------------------------------------------

# name -> (constructor in tests/comfyui/families.py, inputs(batch, make_tensor) -> forward kwargs, latent channels,
# guidance-distilled, latent sides measured)
FIXTURES = {
    "sdxl": ("make_sdxl_unet", lambda b, t: dict(context=t(b, 77, 2048), y=t(b, 2816)), 4, False, (32, 64)),
    "sd3": ("make_sd3_mmdit", lambda b, t: dict(context=t(b, 77, 4096), y=t(b, 2048)), 16, False, (32, 64)),
    "flux": ("make_flux", lambda b, t: dict(context=t(b, 256, 4096), y=t(b, 768), guidance=t(b).abs()), 16, True,
             (32, 64)),
    "lumina2": ("make_lumina2", lambda b, t: dict(context=t(b, 128, 64), num_tokens=128), 16, False, (32, 64)),
}


def fixture_estimate(torch, make, inputs, shape):
    """(activations one grad call saves, and with blocks checkpointed: (kept after the forward, the largest block))
    from a meta forward, fp32."""
    with torch.device("meta"):
        model = make(dtype=torch.float32)
    x = torch.randn(*shape, device="meta", requires_grad=True)
    t = torch.ones(shape[0], device="meta")
    kwargs = inputs(shape[0], lambda *s: torch.randn(*s, device="meta"))
    acts, _ = saved_bytes(torch, lambda: model(x, t, **kwargs))
    return acts, saved_with_blocks(torch, model, lambda: model(x, t, **kwargs))


def _rss():
    from _timing import _status_bytes
    gc.collect()
    return _status_bytes("VmRSS")


def measure_fixture(name, side):
    """One row of ``--fixtures`` (runs in its own process)."""
    load_comfyui()
    import torch
    sys.path[:0] = [HERE, os.path.join(HERE, "..", "tests", "comfyui")]
    import families as fixture_models
    from _timing import measure
    from rewardlab.host.grad import model_blocks
    from rewardlab.samplers.runner import checkpointed, inplace_safe

    constructor, inputs, channels, distilled, _ = FIXTURES[name]
    make = getattr(fixture_models, constructor)
    shape = (1 if distilled else 2, channels, side, side)
    acts, (blocks_kept, largest_block) = fixture_estimate(torch, make, inputs, shape)

    torch.manual_seed(0)
    model = make(dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)     # comfy ops leave weights uninitialised; the values do not change the memory
    x = torch.randn(*shape, requires_grad=True)
    t = torch.full((shape[0],), 0.5)
    kwargs = inputs(shape[0], torch.randn)

    def grad_call():
        with inplace_safe():                   # as the runner's grad steps call the model
            return model(x, t, **kwargs)

    start = _rss()
    with measure("cpu") as forward:
        out = grad_call()
    kept = _rss() - start
    del out
    for _, block in model_blocks(model):
        block.forward = checkpointed(block.forward)
    start = _rss()
    out = grad_call()
    kept_blocks = _rss() - start
    with measure("cpu") as backward:
        torch.autograd.grad(out.square().mean(), x)
    blocks_peak = kept_blocks + backward["growth_GiB"] * GIB

    def gib(n):
        return round(n / GIB, 4)
    return {"family": name, "latent": side, "batch": shape[0], "dtype": "fp32",
            "estimate_saved_gib": gib(acts), "rss_kept_gib": gib(kept), "ratio": round(kept / acts, 2),
            "estimate_blocks_kept_gib": gib(blocks_kept), "rss_blocks_kept_gib": gib(kept_blocks),
            "ratio_blocks_kept": round(kept_blocks / blocks_kept, 2),
            "estimate_blocks_peak_gib": gib(blocks_kept + largest_block), "rss_blocks_peak_gib": gib(blocks_peak),
            "ratio_blocks_peak": round(blocks_peak / (blocks_kept + largest_block), 2),
            "forward_peak_growth_gib": round(forward["growth_GiB"], 4), "forward_cpu_s": round(forward["cpu_s"], 1)}


def check_fixtures(names):
    from _timing import MALLOC_ENV
    env = {**os.environ, **MALLOC_ENV, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    for name in names:
        for side in FIXTURES[name][4]:
            proc = subprocess.run([sys.executable, __file__, "--measure-fixture", name, str(side)], env=env,
                                  capture_output=True, text=True)
            if proc.returncode:
                print(json.dumps({"family": name, "latent": side, "error": proc.stderr.strip()[-2000:]}), flush=True)
            else:
                print(proc.stdout.strip().splitlines()[-1], flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", default=["sd15", "sdxl", "sd3", "flux", "lumina2"])
    p.add_argument("--fixtures", nargs="*", metavar="FAMILY",
                   help=f"check the estimate against peak RSS on the test fixtures ({', '.join(FIXTURES)}; "
                        "none named: all)")
    p.add_argument("--measure-fixture", nargs=2, metavar=("FAMILY", "LATENT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure_fixture:
        print(json.dumps(measure_fixture(args.measure_fixture[0], int(args.measure_fixture[1]))), flush=True)
        return
    if args.fixtures is not None:
        check_fixtures(args.fixtures or list(FIXTURES))
        return
    load_comfyui()
    import comfy.ops
    import torch
    specs = families(torch, comfy.ops.disable_weight_init)
    for name in args.families:
        print(json.dumps(row(name, specs[name], torch, comfy.ops.disable_weight_init)), flush=True)


if __name__ == "__main__":
    main()
