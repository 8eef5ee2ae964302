"""torch.compile (train.compile) against eager for the whole training step of the study's recipe, in one process.

What is timed is `ldm_lite.training.train_step`, the step `python -m train` runs: a batch drawn from the data in
memory, the UNet's forward under the recipe's autocast, the loss, backward, gradient clipping, fused AdamW and the
EMA update. Only the model call differs between the two runs (train.compile wraps it, as `python -m train` does).
The recipe is one of bench/convergence.py's (its baseline plus named overrides; default bf16+batch_32, the one it
chose), on the embedded synthetic images at 32 x 32 (the step does not depend on their content).
Both runs start from the same weights; rounds alternate which goes first; medians of the process's CPU time on one
thread (other processes do not inflate it). Compiling time is reported apart.

    .venv/bin/python bench/train_compile.py                       # bf16+batch_32
    .venv/bin/python bench/train_compile.py --recipe batch_32      # the same in float32
"""
import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from convergence import recipe_tree  # bench/, beside this file
from ldm_lite.config_io import config_from_dict
from ldm_lite.distributed import World
from ldm_lite.training import Run, build_model, loss_weights, make_scheduler, prepare_data, train_step
from ldm_lite.training_state import new_state


def make_run(config, dataset, model, compiled: bool):
    """(run, state, weights) of a run whose step calls `model`, wrapped in torch.compile when `compiled`."""
    forward = torch.compile(model) if compiled else model
    run = Run(config, World(), Path(config.run.out), dataset, None, make_scheduler(config), forward,
              null_label=dataset.num_classes)
    return run, new_state(config, model), loss_weights(config, run.scheduler.alphas_cumprod)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="bf16+batch_32", help="a recipe of bench/convergence.py")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run per round")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        config = config_from_dict({**recipe_tree(args.recipe, "synthetic"), "run": {"out": out, "progress": False}})
        dataset, _ = prepare_data(config, World(), Path(out))
        torch.manual_seed(0)
        model = build_model(config, dataset).to(memory_format=torch.channels_last)
        runs = {"eager": make_run(config, dataset, model, False),
                "compiled": make_run(config, dataset, copy.deepcopy(model), True)}
        step = lambda name: train_step(*runs[name])  # noqa: E731
        started = time.process_time()
        step("compiled")  # compiles forward and backward
        step("compiled")
        compile_seconds = time.process_time() - started
        step("eager")
        times = {name: [] for name in runs}
        for r in range(args.rounds):
            for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                for _ in range(args.steps):
                    start = time.process_time()
                    step(name)
                    times[name].append(time.process_time() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"train_step of {args.recipe}: batch {config.train.batch_size}, {config.train.precision}, 1 thread, {args.rounds} rounds x {args.steps} "
          f"steps: eager {median['eager']:.3f} s/step, compiled {median['compiled']:.3f} s/step, speed-up "
          f"{median['eager'] / median['compiled']:.2f}x; compiling took {compile_seconds:.0f} s of CPU time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
