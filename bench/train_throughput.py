"""Training throughput of ldm_lite's UNet vs diffusers' UNet2DModel with the identical architecture.

One training step = forward + MSE loss + backward + AdamW step on a batch of noisy images, as in DDPM
training. Both models get the same weights, the same inputs and run in the same process; rounds alternate
which model goes first, and each reports the median step time. Rows: each config x {float32, bf16 autocast}.
FLOPs per image (forward + backward) are counted with torch.utils.flop_counter on the diffusers model: the
architecture's nominal cost (ours computes the upsampling convs with 2.25x fewer FLOPs, so %peak for ours
is an effective figure). The peak is the best of a matmul and a 256-channel conv measured here (or given
with --peak-fp32 / --peak-bf16, in GFLOP/s).

Quick run (a few minutes on 2 cores):  python bench/train_throughput.py --steps 2 --rounds 2
Only the small model:                  python bench/train_throughput.py --configs tiny --steps 10
As `python -m train` runs:             add --keep-freed-memory (glibc keeps freed memory; process-wide, so
                                       for both models)
On a machine shared with other jobs:   add --threads 1 (timed with the process's CPU time, which other
                                       processes do not inflate; 2-thread wall times there are meaningless)
"""
import argparse
import statistics
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ldm_lite.allocator import keep_freed_memory
from ldm_lite.models.unet import UNet, UNetConfig, unet_preset


def diffusers_kwargs(cfg: UNetConfig) -> dict:
    """UNet2DModel arguments that build the same network (and parameter names) as UNet(cfg)."""
    attn = [cfg.has_attention(level) for level in range(len(cfg.channel_mult))]
    return dict(
        sample_size=cfg.sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=cfg.level_channels, layers_per_block=cfg.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=cfg.head_channels, dropout=cfg.dropout, norm_num_groups=cfg.norm_groups,
        norm_eps=cfg.norm_eps, flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift,
        downsample_padding=cfg.downsample_padding, add_attention=cfg.mid_attention,
        resnet_time_scale_shift="scale_shift" if cfg.time_conditioning == "scale_shift" else "default",
        num_class_embeds=None if cfg.num_classes is None else cfg.num_classes + 1)


def build_pair(name: str):
    """Our UNet and a diffusers UNet2DModel holding the same weights."""
    from diffusers import UNet2DModel
    cfg = unet_preset(name)
    if cfg.head_channels is None and cfg.num_heads != 1:
        raise ValueError("diffusers expresses heads as head channels; use head_channels in the preset")
    ours = UNet(cfg).train()
    theirs = UNet2DModel(**diffusers_kwargs(cfg)).train()
    theirs.load_state_dict(ours.state_dict())
    return cfg, ours, theirs


def make_step(model, is_ours: bool, batch: dict, bf16: bool):
    """A closure running one training step (forward, MSE to the noise, backward, AdamW)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            out = model(batch["x"], batch["t"])
            out = out if is_ours else out.sample
            loss = F.mse_loss(out.float(), batch["noise"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def flops_per_image(model, size: int) -> float:
    """Forward + backward FLOPs of one image (counted at batch 2, halved) for a diffusers-style model."""
    x = torch.randn(2, model.config.in_channels, size, size)
    with FlopCounterMode(display=False) as counter:
        model(x, torch.tensor([1, 2])).sample.square().mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def measure_peak(bf16: bool, clock=time.perf_counter, repeats: int = 5) -> float:
    """GFLOP/s of the best of a 2048^3 matmul and a 256-channel 3x3 conv (oneDNN), the practical peak."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    x = torch.randn(32, 256, 16, 16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3)
    candidates = [(lambda: a @ b, 2 * 2048 ** 3), (lambda: F.conv2d(x, w, padding=1), 2 * 32 * 256 * 256 * 9 * 256)]
    best = 0.0
    for fn, flops in candidates:
        times = []
        with autocast:
            for _ in range(repeats + 1):
                start = clock()
                fn()
                times.append(clock() - start)
        best = max(best, flops / statistics.median(times[1:]) / 1e9)
    return best


def time_interleaved(steps: dict, n_steps: int, rounds: int, warmup: int, clock=time.perf_counter) -> dict:
    """Median seconds per step for each closure; rounds alternate the order of the closures."""
    times = {name: [] for name in steps}
    for step in steps.values():
        for _ in range(warmup):
            step()
    names = list(steps)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            for _ in range(n_steps):
                start = clock()
                steps[name]()
                times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def run_config(name: str, args, peaks: dict) -> list:
    torch.manual_seed(0)
    cfg, ours, theirs = build_pair(name)
    size = cfg.sample_size
    batch = {"x": torch.randn(args.batch, cfg.in_channels, size, size),
             "t": torch.randint(0, 1000, (args.batch,)),
             "noise": torch.randn(args.batch, cfg.out_channels, size, size)}
    gflop = flops_per_image(theirs, size) / 1e9  # the architecture's FLOPs; ours runs ~7-10 % fewer
    rows = []
    for dtype in args.dtypes:
        bf16 = dtype == "bf16"
        steps = {"ours": make_step(ours, True, batch, bf16), "diffusers": make_step(theirs, False, batch, bf16)}
        seconds = time_interleaved(steps, args.steps, args.rounds, args.warmup, args.clock)
        ips = {k: args.batch / s for k, s in seconds.items()}
        peak = peaks[dtype]
        rows.append((name, dtype, gflop, ips["ours"], ips["diffusers"], ips["ours"] / ips["diffusers"],
                     100 * ips["ours"] * gflop / peak, 100 * ips["diffusers"] * gflop / peak))
        print(f"  {name:13s} {dtype:5s} ours {ips['ours']:7.2f} img/s  diffusers {ips['diffusers']:7.2f} img/s  "
              f"ratio {ips['ours'] / ips['diffusers']:.2f}", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="ddpm_cifar10,tiny", help="comma-separated UNet presets")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model and dtype")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc malloc keeps freed memory (as python -m train does), for both models")
    parser.add_argument("--peak-fp32", type=float, default=None, help="GFLOP/s; measured when omitted")
    parser.add_argument("--peak-bf16", type=float, default=None, help="GFLOP/s; measured when omitted")
    args = parser.parse_args(argv)
    args.dtypes = args.dtypes.split(",")
    if set(args.dtypes) - {"fp32", "bf16"} or args.steps < 1 or args.rounds < 1:
        print("error: --dtypes takes fp32,bf16; --steps and --rounds must be >= 1", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = "kept freed memory" if args.keep_freed_memory and keep_freed_memory() else "default allocator"
    # One thread: count its CPU time, which time-slicing by other processes does not inflate.
    args.clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    peaks = {"fp32": args.peak_fp32 or measure_peak(False, args.clock),
             "bf16": args.peak_bf16 or measure_peak(True, args.clock)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"({'process CPU time' if args.clock is time.process_time else 'wall time'}), batch {args.batch}, "
          f"{allocator}; matmul peak fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
    rows = []
    for name in args.configs.split(","):
        try:
            rows += run_config(name, args, peaks)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    print(f"\n{'config':13s} {'dtype':5s} {'GFLOP/img':>9s} {'ours img/s':>10s} {'diff img/s':>10s} "
          f"{'ours/diff':>9s} {'ours %peak':>10s} {'diff %peak':>10s}")
    for name, dtype, gflop, ours, theirs, ratio, ours_peak, theirs_peak in rows:
        print(f"{name:13s} {dtype:5s} {gflop:9.2f} {ours:10.2f} {theirs:10.2f} {ratio:9.2f} "
              f"{ours_peak:9.1f}% {theirs_peak:9.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
