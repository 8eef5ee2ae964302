"""Training configuration: frozen dataclasses, one per section ([data], [model], [diffusion], [noise], [train],
[run], [latent]), each value range-checked in `__post_init__` with an error naming `section.key`.

Reading them from TOML and `--section.key=value` overrides (type-checked on the way in) and writing a run's
`config.toml` (also stored in each checkpoint) is `ldm_lite.config_io`.
"""
import dataclasses
import math
from dataclasses import dataclass, field

from ldm_lite.schedulers.base import PREDICTION_TYPES
from ldm_lite.schedules import BETA_SCHEDULES, default_steps_offset

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
DATA_LABELS = ("dataset", "brightness")
UNET_PRESETS = ("ddpm_cifar10", "small", "tiny")
TIMESTEP_SAMPLINGS = ("uniform", "lognormal")
LR_SCHEDULES = ("constant", "cosine")
EMA_KINDS = ("decay", "power")
BUDGET_CLOCKS = ("wall", "cpu")
EVAL_AUTOCASTS = ("auto", "bf16", "off")
COMPILE_MODES = ("off", "on", "auto")
# Values older configs (and `--train.compile=true`) hold for keys whose type changed: read as today's value.
LEGACY_VALUES = {"train.compile": {True: "on", False: "off", "true": "on", "false": "off", "yes": "on", "no": "off",
                                   "1": "on", "0": "off"}}

# Short command-line aliases for the options changed most often.
ALIASES = {"data": "data.source", "steps": "train.steps", "out": "run.out", "batch-size": "train.batch_size",
           "seed": "train.seed", "latent-vae": "latent.vae", "max-minutes": "train.max_minutes",
           "resume": "run.resume", "fresh": "run.fresh", "allow-data-change": "run.allow_data_change"}


def option(default, help: str, **extra):
    """A settings-dataclass field with its command-line help (and metavar, choices, flag, required, repeat);
    `ldm_lite.cli.options` builds the flags from it, so defaults and help live once."""
    return field(default=default, metadata={"help": help, **extra})


def _check(condition: bool, name: str, message: str, value) -> None:
    if not condition:
        raise ValueError(f"{name} {message}, got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """source: "synthetic", "cifar10:ROOT" (torchvision files) or an image folder (recursive)."""
    source: str = "synthetic"
    resolution: int = 16
    center_crop: bool = True       # False: random crop (image folders are then cropped once, at load time)
    random_flip: bool = True       # horizontal flips drawn per sample, per step
    download: bool = False         # cifar10 only: fetch the files when missing
    synthetic_size: int = 4096     # number of embedded synthetic images
    max_images: int = 0            # image folders: keep N images spread evenly over the sorted list (0 = all)
    labels: str = "dataset"        # "dataset" (classes / folders / synthetic terciles) or "brightness" terciles

    def __post_init__(self):
        _check(self.labels in DATA_LABELS, "data.labels", f"must be one of {DATA_LABELS}", self.labels)
        _check(self.resolution >= 1, "data.resolution", "must be >= 1", self.resolution)
        _check(self.synthetic_size >= 1, "data.synthetic_size", "must be >= 1", self.synthetic_size)
        _check(self.max_images >= 0, "data.max_images", "must be >= 0 (0 = all)", self.max_images)
        _check(bool(self.source), "data.source", "must be 'synthetic', 'cifar10:ROOT' or a folder", self.source)


@dataclass(frozen=True)
class ModelConfig:
    """A UNet preset; class-conditional models take labels from the data with a share of null labels."""
    preset: str = "tiny"
    class_conditional: bool = False
    null_label_prob: float = 0.1   # share of labels replaced by the null class (classifier-free guidance)
    dropout: float | None = None   # None: the preset's value
    base_channels: int | None = None   # width: channels of the first level (None: the preset's)
    num_res_blocks: int | None = None  # depth: residual blocks per level (None: the preset's)

    def __post_init__(self):
        _check(self.preset in UNET_PRESETS, "model.preset", f"must be one of {UNET_PRESETS}", self.preset)
        for name in ("base_channels", "num_res_blocks"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"model.{name}", "must be >= 1 (or unset: the preset's)", value)
        _check(0.0 <= self.null_label_prob <= 1.0, "model.null_label_prob", "must be in [0, 1]", self.null_label_prob)
        _check(self.dropout is None or 0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)", self.dropout)


@dataclass(frozen=True)
class DiffusionConfig:
    """Forward process and objective, with diffusers' names. min_snr: Hang et al. 2023 loss weights, with
    min_snr_gamma None meaning the paper's 5 once min_snr is on."""
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    rescale_betas_zero_snr: bool = False
    prediction_type: str = "epsilon"
    min_snr: bool = False
    min_snr_gamma: float | None = None
    timestep_sampling: str = "uniform"   # "lognormal": t drawn by EDM's log-normal density of sigma (below)
    lognormal_mean: float | None = None  # P_mean of ln sigma (None: Karras et al. 2022's -1.2)
    lognormal_std: float | None = None   # P_std of ln sigma (None: Karras et al. 2022's 1.2)

    def __post_init__(self):
        _check(self.num_train_timesteps >= 2, "diffusion.num_train_timesteps", "must be >= 2", self.num_train_timesteps)
        _check(self.beta_schedule in BETA_SCHEDULES, "diffusion.beta_schedule", f"must be one of {BETA_SCHEDULES}",
               self.beta_schedule)
        _check(0.0 < self.beta_start < self.beta_end < 1.0, "diffusion.beta_start/beta_end",
               "must satisfy 0 < beta_start < beta_end < 1", (self.beta_start, self.beta_end))
        _check(self.prediction_type in PREDICTION_TYPES, "diffusion.prediction_type",
               f"must be one of {PREDICTION_TYPES}", self.prediction_type)
        _check_switched("diffusion", "min_snr", self.min_snr, "min_snr_gamma", self.min_snr_gamma, lambda v: v > 0,
                        "must be > 0")
        _check(self.timestep_sampling in TIMESTEP_SAMPLINGS, "diffusion.timestep_sampling",
               f"must be one of {TIMESTEP_SAMPLINGS}", self.timestep_sampling)
        lognormal, why = self.timestep_sampling == "lognormal", "t is sampled uniformly"
        remedy = "use --diffusion.timestep_sampling=lognormal or drop it"
        _check_option("diffusion", "lognormal_mean", self.lognormal_mean, lognormal, why, remedy, math.isfinite,
                      "must be a finite number")
        _check_option("diffusion", "lognormal_std", self.lognormal_std, lognormal, why, remedy,
                      lambda v: 0 < v < math.inf, "must be > 0")

    @property
    def lognormal(self) -> tuple[float, float] | None:
        """(P_mean, P_std) of the log-normal timestep density in force, or None for uniform t."""
        if self.timestep_sampling != "lognormal":
            return None
        return (-1.2 if self.lognormal_mean is None else self.lognormal_mean,
                1.2 if self.lognormal_std is None else self.lognormal_std)

    @property
    def snr_gamma(self) -> float | None:
        """The min-SNR gamma in force: None when min_snr is off, else the set value or the paper's 5."""
        return (5.0 if self.min_snr_gamma is None else self.min_snr_gamma) if self.min_snr else None


# The papers' values of the training-noise strengths, used when a switch is on and its strength is not set:
# offset noise 0.1 (Guttenberg 2023), pyramid discount 0.8, input perturbation gamma 0.1 (Ning et al. 2023).
NOISE_DEFAULTS = {"offset_noise_strength": 0.1, "pyramid_discount": 0.8, "input_perturbation_gamma": 0.1}
NOISE_SWITCHES = {"offset_noise_strength": "offset_noise", "pyramid_discount": "pyramid_noise",
                  "input_perturbation_gamma": "input_perturbation"}


@dataclass(frozen=True)
class NoiseConfig:
    """Training-noise bias fixes (formulas in `ldm_lite.noise`); each is off unless switched on. A strength left
    at None takes the paper's value (NOISE_DEFAULTS) once its switch is on; set while the switch is off, it is
    an error rather than a silent no-op."""
    offset_noise: bool = False
    offset_noise_strength: float | None = None
    pyramid_noise: bool = False
    pyramid_discount: float | None = None
    input_perturbation: bool = False
    input_perturbation_gamma: float | None = None

    def __post_init__(self):
        _check_switched("noise", "offset_noise", self.offset_noise, "offset_noise_strength",
                        self.offset_noise_strength, lambda v: v > 0, "must be > 0")
        _check_switched("noise", "pyramid_noise", self.pyramid_noise, "pyramid_discount", self.pyramid_discount,
                        lambda v: 0 < v < 1, "must be in (0, 1)")
        _check_switched("noise", "input_perturbation", self.input_perturbation, "input_perturbation_gamma",
                        self.input_perturbation_gamma, lambda v: v > 0, "must be > 0")

    def strength(self, key: str) -> float:
        """The value in force for `key` (a NOISE_DEFAULTS key): 0 when its switch is off, else set or default."""
        if not getattr(self, NOISE_SWITCHES[key]):
            return 0.0
        value = getattr(self, key)
        return NOISE_DEFAULTS[key] if value is None else value


def _check_switched(section: str, switch: str, on: bool, key: str, value, valid, message: str) -> None:
    _check_option(section, key, value, on, f"{section}.{switch} is off",
                  f"switch it on (--{section}.{switch}=true) or drop the strength", valid, message)


def _check_option(section: str, key: str, value, in_force: bool, why_not: str, remedy: str, valid,
                  message: str) -> None:
    """A strength or parameter left at None is fine; set while it has no effect (`why_not`), it is an error
    saying how to give it one (`remedy`); set and in force, it must be `valid`."""
    if value is None:
        return
    if not in_force:
        raise ValueError(f"{section}.{key} = {value!r} is set but {why_not}; {remedy}")
    _check(valid(value), f"{section}.{key}", message, value)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation. batch_size is the global batch (split evenly across torchrun processes)."""
    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-4
    warmup_steps: int = 0          # linear warmup from lr / warmup_steps to lr
    lr_schedule: str = "constant"  # after warmup: "constant", or "cosine" decay to 0 at lr_horizon_steps
    lr_horizon_steps: int = 0      # cosine: 0 = train.steps, or with max_minutes the steps the budget allows,
                                   # measured early in the run and then stored here (resumes keep it)
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0         # max global gradient norm; 0 disables clipping
    ema_decay: float = 0.9999      # 0 disables the EMA model
    ema_warmup: bool = True        # decay_t = min(ema_decay, (1 + t) / (10 + t))
    ema_kind: str = "decay"        # "decay": the above; "power": EDM2's beta_t = (1 - 1/t)^(gamma + 1)
    ema_gamma: float | None = None  # power EMA's gamma (None: 6.94, EDM2's sigma_rel = 0.10)
    precision: str = "fp32"        # "bf16": autocast of the model (CPU, GPU); "fp16": autocast + gradient scaler;
                                   # "auto": bf16 where a training step measures >= 1.1x faster (ldm_lite.bf16_choice),
                                   # else fp32, fixed at the start and stored (resumes keep it)
    channels_last: bool = True
    compile: str = "auto"          # torch.compile the model: "on", "off", or "auto": where it measures >= 1.1x faster
                                   # on the run's first steps and at least 10 minutes of training are left
                                   # (ldm_lite.compile_choice); the choice is written to config.toml
    seed: int = 0
    max_minutes: float = 0.0       # the run's training time, across resumes: stop with a checkpoint; 0 = no limit
    budget_clock: str = "wall"     # what max_minutes counts: "wall" time, or "cpu" time of this process
    num_threads: int = 0           # CPU threads for this process during training; 0 = torch's default
    keep_freed_memory: bool = False  # python -m train: glibc keeps freed memory (ldm_lite/allocator.py)

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            _check(getattr(self, name) >= 1, f"train.{name}", "must be >= 1", getattr(self, name))
        _check(self.lr > 0 and math.isfinite(self.lr), "train.lr", "must be a positive number", self.lr)
        _check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0", self.warmup_steps)
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0", self.weight_decay)
        _check(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "train.adam_beta1/adam_beta2",
               "must be in [0, 1)", (self.adam_beta1, self.adam_beta2))
        _check(self.adam_eps > 0, "train.adam_eps", "must be > 0", self.adam_eps)
        _check(self.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables)", self.grad_clip)
        _check(0 <= self.ema_decay < 1, "train.ema_decay", "must be in [0, 1) (0 disables)", self.ema_decay)
        _check(self.precision in PRECISIONS, "train.precision", f"must be one of {PRECISIONS}", self.precision)
        _check(self.compile in COMPILE_MODES, "train.compile", f"must be one of {COMPILE_MODES}", self.compile)
        _check(self.max_minutes >= 0, "train.max_minutes", "must be >= 0 (0 = no limit)", self.max_minutes)
        _check(self.budget_clock in BUDGET_CLOCKS, "train.budget_clock", f"must be one of {BUDGET_CLOCKS}",
               self.budget_clock)
        _check(self.lr_schedule in LR_SCHEDULES, "train.lr_schedule", f"must be one of {LR_SCHEDULES}",
               self.lr_schedule)
        _check(self.lr_horizon_steps >= 0, "train.lr_horizon_steps", "must be >= 0 (0 = from the run's length)",
               self.lr_horizon_steps)
        _check(self.ema_kind in EMA_KINDS, "train.ema_kind", f"must be one of {EMA_KINDS}", self.ema_kind)
        _check_option("train", "ema_gamma", self.ema_gamma, self.ema_kind == "power", "train.ema_kind is not "
                      "'power'", "use --train.ema_kind=power or drop it", lambda v: 0 < v < math.inf, "must be > 0")

    @property
    def power_ema_gamma(self) -> float:
        return 6.94 if self.ema_gamma is None else self.ema_gamma
        _check(self.num_threads >= 0, "train.num_threads", "must be >= 0 (0 = torch's default)", self.num_threads)


@dataclass(frozen=True)
class RunConfig:
    """Where the run lives and how often it reports. Intervals are in steps; 0 disables."""
    out: str = "runs/default"
    log_every: int = 50
    checkpoint_every: int = 500
    sample_every: int = 0
    sample_steps: int = 50         # DDIM steps for the sample grids
    samples_per_class: int = 8     # one grid row per class, plus one unconditional row
    progress: bool = True
    resume: bool = True            # continue from <out>/checkpoint.pt when present
    fresh: bool = False            # delete <out>/checkpoint.pt and the log first, and start over
    eval_every: int = 0            # KID / FID of the EMA model's samples every N steps, and at the end; 0 = off
    eval_samples: int = 500        # unconditional samples per evaluation (fixed seeds)
    eval_class_samples: int = 100  # class-conditional models: samples asked for each extreme tercile / class
    eval_sampler: str = "ddim"     # sampler alias (python -m sample --scheduler), on the run's own schedule
    eval_steps: int = 20           # its steps
    eval_reference_images: int = 10_000  # training images of the reference (cached; ldm_lite.fid_reference)
    eval_autocast: str = "auto"    # sampling precision: "auto" (bf16 where measured faster), "bf16" or "off"
    eval_batch_size: int = 100     # images per model call while evaluating
    eval_cache: str = ""           # reference-feature cache folder ('' = $LDM_LITE_CACHE, else runs/cache)
    allow_data_change: bool = False  # resume although the images differ from those the run was trained on

    def __post_init__(self):
        _check(bool(self.out), "run.out", "must be a folder path", self.out)
        _check(self.log_every >= 1, "run.log_every", "must be >= 1", self.log_every)
        _check(self.eval_autocast in EVAL_AUTOCASTS, "run.eval_autocast", f"must be one of {EVAL_AUTOCASTS}",
               self.eval_autocast)
        for name in ("eval_samples", "eval_reference_images"):
            _check(getattr(self, name) >= 4, f"run.{name}", "must be >= 4 (KID draws two subsets of n // 2)",
                   getattr(self, name))
        for name in ("eval_steps", "eval_batch_size", "eval_class_samples"):
            _check(getattr(self, name) >= 1, f"run.{name}", "must be >= 1", getattr(self, name))
        for name in ("checkpoint_every", "sample_every", "eval_every"):
            _check(getattr(self, name) >= 0, f"run.{name}", "must be >= 0 (0 disables)", getattr(self, name))
        _check(self.sample_steps >= 1, "run.sample_steps", "must be >= 1", self.sample_steps)
        _check(self.samples_per_class >= 1, "run.samples_per_class", "must be >= 1", self.samples_per_class)


@dataclass(frozen=True)
class LatentConfig:
    """Latent diffusion: train on VAE latents of the data, cached on disk. vae "" = pixel space."""
    vae: str = ""
    cache: str = ""                # latent cache file; "" = <run.out>/latents.safetensors
    encode_batch_size: int = 16

    def __post_init__(self):
        _check(self.encode_batch_size >= 1, "latent.encode_batch_size", "must be >= 1", self.encode_batch_size)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)

    def scheduler_config(self) -> dict:
        """The diffusers-style scheduler config for sampling a model trained with this config; the one place
        that derives it (read by `ldm_lite.schedulers.from_config`).

        The [diffusion] section is the forward process. x0 is clipped to [-1, 1] for pixel models only (latents
        are not bounded). Timestep spacing: a zero-terminal-SNR schedule gets `trailing`, so sampling starts at
        SNR 0 (Lin et al. 2023, arXiv:2305.08891, sec. 3.3); every other schedule gets `leading` with
        steps_offset 1, as Stable Diffusion samples (t0 = 981 ... 1 for 50 of 1000 steps). DDIM by default.
        """
        d = self.diffusion
        zero_snr = d.rescale_betas_zero_snr
        spacing = "trailing" if zero_snr else "leading"
        return {"_class_name": "DDIMScheduler", "num_train_timesteps": d.num_train_timesteps,
                "beta_schedule": d.beta_schedule, "beta_start": d.beta_start, "beta_end": d.beta_end,
                "rescale_betas_zero_snr": zero_snr, "prediction_type": d.prediction_type,
                "clip_sample": not self.latent.vae, "timestep_spacing": spacing,
                "steps_offset": default_steps_offset(spacing)}


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config)}
