"""`python -m analysis COMMAND ...`: measurement and study commands. Each command is a module of this
package with `add_arguments(parser)` and `run(args)`; all logic lives in ldm_lite."""
import argparse
import importlib
import sys

from ldm_lite.cli import run_main

COMMANDS = {
    "schedules": "signal kept at the first sampled step, per schedule and spacing",
    "bands": "how the forward process destroys each DCT band (plots + CSV)",
    "brightness": "brightness distribution of samples vs data",
    "spectrum": "radially averaged power spectrum of samples vs data",
    "exposure": "exposure bias of a trained model: eps-norm and delta_t along sampling",
    "hspace": "h-space (UNet middle block) PCA directions and edit grids",
    "leak-stats": "fit signal-leak statistics on an image folder",
    "demo": "the one-command bias study (make demo)",
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name, help_text in COMMANDS.items():
        module_name = "analysis." + name.replace("-", "_")
        try:
            modules[name] = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue  # command not built yet
        modules[name].add_arguments(commands.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return modules[args.command].run(args)


if __name__ == "__main__":
    sys.exit(run_main(main))
