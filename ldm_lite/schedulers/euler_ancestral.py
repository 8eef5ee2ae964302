"""Euler ancestral sampler: the ancestral (DDPM-like) step of Ho et al. 2020 (arXiv:2006.11239) written in sigma,
as k-diffusion's sample_euler_ancestral; the split of the noise follows DDIM with eta = 1 (Song et al. 2021,
arXiv:2010.02502, eq. 16)."""
import numpy as np
import torch

from .base import SchedulerOutput, randn_tensor
from .sigmas import SigmaScheduler, add_into, timestep_to_sigma


class EulerAncestralDiscreteScheduler(SigmaScheduler):
    """Ancestral sampling in sigma with diffusers' keywords: each step denoises to a lower level sigma_down by an
    Euler step, then adds fresh noise of scale sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2.

    One model call per step (N calls for N steps); noise is drawn on every step, the last one included (where
    sigma_up = 0), so a shared generator stays in step with diffusers. x_T = init_noise_sigma * randn.
    Differences from diffusers 0.42: prediction_type="sample" is accepted (x0 is the output; diffusers raises
    NotImplementedError). Where the noise level rises between two listed timesteps (rescale_betas_zero_snr: the
    clamped sigma(999) = 4096 lies below sigma(996..998)), sigma_up is 0 and the step is the ODE step; diffusers
    takes the square root of a negative number and returns NaN.
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 timestep_spacing: str = "linspace", steps_offset: int = 0, rescale_betas_zero_snr: bool = False):
        config = self._keyword_arguments(locals())
        self._init_schedule(config)

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Timesteps (N,) float32 (fractional for linspace spacing) and sigmas (N+1,), the last one 0."""
        timesteps = self._spaced_timesteps(num_inference_steps)
        sigmas = timestep_to_sigma(timesteps, self.train_sigmas)
        self.num_inference_steps = num_inference_steps
        self._set_table(timesteps, np.append(sigmas, 0.0), device)

    def step(self, model_output, timestep, sample, generator=None) -> SchedulerOutput:
        """One ancestral step x_sigma -> x_sigma_next.

        model_output: (B, C, H, W) network output for `scale_model_input(sample, timestep)`; sample: x_sigma
        (B, C, H, W). generator: one torch.Generator or a list, one per sample.
        sigma_up = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2) (DDIM eq. 16, eta = 1, in sigma),
        sigma_down = sqrt(sigma_next^2 - sigma_up^2); x_next = x + (sigma_down - sigma) (x - x0) / sigma + sigma_up z.
        """
        index = self._current_index(timestep)
        sample = sample.to(torch.float32)  # step in float32 whatever the model's dtype (as diffusers)
        pred_original_sample = self._denoised(model_output, sample, index)

        # Euler step of the ODE down to sigma_down, then the ancestral noise (sigma_down - sigma and sigma_up
        # per step from `set_timesteps`)
        derivative = torch.sub(sample, pred_original_sample).div_(self._sigma[index])
        prev_sample = derivative.mul_(self._down_step[index]).add_(sample)  # x + d (sigma_down - sigma)
        noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
        prev_sample = add_into(noise.mul_(self._sigma_up[index]), prev_sample)
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev_sample.to(model_output.dtype),
                               pred_original_sample=pred_original_sample)

    def _set_table(self, timesteps, sigmas, device=None, timestep_dtype=torch.float32):
        super()._set_table(timesteps, sigmas, device, timestep_dtype)
        # split each next noise level into a deterministic part (sigma_down) and fresh noise (sigma_up); clamped
        # where the level rises (only on the non-monotonic zero-SNR table, where diffusers returns NaN)
        sigma, sigma_next = self.sigmas[:-1], self.sigmas[1:]
        sigma_up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2).clamp(min=0) ** 0.5
        sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
        self._sigma_up, self._down_step = sigma_up.unbind(), (sigma_down - sigma).unbind()
