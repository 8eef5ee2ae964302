"""Bias metrics: brightness and spectrum of samples vs data, the band view of the forward process, and a
denoiser's loss per timestep bucket.

- Brightness: the per-image mean (per channel and luminance) of samples against data, compared with the
  1-D Wasserstein distance, the two-sample Kolmogorov-Smirnov statistic and the std ratio samples / data
  (below 1: brightness squeezed toward mid-grey, the symptom of the signal leak; Lin et al. 2023,
  arXiv:2305.08891, Everaert et al. 2024, arXiv:2309.15842).
- Spectrum: radially averaged DCT power of samples against data, and its log-ratio per octave band.
- Bands: per-band power P_b of clean data, SNR_b(t) = ab_t P_b / ((1 - ab_t) N_b) for common schedules,
  destruction times, the SNR left at the first sampled step (leak per band) and the measured correlation
  of x_t with x0 against sqrt(S / (1 + S)) (formulas and conventions in `ldm_lite.spectral`).
- Loss per timestep bucket (`loss_per_bucket`): a denoiser's error in the eps, x0 and v parametrisations at once.
Exposure bias along the sampling chain: `ldm_lite.exposure`.

Images are (N, C, H, W), float in [-1, 1] (uint8 in [0, 255] is converted) or latents of any range.
Nothing here plots (see `ldm_lite.plots`); results are dicts of tensors and lists of rows.
"""
import math

import torch

from . import spectral
from .schedulers.base import predict_x0_and_eps
from .schedules import TIMESTEP_SPACINGS, default_steps_offset, make_timesteps, named_alphas_cumprod

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # Rec. 601 luma Y' of gamma-encoded RGB; they sum to 1, so Y' stays in [-1, 1]


def _as_float_images(images: torch.Tensor, name: str) -> torch.Tensor:
    """(N, C, H, W) float64; uint8 in [0, 255] is mapped to [-1, 1]."""
    images = torch.as_tensor(images)
    if images.ndim != 4 or images.shape[0] < 2:
        raise ValueError(f"{name} must be (N, C, H, W) with N >= 2, got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.double() / 127.5 - 1.0
    if not images.is_floating_point():
        raise ValueError(f"{name} must be float in [-1, 1] or uint8 in [0, 255], got dtype {images.dtype}")
    return images.double()


# ----------------------------------------------------------------------------- 1-D distances


def _empirical_cdfs(a: torch.Tensor, b: torch.Tensor):
    """Both empirical CDFs evaluated at every pooled value (sorted): (values (n + m,), F_a, F_b)."""
    a, b = a.double().flatten().sort().values, b.double().flatten().sort().values
    if a.numel() == 0 or b.numel() == 0:
        raise ValueError("both samples must be non-empty")
    pooled = torch.cat([a, b]).sort().values
    cdf_a = torch.searchsorted(a, pooled, right=True).double() / a.numel()
    cdf_b = torch.searchsorted(b, pooled, right=True).double() / b.numel()
    return pooled, cdf_a, cdf_b


def wasserstein_1d(a: torch.Tensor, b: torch.Tensor) -> float:
    """W1 distance between the empirical distributions of two 1-D samples: the area between their CDFs,
    sum over pooled sorted values of |F_a - F_b| * gap to the next value (equal to
    scipy.stats.wasserstein_distance). Sizes may differ."""
    pooled, cdf_a, cdf_b = _empirical_cdfs(a, b)
    return float(((cdf_a - cdf_b).abs()[:-1] * pooled.diff()).sum())


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup_x |F_a(x) - F_b(x)| (scipy.stats.ks_2samp's statistic)."""
    _, cdf_a, cdf_b = _empirical_cdfs(a, b)
    return float((cdf_a - cdf_b).abs().max())


# ----------------------------------------------------------------------------- brightness


def image_brightness(images: torch.Tensor) -> dict:
    """Per-image mean brightness: {quantity: (N,) float64}.

    RGB images (C = 3) give "R", "G", "B" and "luminance" (Rec. 601 weights); other channel counts
    (latents) give "c0", "c1", ... and "mean" (over all channels).
    """
    images = _as_float_images(images, "images")
    channel_means = images.mean(dim=(2, 3))  # (N, C)
    if images.shape[1] == 3:
        names, overall = ["R", "G", "B", "luminance"], channel_means @ torch.tensor(LUMA_WEIGHTS, dtype=torch.float64)
    else:
        names, overall = [f"c{c}" for c in range(images.shape[1])] + ["mean"], channel_means.mean(dim=1)
    return dict(zip(names, [*channel_means.T, overall]))


def brightness_report(samples: torch.Tensor, data: torch.Tensor) -> dict:
    """Compare the per-image brightness of samples (N, C, H, W) and data (M, C, H, W).

    Returns {"rows": one dict per quantity (see `image_brightness`) with samples_mean, data_mean, samples_std,
    data_std, std_ratio (samples / data; < 1 means squeezed toward mid-grey), wasserstein (W1) and ks,
    "samples": {quantity: (N,)}, "data": {quantity: (M,)}}.
    """
    if torch.as_tensor(samples).shape[1:2] != torch.as_tensor(data).shape[1:2]:
        raise ValueError(f"samples and data must have the same channels, got {tuple(samples.shape)} "
                         f"and {tuple(data.shape)}")
    ours, theirs = image_brightness(samples), image_brightness(data)
    rows = []
    for name in ours:
        a, b = ours[name], theirs[name]
        rows.append(dict(quantity=name, samples_mean=float(a.mean()), data_mean=float(b.mean()),
                         samples_std=float(a.std()), data_std=float(b.std()),
                         std_ratio=float(a.std() / b.std()) if b.std() > 0 else math.inf,
                         wasserstein=wasserstein_1d(a, b), ks=ks_statistic(a, b)))
    return {"rows": rows, "samples": ours, "data": theirs}


# ----------------------------------------------------------------------------- spectrum


def radial_power_spectrum(images: torch.Tensor) -> torch.Tensor:
    """Radially averaged power (K,) float64: mean over images, channels and the coefficients of each radial
    DCT index k = floor(sqrt(u^2 + v^2)) of coeff^2 (orthonormal DCT, so it sums to the image energy).
    Index k is k / (2 R) cycles per pixel on R x R images. The DCT needs no window: no wrap-around edges."""
    images = _as_float_images(images, "images")
    coefficients = spectral.dct2(images)
    return spectral.band_mean(coefficients.pow(2).mean(dim=(0, 1)), spectral.radial_index(*images.shape[-2:]))


def spectrum_report(samples: torch.Tensor, data: torch.Tensor) -> dict:
    """Radial power spectra of samples and data (same H, W) and their log10 ratio.

    Returns {"radius": (K,) radial index, "samples": (K,), "data": (K,), "log10_ratio": (K,),
    "rows": per octave band (band 0 = DC, band j holds 2^(j-1) <= k < 2^j): band, k_min, k_max,
    samples_power, data_power, log10_ratio}. log10_ratio > 0: samples carry too much power there.
    """
    samples, data = _as_float_images(samples, "samples"), _as_float_images(data, "data")
    if samples.shape[1:] != data.shape[1:]:
        raise ValueError(f"samples and data must have the same (C, H, W), got {tuple(samples.shape[1:])} "
                         f"and {tuple(data.shape[1:])}")
    ours, theirs = radial_power_spectrum(samples), radial_power_spectrum(data)
    octaves = spectral.octave_bands(*data.shape[-2:])
    radius = spectral.radial_index(*data.shape[-2:])
    band_ours = spectral.band_power(samples, octaves).mean(dim=0)
    band_theirs = spectral.band_power(data, octaves).mean(dim=0)
    rows = [dict(band=b, k_min=int(radius[octaves == b].min()), k_max=int(radius[octaves == b].max()),
                 samples_power=float(band_ours[b]), data_power=float(band_theirs[b]),
                 log10_ratio=float(torch.log10(band_ours[b] / band_theirs[b])))
            for b in range(len(band_ours))]
    return {"radius": torch.arange(len(ours)), "samples": ours, "data": theirs,
            "log10_ratio": torch.log10(ours / theirs), "rows": rows}


# ----------------------------------------------------------------------------- bands of the forward process

def _band_labels(bands, height: int, width: int) -> torch.Tensor:
    if isinstance(bands, torch.Tensor):
        return bands
    if bands == "octave":
        return spectral.octave_bands(height, width)
    if bands == "radial":
        return spectral.radial_bands(height, width)
    raise ValueError(f"bands must be 'octave', 'radial' or a label map (H, W), got {bands!r}")


def band_analysis(x0: torch.Tensor, *, schedules: dict | None = None, bands="octave", num_inference_steps: int = 50,
                  offset_noise: float = 0.1, measure_schedule: str | None = None, measure_timesteps=None,
                  generator: torch.Generator | None = None) -> dict:
    """How the forward process destroys each DCT band of the data x0 (N, C, H, W) (images or latents).

    schedules: {name: alphas_cumprod (T,)}, default `named_alphas_cumprod()`; bands: "octave", "radial" or
    labels (H, W). Channel row C ("all") pools the channels (mean power). For white noise and for offset
    noise of strength `offset_noise` (extra s^2 H W noise power in DC) the result holds, with
    `channels` = channel names + ["all"]:
      "power" (C+1, B) uncentred P_b; "band_counts" (B,); "band_radii" [(k_min, k_max)] per band;
      "noise_power" {noise: (B,)}; "snr" {schedule: (T, C+1, B)} (white noise);
      "destruction" {(schedule, noise): (C+1, B)}: first t with SNR_b < 1 (T if never);
      "leak" {(schedule, spacing, noise): {"t0", "snr" (C+1, B)}}: SNR at the first sampled timestep
        (steps_offset by `schedules.default_steps_offset`);
      "correlation": `spectral.measure_band_correlation` on `measure_schedule` (default the first schedule)
        at `measure_timesteps` (default 12 values spread over [0, T)), with "schedule" added.
    """
    x0 = _as_float_images(x0, "x0")
    schedules = named_alphas_cumprod() if schedules is None else schedules
    labels = _band_labels(bands, *x0.shape[-2:])
    power = spectral.band_power(x0, labels)
    power = torch.cat([power, power.mean(dim=0, keepdim=True)])  # (C+1, B)
    noises = {"white": 0.0, f"offset {offset_noise:g}": offset_noise} if offset_noise else {"white": 0.0}
    noise_power = {name: spectral.band_noise_power(labels, s) for name, s in noises.items()}
    result = dict(channels=_channel_names(x0.shape[1]) + ["all"], power=power, band_counts=spectral.band_counts(labels),
                  band_radii=_band_radii(labels), noise_power=noise_power, num_inference_steps=num_inference_steps,
                  snr={}, destruction={}, leak={})
    for name, alphas_cumprod in schedules.items():
        result["snr"][name] = spectral.band_snr(alphas_cumprod, power)
        for noise, noise_b in noise_power.items():
            snr = spectral.band_snr(alphas_cumprod, power, noise_b)  # (T, C+1, B)
            result["destruction"][name, noise] = spectral.destruction_timesteps(snr)
            for spacing in TIMESTEP_SPACINGS:
                t0 = _first_timestep(num_inference_steps, len(alphas_cumprod), spacing)
                result["leak"][name, spacing, noise] = {"t0": t0, "snr": snr[t0]}
    measure_schedule = measure_schedule or next(iter(schedules))
    alphas_cumprod = schedules[measure_schedule]
    if measure_timesteps is None:
        measure_timesteps = torch.linspace(0, len(alphas_cumprod) - 1, 12).round().long()
    correlation = spectral.measure_band_correlation(x0, alphas_cumprod, measure_timesteps, labels, generator)
    result["correlation"] = {**correlation, "schedule": measure_schedule}
    return result


def _band_radii(labels: torch.Tensor) -> list:
    """(smallest, largest) radial index of every band."""
    radius = spectral.radial_index(*labels.shape)
    return [(int(radius[labels == b].min()), int(radius[labels == b].max())) for b in range(int(labels.max()) + 1)]


def _first_timestep(num_inference_steps: int, num_train_timesteps: int, spacing: str) -> int:
    """t0 of a spacing, with `default_steps_offset`."""
    return int(make_timesteps(num_inference_steps, num_train_timesteps, spacing, default_steps_offset(spacing))[0])


def _channel_names(channels: int) -> list:
    return ["R", "G", "B"] if channels == 3 else [f"c{c}" for c in range(channels)]


def band_tables(result: dict) -> dict:
    """CSV-ready rows of a `band_analysis` result: {"power", "destruction", "leak", "correlation": [dict]}."""
    channels, power = result["channels"], result["power"]
    tables = {"power": [], "destruction": [], "leak": [], "correlation": []}
    for c, channel in enumerate(channels):
        for b, (k_min, k_max) in enumerate(result["band_radii"]):
            band = dict(channel=channel, band=b, k_min=k_min, k_max=k_max)
            tables["power"].append(dict(band, coefficients=int(result["band_counts"][b]), power=float(power[c, b])))
            for (schedule, noise), steps in result["destruction"].items():
                tables["destruction"].append(dict(band, schedule=schedule, noise=noise,
                                                  destruction_timestep=int(steps[c, b])))
            for (schedule, spacing, noise), leak in result["leak"].items():
                tables["leak"].append(dict(band, schedule=schedule, spacing=spacing, noise=noise, t0=leak["t0"],
                                           snr_at_t0=float(leak["snr"][c, b])))
    correlation = result["correlation"]
    for k, t in enumerate(correlation["timesteps"].tolist()):
        for c, channel in enumerate(channels[:-1]):
            for b in range(power.shape[1]):
                tables["correlation"].append(dict(schedule=correlation["schedule"], timestep=t, channel=channel,
                                                  band=b, snr=float(correlation["snr"][k, c, b]),
                                                  measured=float(correlation["correlation"][k, c, b]),
                                                  theory=float(correlation["theory"][k, c, b])))
    return tables


def format_table(rows: list, columns: list | None = None, float_format: str = ".4g", markdown: bool = False) -> str:
    """Plain-text (or, with `markdown`, GitHub-markdown) table of a list of dicts (columns: keys of the first row
    by default)."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])
    cells = [[format(row[c], float_format) if isinstance(row[c], float) else str(row[c]) for c in columns]
             for row in rows]
    if markdown:
        return "\n".join("| " + " | ".join(line) + " |" for line in [columns, ["---"] * len(columns), *cells])
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


@torch.no_grad()
def loss_per_bucket(model, scheduler, x0: torch.Tensor, num_buckets: int = 10, repeats: int = 1,
                    generator: torch.Generator | None = None, batch_size: int = 256) -> dict:
    """Mean squared error of a denoiser per timestep bucket, in all three parametrisations at once.

    The T training timesteps are cut into `num_buckets` equal buckets; every image of x0 (N, C, H, W) is noised
    `repeats` times at a timestep drawn uniformly in each bucket (Ho et al. 2020, arXiv:2006.11239, Algorithm 1)
    and the model output is converted by `predict_x0_and_eps` for the scheduler's prediction type. Per image,
    mean over elements of (x0_hat - x0)^2, (eps_hat - eps)^2 and (v_hat - v)^2 with v = sqrt(ab) eps -
    sqrt(1 - ab) x0 (Salimans & Ho 2022, arXiv:2202.00512). For a consistent model these are one error seen
    three ways: eps error = -(sqrt(ab) / sqrt(1 - ab)) x0 error and v error = -x0 error / sqrt(1 - ab).

    Returns float64 tensors: "edges" (K + 1,) int64, "centres" (K,), "x0_mse", "eps_mse", "v_mse", "loss" (the
    model's own training target) and "loss_stderr" (K,) (standard error over images).
    """
    T = scheduler.num_train_timesteps
    if not 1 <= num_buckets <= T:
        raise ValueError(f"num_buckets must be in [1, {T}], got {num_buckets}")
    edges = torch.linspace(0, T, num_buckets + 1).round().long()
    target = {"epsilon": "eps_mse", "v_prediction": "v_mse", "sample": "x0_mse"}[scheduler.prediction_type]
    data = x0.repeat(repeats, 1, 1, 1).double()
    rows = {name: [] for name in ("x0_mse", "eps_mse", "v_mse")}
    stderr = []
    for low, high in zip(edges[:-1].tolist(), edges[1:].tolist()):
        t = torch.randint(low, high, (len(data),), generator=generator)
        noise = torch.randn(data.shape, generator=generator, dtype=torch.float64)
        ab = scheduler.alphas_cumprod.double()[t].reshape(-1, 1, 1, 1)
        a, b = ab.sqrt(), (1 - ab).sqrt()
        x_t = scheduler.add_noise(data, noise, t)
        errors = {name: [] for name in rows}
        for start in range(0, len(data), batch_size):
            part = slice(start, start + batch_size)
            output = model(x_t[part].float(), t[part], None).double()
            x0_hat, eps_hat = predict_x0_and_eps(output, x_t[part], a[part], b[part], scheduler.prediction_type)
            v, v_hat = a[part] * noise[part] - b[part] * data[part], a[part] * eps_hat - b[part] * x0_hat
            for name, error in (("x0_mse", x0_hat - data[part]), ("eps_mse", eps_hat - noise[part]),
                                ("v_mse", v_hat - v)):
                errors[name].append(error.pow(2).flatten(1).mean(1))
        for name in rows:
            per_image = torch.cat(errors[name])
            rows[name].append(per_image.mean())
            if name == target:
                stderr.append(per_image.std() / math.sqrt(len(per_image)))
    result = {name: torch.stack(values) for name, values in rows.items()}
    return {"edges": edges, "centres": (edges[:-1] + edges[1:] - 1).double() / 2, **result,
            "loss": result[target].clone(), "loss_stderr": torch.stack(stderr)}
