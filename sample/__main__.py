"""`python -m sample --ckpt RUN_OR_DIFFUSERS_FOLDER --out DIR [options]`: sample images with DDPM or DDIM,
optionally with a signal leak (Everaert et al. 2024), epsilon scaling (Ning et al. 2023) and classifier-free
guidance. Writes 00000.png ..., grid.png and manifest.json (every setting, the seed, the timesteps and
sqrt(alpha_bar) at the first one). Same seed and settings, same images."""
import argparse
import sys
import time

from ldm_lite.allocator import keep_freed_memory
from ldm_lite.cli import run_main
from ldm_lite.generate import SampleSettings, generate, parse_leak_dc
from ldm_lite.schedules import TIMESTEP_SPACINGS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sample", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="ldm_lite run folder (or its checkpoint.pt), or a diffusers "
                        "pipeline folder (model_index.json, unet/, scheduler/, optional vae/) or UNet folder")
    parser.add_argument("--out", required=True, help="output folder (created; files in it are overwritten)")
    parser.add_argument("--scheduler", choices=("ddim", "ddpm"), default="ddim")
    parser.add_argument("--steps", type=int, default=50, help="number of sampling steps")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity: 0 deterministic, 1 DDPM-like")
    parser.add_argument("--n", type=int, default=64, help="number of images")
    parser.add_argument("--seed", type=int, default=0, help="seeds x_T, the leak and every step's noise")
    parser.add_argument("--batch-size", type=int, default=64, help="images per model call (the images depend "
                        "on it: noise is drawn batch after batch)")
    parser.add_argument("--leak", metavar="STATS", help="signal-leak statistics (.safetensors from `python -m "
                        "analysis leak-stats`): x_T = sqrt(ab[t0]) leak + sqrt(1 - ab[t0]) noise")
    parser.add_argument("--leak-dc", metavar="CH=VALUE", action="append", default=[],
                        help="set channel CH of the leak to have spatial mean VALUE, in the model's input units "
                        "(images in [-1, 1], or scaled latents for a latent model); repeatable. With --leak, the "
                        "statistics are conditioned on it (correlated components follow); without --leak, the "
                        "leak is exactly VALUE in channel CH and 0 elsewhere")
    parser.add_argument("--eps-scale", type=float, default=1.0, help="epsilon scaling lambda = b (Ning et al.; "
                        "1.017 for CIFAR-10); 1 is the plain sampler")
    parser.add_argument("--eps-scale-slope", type=float, default=0.0,
                        help="k in lambda_i = k * i + b over the step index i (i = 0 is the noisiest step)")
    parser.add_argument("--class", dest="class_label", metavar="LABEL",
                        help="class label (index, or name if the run records class names) for a class-conditional "
                        "model; without it, samples are unconditional (the null label)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance weight w: eps_null + w (eps_cond - "
                        "eps_null); needs --class")
    parser.add_argument("--spacing", choices=TIMESTEP_SPACINGS, help="override the schedule's timestep_spacing")
    parser.add_argument("--scheduler-config", metavar="JSON", help="scheduler_config.json to use instead of the "
                        "checkpoint's schedule (needed for weights that carry none)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--bf16", action="store_true", help="run the model under bfloat16 autocast (the scheduler "
                        "step stays float32)")
    parser.add_argument("--no-ema", dest="use_ema", action="store_false", help="use the raw weights, not the EMA")
    parser.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="glibc: keep freed memory in the process instead of page-faulting it back in at every "
                        "step (ldm_lite/allocator.py)")
    return parser


def main(argv=None) -> int:
    args = vars(build_parser().parse_args(argv))
    args["leak_dc"] = parse_leak_dc(args["leak_dc"])
    if args.pop("keep_freed_memory"):
        keep_freed_memory()
    settings = SampleSettings(checkpoint=args.pop("ckpt"), **args)
    start = time.perf_counter()
    manifest = generate(settings)
    print(f"wrote {len(manifest['images'])} images, grid.png and manifest.json to {settings.out} "
          f"({time.perf_counter() - start:.1f} s; first timestep {manifest['first_timestep']}, "
          f"sqrt(alpha_bar) = {manifest['sqrt_alpha_bar_first_timestep']:.5f})")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
