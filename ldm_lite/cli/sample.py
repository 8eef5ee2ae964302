"""`python -m sample --ckpt RUN_OR_DIFFUSERS_FOLDER --out DIR [options]` (installed: `ldm-sample`): sample
images with any scheduler, optionally with a signal leak (Everaert et al. 2024), epsilon scaling (Ning et al.
2023) and classifier-free guidance. Writes 00000.png ..., grid.png and manifest.json (every setting, the seed,
the timesteps, the number of model calls and sqrt(alpha_bar) at the first timestep). Same seed and settings,
same images; a killed run continues where it stopped."""
import argparse
import sys
import time

from ldm_lite.allocator import keep_freed_memory
from ldm_lite.cli import run_main
from ldm_lite.cli.options import ArgumentParser, add_dataclass_arguments, dataclass_from_args
from ldm_lite.generate import SampleSettings, generate, parse_leak_dc


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m sample", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataclass_arguments(parser, SampleSettings)
    parser.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=False,
                        help="glibc: keep freed memory in the process instead of page-faulting it back in at every "
                        "step (ldm_lite/allocator.py)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.keep_freed_memory:
        keep_freed_memory()
    settings = dataclass_from_args(SampleSettings, args, leak_dc=parse_leak_dc(args.leak_dc))
    start = time.perf_counter()
    manifest = generate(settings)
    if manifest["x0_clipping_dropped"]:
        print(f"note: {manifest['scheduler']['class']} has no {' or '.join(manifest['x0_clipping_dropped'])}: the "
              "checkpoint's schedule clips x0, these samples do not (manifest: x0_clipping off)")
    if "quality" in manifest:
        from ldm_lite.metrics import format_table
        print(format_table([manifest["quality"]]))
    print(f"wrote {len(manifest['images'])} images, grid.png and manifest.json to {settings.out} "
          f"({time.perf_counter() - start:.1f} s; {manifest['scheduler']['class']}, {manifest['nfe']} model calls "
          f"per image; first timestep {manifest['first_timestep']}, "
          f"sqrt(alpha_bar) = {manifest['sqrt_alpha_bar_first_timestep']:.5f})")
    return 0


def entry_point() -> None:
    """The `ldm-sample` console script."""
    sys.exit(run_main(main))
