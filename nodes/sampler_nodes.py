"""SAMPLER node running RewardLab's own trajectory runner, so a workflow samples with exactly the implementation the
optimisers (ReNO, noise search, DRaFT) used: an optimised NOISE or LoRA then reproduces under SamplerCustomAdvanced."""
from ..host.bridge import STEP_NAMES, RunnerSampler


class RewardLabSampler:
    DESCRIPTION = ("RewardLab's sampler loop as a SAMPLER for SamplerCustom / SamplerCustomAdvanced. Use it to "
                   "reproduce what RewardLab optimised (a NOISE from ReNO or noise search, a trained LoRA) with the "
                   "same step implementation.")
    CATEGORY = "RewardLab/Sampling"
    FUNCTION = "get_sampler"
    RETURN_TYPES = ("SAMPLER",)
    RETURN_NAMES = ("sampler",)
    OUTPUT_TOOLTIPS = ("A SAMPLER driven by RewardLab's trajectory runner.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sampler_name": (list(STEP_NAMES), {
                "default": "euler",
                "tooltip": "Step rule: euler (= deterministic DDIM), ddim (with eta), euler_ancestral, dpmpp_2m. "
                           "Flow-matching models get the flow form automatically."}),
            "eta": ("FLOAT", {
                "default": -1.0, "min": -1.0, "max": 1.0, "step": 0.01,
                "tooltip": "Stochasticity for ddim and euler_ancestral; -1 keeps their defaults (ddim 0, "
                           "euler_ancestral 1). Ancestral noise is seeded by the NOISE's seed. Ignored by the others."}),
        }}

    def get_sampler(self, sampler_name, eta):
        if sampler_name not in STEP_NAMES:
            raise ValueError(f"unknown sampler {sampler_name!r}; choose one of {', '.join(STEP_NAMES)}")
        return (RunnerSampler(sampler_name, eta=None if eta < 0 else eta),)


NODE_CLASS_MAPPINGS = {"RewardLabSampler": RewardLabSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"RewardLabSampler": "RewardLab Sampler"}
