"""DRaFT LoRA training nodes: train a reward LoRA on a ComfyUI MODEL, apply / mix / save reward LoRAs.

Training is the host-free trainer (training/draft.py) on a ComfyUI bundle: every micro-batch runs inside one
``guider.sample`` call (CFGGuider on a grad-ready clone of the MODEL carrying the LoRA adapters), whose sampler body
runs the core runner *and* the backward pass, so checkpoint recomputation still finds the guider alive. The LoRA is
saved in ComfyUI's key format under output/loras/, where the stock LoraLoader lists it.
"""
import torch

from . import host
from . import host_sampling as hs
from ..training import checkpoints as ckpt
from ..training.bundle import ModelBundle
from ..training.draft import METHODS, DraftConfig, Trainer, TrainingStopped
from ..training.lora import ATTENTION_TARGETS, mix_lora_state_dicts

CATEGORY = "RewardLab/Training"
METHOD_LABELS = {"DRaFT-K": "draft_k", "DRaFT-LV": "draft_lv", "DRaFT (full)": "draft", "AlignProp": "alignprop",
                 "ReFL": "refl", "DRTune": "drtune"}
TARGETS = {"attention": ATTENTION_TARGETS, "attention + feed-forward": ATTENTION_TARGETS + ("ff.net.0.proj", "ff.net.2"),
           "all linear/conv": None}
PRECISIONS = ("bf16", "fp16", "fp32")
assert set(METHOD_LABELS.values()) == set(METHODS)


# --- the ComfyUI bundle ---------------------------------------------------------------------------------------

class _Session:
    """A duck-typed comfy Sampler whose ``sample`` runs ``fn(denoiser)`` with the guider's CFG'd x̂0 and returns
    the (unused) latent. Models are loaded and conds processed by guider.sample around it."""

    def __init__(self, fn):
        self.fn, self.result = fn, None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        def denoiser(x, sigma, **extra):
            return model_wrap(x, sigma, **extra_args, **extra)
        self.result = self.fn(denoiser)
        return latent_image


def _cat_conditioning(items):
    """One CONDITIONING whose tensors hold one row per item (per-sample prompts in one batch)."""
    conds = [c[0] for c in items]
    extras = [c[1] for c in items]
    merged = {}
    for k, v in extras[0].items():
        merged[k] = torch.cat([e[k] for e in extras]) if isinstance(v, torch.Tensor) else v
    return [[torch.cat(conds), merged]]


def zero_conditioning(conditioning):
    """ConditioningZeroOut: the same structure with every tensor zeroed (an empty negative)."""
    return [[torch.zeros_like(c), {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v for k, v in d.items()}]
            for c, d in conditioning]


class ComfyBundle(ModelBundle):
    """A ComfyUI MODEL + VAE (+ CONDITIONING, or CLIP for per-sample prompts) as a trainer bundle."""

    def __init__(self, model, vae, width, height, positive=None, negative=None, clip=None, downscale=8):
        if positive is None and clip is None:
            raise ValueError("connect a positive CONDITIONING, or a CLIP and a prompt list")
        self.model, self.vae, self.clip = model, vae, clip
        self.positive, self.negative = positive, negative
        info = hs.model_info(model)
        if width % downscale or height % downscale:
            raise ValueError(f"width and height must be multiples of {downscale}, got {width}x{height}")
        self.flow = info.flow
        self.latent_shape = (info.latent_channels, height // downscale, width // downscale)
        self.device = torch.device(host.torch_device())
        self.patcher = self.vae_patcher = None
        self._encoded = {}

    def add_lora(self, rank, alpha, targets):
        self.patcher, adapters = hs.inject_lora(self.model, rank=rank, alpha=alpha, targets=targets)
        self.vae_patcher = hs.grad_vae(self.vae)
        hs.prepare_training(self.patcher)
        return adapters

    def sigmas(self, steps, scheduler):
        with torch.inference_mode(False):      # a normal tensor: it joins autograd graphs
            self._schedule = hs.calculate_sigmas(self.model, scheduler, steps).clone()
        return self._schedule

    def _clip_cond(self, prompt):
        if prompt not in self._encoded:
            with torch.inference_mode(False), torch.no_grad():
                tokens = self.clip.tokenize(prompt)
                self._encoded[prompt] = self.clip.encode_from_tokens_scheduled(tokens)[0]
        c, d = self._encoded[prompt]
        return [c, dict(d)]

    def conditioning(self, prompts):
        """(positive, negative) CONDITIONING for a batch: the CONDITIONING inputs, or per-sample CLIP encodings."""
        if self.positive is not None:
            positive = self.positive
        else:
            positive = _cat_conditioning([self._clip_cond(p) for p in prompts])
        if self.negative is not None:
            negative = self.negative
        elif self.clip is not None:
            negative = [self._clip_cond("")]
        else:
            negative = zero_conditioning(positive)
        return positive, negative

    def session(self, prompts, cfg, fn):
        positive, negative = self.conditioning(prompts)
        guider = hs.make_guider(self.patcher, positive, negative, cfg)
        body = _Session(fn)
        zeros = torch.zeros(len(prompts), *self.latent_shape)
        # the trainer's schedule, so model patches reading transformer_options["sample_sigmas"] see the real one
        guider.sample(zeros, zeros.clone(), body, self._schedule.cpu(), seed=0)
        return body.result

    def decode(self, x):
        return hs.decode(self.vae, self.patcher.model.process_latent_out(x), patcher=self.vae_patcher)


# --- helpers ------------------------------------------------------------------------------------------------------

def _prompt_lines(text):
    return [line.strip() for line in str(text or "").splitlines() if line.strip()]


def image_grid(images, columns=None):
    """(B, 3, H, W) in [0, 1] -> one ComfyUI IMAGE (1, rows·H, cols·W, 3) with 2-px gaps."""
    b, c, h, w = images.shape
    cols = columns or max(1, min(b, int(round(b ** 0.5 + 0.49))))
    rows = -(-b // cols)
    pad = 2
    grid = torch.ones(c, rows * (h + pad) - pad, cols * (w + pad) - pad)
    for i in range(b):
        r, q = divmod(i, cols)
        grid[:, r * (h + pad): r * (h + pad) + h, q * (w + pad): q * (w + pad) + w] = images[i].float().cpu()
    return grid.clamp(0, 1).movedim(0, -1).unsqueeze(0)


def curve_image(log, title="DRaFT training"):
    """Reward and loss per step; the held-out reward (scored every N steps) is drawn as a step line."""
    from ..plots import line_plot

    series = {"reward": [r["reward"] for r in log], "loss": [r["loss"] for r in log]}
    if any(r.get("heldout_reward") is not None for r in log):
        held, last = [], None
        for r in log:
            last = r.get("heldout_reward", last) if r.get("heldout_reward") is not None else last
            held.append(last if last is not None else float("nan"))
        series["held-out reward"] = held
    return line_plot(series, title=title, xlabel="training step", ylabel="value", x=[r["step"] for r in log])


def mix_loras(lora_1, alpha_1, lora_2=None, alpha_2=0.0):
    """α1·ΔW1 + α2·ΔW2 as one LORA_MODEL (ranks concatenated, so the mix is exact)."""
    items = [(lora_1, alpha_1)] + ([(lora_2, alpha_2)] if lora_2 is not None else [])
    return mix_lora_state_dicts(items)


class _DeviceReward:
    """Scores on the reward's own device, returns on the images' device (the VAE and reward may differ)."""

    def __init__(self, reward):
        self.reward = reward

    def __call__(self, images, prompts):
        device = getattr(self.reward, "device", images.device)
        return self.reward(images.to(device), prompts).to(images.device)


# --- nodes --------------------------------------------------------------------------------------------------------

class RewardLabDRaFTTrainLoRA:
    DESCRIPTION = ("DRaFT: train a LoRA by backpropagating a differentiable reward through sampling (Clark et al. "
                   "2023), or AlignProp / ReFL / DRTune. Literature defaults: DRaFT-K with K=1 (or DRaFT-LV, n=2), "
                   "lr 4e-4, rank 8, weight decay 0.1, batch 4. Saves output/loras/<name>.safetensors every "
                   "'save_every' steps (stock LoraLoader lists it); returns the MODEL with the LoRA applied.")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    RETURN_TYPES = ("MODEL", "LORA_MODEL", "IMAGE", "IMAGE")
    RETURN_NAMES = ("model", "lora", "curve", "preview")
    OUTPUT_TOOLTIPS = ("The input MODEL with the trained LoRA merged at strength 1 (ready for KSampler).",
                       "The trained LoRA (ComfyUI keys) for Apply / Mix / Save Reward LoRA.",
                       "Reward and loss per training step (and the held-out reward when scored).",
                       "The last training batch's images.")
    NOT_IDEMPOTENT = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to fine-tune (SD1.x/2.x, SDXL, SD3/Flux, ...)."}),
                "vae": ("VAE", {"tooltip": "Its VAE: decodes samples for the reward (differentiably)."}),
                "reward": ("REWARD_MODEL", {"tooltip": "What to maximise (Load Reward Model / Combine Rewards)."}),
                "prompts": ("STRING", {"multiline": True, "default": "a photo of a cat",
                                       "tooltip": "Training prompts, one per line, cycled in shuffled order. Encoded "
                                                  "with the CLIP input when connected; always given to the reward."}),
                "sampler": (list(hs.STEP_NAMES), {"default": "euler",
                                                  "tooltip": "Step rule of the training trajectories (euler = DDIM)."}),
                "scheduler": (host.scheduler_names(), {"default": "normal" if "normal" in host.scheduler_names() else None,
                                                       "tooltip": "Sigma schedule, as in BasicScheduler."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 200, "tooltip": "Sampling steps per trajectory."}),
                "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 30.0, "step": 0.1,
                                  "tooltip": "Classifier-free guidance inside the training trajectories."}),
                "width": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip": "Image width."}),
                "height": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip": "Image height."}),
                "batch_size": ("INT", {"default": 4, "min": 1, "max": 64,
                                       "tooltip": "Trajectories per step; lower it if you run out of memory."}),
                "method": (list(METHOD_LABELS), {"default": "DRaFT-K",
                                                 "tooltip": "DRaFT-K: grad through the last K steps. DRaFT-LV: n "
                                                            "re-noised copies of the final sample. AlignProp: K drawn "
                                                            "per trajectory in [1, K]. ReFL: one step mid-chain. "
                                                            "DRTune: K sparse steps with stop-grad input."}),
                "k": ("INT", {"default": 1, "min": 1, "max": 200,
                              "tooltip": "K: grad steps (DRaFT-K, DRTune) or the largest K (AlignProp). 1 is best "
                                         "in the DRaFT paper and needs the least memory."}),
                "lv_n": ("INT", {"default": 2, "min": 1, "max": 16, "tooltip": "DRaFT-LV: re-noised copies (n)."}),
                "learning_rate": ("FLOAT", {"default": 4e-4, "min": 1e-7, "max": 1.0, "step": 1e-5,
                                            "tooltip": "AdamW learning rate of the LoRA."}),
                "rank": ("INT", {"default": 8, "min": 1, "max": 256, "tooltip": "LoRA rank."}),
                "training_steps": ("INT", {"default": 100, "min": 1, "max": 100000,
                                           "tooltip": "Optimiser steps."}),
                "save_every": ("INT", {"default": 50, "min": 0, "max": 100000,
                                       "tooltip": "Checkpoint every N steps (0: only at the end)."}),
                "name": ("STRING", {"default": "rewardlab_draft",
                                    "tooltip": "File name under output/loras/ (no folders; '../' is removed)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff,
                                 "tooltip": "Seeds noise, prompt order and method draws (private generator)."}),
            },
            "optional": {
                "positive": ("CONDITIONING", {"tooltip": "Fixed positive conditioning (instead of CLIP + prompts). "
                                                         "SDXL size/pooled conds come from here."}),
                "negative": ("CONDITIONING", {"tooltip": "Negative conditioning (default: empty prompt / zeros)."}),
                "clip": ("CLIP", {"tooltip": "Encodes each training prompt separately (per-sample conditioning)."}),
                "heldout_prompts": ("STRING", {"multiline": True, "default": "",
                                               "tooltip": "Held-out prompts scored every 'heldout_every' steps "
                                                          "(reward-hacking monitor; needs CLIP to differ)."}),
                "heldout_every": ("INT", {"default": 0, "min": 0, "max": 100000,
                                          "tooltip": "Score held-out prompts every N steps (0: never)."}),
                "early_stop_patience": ("INT", {"default": 0, "min": 0, "max": 1000,
                                                "tooltip": "Stop after N held-out scores without improvement."}),
                "kl_weight": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1000.0, "step": 0.01,
                                        "tooltip": "DRaFT+ ε-space L2 penalty to the frozen model (anti reward "
                                                   "hacking; one extra forward per grad step)."}),
                "weight_decay": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 10.0, "step": 0.01,
                                           "tooltip": "AdamW weight decay."}),
                "max_grad_norm": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1000.0, "step": 0.1,
                                            "tooltip": "Gradient-norm clip (0: off)."}),
                "grad_accum": ("INT", {"default": 1, "min": 1, "max": 256,
                                       "tooltip": "Micro-batches per optimiser step (larger effective batch)."}),
                "targets": (list(TARGETS), {"default": "attention", "tooltip": "Layers that get a LoRA."}),
                "precision": (list(PRECISIONS), {"default": "bf16",
                                                 "tooltip": "Autocast dtype on CUDA (CPU always runs fp32)."}),
                "checkpointing": ("BOOLEAN", {"default": True,
                                              "tooltip": "Recompute grad steps in backward (less memory)."}),
                "resume": ("BOOLEAN", {"default": False,
                                       "tooltip": "Continue from output/loras/<name> and its .state.pt if present."}),
            },
        }

    def train(self, model, vae, reward, prompts, sampler, scheduler, steps, cfg, width, height, batch_size, method,
              k, lv_n, learning_rate, rank, training_steps, save_every, name, seed, positive=None, negative=None,
              clip=None, heldout_prompts="", heldout_every=0, early_stop_patience=0, kl_weight=0.0,
              weight_decay=0.1, max_grad_norm=1.0, grad_accum=1, targets="attention", precision="bf16",
              checkpointing=True, resume=False):
        import os

        lines = _prompt_lines(prompts) or [""]
        held = _prompt_lines(heldout_prompts)
        config = DraftConfig(method=METHOD_LABELS[method], k=k, lv_n=lv_n, steps=steps, sampler=sampler,
                             scheduler=scheduler, cfg=cfg, batch_size=batch_size, grad_accum=grad_accum,
                             lr=learning_rate, weight_decay=weight_decay, max_grad_norm=max_grad_norm, rank=rank,
                             targets=TARGETS[targets], train_steps=training_steps, seed=seed % 2**63,
                             precision=precision, checkpointing=checkpointing, kl_weight=kl_weight,
                             heldout_every=heldout_every if held else 0, early_stop_patience=early_stop_patience,
                             save_every=save_every)
        config.validate()
        path = ckpt.output_lora_path(name)
        bundle = ComfyBundle(model, vae, width, height, positive, negative, clip)
        pbar = host.progress_bar(training_steps)

        def on_step(record, trainer):
            preview = host.preview_from_image(host.bchw_to_image(trainer.last_images[:1]))
            pbar.update_absolute(record["step"], training_steps, preview)

        with hs.grad_enabled():
            trainer = Trainer(bundle, _DeviceReward(reward), config, prompts=lines, heldout=held, lora_path=path,
                              on_step=on_step, cancel=host.interrupted, free_memory=host.free_memory,
                              run_id=os.path.basename(path))
            try:
                if resume and os.path.exists(path):
                    trainer.resume()
                trainer.train()
            except TrainingStopped as stop:
                if stop.reason == "cancelled":
                    host.throw_if_interrupted()      # ComfyUI's own "interrupted" outcome
                raise RuntimeError(str(stop)) from None
            finally:                                 # also on an interrupt raised by the progress bar
                hs.release(*[p for p in (bundle.patcher, bundle.vae_patcher) if p is not None])
            lora = trainer.lora_state_dict()
            log, images = trainer.log, trainer.last_images
        trained = hs.apply_lora_state_dict(model, lora, 1.0)
        preview = image_grid(images) if images is not None else torch.zeros(1, 64, 64, 3)
        return (trained, lora, curve_image(log), preview)


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
        return (hs.apply_lora_state_dict(model, lora, strength),)


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
        mixed = mix_loras(lora_1, alpha_1, lora_2, alpha_2)
        return (hs.apply_lora_state_dict(model, mixed, 1.0), mixed)


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
            "name": ("STRING", {"default": "rewardlab_lora",
                                "tooltip": "File name under output/loras/ (no folders; '../' is removed)."}),
        }}

    def save(self, lora, name):
        path = ckpt.output_lora_path(name)
        ckpt.save_lora_file(lora, path, {"rewardlab": "reward lora"})
        return {"ui": {"text": [path]}, "result": (path,)}


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
