"""The pack inside a real headless ComfyUI server (main.py --cpu), driven over HTTP as a user's frontend would."""
import safetensors.torch
import torch

from rewardlab import NODE_CLASS_MAPPINGS

from .conftest import CLIP_FILE, UNET_FILE, VAE_FILE

PROMPT_TEXT = "a red square on a blue background"     # the `conds` fixture's text


def test_pack_imports_and_object_info_lists_every_node(server):
    log = server.log().splitlines()
    ours = [line for line in log if line.rstrip().endswith("custom_nodes/rewardlab")]
    assert ours, "the pack is missing from ComfyUI's custom-node import report"
    assert not [line for line in ours if "IMPORT FAILED" in line], ours
    assert not [line for line in log if "Cannot import" in line and "rewardlab" in line]
    info = server.get_json("/object_info")
    assert sorted(set(NODE_CLASS_MAPPINGS) - set(info)) == []
    sampler = info["RewardLabSampler"]
    assert sampler["display_name"] == "RewardLab Sampler" and sampler["output"] == ["SAMPLER"]
    assert sampler["input"]["required"]["sampler_name"][0] == ["euler", "ddim", "euler_ancestral", "dpmpp_2m"]


def _sampling_prompt(sampler_name, seed, steps, cfg):
    """UNET/CLIP/VAE loaders -> CFGGuider + RewardLab Sampler -> SamplerCustomAdvanced -> SaveLatent + SaveImage."""
    def link(node, out=0):
        return [str(node), out]
    nodes = {
        1: ("UNETLoader", {"unet_name": UNET_FILE, "weight_dtype": "default"}),
        2: ("CLIPLoader", {"clip_name": CLIP_FILE, "type": "stable_diffusion"}),
        3: ("CLIPTextEncode", {"text": PROMPT_TEXT, "clip": link(2)}),
        4: ("ConditioningZeroOut", {"conditioning": link(3)}),
        5: ("EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 1}),
        6: ("RandomNoise", {"noise_seed": seed}),
        7: ("CFGGuider", {"model": link(1), "positive": link(3), "negative": link(4), "cfg": cfg}),
        8: ("RewardLabSampler", {"sampler_name": sampler_name, "eta": -1.0}),
        9: ("BasicScheduler", {"model": link(1), "scheduler": "normal", "steps": steps, "denoise": 1.0}),
        10: ("SamplerCustomAdvanced", {"noise": link(6), "guider": link(7), "sampler": link(8), "sigmas": link(9),
                                       "latent_image": link(5)}),
        11: ("SaveLatent", {"samples": link(10), "filename_prefix": "latents/rl_bridge"}),
        12: ("VAELoader", {"vae_name": VAE_FILE}),
        13: ("VAEDecode", {"samples": link(10), "vae": link(12)}),
        14: ("SaveImage", {"images": link(13), "filename_prefix": "rl_bridge"}),
    }
    return {str(k): {"class_type": c, "inputs": i} for k, (c, i) in nodes.items()}


def test_server_samples_with_rewardlab_sampler_as_in_process(server, comfy, unet, conds):
    """A workflow using the RewardLab Sampler node runs in the server and gives the latent our in-process bridge
    computes for the same models, seed and schedule."""
    from comfy_extras import nodes_custom_sampler as cs

    from rewardlab.host.bridge import trajectory
    from rewardlab.host.models import calculate_sigmas

    entry = server.run_prompt(_sampling_prompt("euler_ancestral", seed=5, steps=3, cfg=3.0))
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"]["14"]["images"][0]["filename"].endswith(".png")
    saved = entry["outputs"]["11"]["latents"][0]
    latent_file = server.output_dir / saved["subfolder"] / saved["filename"]
    served = safetensors.torch.load_file(str(latent_file))["latent_tensor"]

    with torch.inference_mode():
        noise = cs.Noise_RandomNoise(5).generate_noise({"samples": torch.zeros(1, 4, 8, 8)})
        local = trajectory(unet, conds[0], conds[1], 3.0, calculate_sigmas(unet, "normal", 3), noise,
                              {"samples": torch.zeros(1, 4, 8, 8)}, step="euler_ancestral", seed=5)
    assert served.shape == (1, 4, 8, 8)
    assert (served - local).abs().max() <= 1e-4
