"""DDIM sampler: Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models" (arXiv:2010.02502)."""
import torch

from ..schedules import ALL_TIMESTEP_SPACINGS
from .base import Scheduler, SchedulerOutput, noise_like


class DDIMScheduler(Scheduler):
    """DDIM with diffusers' keyword names. eta = 0 is the deterministic sampler, eta = 1 matches DDPM's variance.

    `set_alpha_to_one`: after the last step, use alpha_bar = 1 (return the clean x0 estimate) instead of
    alpha_bar[0]. Unlike diffusers, the previous timestep is read from `timesteps`, so `linspace` and
    non-integer `trailing` spacings step to the right place. timestep_spacing also takes the DDIM paper's
    "quadratic" (`ldm_lite.schedules.make_timesteps`), which diffusers lacks.
    """

    order = 1  # model calls per step
    init_noise_sigma = 1.0  # x_T = init_noise_sigma * randn (diffusers' convention)
    timestep_spacings = ALL_TIMESTEP_SPACINGS

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 clip_sample_range: float = 1.0, sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 rescale_betas_zero_snr: bool = False):
        self._init_schedule(self._keyword_arguments(locals()))

    def _step_coefficients(self, t, prev_t) -> dict:
        # float32, in diffusers' operation order (see base module docstring)
        ab = self.alphas_cumprod[t]
        final = torch.tensor(1.0) if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]
        ab_prev = self._alpha_bar_prev(prev_t, final)
        variance = ((1 - ab_prev) / (1 - ab)) * (1 - ab / ab_prev)  # sigma_t^2 / eta^2, Song et al. eq. 16
        return dict(sqrt_ab=ab ** 0.5, sqrt_one_minus_ab=(1 - ab) ** 0.5, sqrt_ab_prev=ab_prev ** 0.5,
                    ab_prev=ab_prev, variance=variance)

    def _eta_coefficients(self, coefficients: dict, eta: float) -> tuple:
        """(sigma_t, sqrt(1 - ab_prev - sigma_t^2)) for this eta, computed once per (t, eta) in float32."""
        cache = coefficients.setdefault("by_eta", {})
        if eta not in cache:
            variance, ab_prev = torch.tensor(coefficients["variance"]), torch.tensor(coefficients["ab_prev"])
            sigma = eta * variance ** 0.5
            direction = (1 - ab_prev - sigma ** 2).clamp(min=0) ** 0.5  # rounding can dip below 0
            cache[eta] = (float(sigma), float(direction))
        return cache[eta]

    def step(self, model_output, timestep, sample, *, eta: float = 0.0, use_clipped_model_output: bool = False,
             generator=None, variance_noise=None, eps_scale: float = 1.0) -> SchedulerOutput:
        """One DDIM update x_t -> x_{t_prev} (Song et al. eq. 12).

        model_output: (B, C, H, W) epsilon / v / x0 prediction per `prediction_type` ((B, 2C, H, W) from a
        learned-variance model: the variance half is unused by DDIM); sample: x_t (B, C, H, W).
        x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z,  sigma = eta sqrt(eq. 16 variance).
        use_clipped_model_output: after clipping or thresholding x0, re-derive eps = (x_t - sqrt(ab) x0) /
        sqrt(1 - ab) from the clipped x0, as ADM and ADM-ES do (diffusers' keyword and default).
        """
        coefficients = self._coefficients[self._lookup(timestep)]
        if model_output.shape[1] == 2 * sample.shape[1]:
            model_output = model_output[:, :sample.shape[1]]
        x0, eps = self._x0_and_eps(model_output, sample, coefficients, eps_scale)
        if use_clipped_model_output:
            eps = (sample - coefficients["sqrt_ab"] * x0) / coefficients["sqrt_one_minus_ab"]
        sigma, direction = self._eta_coefficients(coefficients, eta)
        # separate multiply and add (no fused alpha=): bit-identical to the reference's rounding
        prev_sample = x0 * coefficients["sqrt_ab_prev"]
        prev_sample += eps * direction
        if eta > 0:
            noise = noise_like(sample.shape, generator, sample.device, sample.dtype, variance_noise)
            prev_sample += noise * sigma
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
