"""Time per `step()` call of every ldm_lite sampler vs its diffusers counterpart, same process, interleaved, medians.

    python bench/schedulers.py [--repeats 15] [--steps 50] [--calls 100] [--cases "DDPM,DPM++ 2M"]
                               [--shapes 1x4x64x64] [--clock wall|cpu] [--keep-freed-memory]

One trajectory is `set_timesteps(steps)`, then `step()` once per entry of `scheduler.timesteps` with the entry
itself as the timestep (a 0-d tensor, as a pipeline passes it), the same fixed model output every call and the
previous call's `prev_sample` as the sample; stochastic samplers get a generator, reseeded identically for both
at the start of every trajectory (both draw the same noise). Each `step()` call is timed on its own
(`time.perf_counter`, or the thread's CPU time with --clock cpu), and so are its minor page faults (getrusage
of the thread); `scale_model_input` runs before it and `set_timesteps` before the trajectory, both timed in their
own columns, outside the ratio.

A repeat runs ours, then diffusers (the order alternating between repeats), each for as many whole trajectories
as reach `calls` step calls. For every position in the trajectory the figure is the median over all its
trajectories (a multistep sampler's first steps are cheaper than later ones, so positions are not pooled), and
the time per call is the mean of those medians over the positions. The ratio is ours / diffusers (lower is
faster); the last line gives the median ratio over all rows. --keep-freed-memory applies
`ldm_lite.keep_freed_memory()` first (glibc serves every block from the heap and never trims it: no page faults on
reallocation, for both implementations).

Targets (issue 2, extended to every sampler): ours / diffusers <= 1.0 in every row, median over rows <= 0.7.
"""
import argparse
import math
import os
import resource
import statistics
import time

import diffusers
import torch

from ldm_lite import schedulers as ours_schedulers
from ldm_lite.allocator import keep_freed_memory

SD_SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
# (name, class name (ours and diffusers), constructor keywords beyond SD_SCHEDULE, step keywords, stochastic);
# the variants are those of `ldm_lite.schedulers.ALIASES`, every other keyword at the class default
CASES = [
    ("DDPM", "DDPMScheduler", {"clip_sample": False}, {}, True),
    ("DDIM eta=0", "DDIMScheduler", {"clip_sample": False}, {"eta": 0.0}, False),
    ("DDIM eta=1", "DDIMScheduler", {"clip_sample": False}, {"eta": 1.0}, True),
    ("Euler", "EulerDiscreteScheduler", {}, {}, False),
    ("Euler a", "EulerAncestralDiscreteScheduler", {}, {}, True),
    ("Heun", "HeunDiscreteScheduler", {}, {}, False),
    ("DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, {}, False),
    ("DPM++ 3M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}, {}, False),
    ("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, {},
     True),
    ("UniPC", "UniPCMultistepScheduler", {}, {}, False),
    ("PNDM", "PNDMScheduler", {"skip_prk_steps": True}, {}, False),
]
SHAPES = [(64, 3, 32, 32), (1, 4, 64, 64)]
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def minor_faults():
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


def run_trajectory(scheduler, model_output, x_T, steps, step_kwargs, seed, clock):
    """One full pass over `scheduler.timesteps`: (set_timesteps s, [step s], [scale_model_input s], [step faults])."""
    start = clock()
    scheduler.set_timesteps(steps)
    setup_time = clock() - start
    kwargs = dict(step_kwargs)
    if seed is not None:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    sample, step_times, scale_times, faults = x_T, [], [], []
    for t in scheduler.timesteps:
        start = clock()
        scheduler.scale_model_input(sample, t)
        middle = clock()
        faults_before = minor_faults()
        step_start = clock()
        sample = scheduler.step(model_output, t, sample, **kwargs).prev_sample
        step_times.append(clock() - step_start)
        faults.append(minor_faults() - faults_before)
        scale_times.append(middle - start)
    return setup_time, step_times, scale_times, faults


def summarise(trajectories):
    """(set_timesteps s, step s per call, scale_model_input s per call, step faults per call): medians over the
    trajectories per position, then the mean over the positions (set_timesteps: the median)."""
    setup, *columns = zip(*trajectories)
    return statistics.median(setup), *(statistics.fmean(map(statistics.median, zip(*rows))) for rows in columns)


def bench_case(case, shape, repeats, steps, calls, clock):
    """{"ours": (set_timesteps, step, scale, faults), "diffusers": (...)}: seconds (step, scale and faults per call)."""
    _, class_name, variant, step_kwargs, stochastic = case
    config = {**SD_SCHEDULE, **variant}
    schedulers = {"ours": getattr(ours_schedulers, class_name)(**config),
                  "diffusers": getattr(diffusers, class_name)(**config)}
    g = torch.Generator().manual_seed(0)
    model_output, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    x_T = noise * schedulers["ours"].init_noise_sigma
    seed = 1 if stochastic else None
    runs = {name: [] for name in schedulers}
    for name, scheduler in schedulers.items():  # warm-up, untimed
        runs[name].append(run_trajectory(scheduler, model_output, x_T, steps, step_kwargs, seed, clock))
    passes = max(1, math.ceil(calls / len(runs["ours"][0][1])))
    runs = {name: [] for name in schedulers}
    for r in range(repeats):
        for name in (list(schedulers) if r % 2 == 0 else list(schedulers)[::-1]):
            for _ in range(passes):
                runs[name].append(run_trajectory(schedulers[name], model_output, x_T, steps, step_kwargs, seed, clock))
    return {name: summarise(trajectories) for name, trajectories in runs.items()}


def load_average():
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=50, help="num_inference_steps of each trajectory")
    parser.add_argument("--calls", type=int, default=100, help="at least this many step calls per impl and repeat")
    parser.add_argument("--cases", default=None, help="comma-separated names from CASES (default: all)")
    parser.add_argument("--shapes", default=None, help="comma-separated, e.g. 64x3x32x32,1x4x64x64")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall: time.perf_counter; cpu: this thread's CPU time (1 thread only; less noise on "
                             "a shared machine)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc keeps freed memory (ldm_lite.keep_freed_memory; process-wide, both samplers)")
    args = parser.parse_args()
    allocator = "kept freed memory" if args.keep_freed_memory and keep_freed_memory() else "default allocator"
    cases = CASES if args.cases is None else [c for c in CASES if c[0] in args.cases.split(",")]
    shapes = SHAPES if args.shapes is None else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, threads {torch.get_num_threads()}, "
          f"{args.clock} clock, {allocator}, load average {load_average()}; {args.steps} steps, "
          f"{args.repeats} repeats", flush=True)
    print(f"{'scheduler':<13} {'shape':<11} {'ours us':>8} {'diffusers us':>12} {'ratio':>6} "
          f"{'scale_model_input us':>21} {'set_timesteps us':>17} {'faults / step':>15}", flush=True)
    ratios = []
    for case in cases:
        for shape in shapes:
            result = bench_case(case, shape, args.repeats, args.steps, args.calls, CLOCKS[args.clock])
            (ours_setup, ours, ours_scale, ours_faults), (ref_setup, ref, ref_scale, ref_faults) = \
                result["ours"], result["diffusers"]
            ratios.append(ours / ref)
            print(f"{case[0]:<13} {'x'.join(map(str, shape)):<11} {ours * 1e6:>8.1f} {ref * 1e6:>12.1f} "
                  f"{ours / ref:>6.2f} {ours_scale * 1e6:>10.1f} / {ref_scale * 1e6:>8.1f} "
                  f"{ours_setup * 1e6:>7.0f} / {ref_setup * 1e6:>7.0f} {ours_faults:>6.0f} / {ref_faults:>6.0f}",
                  flush=True)
    print(f"median ratio over {len(ratios)} rows: {statistics.median(ratios):.2f} (max {max(ratios):.2f}, "
          f"geometric mean {math.exp(statistics.fmean(map(math.log, ratios))):.2f}); load average at the end "
          f"{load_average()}")


if __name__ == "__main__":
    main()
