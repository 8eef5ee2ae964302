"""PNDM / PLMS sampler: Liu, Ren, Lin & Zhao 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds"
(arXiv:2202.09778).

Every update is the paper's transfer part phi (eq. 9), the DDIM step written with alpha_bar only:
    x_end = sqrt(ab_end / ab_start) x - (ab_end - ab_start) e / (ab_start sqrt(1 - ab_end)
            + sqrt(ab_start (1 - ab_start) ab_end)),
fed with a combination e of recent noise predictions: pseudo Runge-Kutta (eq. 12, four model calls per step) for
the first three steps, then pseudo linear multistep (eq. 13, Adams-Bashforth, one call per step). With
`skip_prk_steps` (Stable Diffusion's setting) the warm-up is a pseudo improved Euler step and lower-order
Adams-Bashforth instead.
"""
import torch

from ..schedules import make_timesteps
from .base import SchedulerBase, SchedulerOutput, _check_choice
from .sigmas import add_into, sub_into

RUNGE_KUTTA_STEPS = 3  # steps taken by pseudo Runge-Kutta before multistep takes over (4 past outputs)


class PNDMScheduler(SchedulerBase):
    """PNDM with diffusers' keyword names and defaults. prediction_type: "epsilon" or "v_prediction".

    `timesteps` is the list of model calls, as in diffusers: with skip_prk_steps, t_0, t_1, t_1, t_2, ..., t_{N-1}
    (t_1 twice: the improved-Euler warm-up calls the model at t_1 before and after correcting); without, each of
    the first three steps calls the model at t_i, m_i, m_i, t_{i+1} with midpoint m_i = t_{i+1} + (T // N) // 2.
    `set_alpha_to_one`: after the last step use alpha_bar = 1 (clean x0) instead of alpha_bar[0].
    `rescale_betas_zero_snr` (Lin et al. 2023, arXiv:2305.08891, Algorithm 1; not in diffusers' PNDM): every
    update divides by alpha_bar at its start, so alpha_bar[T - 1] = 0 is clamped to 2^-24, as in the sigma
    samplers; use it with prediction_type="v_prediction".

    Differences from diffusers:
    - Each update ends at the timestep of the next model call, read from the list. diffusers ends at
      t - T // N, which differs from the list for `linspace` and non-integer `trailing` spacings and for odd
      T // N in the Runge-Kutta stages, so it calls the model at a timestep the sample is not at.
    - skip_prk_steps=False with N < 4 raises a ValueError that says why (diffusers: a numpy broadcast error).
    Kept as in diffusers, for compatibility: v-predictions are combined first and the combination is
    converted to noise at the start of the update (exact for epsilon models; for v models the conversion at
    one point lowers the method's order).
    """

    order = 1  # model calls per entry of `timesteps`
    init_noise_sigma = 1.0  # x_T = init_noise_sigma * randn (diffusers' convention)

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, skip_prk_steps: bool = False,
                 set_alpha_to_one: bool = False, prediction_type: str = "epsilon",
                 timestep_spacing: str = "leading", steps_offset: int = 0, rescale_betas_zero_snr: bool = False):
        config = self._keyword_arguments(locals())
        _check_choice("prediction_type", prediction_type, ("epsilon", "v_prediction"))
        self._check_timestep_spacing(timestep_spacing)
        # the transfer divides by alpha_bar at its start: a zero-SNR alpha_bar[T - 1] is clamped
        self._set_training_schedule(config, clamp_zero_snr=True)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.num_inference_steps = None
        self.timesteps = None
        self._plan = []

    # ---- timesteps -------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int, device=None):
        """Plan the model calls for N steps t_0 > ... > t_{N-1} (spaced by `timestep_spacing`) and reset the state.

        Each planned call is (timestep of the model call, kind, start, end): the update it makes goes from
        timestep `start` to `end` (-1: the end of the chain).
        """
        T, N = self.num_train_timesteps, num_inference_steps
        if not self.config["skip_prk_steps"] and isinstance(N, int) and N < RUNGE_KUTTA_STEPS + 1:
            raise ValueError(f"the Runge-Kutta warm-up (skip_prk_steps=False) needs num_inference_steps >= 4, got {N}")
        steps = make_timesteps(N, T, self.config["timestep_spacing"], self.config["steps_offset"]).tolist()
        ends = steps[1:] + [-1]
        if self.config["skip_prk_steps"]:
            plan = [(steps[0], "euler", steps[0], ends[0])]
            if N > 1:
                plan.append((steps[1], "improved_euler", steps[0], ends[0]))
            first_multistep = 1
        else:
            plan = []
            for i in range(RUNGE_KUTTA_STEPS):
                start, end = steps[i], ends[i]
                midpoint = end + T // N // 2
                plan += [(start, "rk1", start, midpoint), (midpoint, "rk2", start, midpoint),
                         (midpoint, "rk3", start, end), (end, "rk4", start, end)]
            first_multistep = RUNGE_KUTTA_STEPS
        plan += [(steps[i], "multistep", steps[i], ends[i]) for i in range(first_multistep, N)]
        self._plan = plan
        self._coefficients = self._transfer_coefficients([call[2] for call in plan], [call[3] for call in plan])
        self.num_inference_steps = N
        self.timesteps = torch.tensor([call[0] for call in plan], dtype=torch.long, device=device)
        self.counter = 0  # model calls so far
        self.past_outputs = []  # model outputs at t_0, t_1, ... (newest last; four are kept)
        self._start_sample = None  # x at the start of a Runge-Kutta or improved-Euler step
        self._runge_kutta_sum = None

    # ---- the step ------------------------------------------------------------------------------
    def step(self, model_output, timestep, sample) -> SchedulerOutput:
        """One planned model call's update. model_output: epsilon or v (B, C, H, W) at x = `sample` (B, C, H, W).

        Returns prev_sample (B, C, H, W); pred_original_sample is None (diffusers gives none).
        """
        if self.timesteps is None:
            raise ValueError("call set_timesteps() before step()")
        if self.counter >= len(self._plan):
            raise ValueError(f"all {len(self._plan)} planned model calls are done; call set_timesteps() to restart")
        call = self.counter
        expected, kind, _, _ = self._plan[call]
        if int(timestep) != expected:
            raise ValueError(f"model call {call} is planned at timestep {expected}, got {int(timestep)}")
        self.counter += 1
        if kind == "multistep":
            self.past_outputs = self.past_outputs[-3:] + [model_output]
            return self._output(self._transfer(sample, _adams_bashforth(self.past_outputs), call))
        if kind == "euler":  # skip_prk_steps warm-up: a first-order step ...
            self.past_outputs, self._start_sample = [model_output], sample
            return self._output(self._transfer(sample, model_output, call))
        if kind == "improved_euler":  # ... redone with the mean of both ends' outputs (Heun)
            combined = torch.add(model_output, self.past_outputs[-1]).div_(2)
            return self._output(self._transfer(self._start_sample, combined, call))
        return self._output(self._runge_kutta_stage(kind, model_output, sample, call))

    def _runge_kutta_stage(self, kind, model_output, sample, call: int):
        """Pseudo Runge-Kutta (PNDM eq. 12): stages e1 at (x, t), e2 at the midpoint from e1, e3 at the midpoint
        from e2, e4 at the end from e3; the step uses (e1 + 2 e2 + 2 e3 + e4) / 6, every stage starting at x."""
        if kind == "rk1":
            self._start_sample = sample
            self.past_outputs.append(model_output)
            self._runge_kutta_sum = model_output / 6
        elif kind in ("rk2", "rk3"):
            self._runge_kutta_sum = self._runge_kutta_sum + model_output / 3
        else:  # rk4
            model_output = self._runge_kutta_sum + model_output / 6
            self._runge_kutta_sum = None
        return self._transfer(self._start_sample, model_output, call)

    def _transfer_coefficients(self, starts: list, ends: list) -> dict:
        """The scalars of `_transfer` for every planned call at once (start and end timesteps, -1: the end of
        the chain), as 0-d float32 tensors, one per call. Elementwise float32 ops give the same bits on these
        vectors as diffusers' per-step 0-d tensors; the expressions are diffusers'."""
        ends = torch.tensor(ends, dtype=torch.long)
        ab_start = self.alphas_cumprod[torch.tensor(starts, dtype=torch.long)]
        ab_end = torch.where(ends >= 0, self.alphas_cumprod[ends.clamp(min=0)], self.final_alpha_cumprod)
        denominator = ab_start * (1 - ab_end) ** 0.5 + (ab_start * (1 - ab_start) * ab_end) ** 0.5
        table = dict(sample=(ab_end / ab_start) ** 0.5, noise=ab_end - ab_start, denominator=denominator)
        if self.prediction_type == "v_prediction":
            table.update(v_output=ab_start ** 0.5, v_sample=(1 - ab_start) ** 0.5)
        return {name: column.unbind() for name, column in table.items()}

    def _transfer(self, sample, model_output, call: int):
        """The transfer part phi (PNDM eq. 9) of planned call `call`: x at its start (B, C, H, W) to its end with
        noise estimate e = `model_output`; every tensor operation as diffusers' (temporaries overwritten in place).

        A v-prediction is first converted to e = sqrt(ab) v + sqrt(1 - ab) x at the start. Coefficients: float32
        scalars computed in diffusers' operation order (`_transfer_coefficients`).
        """
        coefficients = self._coefficients
        noise = model_output
        if self.prediction_type == "v_prediction":
            noise = add_into(coefficients["v_output"][call] * model_output, coefficients["v_sample"][call] * sample)
        # (ab_end / ab_start)^(1/2) x - (ab_end - ab_start) e / denominator
        scaled_noise = (coefficients["noise"][call] * noise).div_(coefficients["denominator"][call])
        return sub_into(coefficients["sample"][call] * sample, scaled_noise)

    @staticmethod
    def _output(prev_sample):
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=None)

    # ---- interface -----------------------------------------------------------------------------
    def scale_model_input(self, sample, timestep=None):
        """Identity: PNDM's model input needs no scaling (kept for interface compatibility)."""
        return sample

    def add_noise(self, original_samples, noise, timesteps):
        """Forward process q(x_t | x0) (Ho et al. 2020, arXiv:2006.11239, eq. 4); x0, noise (B, ...), t (B,)."""
        alphas_cumprod = self.alphas_cumprod.to(device=original_samples.device, dtype=original_samples.dtype)
        ab = alphas_cumprod[torch.as_tensor(timesteps, device=original_samples.device).long()].flatten()
        ab = ab.view((-1,) + (1,) * (original_samples.ndim - 1))
        return ab ** 0.5 * original_samples + (1 - ab) ** 0.5 * noise


def _adams_bashforth(outputs: list):
    """PNDM eq. 13: the Adams-Bashforth combination of the last 1-4 outputs (oldest first), e.g. for four
    (55 e_t - 59 e_{t+1} + 37 e_{t+2} - 9 e_{t+3}) / 24 (multiplied by 1 / 24, as diffusers does, for the same
    bits); fewer outputs give the lower-order formulas. Each product and sum is one operation in diffusers' order;
    with outputs of one dtype and shape, the sums go into the first product's buffer."""
    if len(outputs) == 1:
        return outputs[-1]
    if len(outputs) == 2:
        return (3 * outputs[-1] - outputs[-2]) / 2
    if any(e.dtype != outputs[-1].dtype or e.shape != outputs[-1].shape for e in outputs):
        if len(outputs) == 3:
            return (23 * outputs[-1] - 16 * outputs[-2] + 5 * outputs[-3]) / 12
        return (1 / 24) * (55 * outputs[-1] - 59 * outputs[-2] + 37 * outputs[-3] - 9 * outputs[-4])
    if len(outputs) == 3:
        return (23 * outputs[-1]).sub_(16 * outputs[-2]).add_(5 * outputs[-3]).div_(12)
    return (55 * outputs[-1]).sub_(59 * outputs[-2]).add_(37 * outputs[-3]).sub_(9 * outputs[-4]).mul_(1 / 24)
