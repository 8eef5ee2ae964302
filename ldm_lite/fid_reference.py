"""The FID / KID reference of a dataset: Inception features of an evenly spread subset of its images, computed once
and cached on disk, for every tool that scores samples against the data (the study, evaluation while training,
bench/convergence.py).

The cache file is named by the images' content (so by the data, resolution and count), the FID protocol version
and the network's weights, so a changed dataset or protocol never reads stale features.
"""
import os
from pathlib import Path

import torch

from ldm_lite.models.inception import WEIGHTS_SHA1
from ldm_lite.quality import PROTOCOL_VERSION, FidStatistics
from ldm_lite.runs import tensor_digest, written_then_renamed

CACHE_ENV = "LDM_LITE_CACHE"
DEFAULT_CACHE = "runs/cache"


def reference_images(images: torch.Tensor, count: int) -> torch.Tensor:
    """Up to `count` of `images` (uint8 (N, C, H, W)) spread evenly over them: (min(count, N), C, H, W)."""
    return images[spread(len(images), count)]


def spread(total: int, count: int) -> torch.Tensor:
    """Indices of min(count, total) of `total` items spread evenly over them (all of them when count >= total)."""
    if count >= total:
        return torch.arange(total)
    return torch.linspace(0, total - 1, count).round().long()


def held_out_images(images: torch.Tensor, reference_count: int, n: int, test_images: torch.Tensor | None = None):
    """n images (uint8 (n', C, H, W), n' <= n) the reference does not hold, to score against it (the real-data
    floor of FID / KID at n): spread evenly over `test_images` (a test split) when given, else over the training
    `images` outside `reference_images(images, reference_count)`. n' < n when fewer are available."""
    if test_images is not None:
        return test_images[spread(len(test_images), n)]
    outside = torch.ones(len(images), dtype=torch.bool)
    outside[spread(len(images), reference_count)] = False
    rest = images[outside]
    return rest[spread(len(rest), n)]


def cache_folder(cache: str = "") -> Path:
    """The feature cache: `cache`, else $LDM_LITE_CACHE, else runs/cache (relative to the working folder)."""
    return Path(cache or os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def reference_path(images: torch.Tensor, cache: str = "") -> Path:
    """The cache file of the reference features of `images` (uint8 (N, C, H, W))."""
    digest = tensor_digest(images, digits=20)
    name = f"fid_reference_{digest}_{len(images)}_protocol{PROTOCOL_VERSION}_{WEIGHTS_SHA1[:12]}.safetensors"
    return cache_folder(cache) / name


def reference_statistics(path: Path, images: torch.Tensor, features, source: str) -> FidStatistics:
    """FidStatistics (features kept, for KID) of the reference `images`: read from `path`, or computed with
    `features(images) -> (N, 2048)` and saved there (atomically: a killed run leaves no half file)."""
    if path.is_file():
        return FidStatistics.load(path)
    stats = FidStatistics.from_features(features(images), source=source)
    path.parent.mkdir(parents=True, exist_ok=True)
    with written_then_renamed(path) as partial:
        stats.save(partial)
    return stats
