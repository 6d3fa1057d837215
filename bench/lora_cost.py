"""What a LoRA costs on the SD1.5-shaped UNet: RewardLab's adapter (a parametrization, W + ΔW materialised at every
call) against PEFT's (the low-rank path added to the layer's output), r4 on the attention projections, CFG batch.

Per variant (none / rewardlab / peft): one no-grad forward, and one forward + backward to the LoRA parameters (no
checkpointing), in seconds (wall and CPU) and memory growth over the models (CUDA allocated / CPU peak RSS; run the
CPU case with glibc returning freed memory at once, as draft_step.py --isolate does:
MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072). Needs peft for its row.

    python bench/lora_cost.py --latent 16          # CPU
    python bench/lora_cost.py --latent 64          # GPU (bf16)
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import measure  # noqa: E402
from draft_step import emit, sd15_unet  # noqa: E402

from rewardlab.training.lora import ATTENTION_TARGETS, inject_lora, lora_parameters, remove_lora  # noqa: E402


def cost(unet, params, inputs, device):
    def forward():
        with torch.no_grad():
            unet(*inputs)

    def forward_backward():
        torch.autograd.grad(unet(*inputs).sample.float().square().mean(), params)

    row = {}
    for name, fn in (("nograd", forward), ("fwd_bwd", forward_backward) if params else (None, None)):
        if fn is None:
            continue
        fn()                                  # warm-up
        with measure(device) as m:
            fn()
        row.update({f"{name}_s": m["s"], f"{name}_cpu_s": m["cpu_s"], f"{name}_growth_GiB": m["growth_GiB"]})
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latent", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1, help="images (the UNet sees twice as many rows: CFG)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        unet = sd15_unet(args.tiny).to(dtype).requires_grad_(False).eval()
    rows = 2 * args.batch
    inputs = (torch.randn(rows, 4, args.latent, args.latent, device=device, dtype=dtype),
              torch.full((rows,), 500.0, device=device),
              torch.randn(rows, 77, unet.config.cross_attention_dim, device=device, dtype=dtype))
    common = dict(what="lora_cost", device=device, dtype=str(dtype).replace("torch.", ""), latent=args.latent,
                  B=args.batch, threads=torch.get_num_threads())
    emit(args.out, lora="none", **common, **cost(unet, [], inputs, device))
    adapters = inject_lora(unet, rank=4, alpha=4, targets=ATTENTION_TARGETS)
    params = lora_parameters(adapters)
    with torch.no_grad():
        for a in adapters.values():
            a.up.normal_(0, 0.01)
    for p in params:
        p.requires_grad_(True)
    emit(args.out, lora="rewardlab", **common, **cost(unet, params, inputs, device))
    remove_lora(unet, adapters)
    try:
        from peft import LoraConfig
    except ImportError as e:
        emit(args.out, lora="peft", skipped=f"peft not importable: {e}", **common)
        return
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=list(ATTENTION_TARGETS)))
    params = [p for p in unet.parameters() if p.requires_grad]
    emit(args.out, lora="peft", **common, **cost(unet, params, inputs, device))


if __name__ == "__main__":
    main()
