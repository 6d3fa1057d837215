"""`rewardlab train --model` on diffusers SDXL, SD3 and Flux pipeline folders (tiny random ones written by
tests/_pipeline_fixtures.py; no downloads): the family comes from model_index.json, sampling through the bundle
reproduces the diffusers pipeline itself, training writes a LoRA on the attention layers in keys ComfyUI maps, and
--resume continues from it."""
import os
import re
import shutil
import sys

import pytest
import torch

from rewardlab.cli import build_parser
from rewardlab.samplers import noise_scaling, sample
from rewardlab.training import checkpoints as ckpt
from rewardlab.training.lora import lora_targets
from rewardlab.training.pipelines import diffusers_bundle

sys.path.insert(0, os.path.dirname(__file__))   # pytest runs with --import-mode=importlib
from _pipeline_fixtures import WRITERS, vae  # noqa: E402

# The LoRA module names ComfyUI's stock loader maps, per family (comfy/lora.py ``model_lora_keys_unet``):
#  - SD/SDXL: "lora_unet_" + a key of comfy.utils.unet_to_diffusers with dots as underscores; its attention entries
#    are {down_blocks.i.attentions.j | mid_block.attentions.0 | up_blocks.i.attentions.j}.transformer_blocks.t.
#    {attn1, attn2}.{to_q, to_k, to_v, to_out.0}, and ff.net.0.proj / ff.net.2 beside them;
#  - SD3: "transformer." + a key of comfy.utils.mmdit_to_diffusers: transformer_blocks.i.{attn, attn2}.{to_q, to_k,
#    to_v, to_out.0}, attn.{add_q_proj, add_k_proj, add_v_proj, to_add_out}, {ff, ff_context}.net.{0.proj, 2};
#  - Flux: "transformer." + a key of comfy.utils.flux_to_diffusers: the same names in transformer_blocks.i (without
#    attn2), and single_transformer_blocks.i.{attn.to_q, attn.to_k, attn.to_v, proj_mlp, proj_out}.
# tests/comfyui/test_cli_lora_keys.py checks the same against ComfyUI's own functions when COMFYUI_PATH is set.
_QKVO = r"(to_q|to_k|to_v|to_out\.0)"
_JOINT = (r"(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
          r"|(ff|ff_context)\.net\.(0\.proj|2))")
COMFY_MAPPED = {
    "sdxl": (r"lora_unet_", r"(down_blocks\.\d+\.attentions\.\d+|mid_block\.attentions\.0"
             r"|up_blocks\.\d+\.attentions\.\d+)\.transformer_blocks\.\d+\.(attn[12]\." + _QKVO
             + r"|ff\.net\.(0\.proj|2))", True),
    "sd3": ("transformer.", r"transformer_blocks\.\d+\.(" + _JOINT + r"|attn2\." + _QKVO + ")", False),
    "flux": ("transformer.", r"transformer_blocks\.\d+\." + _JOINT + r"|single_transformer_blocks\.\d+\."
             r"(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out)", False),
}
ATTENTION = re.compile(r"(attn\d?[._](to_q|to_k|to_v|to_out[._]0|add_[qkv]_proj|to_add_out))$")


def comfy_maps(family, key):
    """True when ComfyUI's LoRA loader maps ``key`` (a LoRA file's module key) for ``family``."""
    prefix, names, underscored = COMFY_MAPPED["sd3" if family.startswith("sd3") else family.split("-")[0]]
    if not key.startswith(prefix):
        return False
    pattern = names.replace(r"\.", "_") if underscored else names
    return re.fullmatch(pattern, key[len(prefix):]) is not None


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {name: str(write(root / name)) for name, write in WRITERS.items()}


def train(folder, out, *extra):
    args = build_parser().parse_args([
        "train", "--model", folder, "--reward", "saturation", "--device", "cpu", "--steps", "2", "--batch-size", "1",
        "--width", "32", "--height", "32", "--rank", "2", "--lr", "1e-2", "--out", str(out), "--name", "lora",
        "--precision", "fp32", *extra])
    assert args.func(args) == 0


@pytest.mark.parametrize("family", ["sdxl", "sd3-no-t5", "flux"])
def test_train_command_on_each_family_writes_an_attention_lora_comfyui_maps_and_resumes(folders, family, tmp_path,
                                                                                           capsys):
    out = tmp_path / "out"
    train(folders[family], out, "--train-steps", "2", "--save-every", "2")
    printed = capsys.readouterr().out
    assert "step    2" in printed and "reward before" in printed and "after" in printed
    for suffix in (".safetensors", "_curve.png", "_before.png", "_after.png", "_log.json"):
        assert (out / f"lora{suffix}").exists(), suffix
    assert (out / "rewardlab_state" / "lora.state.pt").exists()
    sd, state = ckpt.load_checkpoint(str(out / "lora.safetensors"))
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd}
    assert state["step"] == 2 and len(modules) >= 4
    assert all(ATTENTION.search(m) for m in modules), sorted(modules)          # "attention": nothing else
    assert all(comfy_maps(family, m) for m in modules), sorted(m for m in modules if not comfy_maps(family, m))
    assert any(float(v.abs().max()) > 0 for k, v in sd.items() if k.endswith("lora_up.weight"))   # it trained

    train(folders[family], out, "--train-steps", "3", "--resume")
    assert "resumed" in capsys.readouterr().out
    assert ckpt.load_checkpoint(str(out / "lora.safetensors"))[1]["step"] == 3


def run_pipeline(bundle, prompt, noise, steps, cfg, **call):
    """The diffusers pipeline itself from the same starting noise: (final latents, decoded images in [0, 1])."""
    pipe = bundle.pipeline
    if bundle.family == "Flux":               # Flux's pipeline takes and returns latents packed into tokens
        b, c, h, w = noise.shape
        call.update(latents=pipe._pack_latents(noise, b, c, h, w))
    else:
        call.update(latents=noise, guidance_scale=cfg)
    latents, images = (pipe(prompt, height=32, width=32, num_inference_steps=steps, output_type=kind, **call).images
                       for kind in ("latent", "pt"))
    if bundle.family == "Flux":
        latents = pipe._unpack_latents(latents, noise.shape[2], noise.shape[3], 1)
    return latents, images


@pytest.mark.parametrize("family, cfg, call", [
    ("sd", 7.5, {}),                                               # v-prediction, CFG against the encoded ""
    ("sdxl", 5.0, {}),                                             # CFG against zeroed empty-prompt embeddings
    ("sd3", 7.0, {"max_sequence_length": 12}),                     # CLIP-L + CLIP-G + T5 (12 tokens here)
    ("sd3-no-t5", 1.0, {}),                                        # T5 absent: zeros, as the pipeline does
    ("flux", 1.0, {"guidance_scale": 4.0, "max_sequence_length": 12}),   # distilled guidance, no CFG batch
    ("flux-schnell", 1.0, {"guidance_scale": 0.0, "max_sequence_length": 12}),
])
def test_bundle_sampling_reproduces_the_diffusers_pipeline(folders, family, cfg, call):
    guidance = call.get("guidance_scale") if family == "flux" else None
    bundle = diffusers_bundle(folders[family], height=32, width=32, guidance=guidance)
    steps, prompt = 3, "a red circle on a blue background"
    sigmas = bundle.sigmas(steps, bundle.defaults["scheduler"])
    noise = torch.randn((1, *bundle.latent_shape), generator=torch.Generator().manual_seed(0))
    x = noise_scaling(sigmas[0], noise, flow=bundle.flow)
    with torch.no_grad():
        ours = sample(bundle.denoiser(bundle.encode([prompt]), cfg), x, sigmas, step="euler", flow=bundle.flow).x
        images = bundle.decode(ours)
        latents, their_images = run_pipeline(bundle, prompt, noise, steps, cfg, **call)
    assert ours.shape == latents.shape
    torch.testing.assert_close(ours, latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(images, their_images, rtol=1e-4, atol=1e-4)      # the VAE's scale and shift undone


def test_flux_trains_with_the_distilled_guidance_and_no_cfg_batch(folders):
    bundle = diffusers_bundle(folders["flux"], height=32, width=32, guidance=4.0)
    assert bundle.defaults == {"steps": 28, "cfg": 1.0, "scheduler": "flow"}
    seen = []
    hook = bundle.pipeline.transformer.register_forward_pre_hook(
        lambda m, args, kw: seen.append((kw["hidden_states"].shape[0], kw["guidance"].tolist())), with_kwargs=True)
    try:
        den = bundle.denoiser(bundle.encode(["a cat", "a dog"]), 1.0)
        den(torch.randn(2, *bundle.latent_shape), torch.full((2,), 0.5))
    finally:
        hook.remove()
    assert seen == [(2, [4.0, 4.0])]                   # one batch of 2 (no uncond rows), guidance 4 in the model
    # the dynamic shift grows with the image's token count: 64 tokens at 32x32, 256 at 64x64 (unshifted: 0.75)
    small = bundle.sigmas(4, "flow")
    large = diffusers_bundle(folders["flux"], height=64, width=64).sigmas(4, "flow")
    assert small[0] == large[0] == 1 and small[-1] == large[-1] == 0
    assert 0.75 < small[1] < large[1]


def test_flux_targets_keep_attention_and_feed_forward_apart(folders):
    transformer = diffusers_bundle(folders["flux"], height=32, width=32).lora_root
    attention, both = ({t.module for t in lora_targets(transformer, label)}
                       for label in ("attention", "attention + feed-forward"))
    assert "single_transformer_blocks.0.attn.to_q" in attention and "transformer_blocks.0.attn.add_k_proj" in attention
    assert not any("ff" in n or "proj_mlp" in n or n.endswith("proj_out") for n in attention)
    assert both - attention == {"transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2",
                                "transformer_blocks.0.ff_context.net.0.proj", "transformer_blocks.0.ff_context.net.2",
                                "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out"}
    assert "proj_out" in dict(transformer.named_modules()) and "proj_out" not in both    # never the final layer
    assert {t.module for t in lora_targets(transformer, r"single_transformer_blocks\.0\.attn\.to_q$")} == {
        "single_transformer_blocks.0.attn.to_q"}                                          # a regex stays an escape hatch


def test_schnell_like_flux_defaults_to_four_steps_and_refuses_a_guidance_value(folders):
    assert diffusers_bundle(folders["flux-schnell"], height=32, width=32).defaults["steps"] == 4
    with pytest.raises(ValueError, match="--cfg"):
        diffusers_bundle(folders["flux-schnell"], height=32, width=32, guidance=3.5)
    with pytest.raises(ValueError, match="--cfg"):
        diffusers_bundle(folders["sdxl"], height=32, width=32, guidance=3.5)


def test_flow_families_refuse_another_schedule(folders):
    bundle = diffusers_bundle(folders["sd3-no-t5"], height=32, width=32)
    with pytest.raises(ValueError, match="--scheduler"):
        bundle.sigmas(4, "karras")


def test_bad_folders_get_errors_that_name_the_fix(folders, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(ValueError, match="SD3Pipeline|StableDiffusion3Pipeline"):
        diffusers_bundle(str(tmp_path / "other"))
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2"):
        (tmp_path / "bare" / sub).mkdir(parents=True)
    with pytest.raises(ValueError, match="model_index.json"):
        diffusers_bundle(str(tmp_path / "bare"))
    with pytest.raises(ValueError, match="multiples of 4"):         # Flux packs 2x2 latents: 2 x the VAE factor
        diffusers_bundle(folders["flux"], height=30, width=32)
    mixed = tmp_path / "flux-with-an-sd-vae"
    shutil.copytree(folders["flux"], mixed)
    shutil.rmtree(mixed / "vae")
    vae(4).save_pretrained(mixed / "vae")
    with pytest.raises(ValueError, match="4 latent channels but its network expects 16.*VAE that ships"):
        diffusers_bundle(str(mixed), height=32, width=32)
