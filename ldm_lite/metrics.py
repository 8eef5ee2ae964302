"""Bias metrics: brightness and spectrum of samples vs data, the band view of the forward process, and
exposure bias along the sampling chain.

- Brightness: the per-image mean (per channel and luminance) of samples against data, compared with the
  1-D Wasserstein distance, the two-sample Kolmogorov-Smirnov statistic and the std ratio samples / data
  (below 1: brightness squeezed toward mid-grey, the symptom of the signal leak; Lin et al. 2023,
  arXiv:2305.08891, Everaert et al. 2024, arXiv:2309.15842).
- Spectrum: radially averaged DCT power of samples against data, and its log-ratio per octave band.
- Bands: per-band power P_b of clean data, SNR_b(t) = ab_t P_b / ((1 - ab_t) N_b) for common schedules,
  destruction times, the SNR left at the first sampled step (leak per band) and the measured correlation
  of x_t with x0 against sqrt(S / (1 + S)) (formulas and conventions in `ldm_lite.spectral`).
- Loss per timestep bucket (`loss_per_bucket`): a denoiser's error in the eps, x0 and v parametrisations at once.
- Exposure bias (Ning et al. 2023, "Elucidating the Exposure Bias in Diffusion Models", arXiv:2308.15321):
  the norm of the predicted noise along sampling vs on forward-noised data, delta_t (sec. 4.2), and a scan
  for the epsilon-scaling value that best matches the two eps-norm curves (sec. 5).

Images are (N, C, H, W), float in [-1, 1] (uint8 in [0, 255] is converted) or latents of any range.
Nothing here plots (see `ldm_lite.plots`); results are dicts of tensors and lists of rows.
"""
import math

import torch
from tqdm.auto import tqdm

from . import spectral
from .sampling import label_tensor, model_device, sample
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


# ----------------------------------------------------------------------------- exposure bias


def predicted_noise(model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar: float, prediction_type: str):
    """The model's epsilon estimate (B, C, H, W) at x_t, whatever it predicts (eps, v or x0); a learned-variance
    output (B, 2C, H, W) contributes its first C channels."""
    output = model_output[:, :x_t.shape[1]]
    _, eps = predict_x0_and_eps(output, x_t, math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar), prediction_type)
    return eps


def _per_image_norm(x: torch.Tensor) -> torch.Tensor:
    return x.double().flatten(1).norm(dim=1)


def _set_steps(scheduler, num_inference_steps):
    if num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps)
    return scheduler.timesteps


@torch.no_grad()
def forward_eps_norm(model, scheduler, x0: torch.Tensor, *, num_inference_steps: int | None = None,
                     generator: torch.Generator | None = None, batch_size: int = 64, class_labels=None,
                     progress: bool = True, autocast_dtype=None) -> dict:
    """Mean per-image L2 norm of the predicted noise on forward-noised data, at each sampled timestep
    (the training-time curve of Ning et al., Fig. 4). x0: (N, C, H, W) training images or latents.
    autocast_dtype: run the model under autocast, as `sample` does with the same argument.
    Returns {"timesteps" (S,), "eps_norm" (S,), "eps_norm_std" (S,)} (std over images)."""
    timesteps, device = _set_steps(scheduler, num_inference_steps), model_device(model)
    class_labels, norms = label_tensor(class_labels, len(x0), device), []
    for t in tqdm(timesteps.tolist(), desc="eps-norm (forward)", disable=not progress, leave=False):
        alpha_bar, step_norms = float(scheduler.alphas_cumprod[t]), []
        for start in range(0, len(x0), batch_size):
            batch = x0[start:start + batch_size].to(device, torch.float32)
            noise = torch.randn(batch.shape, generator=generator, dtype=batch.dtype).to(device)
            x_t = scheduler.add_noise(batch, noise, torch.tensor([t], device=device))
            labels = class_labels[start:start + batch_size] if class_labels is not None else None
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                output = model(x_t, torch.full((len(batch),), t, dtype=torch.long, device=device), labels)
            step_norms.append(_per_image_norm(predicted_noise(output.float(), x_t, alpha_bar,
                                                              scheduler.prediction_type)))
        norms.append(torch.cat(step_norms))
    norms = torch.stack(norms)  # (S, N)
    return {"timesteps": timesteps.clone(), "eps_norm": norms.mean(dim=1), "eps_norm_std": norms.std(dim=1)}


def sampling_trace(model, scheduler, x0: torch.Tensor, *, num_inference_steps: int | None = None, eps_scale=None,
                   seed: int = 0, batch_size: int = 64, class_labels=None, progress: bool = True,
                   **sample_kwargs) -> dict:
    """Sample from real data noised to the first step, x_T = sqrt(ab_t0) x0 + sqrt(1 - ab_t0) eps, and record
    along the chain (through `sample`'s callback):
      "eps_norm" (S,), "eps_norm_std" (S,): mean / std over images of the predicted-noise L2 norm at x_hat_t;
      "residual_std" (S,): std over samples of x_hat_t - sqrt(ab_t) x0, per element, averaged over elements
        (Ning et al. sec. 4.2); "timesteps" (S,); "samples" (N, C, H, W) the final x_hat_0.
    `seed` draws x_T's noise and seeds `sample`; extra keywords (step_options, autocast_dtype, ...) go to
    `ldm_lite.sampling.sample`.
    """
    timesteps, device = _set_steps(scheduler, num_inference_steps), model_device(model)
    x0 = x0.to(device, torch.float32)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed), dtype=x0.dtype).to(device)
    x_T = scheduler.add_noise(x0, noise, timesteps[:1].to(device))
    steps = len(timesteps)
    norms = torch.zeros(steps, len(x0), dtype=torch.float64)
    residual_sum = torch.zeros(steps, *x0.shape[1:], dtype=torch.float64)
    residual_sq = torch.zeros_like(residual_sum)

    def record(info):
        i, start, x_t = info["step_index"], info["batch_start"], info["x_t"]
        alpha_bar_t = float(scheduler.alphas_cumprod[info["timestep"]])
        eps = predicted_noise(info["model_output"], x_t, alpha_bar_t, scheduler.prediction_type)
        norms[i, start:start + len(x_t)] = _per_image_norm(eps).cpu()
        residual = (x_t.double() - math.sqrt(alpha_bar_t) * x0[start:start + len(x_t)].double()).cpu()
        residual_sum[i] += residual.sum(dim=0)
        residual_sq[i] += residual.pow(2).sum(dim=0)

    samples = sample(model, scheduler, len(x0), shape=tuple(x0.shape[1:]), eps_scale=eps_scale, seed=seed,
                     batch_size=batch_size, class_labels=class_labels, x_T=x_T, callback=record, progress=progress,
                     device=device, **sample_kwargs)
    n = len(x0)
    variance = (residual_sq - residual_sum.pow(2) / n) / (n - 1)  # unbiased, per element
    return {"timesteps": timesteps.clone(), "eps_norm": norms.mean(dim=1), "eps_norm_std": norms.std(dim=1),
            "residual_std": variance.clamp(min=0).sqrt().flatten(1).mean(dim=1), "samples": samples}


def exposure_bias(model, scheduler, x0: torch.Tensor, *, num_inference_steps: int | None = None, eps_scale=None,
                  seed: int = 0, batch_size: int = 64, class_labels=None, progress: bool = True,
                  **sample_kwargs) -> dict:
    """Exposure-bias curves of a model on data x0 (N, C, H, W), N >= 2 (Ning et al. 2023, sec. 4.2 and 5).

    Runs `forward_eps_norm` and `sampling_trace` (both seeded by `seed`) and returns, per sampled timestep:
      "timesteps", "alphas_cumprod" (S,); "eps_norm_forward", "eps_norm_sampling" (+ "_std"): the two curves;
      "residual_std" sigma_hat_t and "target_std" sqrt(1 - ab_t);
      "delta": delta_t = (sigma_hat_t - sqrt(1 - ab_t))^2;
      "delta_reference": delta_t of a sampler whose x_hat_t has the right marginal but is independent of x0:
        std sqrt(1 - ab_t + 2 ab_t v) per element, v the per-element variance of x0. Even a perfect model starts
        from x_T, which holds only sqrt(ab_t0) of x0, so delta_t grows toward t = 0 without any exposure bias: at
        sqrt(ab_t0) ~ 0 the perfect model sits on this reference; what x_T leaks about x0 (its brightness, with
        the usual schedules) keeps a good model below it. Compare delta_t between settings (e.g. eps scales).
      "samples": the final samples of the chain.
    """
    if x0.ndim != 4 or len(x0) < 2:
        raise ValueError(f"x0 must be (N, C, H, W) with N >= 2, got shape {tuple(x0.shape)}")
    forward = forward_eps_norm(model, scheduler, x0, num_inference_steps=num_inference_steps,
                               generator=torch.Generator().manual_seed(seed + 1), batch_size=batch_size,
                               class_labels=class_labels, progress=progress,
                               autocast_dtype=sample_kwargs.get("autocast_dtype"))
    trace = sampling_trace(model, scheduler, x0, eps_scale=eps_scale, seed=seed, batch_size=batch_size,
                           class_labels=class_labels, progress=progress, **sample_kwargs)
    alphas_cumprod = scheduler.alphas_cumprod[trace["timesteps"]].double()
    target = (1 - alphas_cumprod).sqrt()
    variance = x0.double().var(dim=0).flatten()  # (D,)
    reference = (1 - alphas_cumprod[:, None] + 2 * alphas_cumprod[:, None] * variance).sqrt().mean(dim=1)
    return {"timesteps": trace["timesteps"], "alphas_cumprod": alphas_cumprod,
            "eps_norm_forward": forward["eps_norm"], "eps_norm_forward_std": forward["eps_norm_std"],
            "eps_norm_sampling": trace["eps_norm"], "eps_norm_sampling_std": trace["eps_norm_std"],
            "residual_std": trace["residual_std"], "target_std": target,
            "delta": (trace["residual_std"] - target).pow(2), "delta_reference": (reference - target).pow(2),
            "samples": trace["samples"]}


def eps_norm_gap(sampling: torch.Tensor, forward: torch.Tensor) -> float:
    """Root-mean-square relative gap between two eps-norm curves (S,): sqrt(mean((sampling / forward - 1)^2))."""
    return float((sampling.double() / forward.double() - 1).pow(2).mean().sqrt())


def scan_eps_scale(model, scheduler, x0: torch.Tensor, candidates, *, num_inference_steps: int | None = None,
                   seed: int = 0, batch_size: int = 64, class_labels=None, progress: bool = True,
                   **sample_kwargs) -> dict:
    """Epsilon scaling b (lambda = b at every step; Ning et al. eq. 11) that best matches the eps-norm along
    sampling to the forward eps-norm. Each candidate reruns the chain from the same x_T and noises (`seed`),
    so only b differs; the forward curve is computed once.

    Returns {"candidates": [b], "gap": [eps_norm_gap per candidate], "best": b with the smallest gap,
    "forward": `forward_eps_norm` result, "traces": [`sampling_trace` result per candidate]}.
    """
    candidates = [float(b) for b in candidates]
    if not candidates or min(candidates) <= 0:
        raise ValueError(f"candidates must be a non-empty list of positive eps-scale values, got {candidates}")
    _set_steps(scheduler, num_inference_steps)
    forward = forward_eps_norm(model, scheduler, x0, generator=torch.Generator().manual_seed(seed + 1),
                               batch_size=batch_size, class_labels=class_labels, progress=progress,
                               autocast_dtype=sample_kwargs.get("autocast_dtype"))
    traces = [sampling_trace(model, scheduler, x0, eps_scale=b, seed=seed, batch_size=batch_size,
                             class_labels=class_labels, progress=progress, **sample_kwargs)
              for b in candidates]
    gaps = [eps_norm_gap(trace["eps_norm"], forward["eps_norm"]) for trace in traces]
    best = candidates[min(range(len(gaps)), key=gaps.__getitem__)]
    return {"candidates": candidates, "gap": gaps, "best": best, "forward": forward, "traces": traces}


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
