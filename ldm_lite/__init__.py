"""ldm_lite: a small pure-PyTorch toolkit for DDPM and latent diffusion, built to study and fix the
biases of diffusion models (signal leak, exposure bias, the frequency view of the forward process).

The public API, in the order data flows: data -> noise -> model -> scheduler -> metrics.
"""
from .allocator import keep_freed_memory
from .data import InMemoryImages, load_dataset, load_image_folder, synthetic_brightness, to_float, to_uint8
from .leak import LeakStats
from .models import AutoencoderKL, UNet, UNetConfig, load_unet, load_vae, save_unet, unet_preset
from .noise import add_offset_noise, min_snr_weights, perturb_noise, pyramid_noise, training_noise
from .sampling import eps_scale_schedule, initial_noise, sample
from .schedulers import DDIMScheduler, DDPMScheduler, SchedulerOutput, predict_x0_and_eps
from .schedules import (NAMED_SCHEDULES, alphas_cumprod_from_betas, make_betas, make_timesteps,
                        named_alphas_cumprod, rescale_zero_terminal_snr, schedule_table, signal_at_first_step, snr)
from .spectral import dct2, idct2

__version__ = "0.1.0"

__all__ = [
    "InMemoryImages", "load_dataset", "load_image_folder", "synthetic_brightness", "to_float", "to_uint8",
    "add_offset_noise", "min_snr_weights", "perturb_noise", "pyramid_noise", "training_noise",
    "UNet", "UNetConfig", "load_unet", "save_unet", "unet_preset", "AutoencoderKL", "load_vae",
    "DDIMScheduler", "DDPMScheduler", "SchedulerOutput", "predict_x0_and_eps",
    "NAMED_SCHEDULES", "alphas_cumprod_from_betas", "make_betas", "make_timesteps", "named_alphas_cumprod",
    "rescale_zero_terminal_snr", "schedule_table", "signal_at_first_step", "snr",
    "LeakStats", "eps_scale_schedule", "initial_noise", "sample", "dct2", "idct2", "keep_freed_memory",
]
