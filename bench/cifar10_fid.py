"""CIFAR-10 FID figures (issue 14): the test set against the training set, the training set against itself in
halves, and the feature throughput of the whole pipeline (uint8 32x32 -> resize -> Inception -> 2048 features).

    .venv/bin/python bench/cifar10_fid.py [--data ../shared/data/cifar10-jpeg] [--threads 2]

The training set is split into two interleaved halves: half A is the images `ldm_lite.fid_reference.reference_images`
picks (evenly spread), half B the rest. Features are cached in `--cache` under the study's reference naming
(content digest, protocol, network), so a study on the same images (`python -m analysis study --data .../train`)
has already computed half A, and this script reuses it; only uncached images are timed for the throughput.

The shared copies are JPEG (quality 75): these FIDs are not comparable with papers' numbers on the PNG dataset.
"""
import argparse
import time
from pathlib import Path

import torch

from ldm_lite.feature_set_metrics import kernel_inception_distance
from ldm_lite.fid_reference import reference_path
from ldm_lite.quality import FidStatistics, inception_features, load_fid_inception, load_images, quality_report
from ldm_lite.runs import written_then_renamed

ROOT = Path(__file__).resolve().parents[1]


def cached_features(images: torch.Tensor, name: str, cache: Path, network, batch_size: int) -> tuple:
    """(FidStatistics of `images` (uint8 (N, 3, 32, 32)), seconds spent computing, 0 when read from the cache)."""
    path = reference_path(images, str(cache))
    if path.is_file():
        print(f"{name}: {len(images)} images, features from {path}")
        return FidStatistics.load(path), 0.0
    started = time.perf_counter()
    features = inception_features(images, batch_size=batch_size, device="cpu", network=network)
    seconds = time.perf_counter() - started
    stats = FidStatistics.from_features(features, source=f"{name}: {len(images)} images")
    path.parent.mkdir(parents=True, exist_ok=True)
    with written_then_renamed(path) as partial:
        stats.save(partial)
    print(f"{name}: {len(images)} images in {seconds:.0f} s ({len(images) / seconds:.2f} img/s), cached in {path}")
    return stats, seconds


def joined(a: FidStatistics, b: FidStatistics, source: str) -> FidStatistics:
    return FidStatistics.from_features(torch.cat([a.features, b.features]), source=source)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg"),
                        help="folder holding train/ and test/ image folders")
    parser.add_argument("--cache", default=str(ROOT / "runs" / "cache"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=50)
    args = parser.parse_args()
    data = Path(args.data)
    if not (data / "train").is_dir() or not (data / "test").is_dir():
        raise SystemExit(f"error: {data} has no train/ and test/ image folders")
    torch.set_num_threads(args.threads)
    network = load_fid_inception("cpu")
    cache = Path(args.cache)

    train, _ = load_images(str(data / "train"), resolution=32)
    test, _ = load_images(str(data / "test"), resolution=32)
    # half A: the images fid_reference.reference_images picks for a 10,000-image reference out of 20,000 (same rule)
    in_a = torch.zeros(len(train), dtype=torch.bool)
    in_a[torch.linspace(0, len(train) - 1, len(train) // 2).round().long()] = True
    half_a, half_b = train[in_a], train[~in_a]

    timings = []
    stats_a, seconds = cached_features(half_a, "train half A", cache, network, args.batch_size)
    timings.append((len(half_a), seconds))
    stats_b, seconds = cached_features(half_b, "train half B", cache, network, args.batch_size)
    timings.append((len(half_b), seconds))
    stats_test, seconds = cached_features(test, "test", cache, network, args.batch_size)
    timings.append((len(test), seconds))
    stats_train = joined(stats_a, stats_b, f"train: {len(train)} images")

    rows = [("test vs train", stats_test, stats_train), ("train half A vs half B", stats_a, stats_b)]
    print(f"\n| pair | n | n_ref | FID | KID x 1e3 (mean ± std, 100 subsets of min(1000, n // 2)) |\n|---|---|---|---|---|")
    for name, samples, reference in rows:
        row = quality_report(samples, reference)
        kid_mean, kid_std = kernel_inception_distance(samples.features, reference.features)
        print(f"| {name} | {samples.count} | {reference.count} | {row['fid']:.3f} | "
              f"{kid_mean * 1e3:.3f} ± {kid_std * 1e3:.3f} |")
    computed = [(n, s) for n, s in timings if s > 0]
    if computed:
        images = sum(n for n, _ in computed)
        seconds = sum(s for _, s in computed)
        print(f"\nfeature throughput: {images} images in {seconds:.0f} s = {images / seconds:.2f} img/s "
              f"({args.threads} threads, batch {args.batch_size}, whole pipeline from uint8 32x32)")


if __name__ == "__main__":
    main()
