"""`python -m train --config train/configs/synthetic_tiny.toml [--section.key=value ...]`

Trains a UNet as the config says and writes the run folder (config.toml, metrics.jsonl, checkpoint.pt,
samples/). Options override the TOML file: `--section.key=value` (type-checked), or the aliases
--data, --steps, --out, --batch-size, --seed, --max-minutes, --resume, --latent-vae. Running the same
command again resumes from the run's checkpoint. Multi-process: `torchrun --nproc_per_node N -m train ...`.
Sections and keys: see `ldm_lite/config.py`.
"""
import sys

from ldm_lite.allocator import keep_freed_memory
from ldm_lite.cli import run_main


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    from ldm_lite.config import load_config, parse_overrides
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


if __name__ == "__main__":
    sys.exit(run_main(main))
