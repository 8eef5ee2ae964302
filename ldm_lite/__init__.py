"""ldm_lite: a small pure-PyTorch toolkit for DDPM and latent diffusion, built to study and fix the
biases of diffusion models (signal leak, exposure bias, the frequency view of the forward process).

The public API, in the order data flows: data -> noise -> model -> scheduler -> metrics.
"""
from .allocator import keep_freed_memory
from .data import InMemoryImages, load_dataset, load_image_folder, synthetic_brightness, to_float, to_uint8
from .noise import add_offset_noise, min_snr_weights, perturb_noise, pyramid_noise, training_noise
from .models import AutoencoderKL, UNet, UNetConfig, load_unet, load_vae, save_unet, unet_preset
from .oracle import GaussianMixtureDenoiser, brightness_mixture
from .runs import LoadedModel, load_model
from .schedules import (NAMED_SCHEDULES, alphas_cumprod_from_betas, make_betas, make_timesteps,
                        named_alphas_cumprod, rescale_zero_terminal_snr, schedule_table, signal_at_first_step, snr)
from .schedulers import (ALIASES, SCHEDULER_CLASSES, DDIMInverseScheduler, DDIMScheduler, DDPMScheduler,
                         DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                         HeunDiscreteScheduler, PNDMScheduler, SchedulerOutput, UniPCMultistepScheduler, from_config,
                         predict_x0_and_eps)
from .leak import LeakStats
from .guidance import ClassifierFreeGuidance
from .sampling import eps_scale_schedule, initial_noise, sample, sample_seed
from .inversion import invert, reconstruct
from .spectral import dct2, idct2

__version__ = "0.1.0"

__all__ = [
    "InMemoryImages", "load_dataset", "load_image_folder", "synthetic_brightness", "to_float", "to_uint8",
    "add_offset_noise", "min_snr_weights", "perturb_noise", "pyramid_noise", "training_noise",
    "UNet", "UNetConfig", "load_unet", "save_unet", "unet_preset", "AutoencoderKL", "load_vae",
    "GaussianMixtureDenoiser", "brightness_mixture", "LoadedModel", "load_model",
    "NAMED_SCHEDULES", "alphas_cumprod_from_betas", "make_betas", "make_timesteps", "named_alphas_cumprod",
    "rescale_zero_terminal_snr", "schedule_table", "signal_at_first_step", "snr",
    "ALIASES", "SCHEDULER_CLASSES", "from_config", "DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler", "PNDMScheduler", "DDIMInverseScheduler", "SchedulerOutput", "predict_x0_and_eps",
    "LeakStats", "ClassifierFreeGuidance", "eps_scale_schedule", "initial_noise", "sample", "sample_seed",
    "invert", "reconstruct", "dct2", "idct2", "keep_freed_memory",
]
