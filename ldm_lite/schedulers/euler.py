"""Euler sampler in sigma, with optional churn: Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models" (arXiv:2206.00364), Algorithm 2 with the Euler step only."""
import numpy as np
import torch

from .base import SchedulerOutput, _check_choice, randn_tensor
from .sigmas import FINAL_SIGMAS_TYPES, INTERPOLATION_TYPES, SigmaScheduler, denoised, final_sigma, respaced_sigmas


class EulerDiscreteScheduler(SigmaScheduler):
    """Euler steps of the probability-flow ODE dx/dsigma = (x - x0(x, sigma)) / sigma, with diffusers' keywords.

    One model call per step (N calls for N steps); x_T = init_noise_sigma * randn, and the network gets
    `scale_model_input(x, t)`. Sigmas: interpolated at the spaced timesteps, or Karras / exponential sigmas
    between the first and last of those (sigma_min / sigma_max override the ends), whose fractional timesteps
    are then passed to the model. final_sigmas_type: the last step lands on 0 ("zero") or on sigma(t=0).

    Differences from diffusers 0.42 (documented, tested against closed-form values):
    - interpolation_type="log_linear" interpolates log sigma at the spaced timesteps (equal to "linear" on
      integer timesteps). diffusers instead spaces N + 1 sigmas uniformly in log between sigma(T-1) and sigma(0),
      unrelated to the timesteps passed to the model, and its last step stops at sigma(0) > 0 (residual noise).
    - timestep_type="continuous" (timesteps 0.25 log sigma) needs a network conditioned on log sigma: refused.
    - use_beta_sigmas (scipy) is refused.
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 interpolation_type: str = "linear", use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False, sigma_min: float | None = None,
                 sigma_max: float | None = None, timestep_spacing: str = "linspace", timestep_type: str = "discrete",
                 steps_offset: int = 0, rescale_betas_zero_snr: bool = False, final_sigmas_type: str = "zero"):
        config = self._keyword_arguments(locals())
        _check_choice("interpolation_type", interpolation_type, INTERPOLATION_TYPES)
        _check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
        if timestep_type != "discrete":
            raise ValueError(f"timestep_type={timestep_type!r} is not supported: 'continuous' conditions the network "
                             "on 0.25 log sigma, and ldm_lite's UNet takes discrete timesteps; use 'discrete'")
        self._init_schedule(config)

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Timesteps (N,) float32 (fractional for linspace spacing and Karras / exponential sigmas), sigmas (N+1,)."""
        config = self.config
        timesteps, sigmas = respaced_sigmas(self._spaced_timesteps(num_inference_steps), self.train_sigmas,
                                            config["use_karras_sigmas"], config["use_exponential_sigmas"],
                                            config["interpolation_type"], config["sigma_min"], config["sigma_max"])
        self.num_inference_steps = num_inference_steps
        last = final_sigma(self.train_sigmas, config["final_sigmas_type"])
        self._set_table(timesteps.astype(np.float32), np.append(sigmas, last), device)

    def step(self, model_output, timestep, sample, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None) -> SchedulerOutput:
        """One step x_sigma -> x_sigma_next (Karras et al. Algorithm 2 without the 2nd-order correction).

        model_output: (B, C, H, W) network output for `scale_model_input(sample, timestep)`; sample: x_sigma
        (B, C, H, W). Churn (lines 4-6): for s_tmin <= sigma <= s_tmax, gamma = min(s_churn / N, sqrt(2) - 1),
        sigma_hat = (1 + gamma) sigma and x_hat = x + sqrt(sigma_hat^2 - sigma^2) s_noise z. As in diffusers, the
        network was called before the churn, so its output at (x, sigma) stands in for the one at (x_hat,
        sigma_hat): an epsilon output is reused as is, a v output is converted with the pre-churn sigma.
        generator: one torch.Generator or a list, one per sample (noise drawn only while gamma > 0).
        """
        index = self._current_index(timestep)
        sample = sample.to(torch.float32)  # step in float32 whatever the model's dtype (as diffusers)
        sigma, sigma_next = self._sigma[index], self._sigma[index + 1]

        # lines 4-6: churn, raising the noise level from sigma to sigma_hat
        gamma = 0.0
        if s_churn != 0 and s_tmin <= sigma <= s_tmax:  # (as a float32 comparison)
            gamma = min(s_churn / (len(self.sigmas) - 1), 2 ** 0.5 - 1)
        if gamma == 0:  # sigma_hat = sigma; the x0 estimate and the step length come from the precomputed table
            sigma_hat, dt = sigma, self._step_length[index]
            pred_original_sample = self._denoised(model_output, sample, index)
        else:
            sigma_hat = sigma * (gamma + 1)
            if gamma > 0:
                noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
                sample = sample + noise * s_noise * (sigma_hat ** 2 - sigma ** 2) ** 0.5
            dt = sigma_next - sigma_hat
            # network output at (x, sigma) for D(x_hat, sigma_hat)
            sigma_for_output = sigma if self.prediction_type == "v_prediction" else sigma_hat
            pred_original_sample = denoised(model_output, sample, sigma_for_output, self.prediction_type)

        # line 7: the ODE derivative d = (x_hat - D) / sigma_hat; line 8: Euler step x_hat + d (sigma_next - sigma_hat)
        derivative = torch.sub(sample, pred_original_sample).div_(sigma_hat)
        prev_sample = derivative.mul_(dt).add_(sample)  # one buffer, the same rounding as x + d * dt
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev_sample.to(model_output.dtype),
                               pred_original_sample=pred_original_sample)
