"""Deterministic DDIM inversion x0 -> x_T: Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models"
(arXiv:2010.02502), eq. 13 (the probability-flow ODE of eq. 14 discretised) run from clean to noisy.

Each step moves x from timestep t_prev up to t with the deterministic DDIM update
    x_t = sqrt(ab_t) x0_hat + sqrt(1 - ab_t) eps_hat,
where (x0_hat, eps_hat) come from the model output converted at t_prev. As in diffusers (and the usual DDIM
inversion), the model is called at the target timestep t on the sample at t_prev: the exact inverse of a DDIM step
would need the model at x_t itself, which is not known yet.
"""
import torch

from ..schedules import make_timesteps
from .base import PREDICTION_TYPES, SchedulerBase, SchedulerOutput, _check_choice, predict_x0_and_eps


class DDIMInverseScheduler(SchedulerBase):
    """DDIM inversion with diffusers' keyword names and defaults. `timesteps` ascend: t_0 < t_1 < ... < t_{N-1}.

    `step(model_output, t_i, x)` takes x from t_{i-1} to t_i; the first step starts from x0 (alpha_bar = 1 when
    `set_alpha_to_one`, else alpha_bar[0]). The model output is the model's at (x, t_i). Spacings: leading (plus
    steps_offset) and trailing, as in diffusers; like diffusers there is no `add_noise`.

    Difference from diffusers: the step starts at the previous listed timestep. diffusers starts at t - T // N,
    which is not the previous timestep for non-integer trailing spacings (N = 7: it starts the first step at
    alpha_bar[0] instead of x0 and the later ones one timestep off). prediction_type="sample" with
    set_alpha_to_one raises a ValueError: the first step would need eps = (x - x0_hat) / 0 (diffusers: inf/NaN).
    """

    order = 1  # model calls per step
    init_noise_sigma = 1.0
    timestep_spacings = ("leading", "trailing")

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 clip_sample_range: float = 1.0, timestep_spacing: str = "leading",
                 rescale_betas_zero_snr: bool = False):
        config = self._keyword_arguments(locals())
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        self._check_timestep_spacing(timestep_spacing)
        if prediction_type == "sample" and set_alpha_to_one:
            raise ValueError("prediction_type='sample' with set_alpha_to_one=True: the first inversion step starts "
                             "at alpha_bar = 1, where eps = (x - x0_hat) / sqrt(1 - alpha_bar) is 0 / 0; "
                             "use set_alpha_to_one=False")
        self._set_training_schedule(config)
        self.initial_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.num_inference_steps = None
        self._set_timestep_list(torch.arange(num_train_timesteps))  # every timestep until set_timesteps

    def set_timesteps(self, num_inference_steps: int, device=None):
        """N ascending timesteps: `leading` arange(N) * (T // N) + steps_offset, `trailing` the reverse of
        `ldm_lite.schedules.make_timesteps` (round(arange(T, 0, -T / N)) - 1)."""
        timesteps = make_timesteps(num_inference_steps, self.num_train_timesteps, self.config["timestep_spacing"],
                                   self.config["steps_offset"]).flip(0)
        self.num_inference_steps = num_inference_steps
        self._set_timestep_list(timesteps, device)

    def _set_timestep_list(self, timesteps, device=None):
        self.timesteps = timesteps.to(device) if device is not None else timesteps
        steps = timesteps.tolist()
        self._start = dict(zip(steps, [-1] + steps[:-1]))  # target timestep -> the one its step starts from

    def scale_model_input(self, sample, timestep=None):
        """Identity: DDIM's model input needs no scaling (kept for interface compatibility)."""
        return sample

    def step(self, model_output, timestep, sample) -> SchedulerOutput:
        """One inversion step x_{t_prev} -> x_t (Song et al. eq. 13 from t_prev to t), t = `timestep`.

        model_output: epsilon / v / x0 prediction (B, C, H, W) of the model at (sample, t); sample: x at the
        previous listed timestep (or x0 for the first). Returns prev_sample = x_t (diffusers' name, here the
        noisier sample) and pred_original_sample = x0_hat, both (B, C, H, W).
        """
        t = int(timestep)
        if t not in self._start:
            raise ValueError(f"timestep {t} is not in the current list of timesteps "
                             f"({self.timesteps[:3].tolist()} ... {self.timesteps[-3:].tolist()})")
        start = self._start[t]
        ab_start = self.alphas_cumprod[start] if start >= 0 else self.initial_alpha_cumprod
        ab = self.alphas_cumprod[t]
        # float32 scalars in diffusers' operation order (see base module docstring)
        x0, eps = predict_x0_and_eps(model_output, sample, float(ab_start ** 0.5), float((1 - ab_start) ** 0.5),
                                     self.prediction_type)
        if self.config["clip_sample"]:
            limit = self.config["clip_sample_range"]
            x0 = x0.clamp(-limit, limit)
        next_sample = float(ab ** 0.5) * x0 + float((1 - ab) ** 0.5) * eps
        return SchedulerOutput(prev_sample=next_sample, pred_original_sample=x0)
