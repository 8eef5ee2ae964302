"""Frequency view of diffusion: orthonormal 2D DCT, radial bands, per-band SNR and its destruction.

Why a frequency view: with white unit noise every coefficient of an orthonormal transform gets noise
of power 1, while natural images put most of their power in the low frequencies (roughly 1/f^2).
So with x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps (Ho et al. 2020, eq. 4), band b of power P_b has

    SNR_b(t) = ab_t * P_b / ((1 - ab_t) * N_b)                           (N_b = noise power, 1 for white noise)

and is "destroyed" (SNR_b < 1) once ab_t < N_b / (N_b + P_b): high frequencies go first, the DC band
last (Rissanen et al. 2023, arXiv:2206.13397; Dieleman 2024, "Diffusion is spectral autoregression").
Offset noise, eps = randn + s * randn(B, C, 1, 1), is a constant field per channel: it lands only in the
DC coefficient and adds s^2 * H * W to its noise power.

Conventions. Coefficients of an image (..., H, W) are indexed (u, v): u the vertical frequency (rows),
v the horizontal one (columns); (0, 0) is DC and equals sqrt(H * W) times the spatial mean.
A band set is a label map `bands` (H, W) of int64 band ids 0..B-1, every band non-empty.
Nothing here plots; results are tensors and dicts (analysis/ draws them).
"""
import functools
import math

import torch

# ----------------------------------------------------------------------------- orthonormal 2D DCT-II


@functools.lru_cache(maxsize=None)
def _cached_dct_matrix(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    matrix = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    matrix[0] /= math.sqrt(2.0)  # DC row: 1/sqrt(n) makes the rows orthonormal
    return matrix.to(dtype=dtype, device=device)


def dct_matrix(n: int, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
    """Orthonormal DCT-II matrix (n, n): row k is the k-th cosine basis vector, so coeffs = M @ signal.

    M[k, i] = c_k * sqrt(2/n) * cos(pi * (2i + 1) * k / (2n)), c_0 = 1/sqrt(2), else 1 (scipy's norm="ortho").
    Built in float64 and cast once; cached per (n, dtype, device). Do not modify the returned tensor.
    """
    if n < 1:
        raise ValueError(f"DCT size must be >= 1, got {n}")
    return _cached_dct_matrix(int(n), dtype, torch.device(device))


def _check_float(x: torch.Tensor, name: str) -> None:
    if x.ndim < 2 or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor (..., H, W), got dtype {x.dtype} "
                         f"and shape {tuple(x.shape)}")


def dct2(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2D DCT-II over the last two dims: (..., H, W) -> (..., H, W), same dtype.

    Equal to scipy.fft.dctn(x, norm="ortho", axes=(-2, -1)). Pass float64 for ~1e-15 accuracy.
    """
    _check_float(x, "x")
    rows = dct_matrix(x.shape[-2], x.dtype, x.device)
    cols = dct_matrix(x.shape[-1], x.dtype, x.device)
    return rows @ x @ cols.T


def idct2(coeffs: torch.Tensor) -> torch.Tensor:
    """Inverse of `dct2` (the matrices are orthogonal, so it is the transposed product): (..., H, W)."""
    _check_float(coeffs, "coeffs")
    rows = dct_matrix(coeffs.shape[-2], coeffs.dtype, coeffs.device)
    cols = dct_matrix(coeffs.shape[-1], coeffs.dtype, coeffs.device)
    return rows.T @ coeffs @ cols


def dct_basis(u: int, v: int, height: int, width: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The (u, v) basis image (H, W) of unit norm: idct2 of a one-hot coefficient map."""
    return torch.outer(dct_matrix(height, dtype)[u], dct_matrix(width, dtype)[v])


# ----------------------------------------------------------------------------- bands


def _squared_radius(height: int, width: int) -> torch.Tensor:
    """u^2 + v^2 as int64 (H, W)."""
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got {height} and {width}")
    u = torch.arange(height)[:, None]
    v = torch.arange(width)[None, :]
    return u * u + v * v


def radial_index(height: int, width: int) -> torch.Tensor:
    """floor(sqrt(u^2 + v^2)) as int64 (H, W). Every integer 0..max occurs (steps along an axis change
    the radius by at most 1), so it is directly a band label map: one band per integer radius."""
    return _squared_radius(height, width).double().sqrt().floor().long()


def radial_bands(height: int, width: int) -> torch.Tensor:
    """One band per radial index k = floor(sqrt(u^2 + v^2)): labels (H, W), band k holds k <= r < k + 1."""
    return radial_index(height, width)


def octave_bands(height: int, width: int) -> torch.Tensor:
    """Octave bands (H, W): band 0 is DC, band j >= 1 holds radial indices 2^(j-1) <= k < 2^j."""
    index = radial_index(height, width)
    labels = torch.zeros_like(index)
    threshold = 1
    while threshold <= index.max():
        labels += (index >= threshold).long()  # one more band per power of two passed
        threshold *= 2
    return labels


def equal_width_bands(height: int, width: int, num_bands: int) -> torch.Tensor:
    """`num_bands` radial bands of equal width in radial index: labels (H, W).

    The K = max_index + 1 radial indices are split evenly: band = floor(k * num_bands / K).
    Needs 1 <= num_bands <= K so that no band is empty.
    """
    index = radial_index(height, width)
    num_indices = int(index.max()) + 1
    if not 1 <= num_bands <= num_indices:
        raise ValueError(f"num_bands must be in [1, {num_indices}] for a {height}x{width} grid "
                         f"(its number of radial indices), got {num_bands}")
    return index * num_bands // num_indices


def band_counts(bands: torch.Tensor) -> torch.Tensor:
    """Number of coefficients per band (B,) int64 for a label map (H, W)."""
    return torch.bincount(bands.flatten())


def band_mean(values: torch.Tensor, bands: torch.Tensor) -> torch.Tensor:
    """Mean of `values` (..., H, W) over each band's coefficients: (..., B)."""
    if values.shape[-2:] != bands.shape:
        raise ValueError(f"values (..., H, W) must match bands {tuple(bands.shape)}, got {tuple(values.shape)}")
    one_hot = torch.nn.functional.one_hot(bands.flatten()).to(values.dtype)  # (H*W, B)
    return values.flatten(-2) @ one_hot / band_counts(bands).to(values.dtype)


def lowest_frequencies(n: int, height: int, width: int) -> list[tuple[int, int]]:
    """The n lowest frequencies (u, v) by radial distance sqrt(u^2 + v^2).

    Ties keep row-major order (smaller u first): DC, (0, 1), (1, 0), (1, 1), (0, 2), (2, 0), (1, 2), ...
    This is a stable argsort of the distance map, the order of Everaert et al.'s signal-leak statistics.
    """
    if not 1 <= n <= height * width:
        raise ValueError(f"n must be in [1, {height * width}] for a {height}x{width} grid, got {n}")
    squared = _squared_radius(height, width).flatten()
    order = torch.argsort(squared, stable=True)[:n]  # integer keys: ties are exact
    return [(int(i) // width, int(i) % width) for i in order]


# ----------------------------------------------------------------------------- power and SNR theory


def band_power(x: torch.Tensor, bands: torch.Tensor) -> torch.Tensor:
    """Per-band power P_b of clean data per channel: mean over images and band coefficients of coeff^2.

    x: (N, C, H, W) images in [-1, 1] or latents. Returns float64 (C, B). The power is uncentred:
    a band's mean (e.g. the DC of a bright dataset) is signal too, and it is what the noise must hide.
    """
    if x.ndim != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    coeffs = dct2(x.to(torch.float64))
    return band_mean(coeffs.pow(2).mean(dim=0), bands)


def band_noise_power(bands: torch.Tensor, offset_noise: float = 0.0) -> torch.Tensor:
    """Noise power per band (B,) float64 for eps = randn + offset_noise * randn(B, C, 1, 1).

    White unit noise gives 1 in every band; the offset adds s^2 * H * W to the DC coefficient, which is
    averaged over the coefficients of the band that holds DC.
    """
    height, width = bands.shape
    power = torch.ones(int(bands.max()) + 1, dtype=torch.float64)
    dc_band = int(bands[0, 0])
    power[dc_band] += offset_noise ** 2 * height * width / int((bands == dc_band).sum())
    return power


def band_snr(alphas_cumprod: torch.Tensor, band_power: torch.Tensor, noise_power=1.0) -> torch.Tensor:
    """SNR_b(t) = ab_t * P_b / ((1 - ab_t) * N_b) for every timestep: (T, *band_power.shape), float64.

    alphas_cumprod: (T,); band_power: (..., B) from `band_power`; noise_power: scalar or (B,) from
    `band_noise_power`. ab_t = 1 gives inf, ab_t = 0 (zero terminal SNR) gives 0.
    """
    alpha_bar = alphas_cumprod.to(torch.float64).reshape(-1, *([1] * band_power.ndim))
    noise_power = torch.as_tensor(noise_power, dtype=torch.float64)
    return alpha_bar * band_power.to(torch.float64) / ((1 - alpha_bar) * noise_power)


def destruction_timesteps(snr: torch.Tensor) -> torch.Tensor:
    """First timestep where SNR_b(t) < 1, per band: snr (T, ...) -> int64 (...); T when it never drops below 1."""
    below = snr < 1
    first = below.long().argmax(dim=0)  # argmax returns the first maximal index
    return torch.where(below.any(dim=0), first, torch.full_like(first, snr.shape[0]))


def snr_at(alphas_cumprod: torch.Tensor, band_power: torch.Tensor, timestep: int, noise_power=1.0) -> torch.Tensor:
    """SNR per band at one timestep, e.g. the first sampled one (the signal a sampler starting there leaks)."""
    return band_snr(alphas_cumprod[timestep].reshape(1), band_power, noise_power)[0]


def expected_correlation(snr: torch.Tensor) -> torch.Tensor:
    """Correlation of x0 and x_t coefficients implied by their SNR S: sqrt(S / (1 + S)) (1 at S = inf)."""
    return torch.where(torch.isinf(snr), torch.ones_like(snr), (snr / (1 + snr)).sqrt())


# ----------------------------------------------------------------------------- measurement


def measure_band_correlation(x0: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps, bands: torch.Tensor,
                             generator: torch.Generator | None = None, offset_noise: float = 0.0) -> dict:
    """Noise x0 with the forward process at each timestep and measure, per band, how much of it survives.

    x0: (N, C, H, W) clean data; alphas_cumprod: (T,); timesteps: K ints; bands: (H, W) labels.
    x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, eps = randn + offset_noise * randn(N, C, 1, 1), in float64.

    The correlation of band b is uncentred (a cosine similarity pooled over images and the band's
    coefficients):  r_b = sum(c0 * ct) / sqrt(sum(c0^2) * sum(ct^2)).
    Since the noise has zero mean, E[c0 ct] = sqrt(ab) P_b and E[ct^2] = ab P_b + (1 - ab) N_b with the
    same uncentred power P_b as `band_power`, so r_b -> sqrt(S_b / (1 + S_b)) also for bands whose mean is
    not zero (DC); a centred (Pearson) correlation would need the band's variance in S instead.

    Returns a dict of float64 tensors: "timesteps" (K,), "correlation" (K, C, B) measured, "power" (C, B)
    of these x0, "snr" (K, C, B) and "theory" (K, C, B) = sqrt(snr / (1 + snr)).
    """
    if x0.ndim != 4 or x0.shape[-2:] != bands.shape:
        raise ValueError(f"x0 must be (N, C, H, W) with (H, W) = bands.shape {tuple(bands.shape)}, "
                         f"got {tuple(x0.shape)}")
    timesteps = torch.as_tensor(timesteps, dtype=torch.long).flatten()
    x0 = x0.to(torch.float64)
    clean = dct2(x0)
    clean_sum = band_mean(clean.pow(2).sum(dim=0), bands)  # (C, B); means share the count, so ratios hold
    correlations = []
    for t in timesteps.tolist():
        alpha_bar = float(alphas_cumprod[t])
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        if offset_noise:
            noise = noise + offset_noise * torch.randn(*x0.shape[:2], 1, 1, generator=generator, dtype=torch.float64)
        noisy = dct2(math.sqrt(alpha_bar) * x0 + math.sqrt(1 - alpha_bar) * noise)
        cross = band_mean((clean * noisy).sum(dim=0), bands)
        noisy_sum = band_mean(noisy.pow(2).sum(dim=0), bands)
        correlations.append(cross / (clean_sum * noisy_sum).sqrt())
    power = clean_sum / x0.shape[0]
    snr = band_snr(alphas_cumprod[timesteps], power, band_noise_power(bands, offset_noise))
    return {"timesteps": timesteps, "correlation": torch.stack(correlations), "power": power,
            "snr": snr, "theory": expected_correlation(snr)}
