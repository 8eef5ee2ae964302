"""`python -m analysis bands --data synthetic|cifar10:ROOT|FOLDER --out DIR`: how the forward process destroys each
DCT band of a dataset (per-band power, SNR_b(t), destruction time, signal leak per band at the first sampled step
for common schedules and spacings, with and without offset noise, and measured vs theoretical correlation).
Writes bands_*.png and bands_*.csv into --out. With --vae the analysis runs on VAE latents.
"""
import torch

from ldm_lite import metrics
from ldm_lite.checks import output_folder
from ldm_lite.models.vae_loading import load_vae
from ldm_lite.plots import plot_bands, write_csv
from ldm_lite.schedules import NAMED_SCHEDULES, named_alphas_cumprod

from ldm_lite.cli.analysis.common import add_data_arguments, load_data, positive
from ldm_lite.latents import encode_latents

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
    parser.add_argument("--num-train-timesteps", type=int, default=1000, help="T (default 1000)")
    parser.add_argument("--offset-noise", type=float, default=0.1, help="offset-noise strength s compared with "
                        "white noise (adds s^2 H W to the DC noise power; 0 to skip; default 0.1)")
    parser.add_argument("--bands", choices=("octave", "radial"), default="octave", help="band layout (default octave)")


def run(args):
    out = output_folder(args.out)
    names = args.schedules.split(",") if args.schedules else list(NAMED_SCHEDULES)
    unknown = [name for name in names if name not in NAMED_SCHEDULES]
    if unknown:
        raise ValueError(f"--schedules: unknown {unknown}; choose from {', '.join(NAMED_SCHEDULES)}")
    schedules = named_alphas_cumprod(names, positive(args.num_train_timesteps, "--num-train-timesteps"))
    if not 1 <= args.steps <= args.num_train_timesteps:
        raise ValueError(f"--steps must be in [1, --num-train-timesteps = {args.num_train_timesteps}], got {args.steps}")
    if args.offset_noise < 0:
        raise ValueError(f"--offset-noise must be >= 0, got {args.offset_noise}")
    x0 = load_data(args.data, args.resolution, args.num_images, args.seed)
    if args.vae:
        x0 = encode_latents(load_vae(args.vae, dtype=torch.float32, seed=args.seed), x0)
    result = metrics.band_analysis(x0, schedules=schedules, bands=args.bands, num_inference_steps=args.steps,
                                   offset_noise=args.offset_noise, generator=torch.Generator().manual_seed(args.seed))
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
