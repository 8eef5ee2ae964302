"""`python -m analysis exposure --ckpt RUN_OR_FOLDER --data synthetic|cifar10:ROOT|FOLDER --out DIR`: exposure bias
of a trained model (Ning et al. 2023, arXiv:2308.15321): the predicted-noise norm along sampling vs on
forward-noised training data, and delta_t, against t (exposure.png, exposure.csv). With --scan B1,B2,...
also the epsilon-scaling value whose sampling eps-norm best matches the forward one (eps_scale_scan.png/.csv).
A latent model's data are encoded with its VAE first.
"""
import torch

from ldm_lite import exposure, metrics
from ldm_lite.checks import output_folder
from ldm_lite.plots import plot_eps_scale_scan, plot_exposure, write_csv

from ldm_lite.cli.analysis.common import (add_data_arguments, add_model_arguments, load_model_and_scheduler,
                                          model_inputs, parse_floats)


def add_arguments(parser):
    add_model_arguments(parser)
    add_data_arguments(parser, resolution_default=None, num_images=64)
    parser.add_argument("--eps-scale", type=float, default=1.0, help="epsilon scaling b used for the curves "
                        "(default 1: the plain sampler)")
    parser.add_argument("--scan", metavar="B1,B2,...", help="also scan these epsilon-scaling values, e.g. "
                        "1,1.005,1.01,1.02 (one extra sampling run each)")
    parser.add_argument("--out", default="runs/analysis/exposure", help="output folder")


def run(args):
    out = output_folder(args.out)
    candidates = parse_floats(args.scan, "--scan") if args.scan else None
    if args.eps_scale <= 0:
        raise ValueError(f"--eps-scale must be > 0, got {args.eps_scale}")
    loaded, scheduler = load_model_and_scheduler(args)
    x0 = model_inputs(loaded, args)
    options = dict(seed=args.seed, batch_size=args.batch_size)
    result = exposure.exposure_bias(loaded.unet, scheduler, x0, eps_scale=args.eps_scale, **options)
    keys = ("eps_norm_forward", "eps_norm_sampling", "residual_std", "target_std", "delta", "delta_reference")
    rows = [dict(step=i, timestep=int(t), **{k: float(result[k][i]) for k in keys})
            for i, t in enumerate(result["timesteps"])]
    files = [plot_exposure(result, out / "exposure.png"), write_csv(rows, out / "exposure.csv")]
    print(f"exposure bias, {len(x0)} images of {args.data}, {args.scheduler} {args.steps} steps, eps scale "
          f"{args.eps_scale:g}; eps-norm gap (RMS relative) "
          f"{exposure.eps_norm_gap(result['eps_norm_sampling'], result['eps_norm_forward']):.4f}:")
    shown = sorted(set(torch.linspace(0, len(rows) - 1, min(len(rows), 8)).round().long().tolist()))
    print(metrics.format_table([rows[i] for i in shown]))
    if candidates:
        scan = exposure.scan_eps_scale(loaded.unet, scheduler, x0, candidates, **options)
        scan_rows = [dict(eps_scale=b, eps_norm_gap=g) for b, g in zip(scan["candidates"], scan["gap"])]
        files += [plot_eps_scale_scan(scan, out / "eps_scale_scan.png"),
                  write_csv(scan_rows, out / "eps_scale_scan.csv")]
        print(metrics.format_table(scan_rows))
        print(f"best eps scale: {scan['best']:g}")
    print(f"wrote {', '.join(f.name for f in files)} to {out}")


