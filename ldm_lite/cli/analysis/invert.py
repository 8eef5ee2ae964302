"""`python -m analysis invert --ckpt RUN --images DIR --steps 10,20,50 [--num-images K] --out DIR`: DDIM inversion
(Song et al. 2021, arXiv:2010.02502, eq. 13 and sec. 4.3) of K images, each sampled back with DDIM at every step
count; the reconstruction error falls with the step count (first order for a smooth denoiser).

Writes inversion.csv (one row per step count), inversion_grid.png (rows: the originals, then for each step count
x_T and the reconstruction) and inversion.png (error against steps, log-log). A latent model inverts the VAE
latents of the images; `rms_*` are then in latent units and `image_rms_mean` (decoded reconstruction against the
original image) includes the VAE's own reconstruction error.
"""
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm_lite.checks import output_folder
from ldm_lite.data import save_image_grid
from ldm_lite.inversion import reconstruct, rms_per_image
from ldm_lite.latents import decode_latents, encode_latents
from ldm_lite.metrics import format_table
from ldm_lite.plots import _pyplot, _save, write_csv
from ldm_lite.runs import load_model

from ldm_lite.cli.analysis.common import load_data, positive

NOISE_DISPLAY_SCALE = 0.5  # x_T is shown times 0.5, so +-2 standard deviations fill the image range


def add_arguments(parser):
    parser.add_argument("--ckpt", required=True, metavar="RUN_OR_FOLDER",
                        help="ldm_lite run folder or checkpoint, or a diffusers pipeline / UNet folder")
    parser.add_argument("--scheduler-config", metavar="JSON", help="scheduler_config.json to use instead of the "
                        "checkpoint's schedule")
    parser.add_argument("--images", required=True, metavar="DIR", help="folder of images (or 'synthetic', "
                        "'cifar10:ROOT'); resized and center-cropped to the model's resolution")
    parser.add_argument("--steps", default="10,20,50", metavar="N1,N2,...", help="DDIM step counts to compare")
    parser.add_argument("--num-images", type=int, default=8, help="images inverted, a seeded random subset")
    parser.add_argument("--class-label", type=int, help="class label for both directions (class-conditional "
                        "models; default: the null label, i.e. the unconditional model)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image subset")
    parser.add_argument("--batch-size", type=int, default=64, help="images per model call")
    parser.add_argument("--out", default="runs/analysis/invert", help="output folder")


def parse_steps(text: str) -> list:
    """'10,20,50' -> [10, 20, 50]: distinct positive ints, in the order given."""
    try:
        steps = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        steps = []
    if not steps or min(steps) < 1 or len(set(steps)) != len(steps):
        raise ValueError(f"--steps must be distinct positive integers separated by commas, got {text!r}")
    return steps


def _check_label(label, num_classes) -> None:
    if label is None:
        return
    if num_classes is None:
        raise ValueError("--class-label given but the model is unconditional")
    if not 0 <= label <= num_classes:
        raise ValueError(f"--class-label must be in [0, {num_classes}] ({num_classes}: the null label), got {label}")


def load_images(loaded, args) -> tuple:
    """(images (K, 3, R, R) in [-1, 1] at the model's resolution R, x0 (K, C, h, w) in the model's space)."""
    source = args.images
    if source != "synthetic" and not source.startswith("cifar10:") and not Path(source).is_dir():
        raise ValueError(f"--images {source!r} is not an existing folder")
    config = loaded.unet.config
    factor = loaded.vae.downscale if loaded.vae is not None else 1
    images = load_data(source, config.sample_size * factor, args.num_images, args.seed, flag="--images")
    x0 = encode_latents(loaded.vae, images, args.batch_size) if loaded.vae is not None else images
    if x0.shape[1] != config.in_channels:
        raise ValueError(f"the model takes {config.in_channels} channels but the images give {x0.shape[1]}")
    return images, x0


def noise_tiles(x_T: torch.Tensor, size: int) -> torch.Tensor:
    """x_T (K, C, h, w) as displayable (K, 3, size, size): its first three channels (one repeated if C < 3),
    scaled by NOISE_DISPLAY_SCALE, nearest-upsampled to the image size (latents are smaller than images)."""
    channels = x_T[:, :3] if x_T.shape[1] >= 3 else x_T[:, :1].expand(-1, 3, -1, -1)
    return F.interpolate(channels.float() * NOISE_DISPLAY_SCALE, size=(size, size), mode="nearest")


def plot_errors(rows: list, path) -> Path:
    """RMS reconstruction error (mean over images, min-max band) against steps, log-log, with a 1/N guide."""
    plt = _pyplot()
    steps = [row["steps"] for row in rows]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(steps, [row["rms_mean"] for row in rows], marker="o", label="mean over images")
    ax.fill_between(steps, [row["rms_min"] for row in rows], [row["rms_max"] for row in rows], alpha=0.2,
                    label="min - max")
    first = rows[0]
    ax.plot(steps, [first["rms_mean"] * first["steps"] / n for n in steps], "k--", linewidth=1,
            label="first order (1 / N)")
    ax.set(xscale="log", yscale="log", xlabel="DDIM steps N (inversion and sampling each)",
           ylabel="RMS reconstruction error", title="DDIM inversion round trip")
    ax.set_xticks(steps, [str(n) for n in steps], minor=False)
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.legend(fontsize=7)
    return _save(fig, path)


def run(args):
    out = output_folder(args.out)
    steps = parse_steps(args.steps)
    positive(args.batch_size, "--batch-size")
    loaded = load_model(args.ckpt, scheduler_config=args.scheduler_config)
    _check_label(args.class_label, loaded.unet.config.num_classes)
    images, x0 = load_images(loaded, args)
    rows, grid = [], [images]
    for n in steps:
        result = reconstruct(loaded.unet, x0, n, loaded.scheduler_config, args.class_label, args.batch_size)
        decoded = decode_latents(loaded.vae, result.reconstruction) if loaded.vae is not None else \
            result.reconstruction
        error = result.error
        rows.append(dict(steps=n, model_calls=2 * n, rms_mean=error.mean().item(), rms_min=error.min().item(),
                         rms_max=error.max().item(), image_rms_mean=rms_per_image(decoded, images).mean().item(),
                         x_T_mean=result.x_T.mean().item(), x_T_std=result.x_T.std().item()))
        grid += [noise_tiles(result.x_T, images.shape[-1]), decoded]
    out.mkdir(parents=True, exist_ok=True)
    scale = max(1, 64 // images.shape[-1])  # small images enlarged so the grid stays readable
    save_image_grid(torch.cat(grid), out / "inversion_grid.png", nrow=len(images), scale=scale)
    files = [write_csv(rows, out / "inversion.csv"), out / "inversion_grid.png"]
    if len(rows) > 1:
        files.append(plot_errors(rows, out / "inversion.png"))
    space = "latent" if loaded.vae is not None else "pixel"
    print(f"DDIM inversion round trip of {len(images)} images from {args.images} ({space} space, RMS per image; "
          f"x_T should look like N(0, 1) noise):")
    print(format_table(rows))
    print(f"wrote {', '.join(f.name for f in files)} to {out}")

