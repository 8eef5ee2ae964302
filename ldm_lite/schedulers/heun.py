"""Heun's second-order sampler: Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models" (arXiv:2206.00364), Algorithm 1 (deterministic), laid out one model call per `step` as diffusers does."""
import numpy as np
import torch

from .base import SchedulerOutput
from .sigmas import SigmaScheduler, add_into, respaced_sigmas


class HeunDiscreteScheduler(SigmaScheduler):
    """Heun (trapezoidal) steps of the probability-flow ODE in sigma, with diffusers' keywords and defaults.

    For N noise levels sigma_0 > ... > sigma_{N-1} > sigma_N = 0, `timesteps` lists t_0 once and every later
    timestep twice: [t_0, t_1, t_1, ..., t_{N-1}, t_{N-1}], 2N - 1 model calls. Calls alternate between an Euler
    predictor from sigma_i to sigma_{i+1} (line 5 of Algorithm 1) and the corrector that averages the slopes at
    both ends (lines 7-8); the last call, towards sigma_N = 0, is a plain Euler step (line 6). `order` = 2.
    clip_sample clamps every x0 estimate to +-clip_sample_range. rescale_betas_zero_snr (Lin et al. 2023,
    arXiv:2305.08891, Algorithm 1) clamps alpha_bar[T - 1] = 0 to 2^-24 (sigma_max = 4096), as Euler does;
    diffusers' Heun has no zero-SNR option.
    """

    order = 2

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                 use_beta_sigmas: bool = False, clip_sample: bool = False, clip_sample_range: float = 1.0,
                 timestep_spacing: str = "linspace", steps_offset: int = 0, rescale_betas_zero_snr: bool = False):
        config = self._keyword_arguments(locals())
        self._init_schedule(config)

    def _reset_state(self):
        self._derivative = None  # slope at the start of the pending Heun step (None: next call is a predictor)
        self._dt = None  # sigma_{i+1} - sigma_i of that step
        self._start = None  # x at sigma_i

    @property
    def state_in_first_order(self) -> bool:
        """True when the next call is a predictor (Euler) call, False when it is the corrector."""
        return self._derivative is None

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Timesteps (2N - 1,) float32 with every timestep after the first repeated, sigmas (2N,) likewise."""
        config = self.config
        timesteps, sigmas = respaced_sigmas(self._spaced_timesteps(num_inference_steps), self.train_sigmas,
                                            config["use_karras_sigmas"], config["use_exponential_sigmas"])
        self.num_inference_steps = num_inference_steps
        sigmas = np.append(sigmas, 0.0).astype(np.float32)
        sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
        timesteps = timesteps.astype(np.float32)
        self._set_table(np.concatenate([timesteps[:1], np.repeat(timesteps[1:], 2)]), sigmas, device)

    def step(self, model_output, timestep, sample) -> SchedulerOutput:
        """One model call's update: the Euler predictor, or the Heun corrector that completes the step.

        model_output: (B, C, H, W) network output for `scale_model_input(sample, timestep)`; sample: the x the
        network saw (B, C, H, W): x at sigma_i for a predictor call, the predicted x at sigma_{i+1} for a corrector.
        Returns the predicted x at sigma_{i+1} (predictor) or the corrected one (corrector), and the x0 estimate.
        """
        index = self._current_index(timestep)
        predictor = self.state_in_first_order
        # the step runs from entry i to i + 1 (sigma to sigma_next); its corrector call comes one table entry later
        step = index if predictor else index - 1
        pred_original_sample = self._denoised(model_output, sample, index)
        if self.config["clip_sample"]:
            limit = self.config["clip_sample_range"]
            pred_original_sample = pred_original_sample.clamp(-limit, limit) if pred_original_sample is model_output \
                else pred_original_sample.clamp_(-limit, limit)

        if predictor:
            # line 5: d_i = (x_i - D(x_i, sigma_i)) / sigma_i; Euler step x_i + (sigma_{i+1} - sigma_i) d_i
            derivative = torch.sub(sample, pred_original_sample).div_(self._sigma[step])
            self._derivative, self._dt, self._start = derivative, self._step_length[step], sample
            prev_sample = add_into(derivative * self._dt, sample)
        else:
            # lines 7-8: d' = (x_{i+1} - D(x_{i+1}, sigma_{i+1})) / sigma_{i+1};
            # x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (d_i + d') / 2
            derivative = torch.sub(sample, pred_original_sample).div_(self._sigma[index])
            derivative = add_into(derivative, self._derivative).div_(2)
            prev_sample = add_into(derivative.mul_(self._dt), self._start)
            self._reset_state()
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
