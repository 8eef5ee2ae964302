"""Generate images from a trained model: the logic behind `python -m sample`.

    checkpoint (run folder, training checkpoint, diffusers folder)
      -> UNet (+ VAE for a latent model) and the noise schedule it was trained with
      -> scheduler (DDPM / DDIM) -> `ldm_lite.sampling.sample` with the inference-time corrections
         (signal leak, epsilon scaling, classifier-free guidance) -> PNGs, a grid and manifest.json

Every setting, the seed, the sampled timesteps and the signal kept at the first one (sqrt(alpha_bar[t0]),
Everaert et al. 2024, arXiv:2309.15842) go into the manifest, so a folder of samples documents itself.
Images are a function of (checkpoint, settings, seed, batch size): the same call gives the same PNG bytes.
"""
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ldm_lite.config import config_from_dict, load_config
from ldm_lite.data import CIFAR10_CLASSES, SYNTHETIC_CLASSES, save_image_grid, to_uint8
from ldm_lite.leak import LeakStats
from ldm_lite.models.unet import load_unet
from ldm_lite.models.weights_io import torch_load_weights
from ldm_lite.models.vae_loading import load_vae
from ldm_lite.sampling import eps_scale_schedule, sample
from ldm_lite.schedulers import SCHEDULERS
from ldm_lite.schedules import TIMESTEP_SPACINGS, signal_at_first_step

# what an ldm_lite run folder holds (written by training.py)
CHECKPOINT_NAME, RUN_CONFIG_FILE, CLASSES_FILE = "checkpoint.pt", "config.toml", "classes.json"


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class SampleSettings:
    """Everything `generate` needs; the `sample` command's flags map one to one onto these fields.

    leak: path of a LeakStats file (`python -m analysis leak-stats`). leak_dc: ((channel, mean), ...) set
    on the leak with `LeakStats.with_channel_mean` (the constant, in the model's input units, that the leak
    holds in that channel); without `leak` the leak is exactly that constant in those channels and zero
    elsewhere. eps_scale, eps_scale_slope: lambda_i = slope * i + eps_scale over the step index i (Ning et
    al. 2023, arXiv:2308.15321). class_label: an int, or a class name when the run records class names.
    spacing: overrides the schedule's timestep_spacing. scheduler_config: a scheduler_config.json to use
    instead of the checkpoint's schedule.
    """
    checkpoint: str
    out: str
    scheduler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    n: int = 64
    seed: int = 0
    batch_size: int = 64
    leak: str | None = None
    leak_dc: tuple = ()
    eps_scale: float = 1.0
    eps_scale_slope: float = 0.0
    class_label: int | str | None = None
    guidance: float | None = None
    spacing: str | None = None
    scheduler_config: str | None = None
    device: str = "cpu"
    bf16: bool = False
    use_ema: bool = True

    def __post_init__(self):
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {tuple(SCHEDULERS)}, got {self.scheduler!r}")
        if self.spacing is not None and self.spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"spacing must be one of {TIMESTEP_SPACINGS}, got {self.spacing!r}")
        for name in ("steps", "n", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.scheduler != "ddim" and self.eta != 0.0:
            raise ValueError(f"eta applies to the ddim scheduler only, got eta={self.eta} with {self.scheduler!r}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {self.eta}")
        if self.guidance is not None and self.class_label is None:
            raise ValueError("guidance needs a class label to guide towards (--class)")


def parse_leak_dc(values) -> tuple:
    """["CH=VALUE", ...] (the --leak-dc flag) -> ((channel, value), ...); ValueError on a malformed entry."""
    parsed = {}
    for text in values or ():
        channel, sep, value = str(text).partition("=")
        try:
            channel, value = int(channel), float(value)
        except ValueError:
            channel = None
        if not sep or channel is None or channel < 0 or not math.isfinite(value):
            raise ValueError(f"--leak-dc expects CH=VALUE with CH a channel index >= 0 and VALUE a finite "
                             f"number (e.g. 0=0.5), got {text!r}")
        if channel in parsed:
            raise ValueError(f"--leak-dc sets channel {channel} twice")
        parsed[channel] = value
    return tuple(parsed.items())


# ----------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """A denoiser ready to sample: UNet, the schedule it was trained with, and the VAE of a latent model.

    scheduler_config: diffusers-style keywords (beta_schedule, num_train_timesteps, prediction_type, ...).
    class_names: names of the class labels when the checkpoint records them (index = label).
    """
    unet: torch.nn.Module
    scheduler_config: dict
    vae: torch.nn.Module | None = None
    class_names: tuple | None = None
    source: dict = field(default_factory=dict)

    @property
    def sample_shape(self) -> tuple:
        """(C, H, W) of what the UNet denoises: images, or latents for a latent model."""
        config = self.unet.config
        return (config.in_channels, config.sample_size, config.sample_size)


def load_model(path, use_ema: bool = True, scheduler_config=None) -> LoadedModel:
    """Load a checkpoint for sampling.

    path: an ldm_lite run folder (checkpoint.pt + config.toml), a training checkpoint .pt inside one, or a
    diffusers folder: a pipeline (model_index.json, unet/, scheduler/, optionally vae/) or a UNet2DModel
    folder whose schedule is found in scheduler_config.json beside it or in ../scheduler/.
    scheduler_config: a scheduler_config.json (file or folder) overriding the checkpoint's schedule; needed
    for weights that carry none (an exported .safetensors).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (expected an ldm_lite run folder, a "
                                "training checkpoint .pt or a diffusers folder)")
    run_config = _run_config(path)
    if (path / "model_index.json").is_file():
        loaded = _load_diffusers_pipeline(path)
    elif run_config is not None:
        loaded = _load_run(path, *run_config, use_ema)
    else:
        loaded = LoadedModel(load_unet(path, use_ema=use_ema), None, source={"kind": "weights", "path": str(path)})
    if scheduler_config is not None:
        loaded.scheduler_config = _read_json_config(Path(scheduler_config), "scheduler_config.json")
    elif loaded.scheduler_config is None:
        loaded.scheduler_config = _find_scheduler_config(path)
    loaded.unet.eval()
    if loaded.vae is not None and loaded.vae.latent_channels != loaded.unet.config.in_channels:
        raise ValueError(f"the VAE has {loaded.vae.latent_channels} latent channels but the UNet takes "
                         f"{loaded.unet.config.in_channels}")
    return loaded


def _folder(path: Path) -> Path:
    """`path` if it is a folder, else the folder holding the file."""
    return path if path.is_dir() else path.parent


def _read_json_config(path: Path, name: str) -> dict:
    file = path / name if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no {name} at {str(path)!r}")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{file} is not valid JSON: {error}") from None


def _load_diffusers_pipeline(folder: Path) -> LoadedModel:
    """A diffusers pipeline folder: model_index.json names the components stored in subfolders."""
    index = _read_json_config(folder, "model_index.json")
    if "vqvae" in index:
        raise ValueError(f"{folder}: VQ-VAE pipelines (LDMPipeline) are not supported; only AutoencoderKL (vae/)")
    if "unet" not in index or "scheduler" not in index:
        raise ValueError(f"{folder}/model_index.json must list 'unet' and 'scheduler' (found: {sorted(index)})")
    vae = load_vae(folder / "vae", dtype=torch.float32) if "vae" in index else None
    scheduler_config = _read_json_config(folder / "scheduler", "scheduler_config.json")
    return LoadedModel(load_unet(folder), scheduler_config, vae,
                       source={"kind": "diffusers pipeline", "path": str(folder)})


def _find_scheduler_config(path: Path) -> dict:
    """The schedule of bare weights: scheduler_config.json beside them, in scheduler/, or in ../scheduler/."""
    folder = _folder(path)
    for candidate in (folder / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json",
                      folder.parent / "scheduler" / "scheduler_config.json"):
        if candidate.is_file():
            return _read_json_config(candidate, candidate.name)
    raise ValueError(f"{path} holds no noise schedule (no run config.toml, no scheduler_config.json beside it or "
                     "in ../scheduler/); pass one with --scheduler-config")


def _run_config(path: Path) -> tuple | None:
    """(Config, where it came from) of an ldm_lite run: its config.toml, else the copy inside the checkpoint.

    None when `path` is neither a run folder (checkpoint.pt) nor a training checkpoint file.
    """
    checkpoint = path / CHECKPOINT_NAME if path.is_dir() else path
    if not checkpoint.is_file() or checkpoint.suffix not in (".pt", ".ckpt"):
        return None
    toml = checkpoint.parent / RUN_CONFIG_FILE
    if toml.is_file():
        return load_config(toml), str(toml)
    saved = torch_load_weights(checkpoint)
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        return None  # not ours: let load_unet name the problem
    return config_from_dict(saved["config"]), f"{checkpoint} (embedded config)"


def _load_run(path: Path, config, config_source: str, use_ema: bool) -> LoadedModel:
    """An ldm_lite run: the schedule, the VAE and the class names come from its resolved training config."""
    vae = load_vae(config.latent.vae, dtype=torch.float32) if config.latent.vae else None
    return LoadedModel(load_unet(path, use_ema=use_ema), scheduler_config_from_training(config), vae,
                       class_names=_class_names(_folder(path), config.data),
                       source={"kind": "ldm_lite run", "path": str(path), "config": config_source})


def scheduler_config_from_training(config) -> dict:
    """Scheduler keywords for a model trained with `config` (an `ldm_lite.config.Config`).

    The [diffusion] section is the forward process. x0 is clipped to [-1, 1] for pixel models only (latents
    are not bounded); a zero-terminal-SNR schedule gets trailing spacing, so sampling starts at SNR 0
    (Lin et al. 2023, arXiv:2305.08891, sec. 3.3), others diffusers' default, leading.
    """
    diffusion = config.diffusion
    return dict(num_train_timesteps=diffusion.num_train_timesteps, beta_schedule=diffusion.beta_schedule,
                beta_start=diffusion.beta_start, beta_end=diffusion.beta_end,
                rescale_betas_zero_snr=diffusion.rescale_betas_zero_snr,
                prediction_type=diffusion.prediction_type, clip_sample=not config.latent.vae,
                timestep_spacing="trailing" if diffusion.rescale_betas_zero_snr else "leading")


def _class_names(run_dir: Path, data) -> tuple | None:
    """Label names of a run: its classes.json, or for runs older than that file, what the data config implies."""
    recorded = run_dir / CLASSES_FILE
    if recorded.is_file():
        return tuple(json.loads(recorded.read_text()))
    if data.source == "synthetic" or data.labels == "brightness":
        return SYNTHETIC_CLASSES
    if data.source.startswith("cifar10:"):
        return CIFAR10_CLASSES
    return None


def build_scheduler(name: str, scheduler_config: dict, spacing: str | None = None):
    """DDPMScheduler or DDIMScheduler from a diffusers-style config (either class's keys are accepted).

    Keys only the other scheduler takes (a DDPM config's variance_type for DDIM, ...) are dropped silently,
    keys neither takes with one warning; `spacing` overrides timestep_spacing.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {tuple(SCHEDULERS)}, got {name!r}")
    known_to_any = {key for cls in SCHEDULERS.values() for key in cls._config_keys()}
    unknown = sorted(k for k in scheduler_config if k not in known_to_any and not k.startswith("_"))
    if unknown:
        warnings.warn(f"scheduler config keys ignored: {', '.join(unknown)}", stacklevel=2)
    cls = SCHEDULERS[name]
    config = {k: v for k, v in scheduler_config.items() if k in cls._config_keys()}
    if spacing is not None:
        config["timestep_spacing"] = spacing
    return cls(**config)


def load_leak(path=None, channel_means=(), shape=None, space: str = "pixel") -> LeakStats | None:
    """The leak for `initial_noise`: statistics from `path` with channel means set, or a constant-DC leak.

    shape: (C, H, W) the model samples, checked against the file. channel_means: ((channel, value), ...),
    values in the model's input units ([-1, 1] images, or scaled latents). Without `path`, the leak is
    `value` in each listed channel and exactly 0 elsewhere (a LeakStats with zero mean and variance).
    Returns None when neither is given.
    """
    if path is None and not channel_means:
        return None
    if path is None:
        zeros = torch.zeros(shape, dtype=torch.float64)
        stats = LeakStats("pixel", tuple(shape), 0, 0, element_mean=zeros, element_var=zeros.clone(), space=space)
    else:
        stats = LeakStats.load(path)
        stats.check_shape(shape)
        if stats.space != space:
            raise ValueError(f"signal-leak statistics {str(path)!r} are in {stats.space} space but the model "
                             f"samples in {space} space")
    for channel, value in channel_means:
        if not 0 <= channel < shape[0]:
            raise ValueError(f"--leak-dc channel {channel} is out of range: the model has {shape[0]} channels "
                             f"(0 .. {shape[0] - 1})")
        stats = stats.with_channel_mean(channel, value)
    return stats


def resolve_class_label(label, num_classes: int | None, class_names=None) -> int | None:
    """--class as an int label in [0, num_classes), or a class name the checkpoint records."""
    if label is None:
        return None
    if num_classes is None:
        raise ValueError(f"--class {label!r} given but the model is unconditional")
    names = list(class_names or ())
    if isinstance(label, str) and label in names:
        return names.index(label)
    try:
        index = int(label)
    except ValueError:
        index = None
    if index is None or not 0 <= index < num_classes:
        named = f" or one of {names}" if names else ""
        raise ValueError(f"--class must be an integer in [0, {num_classes}){named}, got {label!r}")
    return index


# ----------------------------------------------------------------------------- generating


def generate(settings: SampleSettings, progress: bool = True) -> dict:
    """Sample `settings.n` images, write them under `settings.out` and return the manifest (also written).

    Files: 00000.png ... (one per image, uint8 RGB), grid.png, manifest.json.
    """
    device = parse_device(settings.device)
    loaded = load_model(settings.checkpoint, settings.use_ema, settings.scheduler_config)
    scheduler = build_scheduler(settings.scheduler, loaded.scheduler_config, settings.spacing)
    scheduler.set_timesteps(settings.steps)
    space = "latent" if loaded.vae is not None else "pixel"
    leak = load_leak(settings.leak, settings.leak_dc, loaded.sample_shape, space)
    label = resolve_class_label(settings.class_label, loaded.unet.config.num_classes, loaded.class_names)
    lambdas = eps_scales(settings.eps_scale, settings.eps_scale_slope, settings.steps)
    loaded.unet.to(device)
    samples = sample(loaded.unet, scheduler, settings.n, leak=leak, eps_scale=lambdas, guidance=settings.guidance,
                     class_labels=label, generator=torch.Generator().manual_seed(settings.seed),
                     batch_size=settings.batch_size, eta=settings.eta, progress=progress, device=device,
                     autocast_dtype=torch.bfloat16 if settings.bf16 else None)
    images = decode(loaded.vae, samples, settings.batch_size, device) if loaded.vae is not None else samples
    files = write_images(images, Path(settings.out))
    manifest = build_manifest(settings, loaded, scheduler, leak, label, lambdas, files)
    (Path(settings.out) / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def eps_scales(eps_scale: float, slope: float, steps: int) -> list:
    """lambda_i = slope * i + eps_scale for i = 0 .. steps-1 (--eps-scale, --eps-scale-slope); all must be > 0."""
    return eps_scale_schedule(eps_scale, steps, slope)


def parse_device(name: str) -> torch.device:
    """torch.device(name), with a ValueError when it is malformed or not present on this machine."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be a torch device such as cpu or cuda:0, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} requested but CUDA is not available here")
    return device


@torch.no_grad()
def decode(vae, latents: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """Scaled latents (N, C_lat, h, w) -> images (N, 3, f h, f w) roughly in [-1, 1], batch by batch."""
    vae.to(device)
    return torch.cat([vae.from_latents(chunk.to(device)).float().cpu() for chunk in latents.split(batch_size)])


def write_images(images: torch.Tensor, out: Path) -> list:
    """Write images (N, 3, H, W) in [-1, 1] as out/00000.png ... and out/grid.png; returns the file names."""
    out.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(images.cpu()).permute(0, 2, 3, 1).numpy()  # (N, H, W, 3) uint8
    names = [f"{i:05d}.png" for i in range(len(pixels))]
    for name, image in zip(names, pixels):
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(out / name)
    save_image_grid(images.cpu(), out / "grid.png", nrow=math.ceil(math.sqrt(len(images))))
    return names


def build_manifest(settings: SampleSettings, loaded: LoadedModel, scheduler, leak, label, lambdas, files) -> dict:
    """The JSON record of a sampling run: settings, model, scheduler, timesteps, leak, eps scales, files."""
    timesteps = [int(t) for t in scheduler.timesteps]
    leak_record = None
    if leak is not None:
        leak_record = {"path": settings.leak, "kind": leak.kind, "shape": list(leak.shape), "space": leak.space,
                       "num_images": leak.num_images,
                       "fixed_components": [[c, u, v, value] for (c, (u, v)), value in leak.fixed.items()]}
    return {
        "command": "sample",
        "settings": asdict(settings),
        "seed": settings.seed,
        "checkpoint": loaded.source,
        "unet_config": asdict(loaded.unet.config),
        "vae": None if loaded.vae is None else {"variant": loaded.vae.variant, "identity": loaded.vae.identity()},
        "class_label": label,
        "scheduler": {"class": type(scheduler).__name__, "config": scheduler.config},
        "timesteps": timesteps,
        "first_timestep": timesteps[0],
        "sqrt_alpha_bar_first_timestep": signal_at_first_step(scheduler.alphas_cumprod, scheduler.timesteps),
        "eps_scales": lambdas,
        "leak": leak_record,
        "images": files,
        "grid": "grid.png",
        "versions": {"ldm_lite": _version(), "torch": torch.__version__},
    }


def _version() -> str:
    from ldm_lite import __version__
    return __version__
