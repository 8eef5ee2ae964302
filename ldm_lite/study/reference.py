"""The FID / KID reference of the study: training images spread over the dataset, and their Inception features
cached under a name made of the images' content and the FID protocol."""
import hashlib
import os
from pathlib import Path

import torch

from ldm_lite.quality import PROTOCOL_VERSION, WEIGHTS_SHA1, FidStatistics
from ldm_lite.study.config import QualityStudyConfig


def reference_images(dataset, count: int) -> torch.Tensor:
    """Up to `count` training images (uint8 (N, C, H, W)) spread evenly over the dataset."""
    if count >= len(dataset):
        return dataset.images
    return dataset.images[torch.linspace(0, len(dataset) - 1, count).round().long()]


def reference_path(config: QualityStudyConfig, images: torch.Tensor) -> Path:
    """The reference features' cache file, named by the images' content (so by the data, resolution and count)
    and by the FID protocol version and network."""
    digest = hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()[:20]
    folder = Path(config.cache or os.environ.get("LDM_LITE_CACHE") or "runs/cache")
    return folder / f"fid_reference_{digest}_{len(images)}_protocol{PROTOCOL_VERSION}_{WEIGHTS_SHA1[:12]}.safetensors"


def reference_statistics(path: Path, images: torch.Tensor, config: QualityStudyConfig, shards: "Shards"):
    """FidStatistics (features kept, for KID) of the reference images, read from the cache or computed once."""
    if path.is_file():
        return FidStatistics.load(path)
    features = shards.features(images)
    stats = FidStatistics.from_features(features, source=f"{config.data}: {len(images)} training images at "
                                        f"{config.resolution} px")
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # renamed: a killed run leaves no half file
    stats.save(partial)
    partial.replace(path)
    return stats
