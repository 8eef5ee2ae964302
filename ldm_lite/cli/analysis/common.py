"""Flags and loaders shared by the analysis commands: the dataset flags, sample folders, and --ckpt."""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm_lite.checks import comma_list
from ldm_lite.data import list_images, load_dataset, read_images, synthetic_brightness, to_float
from ldm_lite.latents import encode_latents
from ldm_lite.runs import load_model
from ldm_lite.schedulers import ALIASES, from_config

DATA_HELP = "'synthetic' (embedded brightness data), 'cifar10:ROOT' (torchvision files) or an image folder"


def add_data_arguments(parser, resolution_default: int | None = 32, num_images: int = 512):
    parser.add_argument("--data", default="synthetic", help=f"dataset: {DATA_HELP} (default synthetic)")
    default = "the samples' size" if resolution_default is None else resolution_default
    parser.add_argument("--resolution", type=int, default=resolution_default,
                        help=f"image size R: resize the shorter side and center-crop (default {default})")
    parser.add_argument("--num-images", type=int, default=num_images,
                        help=f"images drawn from the dataset, a seeded random subset (default {num_images})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset and of every noise draw (default 0)")


def positive(value, name: str, minimum: int = 1):
    if value is None or value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def load_data(source: str, resolution: int, num_images: int, seed: int = 0, flag: str = "--data") -> torch.Tensor:
    """A seeded random subset of `num_images` images (N, 3, R, R) float in [-1, 1] from a dataset spec given
    by the option `flag` (named in the errors)."""
    positive(resolution, "--resolution")
    positive(num_images, "--num-images", 2)
    generator = torch.Generator().manual_seed(seed)
    if source == "synthetic":
        return to_float(synthetic_brightness(num_images, resolution, seed).images)
    if source.startswith("cifar10:"):
        images = load_dataset(source, resolution).images
        return to_float(images[torch.randperm(len(images), generator=generator)[:num_images]])
    if not Path(source).is_dir():
        raise ValueError(f"{flag} must be {DATA_HELP}; {source!r} is not an existing folder")
    paths = list_images(source)
    if len(paths) < 2:
        raise ValueError(f"{flag} {source!r} holds {len(paths)} image(s); need at least 2")
    chosen = [paths[i] for i in torch.randperm(len(paths), generator=generator)[:num_images].sort().values]
    return to_float(read_images(chosen, resolution, progress=True)[0])


NPZ_KEYS = ("samples", "images", "arr_0")


def add_samples_argument(parser):
    parser.add_argument("--samples", required=True, metavar="DIR_OR_NPZ",
                        help="generated images: a folder from `python -m sample` (its manifest.json lists them) or "
                             "of image files, or a .npz (key samples, images or arr_0: uint8 (N, H, W, 3) or "
                             "(N, 3, H, W), or float (N, C, H, W) in [-1, 1])")


def load_samples(path, resolution: int | None = None) -> torch.Tensor:
    """Samples (N, C, H, W) float in [-1, 1] from a folder of images or a .npz (see `add_samples_argument`).

    Folder images are resized and center-cropped to `resolution` (their own size when None); grid.png is skipped.
    """
    path = Path(path)
    if path.suffix == ".npz":
        if not path.is_file():
            raise ValueError(f"--samples file {str(path)!r} does not exist")
        return _from_array(path)
    if not path.is_dir():
        raise ValueError(f"--samples must be a folder of images or a .npz file; {str(path)!r} does not exist")
    manifest = path / "manifest.json"
    if manifest.is_file():
        files = [path / name for name in json.loads(manifest.read_text()).get("images", [])]
    else:
        files = [p for p in list_images(path) if p.name != "grid.png"]
    if len(files) < 2:
        raise ValueError(f"--samples folder {str(path)!r} holds {len(files)} image(s); need at least 2")
    if resolution is None:
        with Image.open(files[0]) as first:
            resolution = min(first.size)
    return to_float(read_images(files, resolution)[0])


def _from_array(path: Path) -> torch.Tensor:
    with np.load(path) as archive:
        key = next((k for k in NPZ_KEYS if k in archive.files), None)
        if key is None:
            raise ValueError(f"{path} has none of the arrays {NPZ_KEYS} (found {archive.files})")
        array = torch.from_numpy(archive[key])
    if array.ndim != 4:
        raise ValueError(f"{path}[{key!r}] must be 4-D (N, H, W, 3) or (N, C, H, W), got shape {tuple(array.shape)}")
    if array.dtype == torch.uint8:
        if array.shape[-1] in (1, 3) and array.shape[1] not in (1, 3):
            array = array.permute(0, 3, 1, 2)
        return array.float() / 127.5 - 1.0
    return array.float()


def add_comparison_arguments(parser, out: str):
    """Flags of the commands that compare samples with data: --samples, the dataset flags and --out."""
    add_samples_argument(parser)
    add_data_arguments(parser, resolution_default=None, num_images=2048)
    parser.add_argument("--out", default=out, help="output folder")


def load_pair(args) -> tuple:
    """(samples, data) as float (N, C, R, R); data at the samples' resolution unless --resolution is given."""
    if args.resolution is not None:
        positive(args.resolution, "--resolution")
    samples = load_samples(args.samples, args.resolution)
    resolution = args.resolution or samples.shape[-1]
    data = load_data(args.data, resolution, args.num_images, args.seed)
    if samples.shape[1:] != data.shape[1:]:
        raise ValueError(f"samples are {tuple(samples.shape[1:])} but data are {tuple(data.shape[1:])}; "
                         "pass --resolution to resize both")
    return samples, data


def add_model_arguments(parser, steps: int = 50):
    parser.add_argument("--ckpt", required=True, metavar="RUN_OR_FOLDER",
                        help="ldm_lite run folder or checkpoint, or a diffusers pipeline / UNet folder")
    parser.add_argument("--scheduler-config", metavar="JSON", help="scheduler_config.json to use instead of the "
                        "checkpoint's schedule")
    parser.add_argument("--scheduler", default="ddim", help=f"sampler, a class name or one of {', '.join(ALIASES)} "
                        "(default ddim, eta 0)")
    parser.add_argument("--steps", type=int, default=steps, help=f"sampling steps (default {steps})")
    parser.add_argument("--batch-size", type=int, default=64, help="images per model call (default 64)")


def load_model_and_scheduler(args):
    """(LoadedModel, scheduler with --steps set) from the --ckpt flags."""
    positive(args.steps, "--steps")
    positive(args.batch_size, "--batch-size")
    loaded = load_model(args.ckpt, scheduler_config=args.scheduler_config)
    scheduler = from_config(loaded.scheduler_config, args.scheduler)
    scheduler.set_timesteps(args.steps)
    return loaded, scheduler


def parse_floats(text: str, name: str) -> list:
    values = comma_list(text, float, name)
    if not values:
        raise ValueError(f"{name} must be a comma-separated list of numbers, got {text!r}")
    return values


def model_inputs(loaded, args) -> torch.Tensor:
    """Training data (N, C, H, W) in the model's input space: images, or VAE latents for a latent model."""
    config = loaded.unet.config
    factor = loaded.vae.downscale if loaded.vae is not None else 1
    resolution = args.resolution if args.resolution is not None else config.sample_size * factor
    if resolution != config.sample_size * factor:
        print(f"warning: --resolution {resolution}, but the model was trained at {config.sample_size * factor}; "
              "its measurements at another size may not mean much", file=sys.stderr)
    x0 = load_data(args.data, resolution, args.num_images, args.seed)
    if loaded.vae is not None:
        x0 = encode_latents(loaded.vae, x0, args.batch_size)
    if x0.shape[1] != config.in_channels:
        raise ValueError(f"the model takes {config.in_channels} channels but the data have {x0.shape[1]}")
    return x0
