"""Does `keep_freed_memory` speed up the train and sample commands? Alternating whole-command runs, medians.

    python bench/keep_freed_memory.py [--runs 5] [--steps 80]

Each round runs `python -m train` (tiny preset, 32x32, batch 32, `--steps` steps, a fresh run folder) once with
`--train.keep_freed_memory=true` and once with `false`, in alternating order, and `python -m sample` (DDIM, 20
steps, 64 images) with `--keep-freed-memory` and without; each run is a fresh process. It prints the median wall
time of each setting and the gain (1 - kept / default). Run it on a quiet machine: other load swamps the effect.
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["-m", "train", "--config", "train/configs/synthetic_tiny.toml", "--data.resolution=32", "--batch-size", "32",
         "--run.checkpoint_every=0", "--run.progress=false", "--fresh"]


def timed(args: list) -> float:
    """Wall seconds of one child process."""
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=80)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    run = folder / "run"
    commands = {
        "train": lambda keep: TRAIN + ["--steps", str(args.steps), "--out", str(run),
                                       f"--train.keep_freed_memory={'true' if keep else 'false'}"],
        "sample": lambda keep: ["-m", "sample", "--ckpt", str(run), "--out", str(folder / "samples"), "--steps",
                                "20", "--num-images", "64"] + (["--keep-freed-memory"] if keep else []),
    }
    subprocess.run([sys.executable, *commands["train"](False)], cwd=ROOT, check=True, capture_output=True)  # warm-up
    for name, command in commands.items():
        times = {True: [], False: []}
        for round_ in range(args.runs):
            for keep in ((True, False) if round_ % 2 == 0 else (False, True)):
                times[keep].append(timed(command(keep)))
        kept, default = statistics.median(times[True]), statistics.median(times[False])
        print(f"{name}: kept {kept:.2f} s, default {default:.2f} s (medians of {args.runs}); gain "
              f"{1 - kept / default:+.1%}; runs kept {[round(t, 1) for t in times[True]]}, "
              f"default {[round(t, 1) for t in times[False]]}")


if __name__ == "__main__":
    main()
