"""Every capability node on every model family ComfyUI classifies (tests/comfyui/families.py), loaded the way
ComfyUI loads models (inside inference mode): DRaFT with each target choice and the saved LoRA in stock
LoraLoaderModelOnly, ReNO and noise search with NOISE replay in stock SamplerCustomAdvanced, every guidance node,
reward guidance, scoring, and clear errors for a wrong text encoder. One family at a time is loaded."""
import gc
import logging
import re
from dataclasses import dataclass

import pytest
import torch

from rewardlab.host.models import family_name
from rewardlab.nodes import guidance_nodes as gn
from rewardlab.nodes.noise_nodes import RewardLabNoiseSearch, RewardLabReNOOptimiseNoise
from rewardlab.nodes.reward_nodes import RewardLabScoreImages
from rewardlab.nodes.sampler_nodes import RewardLabSampler
from rewardlab.nodes.train_nodes import RewardLabDRaFTTrainLoRA
from rewardlab.rewards import load_reward
from rewardlab.rewards.simple import build as build_simple
from rewardlab.training.lora import family_of

from .conftest import CLIP_FILE, VAE_FILE
from .families import BUILDERS, CLIP_G_FILE, FAMILY_FILES, LUMINA_TEXT_DIM, VAE16_FILE, build_clip_g, build_vae16

CLASSIFIED = {"sdxl": {"Segmind_Vega"}, "sd3": {"SD3"}, "flux": {"Flux"}, "lumina2": {"Lumina2"}}
PROMPT = "a red square on a blue background"


@dataclass
class Fam:
    name: str
    model: object
    vae: object
    clip: object
    positive: list
    negative: list
    channels: int

    @property
    def distilled(self):
        return self.name == "flux"          # guidance-distilled: cfg 1, no CFG batch

    def latent(self, batch=1):
        return {"samples": torch.zeros(batch, self.channels, 8, 8)}


def _build_missing(model_dir, name):
    import folder_paths

    wanted = [("diffusion_models", FAMILY_FILES[name][0], BUILDERS[name])]
    wanted.append(("vae", VAE16_FILE, build_vae16) if name != "sdxl" else ("vae", VAE_FILE, None))
    if name in ("sdxl", "sd3"):
        wanted.append(("text_encoders", CLIP_G_FILE, build_clip_g))
    for sub, file, build in wanted:
        path = model_dir / sub / file
        if not path.exists() and build is not None:
            tmp = path.with_suffix(".part")
            build(tmp)
            tmp.rename(path)
        folder_paths.add_model_folder_path(sub, str(model_dir / sub))


def _text_conditioning(name, tokens=8):
    """CONDITIONING as the family's (too big for CPU) text encoders would shape it, made inside inference mode."""
    g = torch.Generator().manual_seed(7)
    if name == "flux":      # T5-XXL tokens (4096) + CLIP-L pooled (768), distilled guidance as FluxGuidance sets it
        return [[torch.randn(1, tokens, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g),
                                                             "guidance": 3.5}]]
    return [[torch.randn(1, tokens, LUMINA_TEXT_DIM, generator=g),              # Lumina 2: Gemma hidden states
             {"attention_mask": torch.ones(1, tokens, dtype=torch.long)}]]


@pytest.fixture(scope="module", params=list(FAMILY_FILES))
def fam(request, comfy, model_files):
    name = request.param
    _build_missing(model_files, name)
    with torch.inference_mode():
        model = comfy.UNETLoader().load_unet(FAMILY_FILES[name][0], "default")[0]
        vae = comfy.VAELoader().load_vae(VAE_FILE if name == "sdxl" else VAE16_FILE)[0]
        clip = None
        if name in ("sdxl", "sd3"):
            clip = comfy.DualCLIPLoader().load_clip(CLIP_FILE, CLIP_G_FILE, name)[0]
            positive = comfy.CLIPTextEncode().encode(clip, PROMPT)[0]
        else:
            positive = _text_conditioning(name)
        negative = comfy.ConditioningZeroOut().zero_out(positive)[0]
    channels = 4 if name == "sdxl" else 16
    yield Fam(name, model, vae, clip, positive, negative, channels)
    import comfy.model_management as mm
    mm.unload_all_models()
    gc.collect()


@pytest.fixture(scope="module")
def out_dir(comfy, tmp_path_factory):
    import folder_paths
    out = tmp_path_factory.mktemp("family_out")
    old = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(out))
    folder_paths.add_model_folder_path("loras", str(out / "loras"))
    yield out
    folder_paths.set_output_directory(old)


def _cs():
    from comfy_extras import nodes_custom_sampler
    return nodes_custom_sampler


def _cfg(fam):
    return 1.0 if fam.distilled else 2.0


def _replay(fam, noise, steps, cfg, sampler="euler"):
    cs = _cs()
    with torch.inference_mode():
        guider = cs.CFGGuider().get_guider(fam.model, fam.positive, fam.negative, cfg)[0]
        sigmas = cs.BasicScheduler().get_sigmas(fam.model, "simple", steps, 1.0)[0]
        sampler = RewardLabSampler().get_sampler(sampler, -1.0)[0]
        return cs.SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, fam.latent())[0]["samples"]


def _red():
    return build_simple("red", {"kind": "target_colour", "colour": (1.0, 0.0, 0.0)})


# --- detection -------------------------------------------------------------------------------------------------

def test_fixture_is_classified_by_comfyui_as_its_family(fam):
    assert family_name(fam.model) in CLASSIFIED[fam.name]
    assert fam.model.get_model_object("latent_format").latent_channels == fam.channels
    assert family_of(fam.model.model.diffusion_model) is not None


# --- DRaFT ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("targets", ["attention", "attention + feed-forward", "all"])
def test_draft_trains_the_chosen_layers_and_stock_loader_loads_every_key(comfy, fam, out_dir, targets, caplog):
    family = family_of(fam.model.model.diffusion_model)
    name = f"{fam.name}_{targets.replace(' + ', '_')}"
    conditioning = {"clip": fam.clip} if fam.clip is not None else {"positive": fam.positive, "negative": fam.negative}
    with torch.inference_mode():
        model, lora, curve, preview, lora_name = RewardLabDRaFTTrainLoRA().train(
            model=fam.model, vae=fam.vae, reward=load_reward("brightness"), prompts=PROMPT, sampler="euler",
            scheduler="simple", steps=2, cfg=_cfg(fam), width=64, height=64, batch_size=1, method="DRaFT-K", k=1,
            lv_n=2, learning_rate=1e-2, rank=2, training_steps=1, save_every=0, name=name, seed=0, targets=targets,
            precision="fp32", overwrite=True, **conditioning)["result"]
    layers = sorted({k.rsplit(".lora_", 1)[0].rsplit(".alpha", 1)[0][len("diffusion_model."):] for k in lora})
    assert layers, "no layer was trained"
    if targets == "attention":
        assert all(re.search(family.attention, n) or n.endswith("_qkv") for n in layers), layers
        assert any(".attn" in n or "attn." in n or ".attention." in n for n in layers)
    assert not any(re.search(family.never, n) for n in layers)
    ups = [v for k, v in lora.items() if k.endswith("lora_up.weight")]
    assert all(torch.isfinite(v).all() for v in ups) and any(float(v.abs().max()) > 0 for v in ups)
    caplog.set_level(logging.WARNING)
    with torch.inference_mode():
        loaded = comfy.LoraLoaderModelOnly().load_lora_model_only(fam.model, lora_name, 1.0)[0]
    assert "lora key not loaded" not in caplog.text
    assert len(loaded.patches) == len(layers)
    assert preview.shape == (1, 64, 64, 3) and torch.isfinite(curve).all()


def test_draft_with_a_wrong_text_encoder_names_the_fix(fam, conds):
    with pytest.raises(ValueError, match="features per token.*text encoders"):
        with torch.inference_mode():
            RewardLabDRaFTTrainLoRA().train(
                model=fam.model, vae=fam.vae, reward=load_reward("brightness"), prompts=PROMPT, sampler="euler",
                scheduler="simple", steps=2, cfg=2.0, width=64, height=64, name="wrong_clip", positive=conds[0],
                negative=conds[1], training_steps=1)


# --- noise ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("checkpoint", [False, True])
def test_reno_noise_replays_exactly_in_stock_sampler_custom_advanced(fam, checkpoint):
    """One-step ReNO (SDXL-Turbo / Flux-schnell-like use), with and without per-step checkpointing."""
    cfg = 1.0
    with torch.inference_mode():
        noise, latent, image, plot = RewardLabReNOOptimiseNoise().optimise(
            fam.model, fam.positive, fam.negative, fam.vae, fam.latent(), _red(), 1, "euler", "simple", cfg, 5, 1,
            3, 20.0, 0.01, checkpoint_steps=checkpoint, checkpoint_reward=checkpoint)
    assert torch.isfinite(image).all()
    replay = _replay(fam, noise, 1, cfg)
    assert (replay - latent["samples"]).abs().max() <= 1e-4


def test_noise_search_replays_exactly(fam):
    with torch.inference_mode():
        noise, latent, image, plot, best = RewardLabNoiseSearch().search(
            fam.model, fam.positive, fam.negative, fam.vae, fam.latent(), _red(), 2, "euler", "simple", _cfg(fam), 3, 1,
            "random", 6)
    assert (_replay(fam, noise, 2, _cfg(fam)) - latent["samples"]).abs().max() <= 1e-4


# --- guidance ---------------------------------------------------------------------------------------------------

def _combiner_kw(**over):
    kw = dict(combiner="cfg", apg_eta=0.0, apg_norm_threshold=0.0, apg_momentum=0.0, zero_init_steps=0,
              rescale_phi=0.7, space="default", adaptive_guidance=False, adaptive_threshold=0.99, adaptive_space="x0")
    kw.update(over)
    return kw


def _sample(guider, sigmas, latent, seed=3):
    cs = _cs()
    with torch.inference_mode():
        return cs.SamplerCustomAdvanced().sample(cs.Noise_RandomNoise(seed), guider,
                                                 cs.KSamplerSelect().get_sampler("euler")[0], sigmas,
                                                 latent)[0]["samples"]


def test_every_guidance_node_runs_and_constant_cfg_equals_stock(comfy, fam):
    cs = _cs()
    with torch.inference_mode():
        sigmas = cs.BasicScheduler().get_sigmas(fam.model, "simple", 2, 1.0)[0]
        stock = _sample(cs.CFGGuider().get_guider(fam.model, fam.positive, fam.negative, 3.0)[0], sigmas, fam.latent())
        ours = gn.RewardLabScheduledGuider().build(fam.model, fam.positive, fam.negative, 3.0, **_combiner_kw())[0]
        assert (_sample(ours, sigmas, fam.latent()) - stock).abs().max() <= 1e-5
        for combiner in ("apg", "cfg_zero_star", "cfg_rescale"):
            g = gn.RewardLabScheduledGuider().build(fam.model, fam.positive, fam.negative, 3.0,
                                                    **_combiner_kw(combiner=combiner, adaptive_guidance=True))[0]
            assert torch.isfinite(_sample(g, sigmas, fam.latent())).all(), combiner
        cads = gn.RewardLabCADSGuider().build(ours, 0.6, 0.9, 0.25, 1.0, 0, "p_step")[0]
        assert torch.isfinite(_sample(cads, sigmas, fam.latent())).all()
        patched = gn.RewardLabApplyGuidanceSchedule().patch(fam.model, **_combiner_kw(combiner="apg"))[0]
        ks = comfy.KSampler().sample(patched, 3, 2, 3.0, "euler", "simple", fam.positive, fam.negative,
                                     fam.latent())[0]["samples"]
        assert torch.isfinite(ks).all()
        by_step, by_sigma = gn.RewardLabPlotGuidanceSchedule().plot(fam.model, sigmas, 3.0)
        assert by_step.shape[-1] == 3


@pytest.mark.parametrize("gradient", ["x0 only", "through model"])
def test_reward_guidance_runs_on_the_family(fam, gradient):
    cs = _cs()
    with torch.inference_mode():
        sigmas = cs.BasicScheduler().get_sigmas(fam.model, "simple", 2, 1.0)[0]
        base = gn.RewardLabScheduledGuider().build(fam.model, fam.positive, fam.negative, _cfg(fam), **_combiner_kw())[0]
        guided = gn.RewardLabRewardGuider().build(base, fam.vae, _red(), "", 50.0, 0.0, 1.0, 0, 0.1, gradient)[0]
        plain, steered = _sample(base, sigmas, fam.latent()), _sample(guided, sigmas, fam.latent())
    assert torch.isfinite(steered).all() and (steered - plain).abs().max() > 0


def test_score_images_on_the_family_s_decoded_image(comfy, fam):
    with torch.inference_mode():
        latent = {"samples": torch.randn(1, fam.channels, 8, 8, generator=torch.Generator().manual_seed(1))}
        image = comfy.VAEDecode().decode(fam.vae, latent)[0]
        scores, mean, table = RewardLabScoreImages().score(load_reward("colourfulness"), image)
    assert len(scores) == 1 and torch.isfinite(torch.tensor(scores)).all() and "colourfulness" in table
