"""End-to-end DDIM sampling: ldm_lite's sampler vs diffusers' DDIMPipeline, identical weights, same process.

The UNet is google/ddpm-cifar10-32's architecture (35.7M parameters) with random weights: a diffusers
UNet2DModel is built from that config, saved, and loaded into ours with `load_unet`, so both hold the same
numbers. Both sample from the same schedule (the checkpoint's DDPM config, run as DDIM, eta = 0), each run
ends with uint8-ready images in [0, 1]. Rounds alternate which sampler goes first; medians are printed with
the ratio ours / diffusers (target <= 0.8). bf16: ours runs the model under bfloat16 autocast with a float32
scheduler step; diffusers runs the pipeline with bfloat16 weights (its usual `torch_dtype=torch.bfloat16`).

A "loop" row times everything but the UNet (scheduler steps, noise, bookkeeping) with a zero-cost model.

    python bench/sampling.py                          # the issue's setting: 64 images, 50 steps (slow on CPU)
    python bench/sampling.py --n 8 --steps 5 --rounds 2   # quick check
"""
import argparse
import statistics
import sys
import tempfile
import time

import torch

from ldm_lite.allocator import keep_freed_memory
from ldm_lite.generate import build_scheduler
from ldm_lite.models.unet import load_unet
from ldm_lite.sampling import sample

# google/ddpm-cifar10-32: unet/config.json and scheduler/scheduler_config.json (Ho et al. 2020's CIFAR-10 model).
UNET_CONFIG = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                   down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
                   attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6, act_fn="silu",
                   flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, dropout=0.0,
                   center_input_sample=False, time_embedding_type="positional", mid_block_scale_factor=1)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                        trained_betas=None, clip_sample=True, variance_type="fixed_large")


def build_pair(seed: int = 0):
    """(our UNet, our DDIM scheduler, diffusers DDIMPipeline): same random weights, same schedule."""
    from diffusers import DDIMPipeline, DDPMScheduler, UNet2DModel
    from diffusers.utils import logging
    logging.set_verbosity_error()  # silence the "cast with to()" notice for the bf16 rows
    torch.manual_seed(seed)
    reference = UNet2DModel(**UNET_CONFIG).eval()
    with torch.no_grad():  # random norms and biases too, so a mis-loaded parameter shows
        for parameter in reference.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        ours = load_unet(folder).eval()
    # DDIMPipeline turns the checkpoint's DDPMScheduler into a DDIMScheduler with the same config
    pipeline = DDIMPipeline(unet=reference, scheduler=DDPMScheduler(**SCHEDULER_CONFIG))
    pipeline.set_progress_bar_config(disable=True)
    return ours, build_scheduler("ddim", SCHEDULER_CONFIG), pipeline


def run_ours(model, scheduler, args, bf16: bool) -> torch.Tensor:
    """Our sampler; with bf16 the model runs under autocast and the scheduler step stays float32."""
    x = sample(model, scheduler, args.n, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0),
               batch_size=args.n, eta=0.0, progress=False, autocast_dtype=torch.bfloat16 if bf16 else None)
    return (x / 2 + 0.5).clamp(0, 1)


def run_diffusers(pipeline, args) -> torch.Tensor:
    """The pipeline runs in its UNet's dtype (set by the caller): x_T, the model and the scheduler step."""
    output = pipeline(batch_size=args.n, generator=torch.Generator().manual_seed(0), eta=0.0,
                      num_inference_steps=args.steps, output_type="pt")
    return output.images.float()


class ZeroCostModel(torch.nn.Module):
    """Returns its input scaled: what is left of a sampling run when the UNet costs nothing."""
    config = None

    def forward(self, x, timesteps, class_labels=None):
        return x * 0.5


def run_loop_only(scheduler, args) -> float:
    """Seconds of our sampling loop with a zero-cost model (scheduler steps, noise, bookkeeping)."""
    start = time.perf_counter()
    sample(ZeroCostModel(), scheduler, args.n, shape=(3, 32, 32), num_inference_steps=args.steps,
           generator=torch.Generator().manual_seed(0), batch_size=args.n, progress=False)
    return time.perf_counter() - start


def run_diffusers_loop_only(scheduler, args) -> float:
    """The same for diffusers: DDIMPipeline's loop (randn, set_timesteps, step) around a zero-cost model."""
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    x = torch.randn(args.n, 3, 32, 32, generator=generator)
    scheduler.set_timesteps(args.steps)
    for t in scheduler.timesteps:
        x = scheduler.step(x * 0.5, t, x, eta=0.0, generator=generator).prev_sample
    return time.perf_counter() - start


def timed(fn, *fn_args):
    start = time.perf_counter()
    result = fn(*fn_args)
    return time.perf_counter() - start, result


def bench_dtype(ours, scheduler, pipeline, args, bf16: bool) -> dict:
    """Median seconds of each sampler over interleaved rounds, and the images of its untimed warm-up run."""
    pipeline.unet.to(torch.bfloat16 if bf16 else torch.float32)
    runners = {"ours": lambda: run_ours(ours, scheduler, args, bf16),
               "diffusers": lambda: run_diffusers(pipeline, args)}
    images = {name: run() for name, run in runners.items()}  # warm-up (oneDNN kernel choice), kept for accuracy
    times = {name: [] for name in runners}
    for r in range(args.rounds):
        for name in (list(runners) if r % 2 == 0 else list(runners)[::-1]):
            seconds, _ = timed(runners[name])
            times[name].append(seconds)
            print(f"    round {r} {name:9s} {seconds:8.2f} s", flush=True)
    return {name: (statistics.median(times[name]), images[name]) for name in runners}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="images per run (one batch)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds per sampler")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc malloc keeps freed memory (as python -m sample does), for both samplers")
    args = parser.parse_args(argv)
    dtypes = args.dtypes.split(",")
    if set(dtypes) - {"fp32", "bf16"} or min(args.n, args.steps, args.rounds) < 1:
        print("error: --dtypes takes fp32,bf16; --n, --steps and --rounds must be >= 1", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = "kept freed memory" if args.keep_freed_memory and keep_freed_memory() else "default allocator"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {allocator}; DDIM {args.steps} steps, "
          f"{args.n} images 32x32, ddpm-cifar10-32 UNet (random weights), {args.rounds} rounds", flush=True)
    ours, scheduler, pipeline = build_pair()
    results = {}
    for dtype in dtypes:
        print(f"  {dtype}:", flush=True)
        results[dtype] = bench_dtype(ours, scheduler, pipeline, args, dtype == "bf16")
    # accuracy: mean |image - diffusers float32 image| in [0, 1] units (the reference run, same x_T)
    reference = results["fp32"]["diffusers"][1] if "fp32" in results else None
    loop_times = {"ours": [], "diffusers": []}
    for r in range(max(args.rounds, 5)):
        loop_times["ours"].append(run_loop_only(scheduler, args))
        loop_times["diffusers"].append(run_diffusers_loop_only(pipeline.scheduler, args))
    loop = (statistics.median(loop_times["ours"]), statistics.median(loop_times["diffusers"]))
    print(f"\n{'dtype':6s} {'ours s':>9s} {'diffusers s':>12s} {'ours/diff':>9s}   mean |image - diffusers fp32|: "
          "ours, diffusers")
    for dtype, result in results.items():
        (mine, mine_images), (theirs, their_images) = result["ours"], result["diffusers"]
        errors = ("" if reference is None else
                  f"   {(mine_images - reference).abs().mean():.2e}, {(their_images - reference).abs().mean():.2e}")
        print(f"{dtype:6s} {mine:9.2f} {theirs:12.2f} {mine / theirs:9.2f}{errors}")
    print(f"{'loop':6s} {loop[0]:9.4f} {loop[1]:12.4f} {loop[0] / loop[1]:9.2f}   (zero-cost model: scheduler "
          "and bookkeeping only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
