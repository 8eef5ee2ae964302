"""`python -m train --config train/configs/synthetic_tiny.toml [--section.key=value ...]` (installed: `ldm-train`)

Trains a UNet as the config says and writes the run folder (config.toml, metrics.jsonl, checkpoint.pt,
samples/). Options override the TOML file: `--section.key=value` (type-checked), or the aliases below. Running
the same command again resumes from the run's checkpoint; changed training settings are refused unless --fresh
is given. Multi-process: `torchrun --nproc_per_node N -m train ...`.
"""
import dataclasses
import sys

from ldm_lite.allocator import keep_freed_memory
from ldm_lite.cli import run_main


def usage() -> str:
    """The docstring, then every section and key with its default, built from the config dataclasses."""
    from ldm_lite.config import ALIASES, SECTIONS
    from ldm_lite.config_io import field_type
    lines = [__doc__.strip(), "", "aliases: " + ", ".join(f"--{a} (= {k})" for a, k in ALIASES.items()), ""]
    for section, cls in SECTIONS.items():
        lines.append(f"[{section}]  {(cls.__doc__ or '').splitlines()[0]}")
        for field in dataclasses.fields(cls):
            kind, nullable = field_type(cls, field.name)
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            lines.append(f"  --{section}.{field.name}={default!r}  ({kind.__name__}{' or none' if nullable else ''})")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(usage())
        return 0
    from ldm_lite.config_io import load_config, parse_overrides
    from ldm_lite.training import TrainingDiverged, train
    config_path, overrides = parse_overrides(args)
    config = load_config(config_path, overrides)
    if config.train.keep_freed_memory:
        keep_freed_memory()  # process-wide, so here and not in train(); see ldm_lite/allocator.py
    try:
        run_dir = train(config)
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"run folder: {run_dir}")
    return 0


def entry_point() -> None:
    """The `ldm-train` console script."""
    sys.exit(run_main(main))


if __name__ == "__main__":  # python -m ldm_lite.cli.train (the child processes of ldm_lite.processes)
    entry_point()
