"""`python -m analysis bands --data synthetic|cifar10:ROOT|FOLDER --out DIR`: how the forward process destroys each
DCT band of a dataset (per-band power, SNR_b(t), destruction time, signal leak per band at the first sampled step
for common schedules and spacings, with and without offset noise, and measured vs theoretical correlation).
Writes bands_*.png and bands_*.csv into --out. With --vae the analysis runs on VAE latents.

Also home of the data flags shared by the brightness, spectrum and exposure commands.
"""
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ldm_lite import metrics
from ldm_lite.data import list_images, load_dataset, load_image, synthetic_brightness, to_float
from ldm_lite.models.vae_loading import load_vae
from ldm_lite.plots import plot_bands, write_csv
from ldm_lite.schedules import NAMED_SCHEDULES, named_alphas_cumprod

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


def load_data(source: str, resolution: int, num_images: int, seed: int = 0) -> torch.Tensor:
    """A seeded random subset of `num_images` images (N, 3, R, R) float in [-1, 1] from a dataset spec."""
    positive(resolution, "--resolution")
    positive(num_images, "--num-images", 2)
    generator = torch.Generator().manual_seed(seed)
    if source == "synthetic":
        return to_float(synthetic_brightness(num_images, resolution, seed).images)
    if source.startswith("cifar10:"):
        images = load_dataset(source, resolution).images
        return to_float(images[torch.randperm(len(images), generator=generator)[:num_images]])
    if not Path(source).is_dir():
        raise ValueError(f"--data must be {DATA_HELP}; {source!r} is not an existing folder")
    paths = list_images(source)
    if len(paths) < 2:
        raise ValueError(f"--data {source!r} holds {len(paths)} image(s); need at least 2")
    chosen = [paths[i] for i in torch.randperm(len(paths), generator=generator)[:num_images].sort().values]
    return to_float(torch.stack([load_image(p, resolution) for p in tqdm(chosen, desc="loading", leave=False)]))


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Diffusion latents (N, C_lat, R/f, R/f) of images (N, 3, R, R) in [-1, 1]."""
    parameter = next(vae.parameters())
    chunks = [vae.to_latents(chunk.to(parameter.device, parameter.dtype)).float().cpu()
              for chunk in tqdm(images.split(batch_size), desc="encoding", leave=False)]
    return torch.cat(chunks)


def add_arguments(parser):
    add_data_arguments(parser, num_images=512)
    parser.add_argument("--vae", metavar="PATH_OR_VARIANT", help="analyse VAE latents: a VAE file or folder, or a "
                        "variant name (sd, sdxl, sd3, flux, test = random weights)")
    parser.add_argument("--out", default="runs/analysis/bands", help="output folder (default runs/analysis/bands)")
    parser.add_argument("--schedules", default=None, help="comma-separated schedule names (default: all of "
                        "linear, scaled_linear, cosine, sigmoid, scaled_linear_zero_snr); the first one is plotted "
                        "and measured")
    parser.add_argument("--steps", type=int, default=50,
                        help="sampling steps N, which set the first timestep (default 50)")
    parser.add_argument("--train-steps", type=int, default=1000, help="num_train_timesteps T (default 1000)")
    parser.add_argument("--offset-noise", type=float, default=0.1, help="offset-noise strength s compared with "
                        "white noise (adds s^2 H W to the DC noise power; 0 to skip; default 0.1)")
    parser.add_argument("--bands", choices=("octave", "radial"), default="octave", help="band layout (default octave)")


def run(args):
    names = args.schedules.split(",") if args.schedules else list(NAMED_SCHEDULES)
    unknown = [name for name in names if name not in NAMED_SCHEDULES]
    if unknown:
        raise ValueError(f"--schedules: unknown {unknown}; choose from {', '.join(NAMED_SCHEDULES)}")
    schedules = named_alphas_cumprod(names, positive(args.train_steps, "--train-steps"))
    if not 1 <= args.steps <= args.train_steps:
        raise ValueError(f"--steps must be in [1, --train-steps = {args.train_steps}], got {args.steps}")
    if args.offset_noise < 0:
        raise ValueError(f"--offset-noise must be >= 0, got {args.offset_noise}")
    x0 = load_data(args.data, args.resolution, args.num_images, args.seed)
    if args.vae:
        x0 = encode_latents(load_vae(args.vae, dtype=torch.float32, seed=args.seed), x0)
    result = metrics.band_analysis(x0, schedules=schedules, bands=args.bands, num_inference_steps=args.steps,
                                   offset_noise=args.offset_noise, generator=torch.Generator().manual_seed(args.seed))
    out = Path(args.out)
    figures = plot_bands(result, out)
    tables = {name: write_csv(rows, out / f"bands_{name}.csv") for name, rows in metrics.band_tables(result).items()}
    print_summary(result, x0)
    print(f"wrote {', '.join(p.name for p in [*figures.values(), *tables.values()])} to {out}")


def print_summary(result: dict, x0: torch.Tensor):
    print(f"data: {tuple(x0.shape)}; per-band power (channels pooled) and destruction timestep (white noise):")
    rows = []
    for b, (k_min, k_max) in enumerate(result["band_radii"]):
        row = {"band": b, "k": f"{k_min}-{k_max}", "P_b": float(result["power"][-1, b])}
        row.update({name: int(steps[-1, b]) for (name, noise), steps in result["destruction"].items()
                    if noise == "white"})
        rows.append(row)
    print(metrics.format_table(rows))
    print("SNR left at the first sampled step (signal leak): DC band (band 0) and the finest band:")
    last, rows = len(result["band_radii"]) - 1, {}
    for (name, spacing, noise), leak in result["leak"].items():
        row = rows.setdefault((name, spacing), {"schedule": name, "spacing": spacing, "t0": leak["t0"]})
        row[f"DC {noise}"] = float(leak["snr"][-1, 0])
        if noise == "white":
            row[f"band {last}"] = float(leak["snr"][-1, last])
    print(metrics.format_table(list(rows.values())))
