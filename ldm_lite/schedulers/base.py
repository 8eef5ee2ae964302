"""What DDPM and DDIM share: the schedule, the timestep list, the forward process and the
conversion of a model output into (x0, eps).

Notation: ab = alpha_bar_t = alphas_cumprod[t]; x_t = sqrt(ab) x0 + sqrt(1 - ab) eps (Ho et al. 2020,
arXiv:2006.11239, eq. 4); v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022, arXiv:2202.00512).

Constructor keywords carry diffusers' names and defaults, so a diffusers `scheduler_config.json`
loads through `from_config`. Per-timestep coefficients are precomputed once, in float32 with the
same operations as diffusers: near ab = 0 the x0 estimate divides by sqrt(ab) (0.006 for the
linear schedule), so only identical coefficients give identical trajectories.
"""
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..schedules import (BETA_SCHEDULES, TIMESTEP_SPACINGS, alphas_cumprod_from_betas, make_betas, make_timesteps,
                         rescale_zero_terminal_snr)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# Samplers that divide by alpha_bar at their first step clamp the zero-SNR alpha_bar[T - 1] = 0 to 2^-24, as
# diffusers' sigma schedulers do: sigma_max = 4096 instead of infinity.
ZERO_SNR_ALPHA_BAR = 2.0 ** -24
# Keys that define the forward process or the model's parameterisation: a scheduler built from a config must honour
# them, or refuse them (`refuse_dropped_schedule_keys`); dropping one would sample another model's schedule.
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                 "rescale_betas_zero_snr", "prediction_type", "timestep_spacing", "steps_offset")
# values with which a schedule key changes nothing, so a class that lacks the key may drop it
NEUTRAL_SCHEDULE_VALUES = {"rescale_betas_zero_snr": False, "steps_offset": 0, "trained_betas": None}


@dataclass
class SchedulerOutput:
    """prev_sample: x_{t_prev} (B, C, H, W); pred_original_sample: the x0 estimate used for it (B, C, H, W)."""
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def predict_x0_and_eps(model_output, sample, sqrt_ab: float, sqrt_one_minus_ab: float, prediction_type: str,
                       eps_scale: float = 1.0):
    """Convert a model output (B, C, H, W) at x_t = `sample` into (x0, eps) estimates.

    The one adapter between epsilon / v / x0 parametrisations (see module docstring for the formulas).
    `eps_scale` is lambda_t of epsilon scaling (Ning et al. 2023, "Elucidating the Exposure Bias in
    Diffusion Models", arXiv:2308.15321, eq. 11): the x0 estimate uses eps / lambda. With 1.0 no extra
    work is done, so the plain sampler is reproduced bit for bit.
    """
    if prediction_type == "epsilon":
        eps = model_output
        x0 = _x0_from_eps(sample, eps, sqrt_ab, sqrt_one_minus_ab)
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - sqrt_ab * x0) / sqrt_one_minus_ab
    else:  # v_prediction
        x0 = sqrt_ab * sample - sqrt_one_minus_ab * model_output
        eps = sqrt_ab * model_output + sqrt_one_minus_ab * sample
    if eps_scale != 1.0:
        eps = eps / eps_scale
        x0 = _x0_from_eps(sample, eps, sqrt_ab, sqrt_one_minus_ab)
    return x0, eps


def _x0_from_eps(sample, eps, sqrt_ab: float, sqrt_one_minus_ab: float):
    """x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab), in this operation order (see module docstring)."""
    x0 = eps * sqrt_one_minus_ab
    torch.sub(sample, x0, out=x0)
    return x0.div_(sqrt_ab)


def threshold_sample(x0, ratio: float, max_value: float):
    """Dynamic thresholding (Saharia et al. 2022, Imagen, arXiv:2205.11487, sec. 2.3).

    Per sample, s = quantile(|x0|, ratio) clamped to [1, max_value]; x0 is clamped to [-s, s] and divided by s.
    """
    flat = x0.reshape(x0.shape[0], -1)
    dtype = flat.dtype
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # quantile needs float32/64
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)


def refuse_dropped_schedule_keys(cls, config: dict, classes) -> None:
    """ValueError, in one line, when `cls` does not take a SCHEDULE_KEYS entry of `config` whose value matters
    (not its NEUTRAL_SCHEDULE_VALUES); the message names the key and which of `classes` take it."""
    taken = set(cls._config_keys())
    for key in SCHEDULE_KEYS:
        if key in config and key not in taken and config[key] != NEUTRAL_SCHEDULE_VALUES.get(key, object()):
            takers = ", ".join(other.__name__ for other in classes if key in other._config_keys())
            raise ValueError(f"{cls.__name__} does not take {key}={config[key]!r}, which changes the forward process "
                             f"or the model's parameterisation; schedulers that take it: {takers}")


def _check_choice(name: str, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


class SchedulerBase:
    """What every scheduler shares: `config` (exactly the constructor's keyword arguments), `from_config`,
    `save_config`, `len()` (the number of training timesteps) and `repr`.

    Every constructor starts with `config = self._keyword_arguments(locals())` and builds its training schedule
    with `_set_training_schedule(config)`. `timestep_spacings`: the spacings the class takes.
    """

    timestep_spacings = TIMESTEP_SPACINGS

    def _check_timestep_spacing(self, spacing: str):
        """ValueError, in one line, for a spacing this class does not take; one that other schedulers take (DDIM's
        quadratic) is named with them."""
        if spacing in self.timestep_spacings:
            return
        from . import SCHEDULER_CLASSES  # the registry imports this module
        takers = [cls.__name__ for cls in SCHEDULER_CLASSES.values() if spacing in cls.timestep_spacings]
        if takers:
            raise ValueError(f"{type(self).__name__} does not take timestep_spacing={spacing!r}; schedulers that take "
                             f"it: {', '.join(takers)}")
        _check_choice("timestep_spacing", spacing, self.timestep_spacings)

    def _keyword_arguments(self, arguments: dict) -> dict:
        """The constructor's keyword arguments, {name: value} in signature order, from its `locals()` (taken as
        its first statement): the one way a scheduler records its config."""
        return {key: arguments[key] for key in self._config_keys()}

    def _set_training_schedule(self, config: dict, clamp_zero_snr: bool = False):
        """Install `config` and build betas and alphas_cumprod (T,) float32 from it (Lin et al. 2023,
        arXiv:2305.08891, Algorithm 1 with rescale_betas_zero_snr). clamp_zero_snr: alpha_bar[T - 1] = 0 becomes
        ZERO_SNR_ALPHA_BAR, for samplers that divide by alpha_bar at the first step."""
        self.config = config
        self.num_train_timesteps = T = config["num_train_timesteps"]
        self.prediction_type = config["prediction_type"]
        zero_snr = config.get("rescale_betas_zero_snr", False)
        if config["trained_betas"] is None:
            _check_choice("beta_schedule", config["beta_schedule"], BETA_SCHEDULES)
        if zero_snr and self.prediction_type == "epsilon":
            warnings.warn("rescale_betas_zero_snr with prediction_type='epsilon': at SNR 0 the model cannot "
                          "predict the noise (x0 = (x_t - eps) / 0); use 'v_prediction'", stacklevel=4)
        betas = make_betas(config["beta_schedule"], T, config["beta_start"], config["beta_end"],
                           config["trained_betas"])
        if len(betas) != T:
            raise ValueError(f"trained_betas has {len(betas)} values, num_train_timesteps is {T}")
        self.betas = rescale_zero_terminal_snr(betas) if zero_snr else betas
        self.alphas_cumprod = alphas_cumprod_from_betas(self.betas)  # (T,) float32
        if zero_snr and clamp_zero_snr:
            self.alphas_cumprod[-1] = ZERO_SNR_ALPHA_BAR

    @classmethod
    def from_config(cls, config, **overrides):
        """Build from a dict or a diffusers `scheduler_config.json` (file, its folder, or a model repo folder).

        Keys starting with "_" (diffusers bookkeeping) are dropped; other unknown keys are ignored
        with one warning naming them, except a schedule key whose value matters (`refuse_dropped_schedule_keys`).
        """
        from . import SCHEDULER_CLASSES  # the registry imports this module
        if not isinstance(config, dict):
            config = _read_scheduler_config(Path(config))
        config = {**config, **overrides}
        refuse_dropped_schedule_keys(cls, config, SCHEDULER_CLASSES.values())
        known = set(cls._config_keys())
        unknown = sorted(k for k in config if k not in known and not k.startswith("_"))
        if unknown:
            warnings.warn(f"{cls.__name__}.from_config ignores unknown keys: {', '.join(unknown)}", stacklevel=2)
        return cls(**{k: v for k, v in config.items() if k in known})

    @classmethod
    def _config_keys(cls):
        import inspect
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    @property
    def timestep_interpolation(self) -> str:
        """How a fractional entry of `timesteps` relates to its noise level: "log_linear" for Karras and
        exponential sigmas (timesteps found from log sigma), else the `interpolation_type` of the sigma table
        ("linear": Euler at fractional linspace timesteps). Integer timesteps agree under both. An exact
        denoiser (`ldm_lite.oracle`) takes it to see the sampler's own sigmas."""
        config = self.config
        if config.get("use_karras_sigmas") or config.get("use_exponential_sigmas"):
            return "log_linear"
        return config.get("interpolation_type", "linear")

    def alpha_bar_at_first_step(self) -> float:
        """alpha_bar of the noise level the first step starts from: alphas_cumprod[timesteps[0]] (the sigma
        samplers override it with 1 / (1 + sigmas[0]^2))."""
        return float(self.alphas_cumprod[int(self.timesteps[0])])

    def add_noise_at_first_step(self, original_samples, noise):
        """The forward process (B, ...) at the first sampled step: `add_noise` at timesteps[0] (the sigma
        samplers override it to start at the first entry of their table)."""
        return self.add_noise(original_samples, noise, self.timesteps[:1].to(original_samples.device))

    def save_config(self, path):
        """Write the config as a diffusers-style scheduler_config.json."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
            path = path / "scheduler_config.json"
        path.write_text(json.dumps({"_class_name": type(self).__name__, **self.config}, indent=2))

    def __len__(self):
        return self.num_train_timesteps

    def __repr__(self):
        settings = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if k != "trained_betas")
        return f"{type(self).__name__}({settings})"


class Scheduler(SchedulerBase):
    """Base class of DDPM and DDIM: holds the training schedule and the current list of sampled timesteps.

    Subclasses implement `step`. `timesteps` is a descending LongTensor; the previous timestep of
    `timesteps[i]` is `timesteps[i + 1]` (or the end of the chain after the last), whatever the spacing.
    """

    def _init_schedule(self, config: dict):
        """Validate the shared keywords of `config` (the constructor's keyword arguments) and build the schedule;
        before set_timesteps the list holds every training timestep."""
        _check_choice("prediction_type", config["prediction_type"], PREDICTION_TYPES)
        self._check_timestep_spacing(config["timestep_spacing"])
        if not 0.0 < config["dynamic_thresholding_ratio"] <= 1.0:
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {config['dynamic_thresholding_ratio']}")
        self._set_training_schedule(config)
        self.num_inference_steps = None
        self._set_timestep_list(torch.arange(self.num_train_timesteps - 1, -1, -1))

    # ---- timesteps -------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int, device=None):
        """Choose N sampled timesteps by `timestep_spacing` (see `ldm_lite.schedules.make_timesteps`)."""
        timesteps = make_timesteps(num_inference_steps, self.num_train_timesteps, self.config["timestep_spacing"],
                                   self.config["steps_offset"])
        self.num_inference_steps = num_inference_steps
        self._set_timestep_list(timesteps)
        if device is not None:
            self.timesteps = self.timesteps.to(device)

    def _set_timestep_list(self, timesteps: torch.Tensor):
        self.timesteps = timesteps.long()
        steps = self.timesteps.tolist()
        prev = steps[1:] + [-1]
        self._index = {t: i for i, t in enumerate(steps)}
        self._prev = dict(zip(steps, prev))
        # all steps at once: elementwise float32 ops give the same bits as one scalar at a time
        columns = self._step_coefficients(self.timesteps, torch.tensor(prev))
        columns = {name: column.tolist() for name, column in columns.items()}
        self._coefficients = {t: {name: column[i] for name, column in columns.items()} for i, t in enumerate(steps)}

    def _step_coefficients(self, t: torch.Tensor, prev_t: torch.Tensor) -> dict:
        """Per-step coefficients {name: (N,) tensor} for timesteps t (N,) and their successors prev_t (N,)."""
        raise NotImplementedError

    def _alpha_bar_prev(self, prev_t: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        """alphas_cumprod[prev_t] (N,), with `final` after the last step (prev_t = -1)."""
        return torch.where(prev_t >= 0, self.alphas_cumprod[prev_t.clamp(min=0)], final)

    def previous_timestep(self, timestep) -> int:
        """The timestep after `timestep` in the current list, or -1 after the last one."""
        return self._prev[self._lookup(timestep)]

    def step_index(self, timestep) -> int:
        """Position of `timestep` in the current list (0 = first sampled step)."""
        return self._index[self._lookup(timestep)]

    def _lookup(self, timestep) -> int:
        t = int(timestep)
        if t not in self._prev:
            raise ValueError(f"timestep {t} is not in the current list of timesteps "
                             f"({self.timesteps[:3].tolist()} ... {self.timesteps[-3:].tolist()}); "
                             "call set_timesteps() first or pass one of scheduler.timesteps")
        return t

    # ---- x0 estimate ---------------------------------------------------------------------------
    def _x0_and_eps(self, model_output, sample, coefficients: dict, eps_scale: float):
        x0, eps = predict_x0_and_eps(model_output, sample, coefficients["sqrt_ab"],
                                     coefficients["sqrt_one_minus_ab"], self.prediction_type, eps_scale)
        config = self.config
        if config["thresholding"]:
            x0 = threshold_sample(x0, config["dynamic_thresholding_ratio"], config["sample_max_value"])
        elif config["clip_sample"]:
            limit = config["clip_sample_range"]
            # in place, unless x0 is the caller's own tensor (prediction_type="sample")
            x0 = x0.clamp(-limit, limit) if x0 is model_output else x0.clamp_(-limit, limit)
        return x0, eps

    # ---- forward process -------------------------------------------------------------------------
    def add_noise(self, original_samples, noise, timesteps):
        """Forward process q(x_t | x0) (Ho et al. eq. 4): sqrt(ab_t) x0 + sqrt(1 - ab_t) noise.

        original_samples, noise: (B, ...); timesteps: (B,) or scalar long. Returns (B, ...).
        """
        sqrt_ab, sqrt_one_minus_ab = self._broadcast_coefficients(timesteps, original_samples)
        return sqrt_ab * original_samples + sqrt_one_minus_ab * noise

    def get_velocity(self, sample, noise, timesteps):
        """v target (Salimans & Ho 2022, eq. in sec. 4): sqrt(ab_t) noise - sqrt(1 - ab_t) x0; x0 = `sample`."""
        sqrt_ab, sqrt_one_minus_ab = self._broadcast_coefficients(timesteps, sample)
        return sqrt_ab * noise - sqrt_one_minus_ab * sample

    def _broadcast_coefficients(self, timesteps, like):
        alphas_cumprod = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)
        ab = alphas_cumprod[torch.as_tensor(timesteps, device=like.device).long()].flatten()
        shape = (-1,) + (1,) * (like.ndim - 1)
        return (ab ** 0.5).view(shape), ((1 - ab) ** 0.5).view(shape)

    def scale_model_input(self, sample, timestep=None):
        """Identity: DDPM/DDIM inputs need no scaling (kept for interface compatibility)."""
        return sample


def _read_scheduler_config(path: Path) -> dict:
    for candidate in (path, path / "scheduler_config.json", path / "scheduler" / "scheduler_config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise FileNotFoundError(f"no scheduler_config.json at {path} (looked in the folder and its scheduler/ subfolder)")


def noise_like(shape, generator, device, dtype, variance_noise=None):
    """Gaussian noise for a stochastic step: `variance_noise` when given, else `randn_tensor(shape, generator)`."""
    if variance_noise is not None:
        if generator is not None:
            raise ValueError("pass either generator or variance_noise, not both")
        return variance_noise
    return randn_tensor(shape, generator, device, dtype)


def randn_tensor(shape, generator=None, device=None, dtype=torch.float32):
    """Standard normal noise of `shape` (B, ...) on `device`.

    generator: None, one torch.Generator, or a list of B generators, one per sample (diffusers' convention):
    sample b is then drawn from generator[b] alone, so its noise does not depend on the batch it is in.
    Noise is drawn on the generator's device (a CPU generator with a GPU sample) and then moved.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}: pass one per sample")
        return torch.cat([randn_tensor((1, *shape[1:]), g, device, dtype) for g in generator])
    source = generator.device if generator is not None else (device or "cpu")
    return torch.randn(shape, generator=generator, device=source, dtype=dtype).to(device or source)
