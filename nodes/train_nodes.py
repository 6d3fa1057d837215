"""DRaFT LoRA training nodes: train a reward LoRA on a ComfyUI MODEL, apply / mix / save reward LoRAs.

Training is the host-free trainer (training/draft.py) on the ComfyUI bundle (host/bundle.py). The LoRA is saved in
ComfyUI's key format under output/loras/, where the stock LoraLoader lists it; the training state goes to
output/rewardlab_state/, which no LoRA loader lists. An existing LoRA is replaced only when 'overwrite' is on;
otherwise the next free numbered name is used (as SaveImage does) and reported.
"""
import os

import torch

from .. import runtime
from ..host.bridge import STEP_NAMES
from ..host.bundle import ComfyBundle
from ..host.grad import apply_lora_state_dict, grad_enabled
from ..host.services import bchw_to_image, preview_from_image, scheduler_names
from ..plots import image_grid, training_curve
from ..rewards.base import prompt_lines
from ..training import checkpoints as ckpt
from ..training.draft import Trainer, TrainingStopped, training_prompts
from ..training.lora import mix_lora_state_dicts
from ..training.options import config_from_options, node_inputs

CATEGORY = "RewardLab/Training"
VAE_TILE_INPUT = ("INT", {"default": 0, "min": 0, "max": 8192, "step": 64,
                          "tooltip": "Decode the images for the reward in tiles of this many pixels (0: in one piece), "
                                     "for large images whose decoder activations do not fit in memory."})
NAME_TOOLTIP = ("File name under output/loras/ ('folder/name' for a subfolder). Letters, digits, spaces, '-', '_' and "
                "'.'; no '..'. If a LoRA of that name exists, a numbered name (name_00001) is used unless 'overwrite' "
                "is on.")
OVERWRITE_TOOLTIP = ("Replace an existing LoRA of this name (and drop its training state). Off: a free numbered name "
                     "is used instead, so no earlier run is ever lost.")


def name_problem(name):
    """For VALIDATE_INPUTS: True, or the message of a LoRA name that cannot be written (ComfyUI runs it when the
    prompt is queued; a linked name arrives as None and is checked when the node runs)."""
    return True if name is None else ckpt.name_problem(name)


# --- nodes --------------------------------------------------------------------------------------------------------

class RewardLabDRaFTTrainLoRA:
    DESCRIPTION = ("DRaFT: train a LoRA by backpropagating a differentiable reward through sampling (Clark et al. "
                   "2023), or AlignProp / ReFL / DRTune. preset 'paper' runs the chosen method's published recipe "
                   "(its values override the widgets; docs/methods.md lists them with sources); 'custom' uses the "
                   "widgets. Saves output/loras/<name>.safetensors every 'save_every' steps (stock LoraLoader lists "
                   "it); returns the MODEL with the LoRA applied.")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    RETURN_TYPES = ("MODEL", "LORA_MODEL", "IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("model", "lora", "curve", "preview", "lora_name")
    OUTPUT_TOOLTIPS = ("The input MODEL with the trained LoRA merged at strength 1 (ready for KSampler).",
                       "The trained LoRA (ComfyUI keys) for Apply / Mix / Save Reward LoRA.",
                       "Reward and loss per training step (and the held-out reward when scored).",
                       "The last training batch's images.",
                       "The file the LoRA was saved as, as LoraLoader lists it (a numbered name when 'name' was "
                       "taken).")
    NOT_IDEMPOTENT = True

    @classmethod
    def INPUT_TYPES(cls):
        opts = node_inputs()          # the DRaFT settings, from the table the CLI shares (training/options.py)
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to fine-tune (SD1.x/2.x, SDXL, SD3/Flux, ...)."}),
                "vae": ("VAE", {"tooltip": "Its VAE: decodes samples for the reward (differentiably)."}),
                "reward": ("REWARD_MODEL", {"tooltip": "What to maximise (Load Reward Model / Combine Rewards)."}),
                "prompts": ("STRING", {"multiline": True, "default": "a photo of a cat",
                                       "tooltip": "Training prompts, one per line, cycled in shuffled order. Encoded "
                                                  "with the CLIP input when connected; always given to the reward."}),
                "sampler": (list(STEP_NAMES), {"default": "euler",
                                               "tooltip": "Step rule of the training trajectories (euler = DDIM)."}),
                "scheduler": (scheduler_names(), {"default": "normal" if "normal" in scheduler_names() else None,
                                                  "tooltip": "Sigma schedule, as in BasicScheduler."}),
                "steps": opts.pop("steps"),
                "cfg": opts.pop("cfg"),
                "width": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip": "Image width."}),
                "height": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip": "Image height."}),
                "batch_size": opts.pop("batch_size"),
                "method": opts.pop("method"),
                "preset": opts.pop("preset"),
                **{k: opts.pop(k) for k in ("k", "lv_n", "learning_rate", "rank", "training_steps", "save_every")},
                "name": ("STRING", {"default": "rewardlab_draft", "tooltip": NAME_TOOLTIP}),
                **opts,                # seed
            },
            "optional": {
                "positive": ("CONDITIONING", {"tooltip": "Fixed positive conditioning (instead of CLIP + prompts). "
                                                         "SDXL size/pooled conds come from here."}),
                "negative": ("CONDITIONING", {"tooltip": "Negative conditioning (default: empty prompt / zeros)."}),
                "clip": ("CLIP", {"tooltip": "Encodes each training prompt separately (per-sample conditioning), "
                                             "with the image size as SDXL's size conditioning."}),
                "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1,
                                       "tooltip": "Distilled guidance of guidance-distilled models (Flux-dev), as "
                                                  "FluxGuidance sets it, for prompts encoded with the CLIP input "
                                                  "(use cfg 1 with these models). Ignored by other models."}),
                "heldout_prompts": ("STRING", {"multiline": True, "default": "",
                                               "tooltip": "Held-out prompts scored every 'heldout_every' steps "
                                                          "(reward-hacking monitor; needs CLIP to differ)."}),
                **node_inputs(optional=True),
                "vae_tile_size": VAE_TILE_INPUT,
                "resume": ("BOOLEAN", {"default": False,
                                       "tooltip": "Continue from output/loras/<name> and its training state "
                                                  "(output/rewardlab_state/<name>.state.pt) if present."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": OVERWRITE_TOOLTIP}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, name=None):
        return name_problem(name)

    def train(self, model, vae, reward, prompts, sampler, scheduler, width, height, name, positive=None,
              negative=None, clip=None, guidance=3.5, heldout_prompts="", vae_tile_size=0, resume=False,
              overwrite=False, **options):
        files = ckpt.run_files(name)                  # every check runs before any work: a bad name fails here
        lines = training_prompts(prompts, clip is not None, reward)
        held = prompt_lines(heldout_prompts)
        if not held:
            options["heldout_every"] = 0
        config = config_from_options(options, sampler=sampler, scheduler=scheduler)
        files = ckpt.claim(files, resume=resume, overwrite=overwrite)
        path = files.lora
        bundle = ComfyBundle(model, vae, width, height, positive, negative, clip, guidance=guidance,
                             vae_tile=vae_tile_size, checkpoint_blocks=config.checkpointing)
        bundle.encode_prompts(lines + held)
        pbar = runtime.current().progress(config.train_steps)

        def on_step(record, trainer):
            preview = preview_from_image(bchw_to_image(trainer.last_images[:1]))
            pbar.update_absolute(record["step"], config.train_steps, preview)

        with grad_enabled():
            trainer = Trainer(bundle, reward, config, prompts=lines, heldout=held, lora_path=path, on_step=on_step,
                              cancel=runtime.current().interrupted, run_id=files.listed_name, state_path=files.state)
            try:
                if resume and os.path.exists(path):
                    trainer.resume()
                trainer.train()
            except TrainingStopped as stop:
                if stop.reason == "cancelled":
                    runtime.current().check_interrupt()      # ComfyUI's own "interrupted" outcome
                raise RuntimeError(str(stop)) from None
            finally:                                 # also on an interrupt raised by the progress bar
                bundle.release()
            lora = trainer.lora_state_dict()
            log, images = trainer.log, trainer.last_images
        trained = apply_lora_state_dict(model, lora, 1.0)
        preview = image_grid(images) if images is not None else torch.zeros(1, 64, 64, 3)
        return {"ui": {"text": [f"saved as {files.listed_name}"]},
                "result": (trained, lora, training_curve(log), preview, files.listed_name)}


class RewardLabApplyRewardLoRA:
    DESCRIPTION = ("Apply a reward LoRA to a MODEL at any strength: >1 extrapolates the reward direction, <0 moves "
                   "away from it, small values trade reward for fidelity (DRaFT's LoRA scaling).")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The MODEL with the LoRA merged at this strength.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model the LoRA was trained on (same family)."}),
            "lora": ("LORA_MODEL", {"tooltip": "A LoRA from DRaFT Train LoRA, Mix Reward LoRAs or a LoRA loader."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05,
                                   "tooltip": "Scale of ΔW (may be > 1 or < 0)."}),
        }}

    def apply(self, model, lora, strength):
        return (apply_lora_state_dict(model, lora, strength),)


class RewardLabMixRewardLoRAs:
    DESCRIPTION = ("Mix two reward LoRAs: α1·ΔW1 + α2·ΔW2 on one MODEL (DRaFT's LoRA mixing, e.g. aesthetic + "
                   "prompt alignment, or interpolating base and fine-tuned with α in [0, 1]).")
    CATEGORY = CATEGORY
    FUNCTION = "mix"
    RETURN_TYPES = ("MODEL", "LORA_MODEL")
    RETURN_NAMES = ("model", "lora")
    OUTPUT_TOOLTIPS = ("The MODEL with the mixed LoRA merged.", "The mixed LoRA (exact: ranks are concatenated).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model both LoRAs were trained on."}),
            "lora_1": ("LORA_MODEL", {"tooltip": "First LoRA."}),
            "alpha_1": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05,
                                  "tooltip": "Weight α1 of the first LoRA's ΔW."}),
            "lora_2": ("LORA_MODEL", {"tooltip": "Second LoRA."}),
            "alpha_2": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05,
                                  "tooltip": "Weight α2 of the second LoRA's ΔW."}),
        }}

    def mix(self, model, lora_1, alpha_1, lora_2, alpha_2):
        mixed = mix_lora_state_dicts([(lora_1, alpha_1), (lora_2, alpha_2)])   # exact: ranks are concatenated
        return (apply_lora_state_dict(model, mixed, 1.0), mixed)


class RewardLabSaveRewardLoRA:
    DESCRIPTION = "Save a LORA_MODEL as output/loras/<name>.safetensors (ComfyUI keys; LoraLoader lists it)."
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("Where the file was written.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora": ("LORA_MODEL", {"tooltip": "The LoRA to save."}),
            "name": ("STRING", {"default": "rewardlab_lora", "tooltip": NAME_TOOLTIP}),
        }, "optional": {
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": OVERWRITE_TOOLTIP}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, name=None):
        return name_problem(name)

    def save(self, lora, name, overwrite=False):
        files = ckpt.claim(ckpt.run_files(name), overwrite=overwrite)
        if overwrite:
            files.remove_state()          # it belonged to the LoRA being replaced: a LoRA and its state stay together
        ckpt.save_lora_file(lora, files.lora, {"rewardlab": "reward lora"})
        return {"ui": {"text": [f"saved as {files.listed_name}"]}, "result": (files.lora,)}


NODE_CLASS_MAPPINGS = {
    "RewardLabDRaFTTrainLoRA": RewardLabDRaFTTrainLoRA,
    "RewardLabApplyRewardLoRA": RewardLabApplyRewardLoRA,
    "RewardLabMixRewardLoRAs": RewardLabMixRewardLoRAs,
    "RewardLabSaveRewardLoRA": RewardLabSaveRewardLoRA,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "RewardLabDRaFTTrainLoRA": "DRaFT Train LoRA (RewardLab)",
    "RewardLabApplyRewardLoRA": "Apply Reward LoRA (RewardLab)",
    "RewardLabMixRewardLoRAs": "Mix Reward LoRAs (RewardLab)",
    "RewardLabSaveRewardLoRA": "Save Reward LoRA (RewardLab)",
}
