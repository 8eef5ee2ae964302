"""DDPM ancestral sampler: Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models" (arXiv:2006.11239),
with respacing to fewer steps (Nichol & Dhariwal 2021, arXiv:2102.09672, sec. 4)."""
import torch

from ..schedules import ALL_TIMESTEP_SPACINGS
from .base import Scheduler, SchedulerOutput, _check_choice, noise_like

VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")


class DDPMScheduler(Scheduler):
    """DDPM with diffusers' keyword names.

    variance_type: `fixed_small` (posterior variance beta_tilde, Ho et al. eq. 7), `fixed_large` (beta),
    `learned` (the model's second C channels are the variance), `learned_range` (they interpolate
    log beta_tilde .. log beta, Nichol & Dhariwal eq. 15, with v in [-1, 1]).
    With respacing, beta' = 1 - ab_t / ab_prev replaces beta_t. timestep_spacing also takes the DDIM paper's
    "quadratic" (`ldm_lite.schedules.make_timesteps`), which diffusers lacks.
    """

    order = 1  # model calls per step
    init_noise_sigma = 1.0  # x_T = init_noise_sigma * randn (diffusers' convention)
    timestep_spacings = ALL_TIMESTEP_SPACINGS

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, variance_type: str = "fixed_small",
                 clip_sample: bool = True, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False):
        config = self._keyword_arguments(locals())
        _check_choice("variance_type", variance_type, VARIANCE_TYPES)
        self.variance_type = variance_type
        self._init_schedule(config)

    def _step_coefficients(self, t, prev_t) -> dict:
        # float32, in diffusers' operation order (see base module docstring)
        ab = self.alphas_cumprod[t]
        ab_prev = self._alpha_bar_prev(prev_t, torch.tensor(1.0))
        alpha = ab / ab_prev  # alpha'_t of the respaced chain
        beta = 1 - alpha
        posterior_variance = torch.clamp((1 - ab_prev) / (1 - ab) * beta, min=1e-20)  # beta_tilde, eq. 7
        return dict(sqrt_ab=ab ** 0.5, sqrt_one_minus_ab=(1 - ab) ** 0.5,
                    x0_coeff=(ab_prev ** 0.5 * beta) / (1 - ab),  # eq. 7, posterior mean
                    sample_coeff=alpha ** 0.5 * (1 - ab_prev) / (1 - ab),
                    std_small=posterior_variance ** 0.5, std_large=beta ** 0.5,
                    log_small=torch.log(posterior_variance), log_large=torch.log(beta), add_noise=t > 0)

    def step(self, model_output, timestep, sample, *, generator=None, variance_noise=None,
             eps_scale: float = 1.0) -> SchedulerOutput:
        """One ancestral step x_t -> x_{t_prev} ~ q(x_{t_prev} | x_t, x0_hat) (Ho et al. eq. 6-7, 11).

        model_output: (B, C, H, W), or (B, 2C, H, W) with a learned variance type (mean part first);
        sample: x_t (B, C, H, W). Noise is added only while t > 0.
        """
        coefficients = self._coefficients[self._lookup(timestep)]
        channels = sample.shape[1]
        predicted_variance = None
        if model_output.shape[1] == 2 * channels and self.variance_type in ("learned", "learned_range"):
            model_output, predicted_variance = model_output[:, :channels], model_output[:, channels:]
        x0, _ = self._x0_and_eps(model_output, sample, coefficients, eps_scale)
        # separate multiplies and adds (no fused alpha=): bit-identical to the reference's rounding
        prev_sample = x0 * coefficients["x0_coeff"]
        prev_sample += sample * coefficients["sample_coeff"]
        if coefficients["add_noise"]:
            noise = noise_like(model_output.shape, generator, sample.device, sample.dtype, variance_noise)
            prev_sample += self._std(coefficients, predicted_variance) * noise
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def _std(self, coefficients: dict, predicted_variance):
        """Standard deviation of the step: a float for fixed types, a (B, C, H, W) tensor for learned ones."""
        if self.variance_type == "fixed_small":
            return coefficients["std_small"]
        if self.variance_type == "fixed_large":
            return coefficients["std_large"]
        if predicted_variance is None:
            raise ValueError(f"variance_type={self.variance_type!r} needs a model output with 2C channels")
        if self.variance_type == "learned":
            return predicted_variance ** 0.5
        frac = (predicted_variance + 1) / 2  # learned_range
        return torch.exp(0.5 * (frac * coefficients["log_large"] + (1 - frac) * coefficients["log_small"]))
