"""Generate images from a trained model: the logic behind `python -m sample`.

    checkpoint (run folder, training checkpoint, diffusers folder)      -> `ldm_lite.runs.load_model`
      -> UNet (+ VAE for a latent model) and the noise schedule it was trained with
      -> any scheduler by name (`ldm_lite.schedulers.from_config`) -> `ldm_lite.sampling.sample` with the
         inference-time corrections (signal leak, epsilon scaling, classifier-free guidance)
      -> PNGs written batch by batch, a grid and manifest.json

Every setting, the seed, the sampled timesteps, the number of model calls and the signal kept at the first
timestep (sqrt(alpha_bar[t0]), Everaert et al. 2024, arXiv:2309.15842) go into the manifest, so a folder of
samples documents itself. Image i is a function of (checkpoint, settings, seed, i) only: the same call gives the
same PNG bytes whatever the batch size, and a killed run continues where it stopped.
"""
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image

from ldm_lite.checks import output_folder
from ldm_lite.config import option
from ldm_lite.distributed import World, init_world, share
from ldm_lite.data import load_image, save_image_grid, to_float, to_uint8
from ldm_lite.guidance import ClassifierFreeGuidance
from ldm_lite.latents import decode_latents
from ldm_lite.leak import LeakStats
from ldm_lite.run_safety import FolderLock
from ldm_lite.runs import LoadedModel, load_model
from ldm_lite.sampling import eps_scale_schedule, sample
from ldm_lite.schedulers import from_config, scheduler_class, x0_clipping, x0_clipping_dropped
from ldm_lite.schedules import ALL_TIMESTEP_SPACINGS, signal_at_first_step

PARTIAL_FILE = "manifest.partial.json"  # settings of an unfinished run, for resuming it


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class SampleSettings:
    """Everything `generate` needs; `python -m sample` builds its flags from these fields and their help."""
    checkpoint: str = option(None, "ldm_lite run folder (or its checkpoint.pt), or a diffusers pipeline folder "
                              "(model_index.json, unet/, scheduler/, optional vae/) or UNet folder", flag="ckpt",
                              required=True)
    out: str = option(None, "output folder (created; an unfinished run with the same settings is continued; "
                       "one holding more images of an earlier run is refused unless --fresh)", required=True)
    scheduler: str = option("ddim", "sampler: a diffusers class name or an alias (ddpm ddim euler euler_a heun "
                             "dpmpp_2m dpmpp_3m dpmpp_2m_sde unipc pndm)")
    karras: bool = option(False, "Karras et al. sigmas (use_karras_sigmas) where the sampler has them")
    steps: int = option(50, "number of sampling steps (Heun makes 2 N - 1 model calls)")
    eta: float | None = option(None, "DDIM stochasticity: 0 deterministic, 1 DDPM-like (DDIM only)")
    use_clipped_model_output: bool = option(False, "DDIM: re-derive eps from the clipped x0, as ADM / ADM-ES do")
    n: int = option(64, "number of images (--n also works, but not under torchrun, which takes --n for its own "
                    "options)", flag="num_images", aliases=("n",))
    seed: int = option(0, "image i draws its x_T, leak and step noise from seed (seed * 1000003 + i) mod 2^32")
    batch_size: int = option(64, "images per model call (does not change the images)")
    leak: str | None = option(None, "signal-leak statistics (.safetensors from `python -m analysis leak-stats`): "
                               "x_T = add_noise(leak, noise, t0)", metavar="STATS")
    leak_dc: tuple = option((), "set channel CH of the leak to have spatial mean VALUE, in the model's input "
                             "units (images in [-1, 1], or scaled latents); repeatable. With --leak the statistics "
                             "are conditioned on it; without, the leak is VALUE in channel CH and 0 elsewhere",
                             metavar="CH=VALUE", repeat=True)
    eps_scale: float = option(1.0, "epsilon scaling lambda = b (Ning et al.; 1.017 for CIFAR-10); 1 is off")
    eps_scale_slope: float = option(0.0, "k in Ning et al.'s lambda_t = k t + b, t = N-1 the noisiest step")
    eps_scale_centred: bool = option(False, "--eps-scale is the mean lambda: b' = b - k (N - 1) / 2")
    class_label: str | None = option(None, "class label (index, or name if the run records class names); "
                                      "without it, samples are unconditional (the null label)", flag="class",
                                      metavar="LABEL")
    guidance: float | None = option(None, "classifier-free guidance weight w: eps_null + w (eps_cond - eps_null)")
    guidance_rescale: float = option(0.0, "guidance rescale phi (Lin et al. 2023, sec. 3.4; they use 0.7): the "
                                     "guided output is pulled towards the conditional output's std; 0 is off")
    spacing: str | None = option(None, "override the schedule's timestep_spacing (quadratic: DDPM and DDIM only)",
                                 choices=ALL_TIMESTEP_SPACINGS)
    scheduler_config: str | None = option(None, "scheduler_config.json to use instead of the checkpoint's "
                                           "schedule (needed for weights that carry none)", metavar="JSON")
    device: str = option("cpu", "torch device, e.g. cpu or cuda")
    bf16: bool = option(False, "run the model under bfloat16 autocast (the scheduler step stays float32)")
    use_ema: bool = option(True, "use the EMA weights (--no-use-ema: the raw weights)")
    fid: str | None = option(None, "reference statistics (.safetensors from `python -m analysis fid-stats`): report "
                             "FID (and KID with --kid) of the images drawn; latent runs are decoded first",
                             metavar="REF")
    kid: bool = option(False, "with --fid, also KID (100 subsets of min(1000, n / 2) images)")
    png: bool = option(True, "write the images (--no-png with --fid: features only, streamed batch by batch; "
                       "such a run does not resume)")
    fresh: bool = option(False, "delete the images, grid and manifest of an earlier run in --out first (without "
                         "it, a folder holding more images than this run writes is refused)")

    def __post_init__(self):
        scheduler_class(self.scheduler)  # ValueError listing the supported names
        for name in ("steps", "n", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.eta is not None and not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {self.eta}")
        if self.guidance is not None and self.class_label is None:
            raise ValueError("guidance needs a class label to guide towards (--class)")
        if self.guidance_rescale and self.guidance is None:
            raise ValueError("--guidance-rescale needs --guidance W")
        if not self.png and self.fid is None:
            raise ValueError("--no-png keeps nothing without --fid REF")
        if self.kid and self.fid is None:
            raise ValueError("--kid needs --fid REF")

    def step_options(self) -> dict:
        """Per-run keywords of scheduler.step that were asked for (checked against the scheduler by `sample`)."""
        options = {} if self.eta is None else {"eta": self.eta}
        if self.use_clipped_model_output:
            options["use_clipped_model_output"] = True
        return options


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


# ----------------------------------------------------------------------------- leak and labels


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


def build_scheduler(settings: SampleSettings, scheduler_config: dict):
    """The sampler `settings` ask for, on the model's schedule (`ldm_lite.schedulers.from_config`)."""
    overrides = {} if settings.spacing is None else {"timestep_spacing": settings.spacing}
    if settings.karras:
        cls = scheduler_class(settings.scheduler)
        if "use_karras_sigmas" not in cls._config_keys():
            raise ValueError(f"--karras: {cls.__name__} has no Karras sigmas")
        overrides["use_karras_sigmas"] = True
    scheduler = from_config(scheduler_config, settings.scheduler, **overrides)
    scheduler.set_timesteps(settings.steps)
    return scheduler


def generate(settings: SampleSettings, progress: bool = True) -> dict:
    """Sample `settings.n` images, write them under `settings.out` and return the manifest (also written).

    Files: 00000.png ... (one per image, uint8 RGB, written after each batch), grid.png, manifest.json. While
    the run is unfinished, manifest.partial.json holds its settings; the same call then continues after the
    last image written. Under torchrun each rank draws and writes its share of the images (`distributed.share`);
    rank 0 writes the grid and the manifest once all are done.
    """
    device = parse_device(settings.device)
    started_group = not dist.is_initialized()
    world = init_world(device.type)
    if world.size > 1 and device.type == "cuda":
        device = world.device
    try:
        with FolderLock(settings.out, enabled=world.is_main):  # one sampling run per folder
            return _generate(settings, world, device, progress)
    finally:
        if started_group and dist.is_initialized():
            dist.destroy_process_group()


def _generate(settings: SampleSettings, world: World, device: torch.device, progress: bool) -> dict:
    output_folder(settings.out)
    loaded = load_model(settings.checkpoint, settings.use_ema, settings.scheduler_config)
    scheduler = build_scheduler(settings, loaded.scheduler_config)
    space = "latent" if loaded.vae is not None else "pixel"
    leak = load_leak(settings.leak, settings.leak_dc, loaded.sample_shape, space)
    label = resolve_class_label(settings.class_label, loaded.unet.config.num_classes, loaded.class_names)
    lambdas = eps_scale_schedule(settings.eps_scale, len(scheduler.timesteps), settings.eps_scale_slope,
                                 settings.eps_scale_centred)
    model = loaded.unet.to(device)
    if loaded.vae is not None:
        loaded.vae.to(device)
    if settings.guidance is not None:
        model = ClassifierFreeGuidance(model, settings.guidance, settings.guidance_rescale)
    out = Path(settings.out)
    mine = share(settings.n, world)
    first = _resume_point(out, settings, mine, world) if settings.png else mine.start
    features = FeatureCollector(settings, device) if settings.fid else None

    def write_batch(batch, start):
        images = decode_latents(loaded.vae, batch, settings.batch_size) if loaded.vae is not None else batch
        if settings.png:
            write_images(images, out, first + start)
        if features is not None:
            features.add(images)

    if first < mine.stop:
        sample(model, scheduler, mine.stop - first, first_index=first, leak=leak, eps_scale=lambdas,
               step_options=settings.step_options(), class_labels=label, seed=settings.seed,
               batch_size=settings.batch_size, num_inference_steps=settings.steps, on_batch=write_batch,
               progress=progress and world.is_main, device=device,
               autocast_dtype=torch.bfloat16 if settings.bf16 else None)
    files = [image_name(i) for i in range(settings.n)] if settings.png else []
    manifest = build_manifest(settings, loaded, scheduler, leak, label, lambdas, files)
    if features is not None:
        if first > mine.start:  # resumed: the images written before the interruption count too
            features.add_files(out, [image_name(i) for i in range(mine.start, first)])
        manifest["quality"] = features.report(world)
    if world.size > 1:
        dist.barrier()  # every share is on disk
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if settings.png:
            write_grid(out, files)
        (out / "manifest.json").write_text(json.dumps({**manifest, "processes": world.size}, indent=2))
        (out / PARTIAL_FILE).unlink(missing_ok=True)
    return manifest


class FeatureCollector:
    """Inception features of the images as they are drawn (quantised to uint8 first, as PNGs would be), for
    the FID / KID of a sampling run; shards reduce their statistics across torchrun ranks."""

    def __init__(self, settings: SampleSettings, device: torch.device):
        from ldm_lite.quality import FeatureStats, FidStatistics, load_fid_inception
        self.reference = FidStatistics.load(settings.fid)
        self.network = load_fid_inception(device)
        self.stats, self.kept, self.settings, self.device = FeatureStats(), [], settings, device

    def add(self, images: torch.Tensor) -> None:
        """images (B, C, H, W) in [-1, 1]."""
        from ldm_lite.quality import inception_features
        features = inception_features(images, self.settings.batch_size, self.device, progress=False,
                                      network=self.network)
        self.stats.update(features)
        if self.settings.kid:
            self.kept.append(features)

    def add_files(self, out: Path, names: list) -> None:
        with Image.open(out / names[0]) as first:
            size = min(first.size)
        self.add(to_float(torch.stack([load_image(out / name, size) for name in names])))

    def report(self, world: World) -> dict:
        """{fid, kid_mean, kid_std, n_samples, n_reference, seconds} of every rank's images together."""
        from ldm_lite.quality import FidStatistics, quality_report
        kept = torch.cat(self.kept) if self.kept else None
        if world.size > 1:
            self.stats.all_reduce()
            if kept is not None:
                gathered = [None] * world.size
                dist.all_gather_object(gathered, kept)
                kept = torch.cat(gathered)
        samples = FidStatistics.from_stats(self.stats, kept, source=self.settings.out)
        return quality_report(samples, self.reference, kid=self.settings.kid, seed=self.settings.seed)


def _resume_point(out: Path, settings: SampleSettings, mine: range, world: World) -> int:
    """The first index of this rank's share still to draw: after the images an unfinished run with the same
    settings already wrote, else the start of the share (a new run; rank 0 records its settings)."""
    record = json.dumps({**asdict(settings), "fresh": False}, sort_keys=True)
    partial = out / PARTIAL_FILE
    resuming = [not settings.fresh and partial.is_file() and partial.read_text() == record]
    if world.size > 1:
        dist.barrier()  # every rank has looked before rank 0 writes
        dist.broadcast_object_list(resuming, src=0)
    if not resuming[0]:
        earlier = earlier_images(out)
        stale = [name for name in earlier if int(name[:-4]) >= settings.n]
        if stale and not settings.fresh:  # every rank refuses: none waits for rank 0 in a collective
            raise ValueError(f"--out {str(out)!r} holds {len(earlier)} images of an earlier run, {len(stale)} of "
                             f"them beyond the {settings.n} this run writes (from {stale[0]}); choose another "
                             "--out, or pass --fresh to delete the earlier images and manifest first")
        if world.is_main:
            out.mkdir(parents=True, exist_ok=True)
            for name in (*earlier, "grid.png", "manifest.json") if settings.fresh else ("manifest.json",):
                (out / name).unlink(missing_ok=True)
            partial.write_text(record)
        if world.size > 1:
            dist.barrier()  # the folder exists before any rank writes into it
        return mine.start
    first = mine.start
    while first < mine.stop and (out / image_name(first)).is_file():
        first += 1
    return first


def earlier_images(out: Path) -> list:
    """Names of the sample images (`image_name`: 00000.png ...) already in the folder `out`, sorted."""
    names = [p.name for p in out.glob("*.png") if re.fullmatch(r"\d{5,}\.png", p.name)] if out.is_dir() else []
    return sorted(names, key=lambda name: int(name[:-4]))


def parse_device(name: str) -> torch.device:
    """torch.device(name), with a ValueError when it is malformed or not present on this machine."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be a torch device such as cpu or cuda:0, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} requested but CUDA is not available here")
    return device


def image_name(index: int) -> str:
    """The file name of sample `index` in a sample folder: 00000.png, 00001.png, ..."""
    return f"{index:05d}.png"


def write_images(images: torch.Tensor, out: Path, first_index: int = 0) -> list:
    """Write images (N, C, H, W) in [-1, 1] as out/image_name(first_index) ...; returns the file names."""
    out.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(images.cpu()).permute(0, 2, 3, 1).numpy()  # (N, H, W, C) uint8
    names = [image_name(first_index + i) for i in range(len(pixels))]
    for name, image in zip(names, pixels):
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(out / name)
    return names


def write_grid(out: Path, files: list, limit: int = 256) -> None:
    """out/grid.png from the first `limit` written images (read back, so a resumed run gets its grid too)."""
    with Image.open(out / files[0]) as first:
        size = min(first.size)
    images = to_float(torch.stack([load_image(out / name, size) for name in files[:limit]]))
    save_image_grid(images, out / "grid.png", nrow=math.ceil(math.sqrt(len(images))))


def build_manifest(settings: SampleSettings, loaded: LoadedModel, scheduler, leak, label, lambdas, files) -> dict:
    """The JSON record of a sampling run: settings, model, scheduler, timesteps, leak, eps scales, files."""
    timesteps = [float(t) if float(t) != int(t) else int(t) for t in scheduler.timesteps]
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
        "x0_clipping": x0_clipping(scheduler),  # "off" where the sampler drops the schedule's clip_sample
        "x0_clipping_dropped": x0_clipping_dropped(loaded.scheduler_config, scheduler),
        "model_calls_per_image": len(timesteps) * (2 if settings.guidance is not None else 1),
        "nfe": len(timesteps),
        "timesteps": timesteps,
        "first_timestep": timesteps[0],
        "sqrt_alpha_bar_first_timestep": signal_at_first_step(scheduler.alphas_cumprod, scheduler.timesteps[:1].round()),
        "eps_scales": lambdas,
        "leak": leak_record,
        "images": files,
        "grid": "grid.png",
        "versions": {"ldm_lite": _version(), "torch": torch.__version__},
    }


def _version() -> str:
    from ldm_lite import __version__
    return __version__
