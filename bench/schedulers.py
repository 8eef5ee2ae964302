"""Time per `step()` call: ldm_lite DDPM/DDIM vs diffusers, same process, interleaved, medians.

    python bench/schedulers.py [--repeats 7] [--calls 200]

Each repeat times `calls` consecutive steps of ours, then of diffusers (order alternating between
repeats), on the same inputs; the printed figure is the median over repeats of the time per call.
Target (issue 2): ours / diffusers <= 0.5.
"""
import argparse
import statistics
import time

import diffusers
import torch

from ldm_lite.schedulers import DDIMScheduler, DDPMScheduler

CASES = [("DDPM", DDPMScheduler, diffusers.DDPMScheduler, {}),
         ("DDIM eta=0", DDIMScheduler, diffusers.DDIMScheduler, {"eta": 0.0}),
         ("DDIM eta=1", DDIMScheduler, diffusers.DDIMScheduler, {"eta": 1.0})]
SHAPES = [(64, 3, 32, 32), (1, 4, 64, 64)]


def time_steps(scheduler, model_output, sample, timesteps, calls, step_kwargs):
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for i in range(calls):
        t = timesteps[i % len(timesteps)]
        scheduler.step(model_output, t, sample, generator=generator, **step_kwargs)
    return (time.perf_counter() - start) / calls


def bench_case(ours_cls, ref_cls, step_kwargs, shape, repeats, calls):
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    ours, ref = ours_cls(**config), ref_cls(**config)
    ours.set_timesteps(50)
    ref.set_timesteps(50)
    timesteps = ours.timesteps.tolist()  # python ints: what a sampling loop passes either way
    g = torch.Generator().manual_seed(0)
    model_output, sample = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    for scheduler in (ours, ref):  # warm-up
        time_steps(scheduler, model_output, sample, timesteps, 10, step_kwargs)
    ours_times, ref_times = [], []
    for r in range(repeats):
        pair = [(ours, ours_times), (ref, ref_times)]
        for scheduler, times in (pair if r % 2 == 0 else pair[::-1]):
            times.append(time_steps(scheduler, model_output, sample, timesteps, calls, step_kwargs))
    return statistics.median(ours_times), statistics.median(ref_times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, threads {torch.get_num_threads()}")
    print(f"{'scheduler':<12} {'shape':<16} {'ours us':>9} {'diffusers us':>13} {'ours/diffusers':>15}")
    for name, ours_cls, ref_cls, step_kwargs in CASES:
        for shape in SHAPES:
            ours, ref = bench_case(ours_cls, ref_cls, step_kwargs, shape, args.repeats, args.calls)
            print(f"{name:<12} {'x'.join(map(str, shape)):<16} {ours * 1e6:>9.1f} {ref * 1e6:>13.1f} "
                  f"{ours / ref:>15.2f}")


if __name__ == "__main__":
    main()
