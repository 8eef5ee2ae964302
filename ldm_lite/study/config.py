"""The study's two configs: `StudyConfig` (`python -m analysis demo`, synthetic data, minutes) and
`QualityStudyConfig` (`python -m analysis study`, real images, FID / KID); their fields are the commands' flags."""
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ldm_lite.checks import comma_list
from ldm_lite.config import COMPILE_MODES, PRECISIONS, option
from ldm_lite.sampling import eps_scale_schedule
from ldm_lite.schedulers import scheduler_class


CLASS_NAMES = ("dark", "mid", "bright")


@dataclass(frozen=True)
class StudyConfig:
    """Settings of the bias study (`python -m analysis demo` builds its flags from these fields).
    `minutes` is the whole budget; training steps stop early to keep it."""
    out: str = option("runs/demo", "output folder (report.html, results.json, model_*/ runs)")
    data: str = option("synthetic", "'synthetic' (embedded), 'cifar10:ROOT' or an image folder; labels are "
                       "brightness terciles")
    resolution: int = option(16, "image size")
    steps: int = option(3000, "optimiser steps per model (fewer when the budget runs out)")
    batch_size: int = option(32, "training batch size (docs/training.md#the-demo)")
    lr: float = option(1e-3, "learning rate")
    minutes: float = option(8.5, "time budget of the whole study (leaves room for the install in make demo)")
    samples_per_class: int = option(48, "class-conditional samples per brightness class")
    unconditional_samples: int = option(192, "unconditional samples per signal-leak setting")
    sample_steps: int = option(50, "DDIM steps")
    offset_noise: float = option(0.1, "offset-noise strength of the offset model")
    zero_snr_model: bool = option(True, "train the zero-SNR model (part 4) when the budget allows it")
    synthetic_size: int = option(4096, "number of embedded synthetic images")
    max_images: int = option(0, "image folders: keep N images (0 = all)")
    seed: int = option(0, "seed of the data, the training and the sampling")
    progress: bool = option(True, "progress bars")
    fresh: bool = option(False, "delete the study's model checkpoints and train from scratch")
    precision: str = option("fp32", "training precision (train.precision); at 16 px two bf16 runs side by side "
                                    "train fewer steps than float32 (docs/training.md#the-demo)", choices=PRECISIONS)
    compile: str = option("off", "torch.compile of the models' training (train.compile): off, on, or auto (on where "
                          "a compiled training step measures >= 1.1x faster, one choice for all the models)",
                          choices=COMPILE_MODES)

    # the forward process of every model: (beta_schedule, beta_start, beta_end); the demo's is Stable Diffusion's
    BETAS: ClassVar[tuple] = ("scaled_linear", 0.00085, 0.012)

    def __post_init__(self):
        for name in ("resolution", "steps", "batch_size", "samples_per_class", "unconditional_samples",
                     "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.minutes <= 0:
            raise ValueError(f"minutes must be > 0, got {self.minutes}")


FIXES = ("offset", "ip", "zero_snr", "leaky")
DEFAULT_FIXES = ("offset", "zero_snr", "leaky")  # with the standard model: four models, trained as two pairs
AUTOCAST_CHOICES = ("auto", "bf16", "off")


@dataclass(frozen=True)
class QualityStudyConfig(StudyConfig):
    """Settings of `python -m analysis study` (its flags are these fields): the demo's models on real images,
    the standard recipe (linear schedule, epsilon, as Ho et al.) and its fixes, with FID / KID beside the bias
    metrics. Fields redefined here keep the demo's meaning with the study's defaults."""
    out: str = option("runs/study", "output folder (report.html, results.json, model_*/ runs, eval/ samples)")
    data: str = option("", "an image folder or 'cifar10:ROOT' (labels: brightness terciles)", required=True)
    resolution: int = option(32, "image size")
    steps: int = option(1_000_000, "optimiser steps cap per model; the budget stops the first pair, the second "
                        "pair trains as many steps as the first reached")
    minutes: float = option(150.0, "time budget of the whole study (a resumed study gets it afresh for what is "
                            "left)")
    # the recipe bench/convergence.py chose (docs/training.md, "Training on a CPU"): at a fixed CPU budget half
    # the batch (twice the optimiser steps) and bf16 where it measures faster learn more than batch 64 in float32
    batch_size: int = option(32, "training batch size")
    precision: str = option("auto", "training precision (train.precision): auto = bf16 where a training step "
                            "measures >= 1.1x faster, one choice for all the study's models", choices=PRECISIONS)
    compile: str = option("auto", "torch.compile of the models' training (train.compile): auto = on where a compiled "
                          "training step measures >= 1.1x faster and each model trains 10+ minutes, one choice for "
                          "all the study's models; on; off", choices=COMPILE_MODES)
    samples_per_class: int = option(100, "class-conditional samples per brightness tercile (part 4) and per DC "
                                    "steering target (part 3)")
    unconditional_samples: int = option(500, "samples per evaluated setting (FID, KID and bias metrics)")
    sample_steps: int = option(20, "DDIM steps of parts 2-4 (their NFE)")
    samplers: str = option("ddim,dpmpp_2m,unipc,euler,heun", "samplers of part 1 (aliases of python -m sample)")
    nfes: str = option("10,20,50", "numbers of model calls of part 1 (Heun: the nearest 2N - 1 not above)")
    quadratic_ddim: bool = option(True, "part 1: also DDIM with the DDIM paper's quadratic spacing, at the NFEs "
                                  "it allows (up to 29 at T = 1000)")
    eps_scales: str = option("0.99,0.995,1.0,1.005,1.01,1.02,1.03", "epsilon-scaling lambdas of part 2 (DDIM), on "
                             "both sides of 1, which the grid must hold (the base setting)")
    eps_slopes: str = option("0.001", "part 2: slopes k of lambda_t = k t + b (t = N - 1 at the noisiest step; "
                             "Ning et al.), each centred on --eps-slope-mean; '' for none")
    eps_slope_mean: float = option(1.01, "the mean lambda of the sloped schedules: b = mean - k (N - 1) / 2")
    exposure_images: int = option(256, "training images for part 2's eps-norm metric")
    fixes: str = option(",".join(DEFAULT_FIXES), "models beside the standard one (part 4), trained like it: offset, ip "
                        "(input perturbation), zero_snr (zero terminal SNR, v-prediction, trailing spacing) and leaky "
                        "(Stable Diffusion's scaled_linear schedule, whose signal leak part 3 measures)")
    input_perturbation: float = option(0.1, "DDPM-IP gamma of the ip model")
    reference_images: int = option(10_000, "training images of the FID / KID reference, spread evenly over the "
                                   "data; their features are cached")
    cache: str = option("", "reference-feature cache folder ('' = $LDM_LITE_CACHE, else runs/cache)")
    device: str = option("auto", "evaluation and training device: auto (CUDA when available), cpu or cuda",
                         choices=("auto", "cpu", "cuda"))
    autocast: str = option("auto", "bf16 autocast of evaluation sampling: auto (on where measured faster), bf16, "
                           "off", choices=AUTOCAST_CHOICES)
    eval_batch_size: int = option(100, "images per model call when sampling for evaluation")
    unet_from: str = option("", "a model trained elsewhere for parts 1-3, nothing trained: a diffusers UNet2DModel "
                            "folder or pipeline, or an ldm_lite run or its export (python -m analysis export)")

    BETAS: ClassVar[tuple] = ("linear", 1e-4, 0.02)

    def __post_init__(self):
        super().__post_init__()
        if not self.data:
            raise ValueError("data must name an image folder or 'cifar10:ROOT'")
        for name in ("exposure_images", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("unconditional_samples", "reference_images"):
            if getattr(self, name) < 4:
                raise ValueError(f"{name} must be >= 4 (KID draws two subsets of n // 2), got {getattr(self, name)}")
        for name in self.sampler_names:
            scheduler_class(name)
        if self.unet_from and not Path(self.unet_from).exists():
            raise ValueError(f"unet_from: {self.unet_from!r} does not exist")
        unknown = [name for name in self.fix_names if name not in FIXES]
        if unknown:
            raise ValueError(f"fixes must be among {', '.join(FIXES)}, got {', '.join(unknown)}")
        if not self.nfe_levels or min(self.nfe_levels) < 1:
            raise ValueError(f"nfes must be positive integers, got {self.nfes!r}")
        if not self.lambdas or min(self.lambdas) <= 0:
            raise ValueError(f"eps_scales must be positive numbers, got {self.eps_scales!r}")
        if 1.0 not in self.lambdas:
            raise ValueError(f"eps_scales must hold 1 (the base setting, lambda = 1), got {self.eps_scales!r}")
        for slope in self.slopes:
            eps_scale_schedule(self.eps_slope_mean, self.sample_steps, slope, centred=True)  # every lambda > 0

    @property
    def sampler_names(self) -> list:
        return _items(self.samplers, str, "samplers")

    @property
    def nfe_levels(self) -> list:
        return sorted(set(_items(self.nfes, int, "nfes")))

    @property
    def lambdas(self) -> list:
        return _items(self.eps_scales, float, "eps_scales")

    @property
    def slopes(self) -> list:
        """The nonzero slopes k of --eps-slopes (k = 0 is the constant grid)."""
        return [k for k in _items(self.eps_slopes, float, "eps_slopes") if k != 0]

    @property
    def fix_names(self) -> list:
        """The models trained beside the standard one: none with --unet-from (its model takes the standard's place)."""
        return [] if self.unet_from else _items(self.fixes, str, "fixes")


def _items(text: str, kind, name: str) -> list:
    """A comma-separated flag as a list of `kind`, repeats dropped; ValueError naming the flag."""
    return list(dict.fromkeys(comma_list(text, kind, name)))


def grid_scale(config: StudyConfig) -> int:
    """Pixel repeat that makes small samples about 48 pixels wide in the report's grids."""
    return max(1, 48 // config.resolution)
