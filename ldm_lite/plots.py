"""Figures and CSV tables for the bias analyses (matplotlib, Agg backend, imported only when a figure is drawn,
so importing ldm_lite stays light).

Every `plot_*` function takes the dict returned by the matching `ldm_lite.metrics` / `ldm_lite.hspace`
function, writes one PNG and returns its path.
"""
import csv
import math
from pathlib import Path

import torch


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def write_csv(rows: list, path) -> Path:
    """Write a list of dicts as CSV, one column per key any row has (in order of first appearance; a row without
    it leaves the cell empty: rows logged by different versions add fields); floats keep full precision."""
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _band_label(result: dict, band: int) -> str:
    k_min, k_max = result["band_radii"][band]
    return f"band {band} (k {k_min})" if k_min == k_max else f"band {band} (k {k_min}-{k_max})"


# ----------------------------------------------------------------------------- bands


def plot_band_snr(result: dict, path, schedule: str | None = None) -> Path:
    """SNR_b(t) of every band (channels pooled) on log axes, with the SNR = 1 line, for one schedule."""
    plt = _pyplot()
    schedule = schedule or next(iter(result["snr"]))
    snr = result["snr"][schedule][:, -1]  # (T, B), pooled channels
    timesteps = torch.arange(1, snr.shape[0] + 1)  # t + 1 so that t = 0 fits on a log axis
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for band in range(snr.shape[1]):
        ax.loglog(timesteps, snr[:, band].clamp(min=1e-12), label=_band_label(result, band))
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="SNR = 1")
    ax.set(xlabel="timestep t + 1", ylabel="SNR_b(t) = ab P_b / (1 - ab)",
           title=f"Per-band SNR of the forward process ({schedule})")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_destruction(result: dict, path) -> Path:
    """First timestep with SNR_b < 1 against the band, one line per schedule (white noise solid, offset dashed)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    bands = range(result["power"].shape[1])
    schedules = list(dict.fromkeys(schedule for schedule, _ in result["destruction"]))
    for (schedule, noise), steps in result["destruction"].items():
        ax.plot(bands, steps[-1], marker="o", color=f"C{schedules.index(schedule)}",
                linestyle="-" if noise == "white" else "--", label=schedule if noise == "white" else None)
    ax.set(xlabel="band (0 = DC, higher = finer detail)", ylabel="destruction timestep (SNR_b < 1)",
           title="When each band is drowned by noise (channels pooled)")
    ax.legend(fontsize=7, title="dashed: offset noise", title_fontsize=7)
    return _save(fig, path)


def plot_leak(result: dict, path) -> Path:
    """SNR per band left at the first sampled timestep (channels pooled), one panel per spacing, one colour per
    schedule; solid white noise, dashed offset noise. Exactly zero (zero terminal SNR) is drawn at the bottom."""
    plt = _pyplot()
    spacings = list(dict.fromkeys(spacing for _, spacing, _ in result["leak"]))
    schedules = list(dict.fromkeys(schedule for schedule, _, _ in result["leak"]))
    positive = [float(leak["snr"][-1][leak["snr"][-1] > 0].min()) for leak in result["leak"].values()
                if (leak["snr"][-1] > 0).any()]
    floor = 0.1 * min(positive, default=1.0)
    fig, axes = plt.subplots(1, len(spacings), figsize=(5 * len(spacings), 4.5), sharey=True, squeeze=False)
    for ax, spacing in zip(axes[0], spacings):
        for (schedule, leak_spacing, noise), leak in result["leak"].items():
            if leak_spacing == spacing:
                ax.semilogy(range(leak["snr"].shape[1]), leak["snr"][-1].clamp(min=floor), marker="o",
                            color=f"C{schedules.index(schedule)}", linestyle="-" if noise == "white" else "--",
                            label=f"{schedule} (t0={leak['t0']})" if noise == "white" else None)
        ax.axhline(floor, color="grey", linewidth=0.5)
        ax.set(xlabel="band (0 = DC)", title=f"{spacing} spacing, {result['num_inference_steps']} steps")
        ax.legend(fontsize=7, title="dashed: offset noise; bottom line: SNR 0", title_fontsize=7)
    axes[0][0].set_ylabel("SNR_b at the first sampled step (signal leak)")
    return _save(fig, path)


def plot_band_correlation(result: dict, path) -> Path:
    """Measured corr(x0, x_t) per band (markers) against sqrt(S / (1 + S)) (lines), averaged over channels."""
    plt = _pyplot()
    correlation = result["correlation"]
    timesteps = correlation["timesteps"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for band in range(correlation["theory"].shape[2]):
        line, = ax.plot(timesteps, correlation["theory"][:, :, band].mean(dim=1), label=_band_label(result, band))
        ax.plot(timesteps, correlation["correlation"][:, :, band].mean(dim=1), "o", color=line.get_color())
    ax.set(xlabel="timestep t", ylabel="corr(x0, x_t) per band",
           title=f"Measured (dots) vs sqrt(S / (1 + S)) (lines), {correlation['schedule']}")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_bands(result: dict, out_dir, prefix: str = "bands") -> dict:
    """All four band figures into out_dir: {"snr", "destruction", "leak", "correlation": path}."""
    out_dir = Path(out_dir)
    return {"snr": plot_band_snr(result, out_dir / f"{prefix}_snr.png"),
            "destruction": plot_destruction(result, out_dir / f"{prefix}_destruction.png"),
            "leak": plot_leak(result, out_dir / f"{prefix}_leak.png"),
            "correlation": plot_band_correlation(result, out_dir / f"{prefix}_correlation.png")}


# ----------------------------------------------------------------------------- brightness and spectrum


def plot_brightness(report: dict, path, bins: int | None = None) -> Path:
    """Histogram overlay of per-image brightness, samples vs data, one panel per quantity.
    bins: default sqrt of the smaller sample size, within [10, 50]."""
    plt = _pyplot()
    names = list(report["samples"])
    smaller = min(len(report["samples"][names[0]]), len(report["data"][names[0]]))
    bins = bins or int(min(max(smaller ** 0.5, 10), 50))
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), squeeze=False)
    for ax, row, name in zip(axes[0], report["rows"], names):
        samples, data = report["samples"][name], report["data"][name]
        low, high = float(min(samples.min(), data.min())), float(max(samples.max(), data.max()))
        edges = torch.linspace(low, high + 1e-9, bins + 1).numpy()
        ax.hist(data.numpy(), bins=edges, density=True, alpha=0.5, label="data")
        ax.hist(samples.numpy(), bins=edges, density=True, alpha=0.5, label="samples")
        ax.set(xlabel=f"per-image mean ({name})",
               title=f"{name}: std ratio {row['std_ratio']:.2f}, W1 {row['wasserstein']:.3f}")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_study_summary(offset_rows: list, luminance: dict, path) -> Path:
    """The bias study at a glance. Left: mean brightness per asked class, data vs each model (rows of the
    offset-noise table: model, asked, data_mean, samples_mean). Right: per-image luminance histograms,
    luminance = {label: (N,) tensor}, with the data under the label "data"."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    classes = list(dict.fromkeys(row["asked"] for row in offset_rows))
    models = list(dict.fromkeys(row["model"] for row in offset_rows))
    series = {"data": [next(r["data_mean"] for r in offset_rows if r["asked"] == c) for c in classes]}
    for model in models:
        series[model] = [next(r["samples_mean"] for r in offset_rows if r["asked"] == c and r["model"] == model)
                         for c in classes]
    width = 0.8 / len(series)
    for i, (label, means) in enumerate(series.items()):
        left.bar([c + (i - (len(series) - 1) / 2) * width for c in range(len(classes))], means, width, label=label)
    left.axhline(0.0, color="black", linewidth=0.8)
    left.set(xticks=range(len(classes)), xticklabels=[f"asked: {c}" for c in classes],
             ylabel="mean brightness of the images", title="Class-conditional: asked for dark / mid / bright")
    data = luminance["data"]
    edges = torch.linspace(-1, 1, 17).numpy()  # coarse: a few hundred samples per curve
    right.hist(data.numpy(), bins=edges, density=True, color="lightgrey", label="data")
    for label, values in luminance.items():
        if label != "data":
            ratio = float(values.std() / data.std())
            right.hist(values.numpy(), bins=edges, density=True, histtype="step", linewidth=1.8,
                       label=f"{label} (std ratio {ratio:.2f})")
    right.set(xlabel="per-image mean luminance", ylabel="density", title="Unconditional: brightness spread")
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    left.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, frameon=False)
    return _save(fig, path)


def plot_spectrum(report: dict, path) -> Path:
    """Radially averaged DCT power of samples and data (log-log, DC left out) and their log10 ratio."""
    plt = _pyplot()
    radius = report["radius"][1:]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.5, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    top.loglog(radius, report["data"][1:], label="data")
    top.loglog(radius, report["samples"][1:], label="samples")
    top.set(ylabel="power per coefficient", title="Radially averaged power spectrum (orthonormal DCT)")
    top.legend()
    bottom.semilogx(radius, report["log10_ratio"][1:], marker=".")
    bottom.axhline(0.0, color="black", linewidth=1)
    bottom.set(xlabel="radial frequency index k (k / 2R cycles per pixel)", ylabel="log10 samples / data")
    return _save(fig, path)


# ----------------------------------------------------------------------------- exposure bias


def plot_exposure(result: dict, path) -> Path:
    """Left: eps-norm along sampling vs on forward-noised data. Right: delta_t and its no-memory reference."""
    plt = _pyplot()
    timesteps = result["timesteps"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label in (("eps_norm_forward", "forward-noised data (training)"), ("eps_norm_sampling", "sampling chain")):
        left.errorbar(timesteps, result[key], yerr=result[key + "_std"], capsize=2, marker=".", label=label)
    left.set(xlabel="timestep t", ylabel="mean ||eps_theta|| per image", title="Epsilon norm")
    left.invert_xaxis()
    left.legend()
    right.semilogy(timesteps, result["delta"].clamp(min=1e-12), marker=".", label="delta_t measured")
    right.semilogy(timesteps, result["delta_reference"].clamp(min=1e-12), linestyle="--",
                   label="reference: x_hat_t independent of x0")
    right.set(xlabel="timestep t", ylabel="delta_t = (sigma_hat_t - sqrt(1 - ab_t))^2", title="Exposure bias delta_t")
    right.invert_xaxis()
    right.legend(fontsize=8)
    return _save(fig, path)


def plot_eps_scale_scan(scan: dict, path) -> Path:
    """Left: the eps-norm gap along the chain, sampling / forward - 1 per sampled timestep, one line per candidate
    lambda (below 1 blue, above red, 1 black). Right: its RMS over the chain against lambda, the best circled; a
    best at the grid's edge says its optimum may lie beyond. scan: `exposure.scan_eps_scale`'s result."""
    plt = _pyplot()
    forward, candidates = scan["forward"], scan["candidates"]
    fig, (along, rms) = plt.subplots(1, 2, figsize=(12, 4.5))
    below = max([1 - c for c in candidates if c < 1], default=1.0)  # the farthest lambda on each side of 1
    above = max([c - 1 for c in candidates if c > 1], default=1.0)
    for scale, gap, trace in zip(candidates, scan["gap"], scan["traces"]):
        shade = 0.4 + 0.6 * abs(scale - 1) / (below if scale < 1 else above)  # darker further from 1
        colour = "black" if scale == 1 else plt.get_cmap("Blues" if scale < 1 else "Reds")(shade)
        along.plot(trace["timesteps"], trace["eps_norm"] / forward["eps_norm"] - 1, marker=".", color=colour,
                   linewidth=2.5 if scale == scan["best"] else 1, label=f"lambda {scale:g} (RMS {gap:.4f})")
    along.axhline(0.0, color="grey", linestyle="--", linewidth=1)
    along.set(xlabel="timestep t (sampling runs left to right)", ylabel="eps-norm sampling / forward - 1",
              title="Eps-norm gap along sampling, per lambda")
    along.invert_xaxis()
    along.legend(fontsize=7)
    order = sorted(range(len(candidates)), key=candidates.__getitem__)
    rms.plot([candidates[i] for i in order], [scan["gap"][i] for i in order], marker="o", color="C2")
    best_gap = scan["gap"][candidates.index(scan["best"])]
    if math.isfinite(best_gap):
        rms.plot([scan["best"]], [best_gap], marker="o", markersize=14, markerfacecolor="none", color="black")
    edge = " (at the grid's edge)" if scan["best"] in (min(candidates), max(candidates)) else ""
    rms.set(xlabel="epsilon scale lambda", ylabel="RMS relative eps-norm gap",
            title=f"Exposure metric: best lambda {scan['best']:g}{edge}")
    fig.tight_layout()
    return _save(fig, path)


def plot_eps_scale_quality(rows: list, path) -> Path:
    """FID, KID (+- 2 std over subsets) and the exposure metric's eps-norm gap against the epsilon scale lambda;
    rows: eps_scale, fid, kid, kid_std, eps_norm_gap (the bias study's part 2)."""
    plt = _pyplot()
    rows = sorted(rows, key=lambda r: r["eps_scale"])
    scales = [r["eps_scale"] for r in rows]
    fig, (fid, kid, gap) = plt.subplots(1, 3, figsize=(14, 4))
    fid.plot(scales, [r["fid"] for r in rows], marker="o", color="C0")
    fid.set(xlabel="epsilon scale lambda", ylabel="FID", title="FID against lambda")
    kid.errorbar(scales, [r["kid"] for r in rows], yerr=[2 * r["kid_std"] for r in rows], marker="o", color="C1",
                 capsize=3)
    kid.set(xlabel="epsilon scale lambda", ylabel="KID (+- 2 std over subsets)", title="KID against lambda")
    gap.plot(scales, [r["eps_norm_gap"] for r in rows], marker="o", color="C2")
    gap.set(xlabel="epsilon scale lambda", ylabel="RMS relative gap", title="eps-norm, sampling vs forward")
    fig.tight_layout()
    return _save(fig, path)


def plot_fid_nfe(rows: list, path) -> Path:
    """FID (left) and KID +- 2 std (right) against the number of model calls, one line per sampler; rows:
    sampler, nfe, fid, kid, kid_std (the bias study's part 1)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, sampler in enumerate(dict.fromkeys(r["sampler"] for r in rows)):
        mine = sorted((r for r in rows if r["sampler"] == sampler), key=lambda r: r["nfe"])
        calls = [r["nfe"] for r in mine]
        left.plot(calls, [r["fid"] for r in mine], marker="o", color=f"C{i}", label=sampler)
        right.errorbar(calls, [r["kid"] for r in mine], yerr=[2 * r["kid_std"] for r in mine], marker="o",
                       color=f"C{i}", capsize=3, label=sampler)
    left.set(xscale="log", xlabel="model calls (NFE)", ylabel="FID", title="FID against the number of model calls")
    right.set(xscale="log", xlabel="model calls (NFE)", ylabel="KID (+- 2 std over subsets)",
              title="KID against the number of model calls")
    left.legend(fontsize=8)
    return _save(fig, path)


# ----------------------------------------------------------------------------- h-space


def _to_display(images: torch.Tensor) -> torch.Tensor:
    """(..., C, H, W) in [-1, 1] -> (..., H, W, 3) in [0, 1]; non-RGB: the first channel as grey."""
    images = images.float().clamp(-1, 1).add(1).div(2)
    if images.shape[-3] != 3:
        images = images[..., :1, :, :].expand(*images.shape[:-3], 3, *images.shape[-2:])
    return images.movedim(-3, -1)


def plot_edit_grid(grid: torch.Tensor, path, components, scales) -> Path:
    """Edit grid (R, S, N, C, H, W) in [-1, 1]: rows are principal components (N images each), columns scales."""
    plt = _pyplot()
    rows, columns, n = grid.shape[:3]
    images = _to_display(grid)  # (R, S, N, H, W, 3)
    height, width = images.shape[3:5]
    pad, gap = max(height // 16, 1), max(height // 4, 2)  # between images, and between component blocks
    block = n * (height + pad) + gap
    canvas = torch.ones(rows * block, columns * (width + pad), 3)
    for r in range(rows):
        for i in range(n):
            for c in range(columns):
                top, left = r * block + i * (height + pad), c * (width + pad)
                canvas[top:top + height, left:left + width] = images[r, c, i]
    fig, ax = plt.subplots(figsize=(1.0 + 1.2 * columns, 0.5 + 1.2 * rows * n))
    ax.imshow(canvas.numpy(), interpolation="nearest")
    ax.set_xticks([c * (width + pad) + width / 2 for c in range(columns)], [f"{s:+g} std" for s in scales])
    ax.set_yticks([r * block + n * (height + pad) / 2 for r in range(rows)], [f"PC {k}" for k in components])
    ax.tick_params(length=0)
    ax.set_title("h-space edits (rows: principal components, columns: scale)")
    return _save(fig, path)


def plot_pca_explained(explained: dict, path) -> Path:
    """Explained-variance fraction per component; `explained` maps a label (e.g. "all" or a timestep) to (k,)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, fractions in explained.items():
        ax.plot(range(len(fractions)), fractions, marker="o", label=str(label))
    ax.set(xlabel="principal component", ylabel="fraction of variance", yscale="log",
           title="h-space PCA: explained variance")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_training_curves(curves: dict, path) -> Path:
    """KID (with a +-1 std band) and FID against training minutes and against images seen, one line per run.
    curves: {label: [eval rows of `ldm_lite.training_eval.read_eval_rows`]}; floor: an optional {"kid", "fid"}
    under the key None, drawn as a horizontal line (real data scored at the same n)."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharey="row")
    floor = curves.get(None)
    for label, rows in curves.items():
        if label is None or not rows:
            continue
        for column, x_key in enumerate(("train_minutes", "images_seen")):
            x = [r[x_key] for r in rows]
            kid, std = [r["kid"] for r in rows], [r["kid_std"] for r in rows]
            line, = axes[0, column].plot(x, kid, marker="o", label=label)
            axes[0, column].fill_between(x, [k - s for k, s in zip(kid, std)], [k + s for k, s in zip(kid, std)],
                                         color=line.get_color(), alpha=0.15)
            axes[1, column].plot(x, [r["fid"] for r in rows], marker="o", label=label)
    for row, metric in enumerate(("kid", "fid")):
        for column, x_label in enumerate(("training minutes", "images seen")):
            ax = axes[row, column]
            if floor is not None:  # drawn where the log axis can show it (real data's unbiased KID is ~0 or below)
                drawn = floor[metric] > 0
                if drawn:
                    ax.axhline(floor[metric], color="black", linestyle=":")
                value = f"{floor[metric]:.4f}" if metric == "kid" else f"{floor[metric]:.2f}"
                ax.text(0.98, 0.06, f"real data, same n{' (dotted)' if drawn else ''}: {metric.upper()} {value}",
                        fontsize=8, ha="right", va="bottom", transform=ax.transAxes,
                        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8})
            if column == 1:
                ax.xaxis.set_major_formatter(lambda value, _: f"{value / 1000:g}k")
            ax.set_yscale("log")
            ax.set_xlabel(x_label)
            ax.set_ylabel(metric.upper())
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("sample quality while training (EMA model)")
    return _save(fig, path)
