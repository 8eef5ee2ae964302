"""`python -m analysis COMMAND ...` (installed: `ldm-analysis`): measurement and study commands. Each command is
a module of this package with `add_arguments(parser)` and `run(args)`; the logic lives in the library, and
flags and loaders shared by several commands in `common.py`. Only the module of the command that runs is
imported."""
import argparse
import importlib
import sys

from ldm_lite.cli import run_main
from ldm_lite.cli.options import ArgumentParser

COMMANDS = {
    "schedules": "signal kept at the first sampled step, per schedule and spacing",
    "bands": "how the forward process destroys each DCT band (plots + CSV)",
    "brightness": "brightness distribution of samples vs data",
    "spectrum": "radially averaged power spectrum of samples vs data",
    "exposure": "exposure bias of a trained model: eps-norm and delta_t along sampling",
    "hspace": "h-space (UNet middle block) PCA directions and edit grids",
    "leak-stats": "fit signal-leak statistics on an image folder",
    "fid-stats": "Inception feature statistics of a reference dataset (for fid)",
    "fid": "FID (and KID) of samples against reference statistics or a dataset",
    "demo": "the one-command bias study (make demo)",
    "study": "the bias study on real images: FID/KID of samplers, eps scaling, signal leak and fixes",
    "export": "write a run as a diffusers folder (unet/, scheduler/, vae/, model_index.json)",
    "curves": "KID / FID logged while training (run.eval_every), against minutes and images seen",
    "invert": "DDIM inversion: reconstruction error of images vs step count (table, CSV, grid)",
}


def usage() -> str:
    lines = ["usage: python -m analysis COMMAND [options]   (python -m analysis COMMAND --help)", "", "commands:"]
    lines += [f"  {name:<11} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command = argv[0]
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; choose from {', '.join(COMMANDS)}")
    module = importlib.import_module(f"{__name__}.{command.replace('-', '_')}")
    parser = ArgumentParser(prog=f"python -m analysis {command}", description=COMMANDS[command],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv[1:]))


def entry_point() -> None:
    """The `ldm-analysis` console script."""
    sys.exit(run_main(main))
