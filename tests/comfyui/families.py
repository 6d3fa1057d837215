"""Download-free, random-weight models of the families ComfyUI users run, built with ComfyUI's own classes and
written as safetensors, so that ComfyUI's own detection (UNETLoader / CLIPLoader / VAELoader) classifies them:

    sdxl    a Segmind-Vega-shaped UNet (the smallest SDXL-family config ComfyUI knows)
            + CLIP-L and CLIP-G through DualCLIPLoader "sdxl"; SD VAE (4 channels)
    sd3     an MMDiT of depth 2 (ComfyUI ties the width to the depth: 128) + CLIP-L/CLIP-G ("sd3"); 16-channel VAE
    flux    Flux with one double and one single block (ComfyUI fixes the width at 3072), guidance-distilled (dev);
            T5-XXL is too big for a CPU test, so its CONDITIONING is built in the test; 16-channel VAE
    lumina2 Lumina 2 (NextDiT) with one layer (ComfyUI fixes the width at 2304); Gemma is too big, so its
            CONDITIONING is built in the test; 16-channel VAE

Every builder initialises deterministically (comfy ops leave parameters uninitialised).
"""
import torch

FAMILY_FILES = {
    "sdxl": ("sdxl_vega_unet.safetensors", "SDXL"),
    "sd3": ("sd3_mmdit_d2.safetensors", "SD3"),
    "flux": ("flux_1x1.safetensors", "Flux"),
    "lumina2": ("lumina2_1layer.safetensors", "Lumina2"),
}
CLIP_G_FILE = "tiny_clip_g.safetensors"
VAE16_FILE = "vae_16ch.safetensors"


def init_(module, std=0.02, seed=0):
    """Matrices ~ N(0, std), norm weights 1, biases 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith(("weight", "scale")):
                p.fill_(1.0)
            else:
                p.zero_()
        for name, b in module.named_buffers():        # tables built with torch.empty (MMDiT's positional table)
            if name.endswith("pos_embed"):
                b.copy_(torch.randn(b.shape, generator=g) * std)


def save(module, path, dtype=torch.float16):
    import safetensors.torch
    sd = {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}
    safetensors.torch.save_file(sd, str(path))


def make_sdxl_unet(**kw):
    """The fixture's network, uninitialised (``kw``: dtype/device for ComfyUI's constructors; bench/memory_table.py
    measures these)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[2, 2, 2],
                     channel_mult=[1, 2, 4],
                     transformer_depth=[0, 0, 1, 1, 2, 2], transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1],
                     transformer_depth_middle=1, context_dim=2048, num_head_channels=64,
                     use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential",
                     use_spatial_transformer=True, legacy=False, operations=comfy.ops.disable_weight_init, **kw)


def build_sdxl_unet(path):
    unet = make_sdxl_unet()
    init_(unet, seed=11)
    save(unet, path)


def make_sd3_mmdit(**kw):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    return MMDiT(in_channels=16, out_channels=16, patch_size=2, depth=2, adm_in_channels=2048,
                 context_embedder_config={"target": "torch.nn.Linear",
                                          "params": {"in_features": 4096, "out_features": 128}},
                 pos_embed_max_size=32, num_patches=32 * 32, pos_embed_scaling_factor=None,
                 operations=comfy.ops.disable_weight_init, **kw)


def build_sd3_mmdit(path):
    mmdit = make_sd3_mmdit()
    init_(mmdit, seed=12)
    save(mmdit, path)


def make_flux(**kw):
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    return Flux(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56],
                theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
                operations=comfy.ops.disable_weight_init, **kw)


def build_flux(path):
    flux = make_flux()
    init_(flux, std=0.01, seed=13)
    save(flux, path, torch.bfloat16)


def make_lumina2(**kw):
    import comfy.ops
    from comfy.ldm.lumina.model import NextDiT

    return NextDiT(patch_size=2, in_channels=16, dim=2304, n_layers=1, n_heads=24, n_kv_heads=8, qk_norm=True,
                   cap_feat_dim=LUMINA_TEXT_DIM, axes_dims=[32, 32, 32], axes_lens=[300, 512, 512],
                   operations=comfy.ops.disable_weight_init, **kw)


def build_lumina2(path):
    dit = make_lumina2()
    init_(dit, std=0.01, seed=14)
    save(dit, path, torch.bfloat16)


LUMINA_TEXT_DIM = 64


def build_clip_g(path):
    import json
    import os

    import comfy.clip_model
    import comfy.ops
    import comfy.sdxl_clip

    with open(os.path.join(os.path.dirname(comfy.sdxl_clip.__file__), "clip_config_bigg.json")) as f:
        config = json.load(f)
    model = comfy.clip_model.CLIPTextModel(config, torch.float32, "cpu", comfy.ops.disable_weight_init)
    init_(model, seed=15)
    save(model, path)


def build_vae16(path):
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = AutoencodingEngine(regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
                             encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder",
                                             "params": ddconfig},
                             decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder",
                                             "params": ddconfig})
    init_(vae, seed=16)
    save(vae, path)


BUILDERS = {"sdxl": build_sdxl_unet, "sd3": build_sd3_mmdit, "flux": build_flux, "lumina2": build_lumina2}
