"""Noise levels for the samplers that step in sigma (Euler, Euler ancestral, Heun, DPM-Solver, UniPC), and their
shared base class.

Notation (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
arXiv:2206.00364, sec. 2 and Table 1): with ab = alphas_cumprod, sigma_t = sqrt((1 - ab_t) / ab_t) and
x_sigma = x_t / sqrt(ab_t) = x0 + sigma_t n. A DDPM-trained network expects x_t = x_sigma / sqrt(sigma^2 + 1),
which is what `scale_model_input` hands it.

Functions (stable names, imported by other schedulers):
  sigmas_from_alphas_cumprod(alphas_cumprod) -> (T,) float32 tensor, ascending in t
  spaced_timesteps(N, T, spacing, steps_offset) -> (N,) float32 array, descending (fractional for linspace)
  timestep_to_sigma(timesteps, train_sigmas, interpolation_type) -> (N,) float64 array
  sigma_to_timestep(sigmas, train_sigmas) -> (N,) float64 array, fractional timesteps
  karras_sigmas(sigma_min, sigma_max, N, rho) -> (N,) float64 array, descending (Karras et al. eq. 5)
  exponential_sigmas(sigma_min, sigma_max, N) -> (N,) float64 array, descending, uniform in log sigma
  respaced_sigmas(timesteps, train_sigmas, ...) -> (timesteps, sigmas) for a sigma kind (plain, karras, exp.)
  denoised(model_output, sample, sigma, prediction_type) -> x0 estimate in the sigma variable

Numbers follow diffusers' arithmetic (float32 schedule, float64 numpy interpolation, one cast to float32 at the
end), so a model driven by these samplers takes the same trajectory as with diffusers.
"""
import numpy as np
import torch

from ..schedules import make_timesteps
from .base import SchedulerBase, _check_choice

INTERPOLATION_TYPES = ("linear", "log_linear")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


# ---- noise levels --------------------------------------------------------------------------------------------
def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - ab_t) / ab_t) for alphas_cumprod (T,); returns (T,) in its dtype, ascending in t."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def spaced_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000, timestep_spacing: str = "linspace",
                     steps_offset: int = 0) -> np.ndarray:
    """The N sampled timesteps (N,) float32, descending, as the sigma samplers space them.

    `leading` and `trailing` as `ldm_lite.schedules.make_timesteps` (integers); `linspace` keeps the fractional
    values of linspace(0, T - 1, N) unrounded (the sigma at a fractional t is interpolated).
    """
    if timestep_spacing != "linspace":
        return make_timesteps(num_inference_steps, num_train_timesteps, timestep_spacing, steps_offset).numpy() \
            .astype(np.float32)
    T, N = num_train_timesteps, num_inference_steps
    if not isinstance(N, int) or not 1 <= N <= T:
        raise ValueError(f"num_inference_steps must be an integer in [1, num_train_timesteps={T}], got {N!r}")
    return np.linspace(0, T - 1, N, dtype=np.float32)[::-1].copy()


def timestep_to_sigma(timesteps, train_sigmas, interpolation_type: str = "linear") -> np.ndarray:
    """sigma at possibly fractional timesteps (N,), float64.

    train_sigmas: (T,) sigma of each training timestep (`sigmas_from_alphas_cumprod`). `linear` interpolates
    sigma between neighbouring integer timesteps; `log_linear` interpolates log sigma (the two agree on integers).
    """
    _check_choice("interpolation_type", interpolation_type, INTERPOLATION_TYPES)
    train_sigmas, timesteps = _numpy(train_sigmas), _numpy(timesteps)
    grid = np.arange(len(train_sigmas))
    if interpolation_type == "linear":
        return np.interp(timesteps, grid, train_sigmas)
    return np.exp(np.interp(timesteps, grid, np.log(train_sigmas.astype(np.float64))))


def sigma_to_timestep(sigmas, train_sigmas) -> np.ndarray:
    """Fractional timesteps (N,) float64 whose log sigma interpolates linearly between training timesteps.

    The inverse of `timestep_to_sigma(..., "log_linear")` (k-diffusion's DiscreteSchedule.sigma_to_t, as in
    diffusers). sigmas below train_sigmas[0] map to 0, above train_sigmas[-1] to T - 1.
    train_sigmas: (T,) ascending; its logs are taken in its own dtype (float32 in the schedulers).
    """
    log_train = np.log(_numpy(train_sigmas))  # (T,)
    log_sigmas = np.log(np.maximum(_numpy(sigmas).astype(np.float64), 1e-10))  # (N,)
    # the last training timestep whose sigma is at or below each sigma (0 if none), kept inside [0, T - 2]; "last",
    # not "count - 1": the zero-SNR table is not monotonic at its end (sigma(999) = 4096 < sigma(998))
    at_or_below = log_train[None, :] <= log_sigmas[:, None]  # (N, T)
    last = np.where(at_or_below.any(axis=1), len(log_train) - 1 - at_or_below[:, ::-1].argmax(axis=1), 0)
    low_idx = np.clip(last, 0, len(log_train) - 2)
    low, high = log_train[low_idx], log_train[low_idx + 1]
    weight = np.clip((low - log_sigmas) / (low - high), 0, 1)
    return (1 - weight) * low_idx + weight * (low_idx + 1)


def _numpy(values) -> np.ndarray:
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (arXiv:2206.00364) eq. 5: (N,) float64 from sigma_max down to sigma_min,
    sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, rho = 7."""
    ramp = np.linspace(0, 1, num_inference_steps)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int) -> np.ndarray:
    """(N,) float64 from sigma_max down to sigma_min, uniformly spaced in log sigma."""
    return np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), num_inference_steps))


def respaced_sigmas(timesteps, train_sigmas, use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                    interpolation_type: str = "linear", sigma_min=None, sigma_max=None):
    """(timesteps (N,) float64, sigmas (N,) float64) of the Euler / Heun family.

    Plain: sigma interpolated at the spaced timesteps. Karras / exponential: N new sigmas between sigma_min and
    sigma_max (default: the sigmas at the last and first spaced timestep, as diffusers), whose timesteps become
    the fractional `sigma_to_timestep` values.
    """
    sigmas = timestep_to_sigma(timesteps, train_sigmas, interpolation_type)
    if not (use_karras_sigmas or use_exponential_sigmas):
        return np.asarray(timesteps, dtype=np.float64), sigmas
    low = sigma_min if sigma_min is not None else sigmas[-1].item()
    high = sigma_max if sigma_max is not None else sigmas[0].item()
    make = karras_sigmas if use_karras_sigmas else exponential_sigmas
    sigmas = make(low, high, len(sigmas))
    return sigma_to_timestep(sigmas, train_sigmas), sigmas


def final_sigma(train_sigmas, final_sigmas_type: str = "zero") -> float:
    """The noise level after the last step: 0 ("zero", a clean sample) or sigma at t = 0 ("sigma_min")."""
    _check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
    return 0.0 if final_sigmas_type == "zero" else float(train_sigmas[0])


def denoised(model_output, sample, sigma, prediction_type: str):
    """x0 estimate (B, C, H, W) from the output of a DDPM-trained network at x_sigma = `sample` (B, C, H, W).

    sigma: 0-d float32 tensor. In VP terms sqrt(ab) = 1 / sqrt(sigma^2 + 1) and sqrt(1 - ab) = sigma sqrt(ab):
    epsilon: x0 = x - sigma eps; v_prediction (Salimans & Ho 2022, arXiv:2202.00512):
    x0 = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) v; sample: x0 = output.
    """
    if prediction_type == "epsilon":
        return sub_into(sample, sigma * model_output)
    if prediction_type == "v_prediction":
        return add_into(model_output * (-sigma / (sigma ** 2 + 1) ** 0.5), sample / (sigma ** 2 + 1))
    return model_output


# Arithmetic into temporaries (tensors the step just allocated and nobody else holds): each is the plain expression's
# single float32 operation with the same operands in the same order, so the same bits, written into an existing
# buffer instead of a new one (on a 64x3x32x32 batch, a fresh output costs as much again as the arithmetic).
# Operand order matters: with a reduced-precision tensor, a float32 0-d scalar is rounded to its dtype first as
# the left operand but not as the right one, so `s * t` is kept as `s * t` (addition of two tensors commutes).
# They fall back to the expression where the result would get another dtype or shape than the buffer, or where
# autograd records the operation (out= is not differentiable).
def _recording(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _fits(a, b) -> bool:
    return isinstance(a, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and a.device == b.device


def sub_into(a, b):
    """a - b, computed into the temporary b."""
    return torch.sub(a, b, out=b) if _fits(a, b) and not _recording(a, b) else a - b


def add_into(b, a):
    """b + a (= a + b), computed into the temporary b."""
    return b.add_(a) if _fits(a, b) else b + a


def scale_into(scalar, t):
    """scalar * t for a 0-d float32 `scalar`, computed into the temporary t (its dtype is the result's)."""
    return scalar * t if _recording(scalar, t) else torch.mul(scalar, t, out=t)


# ---- shared base ---------------------------------------------------------------------------------------------
class SigmaScheduler(SchedulerBase):
    """Base of the samplers that step in sigma: training schedule, the (timesteps, sigmas) table of the current
    trajectory, a step counter, input scaling and the forward process.

    After `set_timesteps`: `timesteps` (M,) and `sigmas` (M + 1,) float32; sigmas[i] is the noise level at
    timesteps[i], sigmas[M] the level after the last step. As in diffusers, a counter walks the table (Heun lists
    each timestep twice): it starts at the first `step` or `scale_model_input` call, from the timestep given, and
    `set_timesteps` resets it and every other piece of trajectory state.
    """

    order = 1  # model calls per listed timestep
    x_sigma_tables = True  # per-entry sigma tables for a step on x_sigma (DPM-Solver and UniPC step on x_t)

    def _init_schedule(self, config: dict, prediction_types=("epsilon", "v_prediction", "sample")):
        """Validate the shared keywords of `config` (the constructor's arguments) and build the schedule."""
        _check_choice("prediction_type", config["prediction_type"], prediction_types)
        self._check_timestep_spacing(config["timestep_spacing"])
        if config.get("use_beta_sigmas"):
            raise ValueError("use_beta_sigmas is not supported (it needs scipy's beta quantiles); use "
                             "use_karras_sigmas or use_exponential_sigmas")
        if config.get("use_karras_sigmas") and config.get("use_exponential_sigmas"):
            raise ValueError("use at most one of use_karras_sigmas and use_exponential_sigmas")
        self._set_training_schedule(config, clamp_zero_snr=True)
        T = self.num_train_timesteps
        self.train_sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)  # (T,) float32, ascending
        self.num_inference_steps = None
        # before set_timesteps: every training timestep, then a clean sample
        self._set_table(np.arange(T - 1, -1, -1, dtype=np.float32), np.append(self.train_sigmas.numpy()[::-1], 0.0))

    def _set_table(self, timesteps, sigmas, device=None, timestep_dtype=torch.float32):
        """Install timesteps (M,) and sigmas (M + 1,) (cast once to float32) and reset the trajectory state."""
        self.timesteps = torch.from_numpy(np.asarray(timesteps)).to(device=device, dtype=timestep_dtype)
        self.sigmas = torch.from_numpy(np.asarray(sigmas).astype(np.float32))  # on the CPU, read as scalars
        self._timestep_values = self.timesteps.tolist()  # the per-step check compares Python numbers first
        self._sigma_values = self.sigmas.tolist()
        if self.x_sigma_tables:
            # per-entry scalars, computed once for the whole table: elementwise float32 ops give the same bits on a
            # vector as on the 0-d tensors diffusers computes per step; kept as 0-d tensors (a tensor operand
            # dispatches faster than a Python float, which is wrapped into a new tensor on every call)
            self._sigma = self.sigmas.unbind()
            variance = self.sigmas ** 2 + 1  # sigma^2 + 1 = 1 / alpha_bar
            self._input_divisor = (variance ** 0.5).unbind()  # scale_model_input: x / sqrt(sigma^2 + 1)
            self._step_length = (self.sigmas[1:] - self.sigmas[:-1]).unbind()  # sigma_next - sigma per entry
            if self.prediction_type == "v_prediction":  # `denoised`'s coefficients
                self._v_output_scale = (-self.sigmas / variance ** 0.5).unbind()
                self._v_sample_divisor = variance.unbind()
        self._step_index = None
        self._reset_state()

    def _reset_state(self):
        """Subclasses drop their multistep / second-order state here."""

    def _spaced_timesteps(self, num_inference_steps: int) -> np.ndarray:
        config = self.config
        return spaced_timesteps(num_inference_steps, self.num_train_timesteps, config["timestep_spacing"],
                                config["steps_offset"])

    @property
    def init_noise_sigma(self) -> float:
        """Scale of x_T = init_noise_sigma * randn: the first noise level sigmas[0], or sqrt(sigmas[0]^2 + 1) for
        `leading` spacing (diffusers' convention: the model input x_T / sqrt(sigma^2 + 1) is then unit Gaussian).

        diffusers takes max(sigmas) instead, the same value except with rescale_betas_zero_snr, whose clamped table
        is not monotonic (sigma(999) = 4096 < sigma(996..998)): with 996-998 among the timesteps it would start
        from a noise level above that of the first step.
        """
        sigma_start = self.sigmas[0]
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return float(sigma_start)
        return float((sigma_start ** 2 + 1) ** 0.5)

    @property
    def step_index(self):
        """Position of the next step in `timesteps` (None before the first call of a trajectory)."""
        return self._step_index

    def index_for_timestep(self, timestep) -> int:
        """Position of `timestep` in `timesteps`; of a repeated one, its second place (diffusers' rule: starting
        mid-schedule then skips no sigma). A trajectory that starts at timesteps[0] starts at index 0, even where
        rounding repeats the first timestep (DPM-Solver's rounded Karras / exponential timesteps on the cosine or
        zero-SNR schedule), where diffusers would skip the first step and fail on the last."""
        matches = (self.timesteps.cpu() == self._as_timestep(timestep)).nonzero().flatten().tolist()
        if not matches:
            raise ValueError(f"timestep {float(timestep)} is not in the current list of timesteps "
                             f"({self.timesteps[:3].tolist()} ... {self.timesteps[-3:].tolist()}); call "
                             "set_timesteps() first and pass one of scheduler.timesteps")
        return matches[1] if len(matches) > 1 else matches[0]

    def _as_timestep(self, timestep) -> torch.Tensor:
        """`timestep` as a 0-d CPU tensor of the timesteps' dtype, for exact comparison with the list."""
        return torch.as_tensor(timestep).cpu().to(self.timesteps.dtype)

    def _current_index(self, timestep) -> int:
        """The step counter, started from `timestep` on the first call; checks `timestep` is the one it expects."""
        if self._step_index is None:  # the first call of a trajectory
            at_start = self.timesteps[0].cpu() == self._as_timestep(timestep)
            self._step_index = 0 if at_start else self.index_for_timestep(timestep)
        index = self._step_index
        if index >= len(self._timestep_values):
            raise ValueError("this trajectory has already taken every step: call set_timesteps() before the next")
        # equal as Python numbers implies equal after the cast to the timesteps' dtype; the exact check only on
        # a mismatch (a float64 timestep that rounds to the listed float32 one)
        if float(timestep) != self._timestep_values[index] and self.timesteps[index].cpu() != self._as_timestep(
                timestep):
            raise ValueError(f"expected timestep {float(self.timesteps[index])} (step {index}), got {float(timestep)}:"
                             " step once per entry of scheduler.timesteps, and call set_timesteps() before each "
                             "trajectory")
        return index

    def scale_model_input(self, sample, timestep):
        """The network input for x_sigma = `sample` (B, C, H, W): x_sigma / sqrt(sigma^2 + 1) = x_t."""
        return sample / self._input_divisor[self._current_index(timestep)]

    def _denoised(self, model_output, sample, index: int):
        """`denoised` at the table's sigma of entry `index`, with its coefficients precomputed."""
        if self.prediction_type == "epsilon":
            return sub_into(sample, self._sigma[index] * model_output)
        if self.prediction_type == "v_prediction":
            return add_into(model_output * self._v_output_scale[index], sample / self._v_sample_divisor[index])
        return model_output

    def add_noise(self, original_samples, noise, timesteps):
        """x_sigma = x0 + sigma noise (B, ...) for timesteps (B,) taken from `timesteps` (the k-diffusion
        variable; divide by sqrt(sigma^2 + 1) for the DDPM x_t)."""
        return self._noised(original_samples, noise, self._sigmas_at(timesteps, original_samples))

    def alpha_bar_at_first_step(self) -> float:
        """1 / (1 + sigmas[0]^2): the signal level where the first step starts (2^-24 or less at zero SNR, whose
        alpha_bar[T - 1] = 0 is clamped to 2^-24)."""
        return float(1 / (1 + self.sigmas[0].double() ** 2))

    def add_noise_at_first_step(self, original_samples, noise):
        """The forward process (B, ...) at the first entry of the table, where `step` starts: unlike
        `add_noise(x, noise, timesteps[:1])`, right where the first timestep repeats (index_for_timestep then
        gives its second place: UniPC or DPM-Solver with Karras sigmas on a cosine or zero-SNR schedule)."""
        sigma = self.sigmas[0].to(device=original_samples.device, dtype=original_samples.dtype)
        return self._noised(original_samples, noise, sigma)

    def _noised(self, original_samples, noise, sigma):
        """x_sigma = x0 + sigma noise; sigma broadcastable against x0 (B, ...)."""
        return original_samples + noise * sigma

    def _sigmas_at(self, timesteps, like):
        """sigmas (B, 1, ...) for listed timesteps (B,), broadcastable against `like`."""
        indices = [self.index_for_timestep(t) for t in torch.as_tensor(timesteps).reshape(-1)]
        sigma = self.sigmas.to(device=like.device, dtype=like.dtype)[indices]
        return sigma.view((-1,) + (1,) * (like.ndim - 1))
