"""Host-free sampling core in the k-diffusion convention (denoiser(x, sigma, **extra) -> x̂0)."""
from .denoisers import CFGDenoiser, DiscreteDenoiser, FlowDenoiser, ModuleDenoiser, sigma_to_t, skip_coefficient
from .runner import Cancelled, Policy, Trajectory, noise_scaling, sample
from .sigmas import SCHEDULER_NAMES, scaled_linear_model_sigmas, sigma_schedule
from .steps import STEPS, get_step

__all__ = ["CFGDenoiser", "DiscreteDenoiser", "FlowDenoiser", "ModuleDenoiser", "sigma_to_t", "skip_coefficient", "Cancelled", "Policy",
           "Trajectory", "noise_scaling", "sample", "SCHEDULER_NAMES", "scaled_linear_model_sigmas", "sigma_schedule",
           "STEPS", "get_step"]
