"""Signal-leak statistics: model what the noised training data still holds at the first timestep.

Everaert et al., "Exploiting the Signal-Leak Bias in Diffusion Models", WACV 2024 (arXiv:2309.15842).
Training never reaches pure noise: x_T = sqrt(ab_T) x0 + sqrt(1 - ab_T) eps keeps a little of the image
(sqrt(ab_999) = 0.068 for Stable Diffusion), and models learn to rely on it. Sampling from plain randn
lacks that leak; starting from x_T = sqrt(ab_T) leak + sqrt(1 - ab_T) randn with a leak drawn from the data's
statistics restores it, and fixing the leak's low frequencies by hand steers the mean colour.

Models of the leak, fitted on clean images (N, C, H, W) in [-1, 1] or on VAE latents:
  "pixel":     every element an independent Gaussian (mean, unbiased variance over the N images).
  "dct":       the n lowest frequencies of each channel's orthonormal 2D DCT-II (order of
               spectral.lowest_frequencies) form one vector of length n * C with one full-covariance
               Gaussian; the rest of the leak is zero.
  "dct+pixel": the "dct" Gaussian plus the remainder x - idct(those coefficients), modelled per element
               like "pixel"; a sample is the sum of both draws (the paper's model).
The per-element model cannot carry a brightness that varies from image to image (its DC variance is only
the mean element variance); brightness diversity needs the DCT part.

Layout of the low-frequency vector: component-major, index k * C + c for frequency k and channel c
(as in the paper's code). Fitting runs in float64 and streams (Chan et al.'s pairwise update), so memory
does not grow with N.
"""
import json
import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Iterable

from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from ldm_lite.data import iter_image_folder, list_images, to_float
from ldm_lite.latents import encode_latents
from ldm_lite.models.weights_io import save_safetensors
from ldm_lite.spectral import dct2, dct_basis, idct2, lowest_frequencies

KINDS = ("pixel", "dct", "dct+pixel")
SPACES = ("pixel", "latent")
FORMAT = "ldm_lite.leak/1"


# ----------------------------------------------------------------------------- low frequencies <-> images


def split_low_frequencies(x: torch.Tensor, frequencies: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, C, H, W) -> (low (N, n * C) component-major, remainder (N, C, H, W) = x - idct of `low`)."""
    coeffs = dct2(x)
    u, v = torch.tensor(frequencies).T
    low = coeffs[:, :, u, v]  # (N, C, n)
    kept = torch.zeros_like(coeffs)
    kept[:, :, u, v] = low
    return low.transpose(1, 2).flatten(1), x - idct2(kept)


def compose_low_frequencies(low: torch.Tensor, frequencies: list[tuple[int, int]], shape) -> torch.Tensor:
    """Inverse of the split's first half: low (N, n * C) -> images (N, C, H, W) holding only those frequencies."""
    channels, height, width = shape
    u, v = torch.tensor(frequencies).T
    coeffs = torch.zeros(low.shape[0], channels, height, width, dtype=low.dtype)
    coeffs[:, :, u, v] = low.reshape(low.shape[0], len(frequencies), channels).transpose(1, 2)
    return idct2(coeffs)


# ----------------------------------------------------------------------------- streaming moments


class _RunningMoments:
    """Mean and unbiased (co)variance of rows (B, D) fed in batches (Chan, Golub & LeVeque 1979), float64."""

    def __init__(self, full_covariance: bool):
        self.full_covariance = full_covariance
        self.count, self.mean, self.m2 = 0, None, None

    def _second_moment(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a.T @ b if self.full_covariance else (a * b).sum(dim=0)

    def update(self, rows: torch.Tensor) -> None:
        n, mean = rows.shape[0], rows.mean(dim=0)
        centred = rows - mean
        m2 = self._second_moment(centred, centred)
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        delta = (mean - self.mean)[None]  # (1, D): merge two groups' moments exactly
        total = self.count + n
        self.m2 = self.m2 + m2 + self._second_moment(delta, delta) * (self.count * n / total)
        self.mean = self.mean + delta[0] * (n / total)
        self.count = total

    def covariance(self) -> torch.Tensor:
        return self.m2 / (self.count - 1)


def shrink_to_diagonal(covariance: torch.Tensor, num_samples: int) -> tuple[torch.Tensor, float]:
    """Shrink a covariance (D, D) toward its diagonal: off-diagonals scaled by (1 - rho).

    rho is the oracle-approximating shrinkage (OAS) intensity of Chen, Wiesel, Eldar & Hero 2010
    (arXiv:0907.4698, eq. 23) applied to the correlation matrix R, which is valid for Gaussian data:
    rho = min(1, ((1 - 2/D) tr(R^2) + tr(R)^2) / ((n + 1 - 2/D) (tr(R^2) - tr(R)^2 / D))).
    Keeps every variance, and is full rank whenever the variances are positive.
    """
    dim = covariance.shape[0]
    std = covariance.diagonal().sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    correlation = covariance / torch.outer(std, std)
    trace, trace_sq = correlation.trace(), (correlation ** 2).sum()
    denominator = (num_samples + 1 - 2 / dim) * (trace_sq - trace ** 2 / dim)
    rho = 1.0 if denominator <= 0 else min(1.0, float(((1 - 2 / dim) * trace_sq + trace ** 2) / denominator))
    shrunk = covariance * (1 - rho)
    shrunk.diagonal().copy_(covariance.diagonal())
    return shrunk, rho


def _matrix_sqrt(covariance: torch.Tensor) -> torch.Tensor:
    """L with L @ L.T = covariance (D, D): Cholesky, or the symmetric eigen-root if only semi-definite."""
    factor, info = torch.linalg.cholesky_ex(covariance)
    if info == 0:
        return factor
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    return eigenvectors * eigenvalues.clamp_min(0).sqrt()


# ----------------------------------------------------------------------------- the statistics


@dataclass(frozen=True, eq=False, repr=False)
class LeakStats:
    """Fitted signal-leak statistics for leaks of shape (C, H, W) (tensors float64, on the CPU).

    element_mean, element_var: (C, H, W) per-element Gaussian ("pixel": of x; "dct+pixel": of the remainder).
    low_mean (n * C,), low_cov (n * C, n * C): Gaussian of the n lowest DCT frequencies ("dct", "dct+pixel").
    fixed: {(channel, (u, v)): value} DCT coefficients set by hand (see `with_components`).
    space: "pixel" or "latent"; resolution: image side the data was loaded at; scaling_factor: the VAE's.
    shrinkage: diagonal-shrinkage intensity used on low_cov (0 when N > n * C, no shrinkage).
    """
    kind: str
    shape: tuple[int, int, int]
    n_components: int
    num_images: int
    element_mean: torch.Tensor | None = None
    element_var: torch.Tensor | None = None
    low_mean: torch.Tensor | None = None
    low_cov: torch.Tensor | None = None
    space: str = "pixel"
    resolution: int | None = None
    scaling_factor: float | None = None
    shrinkage: float = 0.0
    fixed: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {self.space!r}")
        if self.kind != "dct" and (self.element_mean is None or self.element_var is None
                                   or self.element_mean.shape != self.shape or self.element_var.shape != self.shape):
            raise ValueError(f"kind {self.kind!r} needs element_mean and element_var of shape {self.shape}")
        dim = self.n_components * self.shape[0]
        if self.kind != "pixel" and (self.low_mean is None or self.low_cov is None
                                     or self.low_mean.shape != (dim,) or self.low_cov.shape != (dim, dim)):
            raise ValueError(f"kind {self.kind!r} needs low_mean ({dim},) and low_cov ({dim}, {dim})")

    def __repr__(self) -> str:
        return (f"LeakStats(kind={self.kind!r}, shape={self.shape}, n_components={self.n_components}, "
                f"num_images={self.num_images}, space={self.space!r}, resolution={self.resolution}, "
                f"scaling_factor={self.scaling_factor}, shrinkage={self.shrinkage:.3g}, fixed={self.fixed})")

    @property
    def frequencies(self) -> list[tuple[int, int]]:
        """The modelled low frequencies (u, v), lowest first; empty for "pixel"."""
        if self.kind == "pixel":
            return []
        return lowest_frequencies(self.n_components, *self.shape[1:])

    # ------------------------------------------------------------------------- fitting

    @classmethod
    def fit(cls, x: torch.Tensor, kind: str = "dct+pixel", n_components: int = 3, **metadata) -> "LeakStats":
        """Statistics of data x (N, C, H, W) (images in [-1, 1] or latents), N >= 2.

        metadata: space, resolution, scaling_factor (recorded, see the class docstring).
        """
        return cls.fit_batches([x], kind, n_components, **metadata)

    @classmethod
    def fit_batches(cls, batches: Iterable[torch.Tensor], kind: str = "dct+pixel", n_components: int = 3,
                    **metadata) -> "LeakStats":
        """Same as `fit`, over an iterable of batches (B, C, H, W) of one shape; memory independent of N."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        elements, low, shape, frequencies = _RunningMoments(False), _RunningMoments(True), None, []
        for batch in batches:
            if batch.ndim != 4 or not batch.is_floating_point():
                raise ValueError(f"data must be float (N, C, H, W), got {batch.dtype} {tuple(batch.shape)}")
            if shape is None:
                shape = tuple(batch.shape[1:])
                frequencies = _check_components(kind, n_components, shape)
            elif tuple(batch.shape[1:]) != shape:
                raise ValueError(f"all batches must share (C, H, W) = {shape}, got {tuple(batch.shape[1:])}")
            batch = batch.detach().to("cpu", torch.float64)
            if kind != "pixel":
                low_rows, batch = split_low_frequencies(batch, frequencies)
                low.update(low_rows)
            if kind != "dct":
                elements.update(batch.flatten(1))
        if shape is None or max(elements.count, low.count) < 2:
            raise ValueError("need at least 2 images to fit signal-leak statistics")
        return cls._from_moments(kind, shape, len(frequencies), elements, low, **metadata)

    @classmethod
    def _from_moments(cls, kind, shape, n_components, elements, low, **metadata) -> "LeakStats":
        tensors, num_images, shrinkage = {}, max(elements.count, low.count), 0.0
        if kind != "dct":
            tensors = {"element_mean": elements.mean.view(shape), "element_var": elements.covariance().view(shape)}
        if kind != "pixel":
            covariance, dim = low.covariance(), low.mean.shape[0]
            if num_images <= dim:
                covariance, shrinkage = shrink_to_diagonal(covariance, num_images)
                warnings.warn(f"only {num_images} images for a {dim}-dimensional low-frequency covariance "
                              f"(full rank needs more than {dim}): it is rank-deficient, so it was shrunk toward "
                              f"its diagonal (intensity {shrinkage:.3f}); fit on more images or use fewer "
                              f"n_components", stacklevel=3)
            tensors.update(low_mean=low.mean, low_cov=covariance)
        return cls(kind, shape, n_components, num_images, shrinkage=shrinkage, **tensors, **metadata)

    @classmethod
    def fit_folder(cls, path, resolution: int, vae=None, center_crop: bool = True, batch_size: int = 32,
                   kind: str = "dct+pixel", n_components: int = 3, progress: bool = True) -> "LeakStats":
        """Statistics of every image under `path`, loaded at `resolution` (shorter side resized, square crop).

        Without a VAE the data are images in [-1, 1] (space "pixel"); with one, the latents
        vae.to_latents(images) (posterior mode times scaling, space "latent"), and vae.scaling_factor is recorded.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        num_batches = math.ceil(len(list_images(path)) / batch_size)

        def batches():
            folder = iter_image_folder(path, resolution, batch_size, center_crop=center_crop)
            for images, _ in tqdm(folder, total=num_batches, desc="signal-leak statistics", disable=not progress):
                yield to_float(images) if vae is None else encode_latents(vae, images, len(images))

        metadata = dict(space="pixel", resolution=resolution)
        if vae is not None:
            metadata.update(space="latent", scaling_factor=float(vae.scaling_factor))
        return cls.fit_batches(batches(), kind, n_components, **metadata)

    # ------------------------------------------------------------------------- manual control

    def with_components(self, components: dict) -> "LeakStats":
        """A copy whose leaks have the given DCT coefficients: {(channel, (u, v)): value, ...}.

        Values are in ortho-DCT units of the leak (DC = sqrt(H * W) times the channel mean). Modelled
        components (among `frequencies`) condition the low-frequency Gaussian, so correlated components
        (other channels' DC, neighbouring frequencies) move with them; any other coefficient is simply set.
        In every sample the coefficient then equals the value (the remainder's share of it is replaced).
        Later calls add to (and override) earlier ones.
        """
        channels, height, width = self.shape
        fixed = dict(self.fixed)
        for key, value in components.items():
            try:
                channel, (u, v) = key
            except (TypeError, ValueError):
                raise ValueError(f"component keys must be (channel, (u, v)), got {key!r}") from None
            if not (0 <= channel < channels and 0 <= u < height and 0 <= v < width):
                raise ValueError(f"component {key!r} is outside channels [0, {channels}) and frequencies "
                                 f"[0, {height}) x [0, {width})")
            fixed[(int(channel), (int(u), int(v)))] = float(value)
        return replace(self, fixed=fixed)

    def with_channel_mean(self, channel: int, value: float) -> "LeakStats":
        """A copy whose leaks have spatial mean `value` in `channel` (a DC of value * sqrt(H * W))."""
        return self.with_components({(channel, (0, 0)): value * math.sqrt(self.shape[1] * self.shape[2])})

    def low_frequency_gaussian(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (n * C,) and covariance (n * C, n * C) of the low frequencies given the fixed components.

        Gaussian conditioning: mean_r + S_rf S_ff^+ (a - mean_f) and S_rr - S_rf S_ff^+ S_fr for the free
        components r; fixed ones get their value and zero (co)variance.
        """
        if self.kind == "pixel":
            raise ValueError("kind 'pixel' has no low-frequency Gaussian")
        fixed_index, values = self._fixed_low_components()
        if not fixed_index:
            return self.low_mean, self.low_cov
        fixed = torch.zeros(len(self.low_mean), dtype=torch.bool)
        fixed[fixed_index] = True
        free_cov = self.low_cov[~fixed]
        gain = free_cov[:, fixed] @ torch.linalg.pinv(self.low_cov[fixed][:, fixed], hermitian=True)
        mean = self.low_mean.clone()
        mean[~fixed] += gain @ (values - self.low_mean[fixed])
        mean[fixed] = values
        covariance = torch.zeros_like(self.low_cov)
        covariance[torch.outer(~fixed, ~fixed)] = (free_cov[:, ~fixed] - gain @ free_cov[:, fixed].T).flatten()
        return mean, covariance

    def _fixed_low_components(self) -> tuple[list[int], torch.Tensor]:
        """Indices into the low-frequency vector of the fixed components it models, and their values."""
        position = {frequency: k for k, frequency in enumerate(self.frequencies)}
        pairs = sorted((position[f] * self.shape[0] + c, value)
                       for (c, f), value in self.fixed.items() if f in position)
        return [i for i, _ in pairs], torch.tensor([value for _, value in pairs], dtype=torch.float64)

    # ------------------------------------------------------------------------- sampling

    def sample(self, n: int, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """n leaks (n, C, H, W) in the data's units, drawn with `generator` (a CPU torch.Generator).

        Draws, in order: the free low-frequency components (n, n_free) then the per-element part (n, C, H, W);
        computed in float64, returned as `dtype`.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        leak = torch.zeros(n, *self.shape, dtype=torch.float64)
        if self.kind != "pixel":
            mean, covariance = self.low_frequency_gaussian()
            free = torch.ones(len(mean), dtype=torch.bool)
            free[self._fixed_low_components()[0]] = False
            low = mean.expand(n, -1).clone()
            draws = torch.randn(n, int(free.sum()), generator=generator, dtype=torch.float64)
            low[:, free] += draws @ _matrix_sqrt(covariance[free][:, free]).T
            leak += compose_low_frequencies(low, self.frequencies, self.shape)
        if self.kind != "dct":
            noise = torch.randn(n, *self.shape, generator=generator, dtype=torch.float64)
            leak += self.element_mean + self.element_var.sqrt() * noise
        for (channel, (u, v)), value in self.fixed.items():
            basis = dct_basis(u, v, *self.shape[1:])  # unit-norm: moving along it changes only this coefficient
            current = (leak[:, channel] * basis).sum(dim=(-2, -1))
            leak[:, channel] += (value - current)[:, None, None] * basis
        return leak.to(dtype)

    def check_shape(self, shape) -> None:
        """Raise ValueError unless `shape` ((C, H, W) or (B, C, H, W)) matches the statistics' (C, H, W)."""
        shape = tuple(shape)
        if len(shape) not in (3, 4) or shape[-3:] != self.shape:
            raise ValueError(f"signal-leak statistics are for (C, H, W) = {self.shape} ({self.space} space, "
                             f"resolution {self.resolution}), but the requested shape is {shape}")

    # ------------------------------------------------------------------------- files

    def save(self, path) -> None:
        """Write a safetensors file: the float64 tensors, and everything else in its metadata."""
        names = ("element_mean", "element_var", "low_mean", "low_cov")
        tensors = {name: getattr(self, name).contiguous() for name in names if getattr(self, name) is not None}
        metadata = {"format": FORMAT, "kind": self.kind, "shape": json.dumps(list(self.shape)),
                    "n_components": str(self.n_components), "num_images": str(self.num_images),
                    "space": self.space, "resolution": json.dumps(self.resolution),
                    "scaling_factor": json.dumps(self.scaling_factor), "shrinkage": json.dumps(self.shrinkage),
                    "fixed": json.dumps([[c, u, v, value] for (c, (u, v)), value in self.fixed.items()])}
        save_safetensors(tensors, path, metadata=metadata)

    @classmethod
    def load(cls, path) -> "LeakStats":
        """Read a file written by `save`; ValueError for anything else."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"signal-leak statistics file {str(path)!r} not found")
        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = file.metadata() or {}
                tensors = {name: file.get_tensor(name) for name in file.keys()}
        except Exception as error:  # safetensors raises its own error types for a foreign or damaged file
            raise ValueError(f"{str(path)!r} is not a readable signal-leak statistics file ({error})") from None
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{str(path)!r} is not a signal-leak statistics file (format {FORMAT!r})")
        try:
            return cls._from_file(metadata, tensors)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{str(path)!r} is not a readable signal-leak statistics file ({error})") from None

    @classmethod
    def _from_file(cls, metadata: dict, tensors: dict) -> "LeakStats":
        fixed = {(c, (u, v)): value for c, u, v, value in json.loads(metadata["fixed"])}
        return cls(metadata["kind"], tuple(json.loads(metadata["shape"])), int(metadata["n_components"]),
                   int(metadata["num_images"]), space=metadata["space"], resolution=json.loads(metadata["resolution"]),
                   scaling_factor=json.loads(metadata["scaling_factor"]), shrinkage=json.loads(metadata["shrinkage"]),
                   fixed=fixed, **tensors)


def _check_components(kind: str, n_components: int, shape) -> list[tuple[int, int]]:
    """The modelled frequencies for `kind` on a (C, H, W) leak; ValueError for a bad n_components."""
    if kind == "pixel":
        return []
    height, width = shape[1:]
    if not isinstance(n_components, int) or not 1 <= n_components <= height * width:
        raise ValueError(f"n_components must be an int in [1, {height * width}] for kind {kind!r} on "
                         f"{height}x{width} data, got {n_components!r}")
    return lowest_frequencies(n_components, height, width)
