"""DRaFT Train LoRA on a real ComfyUI MODEL (in-process, CPU, tiny SD15-class fixtures): the node trains, the saved
file loads through stock LoraLoaderModelOnly with zero missing keys, and the trained MODEL samples through stock
KSampler. Also Apply / Mix Reward LoRA on ComfyUI MODELs and a CLIP + prompt-list run with DRaFT-LV."""
import logging

import pytest
import torch

from rewardlab.nodes import train_nodes as tn
from rewardlab.rewards import load_reward


@pytest.fixture(scope="module")
def out_dir(comfy, tmp_path_factory):
    import folder_paths
    out = tmp_path_factory.mktemp("comfy_out")
    old = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(out))
    folder_paths.add_model_folder_path("loras", str(out / "loras"))     # main.py does this for output/loras
    yield out
    folder_paths.set_output_directory(old)


def train(unet, vae, **kw):
    args = dict(model=unet, vae=vae, reward=load_reward("brightness"), prompts="a red square on a blue background",
                sampler="euler", scheduler="normal", steps=3, cfg=3.0, width=64, height=64, batch_size=1,
                method="DRaFT-K", k=1, lv_n=2, learning_rate=1e-2, rank=2, training_steps=3, save_every=2,
                name="draft_test", seed=0, precision="fp32")
    args.update(kw)
    with torch.inference_mode():                          # as a ComfyUI worker runs nodes
        out = tn.RewardLabDRaFTTrainLoRA().train(**args)
    assert out["ui"]["text"] == [f"saved as {out['result'][4]}"]
    return out["result"]


def sample(comfy, model, conds, seed=1):
    with torch.inference_mode():
        latent = {"samples": torch.zeros(1, 4, 8, 8)}
        return comfy.KSampler().sample(model, seed, 3, 3.0, "euler", "normal", conds[0], conds[1], latent)[0]["samples"]


@pytest.fixture(scope="module")
def trained(comfy, unet, vae, conds, out_dir):
    return train(unet, vae, positive=conds[0], negative=conds[1])


def test_train_node_runs_on_a_comfy_model_and_saves_under_output_loras(trained, out_dir):
    model, lora, curve, preview, name = trained
    path = out_dir / "loras" / "draft_test.safetensors"
    assert name == "draft_test.safetensors" and path.exists()
    assert (out_dir / "rewardlab_state" / "draft_test.state.pt").exists()      # outside the folder loaders list
    assert not (out_dir / "loras" / "draft_test.state.pt").exists()
    assert lora and all(k.startswith("diffusion_model.") for k in lora)
    assert any(float(v.abs().max()) > 0 for k, v in lora.items() if k.endswith("lora_up.weight"))   # it trained
    assert curve.ndim == 4 and curve.shape[-1] == 3 and preview.shape == (1, 64, 64, 3)


def test_saved_lora_loads_through_stock_loraloader_with_zero_missing_keys(comfy, unet, trained, caplog):
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        patched = comfy.LoraLoaderModelOnly().load_lora_model_only(unet, "draft_test.safetensors", 1.0)[0]
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    n_modules = len([k for k in trained[1] if k.endswith(".alpha")])
    assert len(patched.patches) == n_modules > 0


def test_trained_model_samples_through_stock_ksampler(comfy, unet, conds, trained):
    base, tuned = sample(comfy, unet, conds), sample(comfy, trained[0], conds)
    assert torch.isfinite(tuned).all() and tuned.shape == base.shape
    assert not torch.allclose(base, tuned)


def test_apply_and_mix_reward_lora_on_comfy_models(comfy, unet, conds, trained):
    lora = trained[1]
    with torch.inference_mode():
        half = tn.RewardLabApplyRewardLoRA().apply(unet, lora, 0.5)[0]
        neg = tn.RewardLabApplyRewardLoRA().apply(unet, lora, -1.0)[0]
        mixed, mixed_lora = tn.RewardLabMixRewardLoRAs().mix(unet, lora, 0.25, lora, 0.25)
    base = sample(comfy, unet, conds)
    # strength 0.5 and the 0.25 + 0.25 mix are the same ΔW (up to weight-dtype rounding of the merge)
    s_half = sample(comfy, half, conds)
    torch.testing.assert_close(s_half, sample(comfy, mixed, conds), rtol=1e-3, atol=1e-3)
    assert not torch.allclose(s_half, base, atol=1e-3)
    assert not torch.allclose(sample(comfy, neg, conds), base, atol=1e-3)
    assert mixed_lora["diffusion_model." + next(iter(lora)).split("diffusion_model.")[1].rsplit(".lora_", 1)[0]
                      .rsplit(".alpha", 1)[0] + ".lora_up.weight"].shape[1] == 4       # ranks concatenated (2 + 2)


def test_clip_prompt_list_with_draft_lv(comfy, unet, vae, clip, out_dir):
    model, lora, curve, preview, _ = train(unet, vae, clip=clip, prompts="a red square\na blue circle", batch_size=2,
                                        method="DRaFT-LV", training_steps=2, save_every=0, name="draft_lv_test")
    assert (out_dir / "loras" / "draft_lv_test.safetensors").exists()
    assert preview.shape[1] > 64                                 # a grid of the 2 × n images


@pytest.mark.parametrize("family", ["v_prediction", "flow"])
def test_train_node_on_v_prediction_and_flow_model_sampling(comfy, unet, vae, conds, out_dir, family):
    from comfy_extras import nodes_model_advanced as adv
    from rewardlab.host.models import model_info
    with torch.inference_mode():
        if family == "flow":      # rectified-flow sampling (CONST, as SD3/Flux) through ComfyUI's model_sampling
            patched = adv.ModelSamplingSD3().patch(unet, 3.0)[0]
        else:
            patched = adv.ModelSamplingDiscrete().patch(unet, "v_prediction", False)[0]
    assert model_info(patched).flow == (family == "flow")
    model, lora, curve, preview, _ = train(patched, vae, positive=conds[0], negative=conds[1], training_steps=2,
                                        save_every=0, name=f"draft_{family}", width=64, height=48)
    ups = [v for k, v in lora.items() if k.endswith("lora_up.weight")]
    assert all(torch.isfinite(v).all() for v in ups) and any(float(v.abs().max()) > 0 for v in ups)
    assert preview.shape == (1, 48, 64, 3)                       # non-square: latent shape from width/height
    out = sample(comfy, model, conds)
    assert torch.isfinite(out).all()


# --- issue 14: nothing lost, nothing overwritten ---------------------------------------------------------------------

def test_a_second_run_of_the_same_name_gets_a_numbered_name_and_resume_continues_the_first(comfy, unet, vae, conds,
                                                                                          out_dir, trained):
    before = (out_dir / "loras" / "draft_test.safetensors").read_bytes()
    again = train(unet, vae, positive=conds[0], negative=conds[1], training_steps=1, save_every=0)
    assert again[4] == "draft_test_00001.safetensors" and (out_dir / "loras" / again[4]).exists()
    assert (out_dir / "loras" / "draft_test.safetensors").read_bytes() == before            # the first run is kept
    resumed = train(unet, vae, positive=conds[0], negative=conds[1], training_steps=4, save_every=0, resume=True)
    assert resumed[4] == "draft_test.safetensors"
    from rewardlab.training import checkpoints as ckpt
    assert ckpt.load_checkpoint(str(out_dir / "loras" / "draft_test.safetensors"),
                                str(out_dir / "rewardlab_state" / "draft_test.state.pt"))[1]["step"] == 4


def test_every_file_the_stock_lora_list_shows_is_a_lora(comfy, unet, out_dir, trained):
    """Issue 14: *.state.pt files showed up in LoraLoader's list (choosing one 'succeeded' and changed nothing)."""
    import folder_paths

    import comfy.utils
    ours = [n for n in folder_paths.get_filename_list("loras")
            if folder_paths.get_full_path("loras", n).startswith(str(out_dir))]
    assert ours and all(n.endswith(".safetensors") for n in ours), ours
    for n in ours:
        sd = comfy.utils.load_torch_file(folder_paths.get_full_path("loras", n), safe_load=True)
        assert sd and all(k.endswith((".lora_up.weight", ".lora_down.weight", ".alpha")) for k in sd), n


def test_reno_with_a_video_shaped_latent_names_the_fix(comfy, unet, vae, conds):
    """Issue 14: ReNO with a 5-D latent failed inside conv2d."""
    from rewardlab.nodes.noise_nodes import RewardLabReNOOptimiseNoise
    with pytest.raises(ValueError, match=r"the LATENT is 5-D .* this model takes an image latent \(B, C, H, W\)"), \
            torch.inference_mode():
        RewardLabReNOOptimiseNoise().optimise(unet, conds[0], conds[1], vae, {"samples": torch.zeros(1, 4, 2, 8, 8)},
                                              load_reward("brightness"), 1, "euler", "normal", 1.0, 0, 1, 2, 1.0, 0.01)


def test_draft_loads_the_vae_without_its_encoder_and_gives_it_back(comfy, unet, vae, conds, out_dir, vae_loads):
    """Issue 11: during DRaFT the VAE encoder stays off the device (only the decoder carries gradients): ComfyUI
    neither moves the encoder's weights nor counts them as loaded, and after the node the VAE encodes as before."""
    import comfy.model_management as mm

    from rewardlab.host.grad import grad_enabled, release
    from rewardlab.host.vae import EncoderLeftOut, decode, grad_vae

    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = vae.encode(image)
        vae_loads.moved.clear(), vae_loads.loaded.clear()
        with grad_enabled():                     # control: the plain grad clone loads the encoder too
            vp = grad_vae(vae)
            decode(vae, torch.zeros(1, 4, 8, 8), patcher=vp)
            release(vp)
    assert vae_loads.moved and vae_loads.loaded == [(mm.module_size(vae.first_stage_model), type(vae_loads.encoder))]
    vae_loads.moved.clear(), vae_loads.loaded.clear()
    train(unet, vae, positive=conds[0], negative=conds[1], training_steps=1, name="draft_vae_test")
    assert vae_loads.loaded and set(vae_loads.loaded) == {(vae_loads.decoder_only, EncoderLeftOut)}
    assert not vae_loads.moved
    assert vae.first_stage_model.encoder is vae_loads.encoder
    with torch.inference_mode():
        torch.testing.assert_close(vae.encode(image), before)
