"""ldm_lite: a small pure-PyTorch toolkit for DDPM and latent diffusion, built to study and fix the
biases of diffusion models (signal leak, exposure bias, the frequency view of the forward process)."""
from .schedules import (alphas_cumprod_from_betas, make_betas, make_timesteps, rescale_zero_terminal_snr,
                        schedule_table, signal_at_first_step, snr)
from .schedulers import DDIMScheduler, DDPMScheduler, SchedulerOutput

__version__ = "0.1.0"
