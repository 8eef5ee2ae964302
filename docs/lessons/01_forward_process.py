"""Lesson 1: the forward process. Run `python docs/lessons/01_forward_process.py [--quick]` from the repository
root, or open it as a notebook (jupytext percent format). Figures go to runs/lessons/01/."""

# %% [markdown]
# # Lesson 1: The forward process
#
# A diffusion model learns to undo a fixed corruption. The corruption, the *forward process*, mixes an image
# $x_0$ with Gaussian noise in $T = 1000$ small steps of variance $\beta_t$. Because a sum of Gaussians is
# Gaussian, any step can be reached in one jump (Ho et al. 2020, arXiv:2006.11239, eq. 4):
#
# $$
# q(x_t \mid x_0) = \mathcal{N}\big(\sqrt{\bar\alpha_t}\, x_0,\ (1 - \bar\alpha_t) I\big), \qquad
# \bar\alpha_t = \prod_{s \le t} (1 - \beta_s),
# $$
#
# that is $x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\, \epsilon$ with $\epsilon \sim
# \mathcal{N}(0, I)$. Everything about "how noisy is step $t$" is in one number, the signal-to-noise ratio
# (Kingma et al. 2021, arXiv:2107.00630, sec. 2)
#
# $$
# \mathrm{SNR}(t) = \frac{\bar\alpha_t}{1 - \bar\alpha_t}.
# $$
#
# This lesson (1) noises a real picture, (2) compares the schedules people use, (3) looks at the process in
# the frequency domain, where it becomes clear why coarse structure survives longest, and (4) measures how much
# signal is *left* at the first step a sampler takes: the root of the signal-leak bias of lesson 4.
#
# `ldm_lite` computes schedules exactly as diffusers does (`ldm_lite/schedules.py`); the forward jump is
# `scheduler.add_noise(x0, noise, t)`.

# %%
import math

import matplotlib
import torch

from ldm_lite import metrics, plots, spectral
from ldm_lite.schedulers import DDPMScheduler
from ldm_lite.schedules import (format_schedule_table, make_timesteps, named_alphas_cumprod, schedule_table,
                                signal_at_first_step, snr)
from ldm_lite.teaching import Lesson, lesson_images

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

lesson = Lesson(1, "The forward process")
check = lesson.check
NUM_IMAGES = 64 if lesson.quick else 512  # pictures for the band statistics
RESOLUTION = 32
generator = torch.Generator().manual_seed(0)

# %% [markdown]
# ## 1. One picture, noised
#
# We take pictures from CIFAR-10 (or COCO) when `../shared/data` exists beside the repository, else the
# embedded synthetic images, in $[-1, 1]$. The Stable Diffusion schedule (`scaled_linear`, $\beta$ from
# 0.00085 to 0.012, linear in $\sqrt\beta$) noises the first one at a few timesteps. Watch what disappears
# first: the edges and texture go long before the overall layout and colour.

# %%
images, source = lesson_images(NUM_IMAGES, RESOLUTION)
print("data:", source)
scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
shown_t = torch.tensor([0, 50, 100, 250, 400, 600, 800, 999])
picture = images[:1].expand(len(shown_t), -1, -1, -1)
noise = torch.randn(picture.shape, generator=generator)
noised = scheduler.add_noise(picture, noise, shown_t)
lesson.image_grid(noised, "noised_picture.png", f"x_t of one picture at t = {shown_t.tolist()} (scaled_linear)",
                  nrow=len(shown_t))

# %% [markdown]
# A low-pass filter makes the point sharper. Below, the same $x_t$ keep only their lowest DCT frequencies
# (the orthonormal 2-D DCT-II, `ldm_lite.spectral.dct2`, octave bands 0-2, i.e. radial index below 4): at
# $t = 600$ the full image looks like noise, but its blurred version still shows the picture.

# %%
octaves = spectral.octave_bands(RESOLUTION, RESOLUTION)
low_pass = (octaves <= 2).to(noised.dtype)
blurred = spectral.idct2(spectral.dct2(noised) * low_pass)
lesson.image_grid(blurred, "noised_picture_lowpass.png", "the same x_t, low frequencies only (octave bands 0-2)",
                  nrow=len(shown_t))

# %% [markdown]
# ## 2. The schedules
#
# Four schedules are in common use: `linear` (Ho et al., $\beta$ from $10^{-4}$ to 0.02), `scaled_linear`
# (Stable Diffusion), `cosine` (Nichol & Dhariwal 2021, arXiv:2102.09672, eq. 17) and `sigmoid`; plus the
# zero-terminal-SNR rescaling of Lin et al. 2023 (arXiv:2305.08891, Algorithm 1), which shifts and scales
# $\sqrt{\bar\alpha_t}$ so that $\bar\alpha_{T-1} = 0$ exactly.

# %%
schedules = named_alphas_cumprod()
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
for name, alphas_cumprod in schedules.items():
    left.plot(alphas_cumprod.sqrt(), label=name)
    right.semilogy(snr(alphas_cumprod).clamp(min=1e-12), label=name)
left.set(xlabel="timestep t", ylabel=r"$\sqrt{\bar\alpha_t}$ (signal kept)", title="Signal scale")
right.axhline(1.0, color="black", linestyle="--", linewidth=1)
right.set(xlabel="timestep t", ylabel=r"SNR(t) = $\bar\alpha_t / (1 - \bar\alpha_t)$", title="Signal-to-noise ratio")
left.legend(fontsize=8)
lesson.figure(fig, "schedules.png", "sqrt(alpha_bar) and SNR(t) of the named schedules (zero SNR drawn at 1e-12)")

# %% [markdown]
# A sampler with $N$ steps does not visit all $T$ timesteps. Lin et al. (Table 2) list three ways to pick them:
# `leading` (`arange(N) * T // N`, plus Stable Diffusion's offset 1: 981, 961, ..., 1 for $N = 50$),
# `trailing` (999, 979, ..., 19) and `linspace` (999, ..., 0). The first sampled timestep $t_0$ decides
# how much of the image the starting point $x_{t_0}$ would contain during training:
# $\sqrt{\bar\alpha_{t_0}}$, the **signal left at $t_0$**.

# %%
rows = schedule_table(num_inference_steps=50)
print(format_schedule_table(rows))
leak = {(r["schedule"], r["spacing"]): r["signal_at_first_step"] for r in rows}
t0 = {(r["schedule"], r["spacing"]): r["first_timestep"] for r in rows}
worst = max((key for key in leak if key[0] != "scaled_linear_zero_snr"), key=leak.get)
lesson.finding(f"With 50 steps, {worst[0]} with {worst[1]} spacing starts at t0 = {t0[worst]} where x_t0 still "
               f"holds {leak[worst]:.4f} of the image; scaled_linear keeps {leak['scaled_linear', 'leading']:.4f} "
               f"(leading) and {leak['scaled_linear', 'trailing']:.4f} (trailing); zero terminal SNR with trailing "
               f"spacing keeps {leak['scaled_linear_zero_snr', 'trailing']:.2g}.")

# %% [markdown]
# ## 3. The frequency view
#
# Write every image in the orthonormal DCT basis. White noise has power 1 in *every* coefficient (an
# orthonormal transform of white noise is white noise), while natural images put most of their power into the
# lowest frequencies, roughly as $1/f^2$. So band $b$ with mean power $P_b$ per coefficient has its own SNR
# (Rissanen et al. 2023, arXiv:2206.13397; Dieleman 2024, "Diffusion is spectral autoregression"):
#
# $$
# \mathrm{SNR}_b(t) = \frac{\bar\alpha_t\, P_b}{1 - \bar\alpha_t},
# $$
#
# and the band is *destroyed*, buried under noise, once $\mathrm{SNR}_b < 1$, i.e. once
# $\bar\alpha_t < 1 / (1 + P_b)$. The bands with most power, the lowest frequencies, go last: the forward
# process is a coarse-to-fine blur in disguise, and sampling (which runs it backwards) builds images
# coarse-first. The DC coefficient is $\sqrt{HW}$ times the image mean, so the band that survives longest is
# the image's **brightness and colour**.
#
# The same theory predicts how strongly a band of $x_t$ still correlates with the band of $x_0$:
# $\rho_b = \sqrt{S_b / (1 + S_b)}$; `metrics.band_analysis` measures it on our pictures.

# %%
result = metrics.band_analysis(images, bands="octave", num_inference_steps=50, measure_schedule="scaled_linear",
                               generator=generator)
lesson.add_figure(plots.plot_band_snr(result, lesson.path("band_snr.png"), "scaled_linear"),
                  "SNR_b(t) per octave band, scaled_linear (channels pooled)")
lesson.add_figure(plots.plot_destruction(result, lesson.path("band_destruction.png")),
                  "first timestep with SNR_b < 1, per band and schedule")
lesson.add_figure(plots.plot_band_correlation(result, lesson.path("band_correlation.png")),
                  "measured corr(x0, x_t) per band (dots) against sqrt(S / (1 + S)) (lines), scaled_linear")
power = result["power"][-1]  # (B,), channels pooled
destruction = {name: result["destruction"][name, "white"][-1] for name in schedules}
print("band power P_b:", [f"{p:.3g}" for p in power.tolist()])
for name, steps in destruction.items():
    print(f"{name:<24} destruction timestep per band: {steps.tolist()}")
sl = destruction["scaled_linear"]
lesson.finding(f"On {source}, band power falls from {power[0]:.3g} (DC) to {power[-1]:.3g} (finest band); with "
               f"scaled_linear the finest band drowns at t = {int(sl[-1])} and the DC band at t = {int(sl[0])}"
               + (" (never, within T)" if int(sl[0]) >= 1000 else "") + ".")

# %% [markdown]
# ## 4. What "signal left at $t_0$" means for each spacing
#
# At the first sampled step, band $b$ keeps $\mathrm{SNR}_b(t_0)$. During training the model saw $x_{t_0}$ that
# still carried this much of the image's lowest frequencies, and learned to read them. At inference we start
# from pure noise, which carries none: the model then reads an "average" brightness from it, and samples come
# out mid-grey (Lin et al. 2023, sec. 3; Everaert et al. 2024, arXiv:2309.15842). The table lists the DC band
# and the finest band at $t_0$ for each schedule and spacing.

# %%
lesson.add_figure(plots.plot_leak(result, lesson.path("band_leak.png")),
                  "SNR per band left at the first sampled step t0, per spacing (50 steps)")
leak_rows = []
for (name, spacing, noise_kind), entry in result["leak"].items():
    if noise_kind == "white":
        leak_rows.append(dict(schedule=name, spacing=spacing, t0=entry["t0"],
                              dc_snr=float(entry["snr"][-1, 0]), finest_snr=float(entry["snr"][-1, -1])))
print(metrics.format_table(leak_rows))
dc_at_t0 = {(r["schedule"], r["spacing"]): r["dc_snr"] for r in leak_rows}
finest_at_t0 = {(r["schedule"], r["spacing"]): r["finest_snr"] for r in leak_rows}
ratio = dc_at_t0["scaled_linear", "leading"] / finest_at_t0["scaled_linear", "leading"]
lesson.finding(f"At t0 = {t0['scaled_linear', 'leading']} (scaled_linear, leading) the DC band keeps SNR "
               f"{dc_at_t0['scaled_linear', 'leading']:.3g}, {ratio:.3g} times the finest band's: what leaks is "
               f"the brightness and colour.")

# %% [markdown]
# ## 5. Measured, not computed
#
# Everything above came from the formula $\mathrm{SNR}_b(t) = \bar\alpha_t P_b / (1 - \bar\alpha_t)$. The
# forward process itself is `scheduler.add_noise`, the code every training step runs. Here we noise the pictures'
# DC coefficients with it (the DCT is orthonormal, so the DC coefficient of $x_t$ is that of $x_0$ noised with
# one unit Gaussian), measure the SNR from the correlation $r$ of $x_0$ and $x_t$ ($S = r^2 / (1 - r^2)$), and
# find by bisection the first timestep where it falls below 1. We also measure how much the first sampled
# $x_{t_0}$ still correlates with $x_0$ in the DC band: for scaled_linear with leading spacing, and for its
# zero-terminal-SNR rescaling with trailing spacing.

# %%
REPEATS = 1024  # noise draws per picture and timestep
dc = spectral.dct2(images.double())[:, :, :1, :1].repeat(REPEATS, 1, 1, 1)  # (N R, 3, 1, 1): sqrt(HW) x mean


def measured_dc_snr(noiser, t: int) -> float:
    """SNR of the DC band of x_t = noiser.add_noise(x0, eps, t), channels pooled: r^2 / (1 - r^2), with r the
    uncentred correlation of the DC coefficients of x0 and x_t (as `spectral.measure_band_correlation`)."""
    noisy = noiser.add_noise(dc, torch.randn(dc.shape, generator=generator, dtype=torch.float64), torch.tensor([t]))
    r2 = (dc * noisy).sum().item() ** 2 / (dc.pow(2).sum() * noisy.pow(2).sum()).item()
    return r2 / (1 - r2)


def measured_crossing_t(noiser) -> int:
    """The first t with measured DC SNR < 1 (bisection; the SNR falls with t), or 1000 when it never does."""
    if measured_dc_snr(noiser, 999) >= 1:
        return 1000
    above, below = 0, 999
    while below - above > 1:
        middle = (above + below) // 2
        above, below = (above, middle) if measured_dc_snr(noiser, middle) < 1 else (middle, below)
    return below


measured_crossing = measured_crossing_t(scheduler)
predicted_crossing = int(destruction["scaled_linear"][0])
zero_snr_scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   prediction_type="v_prediction", rescale_betas_zero_snr=True)
t0_correlation = {}
for label, noiser, t in (("scaled_linear, leading", scheduler, t0["scaled_linear", "leading"]),
                         ("zero SNR, trailing", zero_snr_scheduler, t0["scaled_linear_zero_snr", "trailing"])):
    value = measured_dc_snr(noiser, t)
    t0_correlation[label] = math.sqrt(max(value, 0.0) / (1 + value))  # |r|
lesson.finding(f"Measured on add_noise, the DC band falls below SNR 1 at t = {measured_crossing} (predicted "
               f"{predicted_crossing}); the DC band of x_t0 correlates with x0 at "
               + ", ".join(f"{v:.3f} ({k})" for k, v in t0_correlation.items()) + ".")

# %% [markdown]
# ## Checks
#
# Each claim above, tested on what this run computed. A failed check makes the script exit non-zero.

# %%
correlation = result["correlation"]
# sampling error of a correlation over n values is about (1 - rho^2) / sqrt(n); n = images x band coefficients
samples = NUM_IMAGES * result["band_counts"].double()  # (B,)
allowed = 4 * (1 - correlation["theory"] ** 2) / samples.sqrt() + 0.01  # (K, C, B)
excess = ((correlation["correlation"] - correlation["theory"]).abs() / allowed).max().item()
error = (correlation["correlation"] - correlation["theory"]).abs().max().item()
check("the measured correlation of x_t and x0 per band follows sqrt(S / (1 + S))", excess < 1,
      f"largest deviation {error:.3f}; largest deviation / (4 standard errors + 0.01) = {excess:.2f} over "
      f"{len(correlation['timesteps'])} timesteps, 3 channels and {len(samples)} bands")
leaky = [name for name in schedules if name != "scaled_linear_zero_snr"]
last = {name: bool((destruction[name][0] >= destruction[name][1:]).all()) for name in leaky}
check("the DC band is the last to fall below SNR 1, for every schedule", all(last.values()),
      "; ".join(f"{n}: DC at {int(destruction[n][0])}, others at most {int(destruction[n][1:].max())}"
                for n in leaky))
gap = {name: int(destruction[name][0] - destruction[name][-1]) for name in leaky}
check("high frequencies go first: the finest band drowns at least 100 timesteps before DC", min(gap.values()) >= 100,
      ", ".join(f"{n}: {g}" for n, g in gap.items()))
sl_981 = signal_at_first_step(schedules["scaled_linear"], make_timesteps(50, 1000, "leading", 1))
check("scaled_linear with 50 leading steps starts at t0 = 981 with sqrt(alpha_bar) = 0.0760 (Stable Diffusion)",
      t0["scaled_linear", "leading"] == 981 and abs(sl_981 - 0.0760) < 5e-4, f"t0 {t0['scaled_linear', 'leading']}, "
      f"{sl_981:.5f}")
check("the DC band's SNR, measured on the pictures noised by add_noise, falls below 1 within 5 timesteps of the "
      "predicted t", abs(measured_crossing - predicted_crossing) <= 5,
      f"measured t = {measured_crossing}, predicted t = {predicted_crossing}")
dc_samples = dc.numel()
check("x_t0 still carries the brightness under scaled_linear / leading (DC correlation above 0.3), and none under "
      "zero terminal SNR / trailing (within 4 standard errors of 0)",
      t0_correlation["scaled_linear, leading"] > 0.3 and t0_correlation["zero SNR, trailing"] < 4 / math.sqrt(
          dc_samples), ", ".join(f"{k}: {v:.3f}" for k, v in t0_correlation.items())
      + f"; 4 standard errors {4 / math.sqrt(dc_samples):.3f}")
check("at t0 of scaled_linear / leading the DC band keeps the most SNR of all bands",
      bool(result["leak"]["scaled_linear", "leading", "white"]["snr"][-1].argmax() == 0),
      f"DC {dc_at_t0['scaled_linear', 'leading']:.3g}, finest {finest_at_t0['scaled_linear', 'leading']:.3g}")
lesson.finish()
