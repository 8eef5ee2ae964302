"""torch.compile (train.compile) against eager for one training step of the study's recipe, in one process.

A step is what train.compile changes: the UNet's forward under the recipe's autocast, an MSE loss, backward and a
fused AdamW step, on the study's model (tiny, class-conditional on 3 brightness terciles + the null label) at
32 x 32, batch 64. The EMA update and gradient clipping of `python -m train` run outside the compiled model and
cost the same in both, so they would dilute a gain a little; they are left out. Both models hold the same
weights; rounds alternate which goes first; medians of the process's CPU time on one thread (other processes do
not inflate it). Compiling time is reported apart.

    .venv/bin/python bench/train_compile.py --precision bf16
"""
import argparse
import copy
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from ldm_lite.models import UNet, unet_preset


def make_step(model, batch: dict, dtype):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

    def step():
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.mse_loss(model(batch["x"], batch["t"], batch["labels"]).float(), batch["noise"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per model per round")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    eager = UNet(unet_preset("tiny", sample_size=32, num_classes=3)).train().to(memory_format=torch.channels_last)
    compiled = torch.compile(copy.deepcopy(eager))
    batch = {"x": torch.randn(args.batch, 3, 32, 32), "t": torch.randint(0, 1000, (args.batch,)),
             "labels": torch.randint(0, 4, (args.batch,)), "noise": torch.randn(args.batch, 3, 32, 32)}
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    steps = {"eager": make_step(eager, batch, dtype), "compiled": make_step(compiled, batch, dtype)}
    started = time.process_time()
    steps["compiled"]()  # compiles forward and backward
    steps["compiled"]()
    compile_seconds = time.process_time() - started
    steps["eager"]()
    times = {name: [] for name in steps}
    for r in range(args.rounds):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            for _ in range(args.steps):
                start = time.process_time()
                steps[name]()
                times[name].append(time.process_time() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"tiny, batch {args.batch}, {args.precision}, 1 thread, {args.rounds} rounds x {args.steps} steps: eager "
          f"{median['eager']:.3f} s/step, compiled {median['compiled']:.3f} s/step, speed-up "
          f"{median['eager'] / median['compiled']:.2f}x; compiling took {compile_seconds:.0f} s of CPU time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
