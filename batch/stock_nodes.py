"""A small table of the stock ComfyUI nodes our workflows use, in ``/object_info`` shape.

Written from the facts in ComfyUI's source (v0.3.64: ``nodes.py``, ``comfy_extras/nodes_custom_sampler.py``,
``comfy/samplers.py``): input names, types, options, widget order (= dict order), outputs and display names.
It lets the workflow validator and the editor->API converter work without a running server. Model-file combos
(checkpoint, LoRA names, ...) are only known on a server, so they are marked with ``FILE_FOLDER`` and checked
loosely (a file name with a model extension).
"""

MAX_RESOLUTION = 16384
MAX_SEED = 0xFFFFFFFFFFFFFFFF
FILE_FOLDER = "rewardlab_file_folder"  # option key marking a combo whose options are files of a model folder
LATENT_EXTENSIONS = (".latent",)
MODEL_EXTENSIONS = (".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft")

SAMPLER_NAMES = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2", "dpm_2_ancestral",
    "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu",
    "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep",
    "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
    "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece",
    "ddim", "uni_pc", "uni_pc_bh2",
]
SCHEDULER_NAMES = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                   "linear_quadratic", "kl_optimal"]


def files(folder, **opts):
    return [[], {FILE_FOLDER: folder, **opts}]


def INT(default, lo, hi, **opts):
    return ["INT", {"default": default, "min": lo, "max": hi, **opts}]


def FLOAT(default, lo, hi, step, **opts):
    return ["FLOAT", {"default": default, "min": lo, "max": hi, "step": step, **opts}]


def SEED():
    return INT(0, 0, MAX_SEED, control_after_generate=True)


def _node(display, category, required, outputs=(), names=None, optional=None, output_node=False, hidden=None):
    inputs = {"required": required}
    if optional:
        inputs["optional"] = optional
    if hidden:
        inputs["hidden"] = hidden
    return {
        "input": inputs,
        "input_order": {k: list(v) for k, v in inputs.items()},
        "output": list(outputs),
        "output_is_list": [False] * len(outputs),
        "output_name": list(names or outputs),
        "display_name": display,
        "category": category,
        "output_node": output_node,
        "python_module": "nodes",
    }


_IMAGE_HIDDEN = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}

STOCK_NODES = {
    "CheckpointLoaderSimple": _node("Load Checkpoint", "loaders", {"ckpt_name": files("checkpoints")},
                                    ("MODEL", "CLIP", "VAE")),
    "VAELoader": _node("Load VAE", "loaders", {"vae_name": files("vae")}, ("VAE",)),
    "LoraLoader": _node("Load LoRA", "loaders", {
        "model": ["MODEL", {}], "clip": ["CLIP", {}], "lora_name": files("loras"),
        "strength_model": FLOAT(1.0, -100.0, 100.0, 0.01), "strength_clip": FLOAT(1.0, -100.0, 100.0, 0.01),
    }, ("MODEL", "CLIP")),
    "LoraLoaderModelOnly": _node("LoraLoaderModelOnly", "loaders", {
        "model": ["MODEL", {}], "lora_name": files("loras"), "strength_model": FLOAT(1.0, -100.0, 100.0, 0.01),
    }, ("MODEL",)),
    "CLIPTextEncode": _node("CLIP Text Encode (Prompt)", "conditioning", {
        "text": ["STRING", {"multiline": True, "dynamicPrompts": True}], "clip": ["CLIP", {}],
    }, ("CONDITIONING",)),
    "EmptyLatentImage": _node("Empty Latent Image", "latent", {
        "width": INT(512, 16, MAX_RESOLUTION, step=8), "height": INT(512, 16, MAX_RESOLUTION, step=8),
        "batch_size": INT(1, 1, 4096),
    }, ("LATENT",)),
    "KSampler": _node("KSampler", "sampling", {
        "model": ["MODEL", {}], "seed": SEED(), "steps": INT(20, 1, 10000),
        "cfg": FLOAT(8.0, 0.0, 100.0, 0.1, round=0.01), "sampler_name": [SAMPLER_NAMES, {}],
        "scheduler": [SCHEDULER_NAMES, {}], "positive": ["CONDITIONING", {}], "negative": ["CONDITIONING", {}],
        "latent_image": ["LATENT", {}], "denoise": FLOAT(1.0, 0.0, 1.0, 0.01),
    }, ("LATENT",)),
    "KSamplerAdvanced": _node("KSampler (Advanced)", "sampling", {
        "model": ["MODEL", {}], "add_noise": [["enable", "disable"], {}], "noise_seed": SEED(),
        "steps": INT(20, 1, 10000), "cfg": FLOAT(8.0, 0.0, 100.0, 0.1, round=0.01),
        "sampler_name": [SAMPLER_NAMES, {}], "scheduler": [SCHEDULER_NAMES, {}],
        "positive": ["CONDITIONING", {}], "negative": ["CONDITIONING", {}], "latent_image": ["LATENT", {}],
        "start_at_step": INT(0, 0, 10000), "end_at_step": INT(10000, 0, 10000),
        "return_with_leftover_noise": [["disable", "enable"], {}],
    }, ("LATENT",)),
    "SamplerCustomAdvanced": _node("SamplerCustomAdvanced", "sampling/custom_sampling", {
        "noise": ["NOISE", {}], "guider": ["GUIDER", {}], "sampler": ["SAMPLER", {}], "sigmas": ["SIGMAS", {}],
        "latent_image": ["LATENT", {}],
    }, ("LATENT", "LATENT"), names=("output", "denoised_output")),
    "KSamplerSelect": _node("KSamplerSelect", "sampling/custom_sampling/samplers",
                            {"sampler_name": [SAMPLER_NAMES, {}]}, ("SAMPLER",)),
    "BasicScheduler": _node("BasicScheduler", "sampling/custom_sampling/schedulers", {
        "model": ["MODEL", {}], "scheduler": [SCHEDULER_NAMES, {}], "steps": INT(20, 1, 10000),
        "denoise": FLOAT(1.0, 0.0, 1.0, 0.01),
    }, ("SIGMAS",)),
    "KarrasScheduler": _node("KarrasScheduler", "sampling/custom_sampling/schedulers", {
        "steps": INT(20, 1, 10000), "sigma_max": FLOAT(14.614642, 0.0, 5000.0, 0.01, round=False),
        "sigma_min": FLOAT(0.0291675, 0.0, 5000.0, 0.01, round=False), "rho": FLOAT(7.0, 0.0, 100.0, 0.01, round=False),
    }, ("SIGMAS",)),
    "RandomNoise": _node("RandomNoise", "sampling/custom_sampling/noise", {"noise_seed": SEED()}, ("NOISE",)),
    "DisableNoise": _node("DisableNoise", "sampling/custom_sampling/noise", {}, ("NOISE",)),
    "CFGGuider": _node("CFGGuider", "sampling/custom_sampling/guiders", {
        "model": ["MODEL", {}], "positive": ["CONDITIONING", {}], "negative": ["CONDITIONING", {}],
        "cfg": FLOAT(8.0, 0.0, 100.0, 0.1, round=0.01),
    }, ("GUIDER",)),
    "BasicGuider": _node("BasicGuider", "sampling/custom_sampling/guiders", {
        "model": ["MODEL", {}], "conditioning": ["CONDITIONING", {}],
    }, ("GUIDER",)),
    "VAEDecode": _node("VAE Decode", "latent", {"samples": ["LATENT", {}], "vae": ["VAE", {}]}, ("IMAGE",)),
    "VAEEncode": _node("VAE Encode", "latent", {"pixels": ["IMAGE", {}], "vae": ["VAE", {}]}, ("LATENT",)),
    "SaveImage": _node("Save Image", "image", {
        "images": ["IMAGE", {}], "filename_prefix": ["STRING", {"default": "ComfyUI"}],
    }, (), output_node=True, hidden=_IMAGE_HIDDEN),
    "PreviewImage": _node("Preview Image", "image", {"images": ["IMAGE", {}]}, (), output_node=True,
                          hidden=_IMAGE_HIDDEN),
    "LoadImage": _node("Load Image", "image", {"image": files("input", image_upload=True)}, ("IMAGE", "MASK")),
    "LoadLatent": _node("LoadLatent", "_for_testing", {"latent": files("latents")}, ("LATENT",)),
    "PreviewAny": _node("Preview Any", "utils", {"source": ["*", {}]}, (), output_node=True),
}

# Frontend-only node types: they never reach /prompt (graphToPrompt drops them).
VIRTUAL_NODES = frozenset({"Reroute", "PrimitiveNode", "Note", "MarkdownNote"})


def object_info_of_class(name, cls, display_name=None):
    """The ``/object_info`` entry of a V1 node class, built like ComfyUI's ``node_info`` does."""
    inputs = cls.INPUT_TYPES()
    outputs = list(getattr(cls, "RETURN_TYPES", ()))
    return {
        "input": inputs,
        "input_order": {k: list(v) for k, v in inputs.items()},
        "output": outputs,
        "output_is_list": list(getattr(cls, "OUTPUT_IS_LIST", [False] * len(outputs))),
        "output_name": list(getattr(cls, "RETURN_NAMES", outputs)),
        "display_name": display_name or name,
        "category": getattr(cls, "CATEGORY", "sd"),
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
        "description": getattr(cls, "DESCRIPTION", ""),
        "python_module": "custom_nodes.rewardlab",
    }


def pack_object_info():
    """/object_info entries of RewardLab's own nodes (from NODE_CLASS_MAPPINGS)."""
    from ..nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    return {name: object_info_of_class(name, cls, NODE_DISPLAY_NAME_MAPPINGS.get(name))
            for name, cls in NODE_CLASS_MAPPINGS.items()}


def offline_object_info(model_files=None):
    """Stock table + our pack, as a server would report it. ``model_files`` {folder: [names]} fills file combos
    (left empty: every file combo then lists nothing, which validate.py treats as 'unknown files')."""
    info = {name: _with_files(spec, model_files or {}) for name, spec in STOCK_NODES.items()}
    info.update(pack_object_info())
    return info


def _with_files(spec, model_files):
    if not model_files:
        return spec
    out = {**spec, "input": {}}
    for section, entries in spec["input"].items():
        out["input"][section] = {}
        for name, entry in entries.items():
            if isinstance(entry, list) and len(entry) > 1 and isinstance(entry[1], dict) and FILE_FOLDER in entry[1]:
                entry = [list(model_files.get(entry[1][FILE_FOLDER], [])), entry[1]]
            out["input"][section][name] = entry
    return out
