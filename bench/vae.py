"""Benchmark: our AutoencoderKL vs diffusers' AutoencoderKL, identical weights (the SD config, random, seed 0).

    python bench/vae.py                  # full: 4x3x256x256 and 1x3x512x512, float32 and bfloat16
    python bench/vae.py --quick          # 2x3x128x128 only, 2 repeats: a smoke run
    python bench/vae.py --tiled          # also ours at 1024x1024: decode in 640-pixel tiles (2x2) vs whole
    python bench/vae.py --cases "decode 1x4x64x64" --dtypes bfloat16     # one case

Time: both models in this process, runs interleaved (order alternating), median of --reps, after one warm-up
each. bfloat16 means weights and inputs in bfloat16 for both models (`.to(torch.bfloat16)`, no autocast).

Peak memory: one fresh subprocess per (model, case, dtype), so no run inherits another's allocator state. Each
child imports the same modules, loads the same weights, runs the case once (warm-up), then returns freed heap
memory to the OS (malloc_trim), resets the kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs`), reads
VmRSS, runs the case again and reads VmHWM. Reported: VmHWM - VmRSS, the extra memory the run needs on top of the
loaded model and inputs (no tracemalloc, which does not see tensor memory).
"""
import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm_lite.models.vae_loading import load_vae  # noqa: E402

SD_CONFIG = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
FULL_CASES = ["encode 4x3x256x256", "decode 4x4x32x32", "encode 1x3x512x512", "decode 1x4x64x64"]
QUICK_CASES = ["encode 2x3x128x128", "decode 2x4x16x16"]
TILED_CASES = ["decode 1x4x128x128 tile640", "decode 1x4x128x128"]


def diffusers_model(folder: Path, dtype: torch.dtype):
    from diffusers import AutoencoderKL
    from diffusers.utils import logging
    logging.set_verbosity_error()  # its notes on `.to(dtype)` and on accelerate are not about this benchmark
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoencoderKL.from_pretrained(folder, low_cpu_mem_usage=False).eval().to(dtype)


def make_weights(folder: Path) -> None:
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    AutoencoderKL(**SD_CONFIG).save_pretrained(folder)


def models(folder: Path, dtype: torch.dtype) -> dict:
    return {"ours": load_vae(folder, dtype=dtype).eval(), "diffusers": diffusers_model(folder, dtype)}


def runner(name: str, model, case: str, dtype: torch.dtype):
    """A no-argument function running `case` ("encode BxCxHxW" or "decode ..." [+ " tileN"]) on `model`."""
    op, shape, *tile = case.split()
    x = torch.randn(*map(int, shape.split("x")), generator=torch.Generator().manual_seed(0)).to(dtype)
    tile_size = int(tile[0][4:]) if tile else None
    if name == "ours":
        return (lambda: model.encode(x, tile_size).mean) if op == "encode" else (lambda: model.decode(x, tile_size))
    if tile:
        raise ValueError("tiled cases run on ours only")
    return (lambda: model.encode(x).latent_dist.mean) if op == "encode" else (lambda: model.decode(x).sample)


def time_case(pair: dict, case: str, dtype: torch.dtype, reps: int) -> dict:
    """Median seconds per model, runs interleaved with the order alternating."""
    fns = {name: runner(name, model, case, dtype) for name, model in pair.items()}
    times = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        for rep in range(reps):
            for name in (list(fns) if rep % 2 == 0 else list(fns)[::-1]):
                start = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _status_kib(field: str) -> int:
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1])


def memory_child(name: str, case: str, dtype_name: str, folder: str) -> None:
    """Print {"extra_mib": peak RSS of one run above the RSS before it} (runs in its own process)."""
    dtype = getattr(torch, dtype_name)
    import diffusers  # noqa: F401  (both children import the same modules)
    model = load_vae(folder, dtype=dtype).eval() if name == "ours" else diffusers_model(Path(folder), dtype)
    fn = runner(name, model, case, dtype)
    with torch.inference_mode():
        fn()
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib("VmRSS")
        fn()
        peak = _status_kib("VmHWM")
    print(json.dumps({"extra_mib": (peak - before) / 1024, "rss_before_mib": before / 1024}))


def measure_memory(name: str, case: str, dtype_name: str, folder: Path) -> float:
    out = subprocess.run([sys.executable, __file__, "--memory-child", name, case, dtype_name, str(folder)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, 2 repeats")
    parser.add_argument("--reps", type=int, default=None, help="timed repeats per model (default 5, quick 2)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--cases", default=None, help="comma-separated cases like 'encode 4x3x256x256', "
                        "'decode 1x4x64x64' (default: the full or quick set)")
    parser.add_argument("--tiled", action="store_true", help="add ours-only 1024x1024 decode, tiled vs whole")
    parser.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(*args.memory_child)
    if args.cases is not None:   # --cases "" with --tiled runs the tiled cases only
        cases = [case for case in args.cases.split(",") if case]
    else:
        cases = QUICK_CASES if args.quick else FULL_CASES
    reps = args.reps or (2 if args.quick else 5)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, reps {reps}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "vae"
        make_weights(folder)
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            pair = models(folder, dtype)
            print(f"\n{dtype_name}: {'case':<28} {'ours s':>8} {'diffusers s':>12} {'ratio':>6}"
                  + ("" if args.no_memory else f" {'ours MiB':>9} {'diff. MiB':>9} {'ratio':>6}"))
            for case in cases:
                t = time_case(pair, case, dtype, reps)
                line = f"{'':{len(dtype_name) + 1}} {case:<28} {t['ours']:8.3f} {t['diffusers']:12.3f} " \
                       f"{t['ours'] / t['diffusers']:6.2f}"
                if not args.no_memory:
                    m = {name: measure_memory(name, case, dtype_name, folder) for name in pair}
                    line += f" {m['ours']:9.0f} {m['diffusers']:9.0f} {m['ours'] / m['diffusers']:6.2f}"
                print(line, flush=True)
            if args.tiled:
                for case in TILED_CASES:
                    t = time_case({"ours": pair["ours"]}, case, dtype, 1)["ours"]
                    memory = "" if args.no_memory else f" {measure_memory('ours', case, dtype_name, folder):9.0f} MiB"
                    print(f"{'':{len(dtype_name) + 1}} {'ours ' + case:<40} {t:8.3f} s{memory}", flush=True)
            del pair
            gc.collect()


if __name__ == "__main__":
    main()
