"""The embedded tiny text-to-image model: a pixel-space diffusers ``UNet2DConditionModel`` (32×32 RGB),
the built-in text encoder and a DDPM noise schedule, shipped as ``tiny_model.safetensors`` + ``tiny_model.json``.

    model = load_tiny()
    images = model.generate(["a red circle on a blue background"], steps=20, cfg=3.0)   # (B, 3, 32, 32) in [0, 1]

Sampling goes through the core runner (``samplers.sample``) with ``CFGDenoiser``, like every other model.
diffusers is imported inside functions so importing this module stays cheap.
"""
import json
from pathlib import Path

import torch

from ..samplers import CFGDenoiser, DiscreteDenoiser, noise_scaling, sample, sigma_schedule
from .text import VOCAB, Tokenizer, TinyTextEncoder

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "tiny_model.safetensors"
CONFIG = HERE / "tiny_model.json"

IMAGE_SIZE = 32
# The UNet sees the 32×32 RGB image as 8×8 patches of 4×4 pixels (pixel-unshuffle, 48 channels): an exact,
# invertible re-arrangement of pixel space that makes a training step ~16× cheaper than convolving at 32×32,
# which is what lets the shipped weights train in minutes on two shared CPU cores.
PATCH = 4
DEFAULT_UNET = dict(
    sample_size=IMAGE_SIZE // PATCH, in_channels=3 * PATCH**2, out_channels=3 * PATCH**2, layers_per_block=1,
    block_out_channels=(64, 128),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
)
DEFAULT_TEXT = dict(vocab_size=len(VOCAB), max_length=16, dim=64, layers=1, heads=4)
# Linear DDPM betas (Ho et al. 2020): the usual choice for pixel space, where σ_max ≈ 157 leaves no signal.
# v-prediction, not ε: with ε an error at σ ≈ 157 reaches x̂0 multiplied by σ, and a briefly trained UNet
# (measured: ε-MSE 0.27 at high σ after 200 steps) then samples pure noise; v's x̂0 error stays O(1).
DEFAULT_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                        prediction_type="v_prediction")


def ddpm_scheduler(schedule=DEFAULT_SCHEDULE):
    from diffusers import DDPMScheduler
    return DDPMScheduler(**schedule)


def build_unet(config=DEFAULT_UNET):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_config(dict(config))


class PatchUNet(torch.nn.Module):
    """The diffusers UNet applied to pixel-unshuffled images: (B, 3, H, W) in, ε (B, 3, H, W) out.
    Same call as the UNet (``net(x, t, encoder_hidden_states=...)``), so ``DiscreteDenoiser`` wraps it."""

    def __init__(self, unet, patch=PATCH):
        super().__init__()
        self.unet, self.patch = unet, patch

    def forward(self, x, t, **cond):
        out = self.unet(torch.nn.functional.pixel_unshuffle(x, self.patch), t, **cond).sample
        return torch.nn.functional.pixel_shuffle(out, self.patch)


def to_model_space(images):
    """Images in [0, 1] -> the model's pixel space [-1, 1]."""
    return images * 2 - 1


def decode(x):
    """Model space -> images in [0, 1]. Differentiable (the clamp only cuts gradient outside the range)."""
    return (x * 0.5 + 0.5).clamp(0, 1)


class TinyModel(torch.nn.Module):
    """UNet + text encoder + schedule, with the helpers the demo, the tests and the nodes use."""

    def __init__(self, unet, text, alphas_cumprod, config):
        super().__init__()
        self.unet, self.text, self.config = unet, text, config     # unet: the diffusers UNet2DConditionModel
        self.net = PatchUNet(unet, config.get("patch", PATCH))      # the same UNet on (B, 3, 32, 32) pixels
        self.tokenizer = Tokenizer(max_length=text.config["max_length"])
        self.denoiser = DiscreteDenoiser(self.net, alphas_cumprod, config["schedule"]["prediction_type"])

    @property
    def model_sigmas(self):
        return self.denoiser.model_sigmas

    @property
    def device(self):
        return self.model_sigmas.device

    @property
    def image_size(self):
        return self.config["unet"]["sample_size"] * self.net.patch

    def encode(self, prompts):
        """Prompts (a string or list) -> dict(encoder_hidden_states=(B, L, D)); "" is the unconditional input."""
        ids = self.tokenizer(prompts).to(self.device)
        return {"encoder_hidden_states": self.text(ids)}

    def decode(self, x):
        return decode(x)

    def initial_noise(self, batch, seed=0):
        """Standard-normal noise (B, 3, H, W), drawn on the CPU so a seed gives the same images on any device."""
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, 3, self.image_size, self.image_size, generator=g).to(self.device)

    def guided(self, prompts, cfg=3.0, negative=""):
        """The CFG denoiser for these prompts (negative prompt "" = unconditional)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        cond = self.encode(prompts)
        uncond = self.encode([negative] * len(prompts))
        return CFGDenoiser(self.denoiser, cond, uncond, cfg)

    @torch.no_grad()
    def generate(self, prompts, steps=20, cfg=3.0, seed=0, sampler="euler", scheduler="karras", noise=None,
                 callback=None):
        """Sample images (B, 3, H, W) in [0, 1] for the prompts with the core runner."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        sigmas = sigma_schedule(scheduler, steps, self.model_sigmas.cpu()).to(self.device)
        noise = self.initial_noise(len(prompts), seed) if noise is None else noise.to(self.device)
        x = noise_scaling(sigmas[0], noise)
        g = torch.Generator().manual_seed(seed + 1)       # ancestral samplers' noise, independent of x_T
        out = sample(self.guided(prompts, cfg), x, sigmas, step=sampler, generator=g, callback=callback)
        return decode(out.x)


def state_dict_for_saving(unet, text):
    tensors = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    tensors.update({f"text.{k}": v for k, v in text.state_dict().items()})
    return {k: v.detach().to(torch.float16).contiguous() for k, v in tensors.items()}


def save_tiny(unet, text, out_dir, extra=None):
    """Write tiny_model.safetensors (fp16, to stay small) and tiny_model.json (architecture, schedule,
    alphas_cumprod and training metadata) into ``out_dir``."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scheduler = ddpm_scheduler()
    unet_config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    config = dict(unet=unet_config, text=text.config, patch=PATCH, schedule=DEFAULT_SCHEDULE, vocab=list(VOCAB),
                  alphas_cumprod=scheduler.alphas_cumprod.tolist(), **(extra or {}))
    save_file(state_dict_for_saving(unet, text), str(out_dir / WEIGHTS.name))
    (out_dir / CONFIG.name).write_text(json.dumps(config, indent=1))
    return out_dir / WEIGHTS.name


def load_tiny(device="cpu", path=None):
    """Load the shipped tiny model (or one saved by ``save_tiny`` in the folder ``path``), in eval mode."""
    from safetensors.torch import load_file
    folder = Path(path) if path is not None else HERE
    weights, config_file = folder / WEIGHTS.name, folder / CONFIG.name
    if not weights.exists() or not config_file.exists():
        raise FileNotFoundError(f"tiny model files missing in {folder}; run `python -m rewardlab.tiny.train "
                                f"--out {folder}` to create them")
    config = json.loads(config_file.read_text())
    if config["vocab"] != list(VOCAB):
        raise RuntimeError("tiny model vocabulary does not match tiny/text.py; retrain with rewardlab.tiny.train")
    unet = build_unet(config["unet"])
    text = TinyTextEncoder(**config["text"])
    tensors = load_file(str(weights))
    unet.load_state_dict({k[5:]: v.float() for k, v in tensors.items() if k.startswith("unet.")})
    text.load_state_dict({k[5:]: v.float() for k, v in tensors.items() if k.startswith("text.")})
    model = TinyModel(unet, text, config["alphas_cumprod"], config)
    return model.to(device).eval().requires_grad_(False)
