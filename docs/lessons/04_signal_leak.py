"""Lesson 4: the signal leak. Run `python docs/lessons/04_signal_leak.py [--quick]` from the repository root, or
open it as a notebook (jupytext percent format). Figures go to runs/lessons/04/."""

# %% [markdown]
# # Lesson 4: The signal leak
#
# Lesson 1 ended on a number: with Stable Diffusion's schedule and 50 leading steps, sampling starts at
# $t_0 = 981$, where training inputs $x_{t_0} = \sqrt{\bar\alpha_{t_0}}\, x_0 + \sqrt{1 - \bar\alpha_{t_0}}\,
# \epsilon$ still hold $\sqrt{\bar\alpha_{981}} = 0.076$ of the image, mostly its lowest frequencies. The
# model learns to read the image's brightness and colour from them. At inference we start from pure noise, whose
# low frequencies are noise only: the model reads "average", and samples come out **grey**, their brightness
# squeezed toward the middle (Lin et al. 2023, arXiv:2305.08891, sec. 3; Everaert et al. 2024,
# arXiv:2309.15842, sec. 3; Guttenberg 2023, "Diffusion with offset noise").
#
# In DCT terms (lesson 1): the DC coefficient of a training $x_{t_0}$ has variance
# $\bar\alpha_{t_0} P_\text{DC} + (1 - \bar\alpha_{t_0})$, but that of pure noise has variance 1. The starting
# point is drawn from the wrong distribution, and the deterministic sampler carries the error to the end.
#
# Three fixes, each attacking a different term:
#
# 1. **Offset noise** (Guttenberg 2023): train with $\epsilon + s\, \xi$, $\xi \sim \mathcal{N}(0, I_C)$ one
#    value per channel and image, $s = 0.1$. The DC coefficient's noise power becomes $1 + s^2 H W$, so the
#    leak's SNR in DC drops by that factor, and the model learns to move an image's mean. It must then be
#    sampled with the same noise.
# 2. **Zero terminal SNR** (Lin et al. 2023, Algorithm 1 and sec. 3.2-3.3): rescale the schedule so that
#    $\bar\alpha_{T-1} = 0$, train with $v$-prediction (at SNR 0 the noise is the input itself and an
#    $\epsilon$-model's $\hat x_0 = (x_t - \hat\epsilon)/0$ is undefined) and sample with trailing spacing, so
#    $t_0 = 999$: pure noise is then exactly the training distribution at $t_0$.
# 3. **A leak-aware $x_T$** (Everaert et al. 2024, eq. 2): keep the model, fix the start: $x_T =
#    \sqrt{\bar\alpha_{t_0}}\, \ell + \sqrt{1 - \bar\alpha_{t_0}}\, \epsilon$ with a leak $\ell$ drawn from a
#    Gaussian model of real images' low frequencies (`LeakStats`, "dct+pixel": a full-covariance Gaussian of
#    the lowest DCT coefficients plus a per-pixel remainder). Because the leak is explicit, it can also be
#    *set*: choosing the DC coefficient steers the mean colour of the samples.
#
# Quick mode uses the exact denoiser of a mixture of dark, grey and bright images (no model error at all: the
# squeeze comes from the start alone); full mode uses the trained models of the lesson cache (standard, offset
# noise, zero SNR). Brightness is compared with `metrics.brightness_report`: the std ratio samples / data of
# the per-image mean, 1 when the spread is right. Every model is sampled as `python -m sample` would: DDIM, 50
# steps, the model's own spacing and, for these pixel models, $\hat x_0$ clipped to $[-1, 1]$ at every step.
# Lesson 3 showed that clipping makes things worse for an epsilon model: at high noise its $\hat x_0$ is a
# brightness guess magnified by $1/\sqrt{\bar\alpha}$ and clipping cuts it back toward grey. The two effects
# add up: the leak gives the model nothing to read at $t_0$, clipping throws away what it guesses anyway. (The
# exact denoiser of quick mode never leaves $[-1, 1]$, so there the leak acts alone.)

# %%
import math

import matplotlib
import torch

from ldm_lite import metrics, spectral
from ldm_lite.data import synthetic_brightness, to_float
from ldm_lite.leak import LeakStats
from ldm_lite.noise import training_noise
from ldm_lite.oracle import brightness_mixture
from ldm_lite.sampling import sample
from ldm_lite.schedulers import from_config
from ldm_lite.teaching import Lesson, cached_runs, lesson_config, load_cached

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

lesson = Lesson(4, "The signal leak")
check = lesson.check
N = 512 if lesson.quick else 96  # the exact denoiser is cheap: many samples, small error bars
STEPS = 50
shape = (3, 16, 16)
configs = {kind: lesson_config(kind) for kind in ("eps", "offset", "zero_snr")}
schedulers = {kind: from_config(config) for kind, config in configs.items()}  # each model's own sampling config
if lesson.quick:
    models = {kind: brightness_mixture(schedulers[kind].alphas_cumprod,
                                       prediction_type=configs[kind].diffusion.prediction_type)
              for kind in ("eps", "zero_snr")}
    data, _ = models["eps"].sample_data(4096, torch.Generator().manual_seed(1))
    source = "the exact denoiser of the brightness mixture"
else:
    runs = cached_runs(configs)
    models = {kind: load_cached(run).unet for kind, run in runs.items()}
    data = to_float(synthetic_brightness(1024, 16, seed=0).images)  # the training images
    source = "the trained models of the lesson cache"


def draw(kind, x_T=None, leak=None, seed=0):
    """N samples of model `kind` with DDIM, 50 steps, from x_T or from initial_noise (with an optional leak)."""
    return sample(models[kind], schedulers[kind], N, x_T=x_T, leak=leak, num_inference_steps=STEPS, seed=seed,
                  progress=False, batch_size=N)


def spread(images):
    """Luminance std ratio samples / data and the samples' mean luminance."""
    row = metrics.brightness_report(images, data)["rows"][-1]
    return row["std_ratio"], row["samples_mean"]


results, grids = {}, []

# %% [markdown]
# ## 1. Grey samples: the bias
#
# The standard model (leaky `scaled_linear`, 50 leading steps from $t_0 = 981$), sampled twice: from pure
# noise, and from the *true* distribution at $t_0$, real images noised by the forward process. Only the start
# differs.

# %%
scheduler = schedulers["eps"]
scheduler.set_timesteps(STEPS)
t0 = int(scheduler.timesteps[0])
pure = draw("eps")
noise = torch.randn((N, *shape), generator=torch.Generator().manual_seed(2))
marginal = draw("eps", x_T=scheduler.add_noise(data[:N], noise, scheduler.timesteps[:1]))
results["pure noise"], results["true x_t0"] = spread(pure), spread(marginal)
grids += [pure[:12], marginal[:12]]
dc_power = spectral.band_power(data, spectral.octave_bands(16, 16))[:, 0].mean().item()
alpha_bar = float(scheduler.alphas_cumprod[t0])
lesson.finding(f"With {source}, starting at t0 = {t0} from pure noise gives a brightness std ratio of "
               f"{results['pure noise'][0]:.3f}; starting from real images noised to t0 gives "
               f"{results['true x_t0'][0]:.3f}. In training, the DC coefficient of x_t0 had variance "
               f"{alpha_bar * dc_power + 1 - alpha_bar:.3f} (data DC power {dc_power:.1f}); pure noise has 1.")

# %% [markdown]
# ## 2. Fix one: offset noise
#
# Offset noise adds $s^2 H W$ to the noise power of the DC coefficient (`spectral.band_noise_power`); we
# measure it on the library's training noise. A model trained with it must also be *sampled* with it: drawn
# from plain noise, its $x_T$ has too little DC variance again, now relative to the offset noise it was trained
# on.

# %%
offset = configs["offset"].noise.strength("offset_noise_strength")
draws = training_noise((4096, *shape), torch.Generator().manual_seed(3), offset_strength=offset)
measured_dc = spectral.dct2(draws.double())[:, :, 0, 0].pow(2).mean().item()
theory_dc = float(spectral.band_noise_power(spectral.octave_bands(16, 16), offset)[0])
snr_factor = theory_dc / float(spectral.band_noise_power(spectral.octave_bands(16, 16), 0.0)[0])
lesson.finding(f"Offset noise of strength {offset} gives the DC coefficient a noise power of {measured_dc:.3f} "
               f"(theory 1 + s^2 H W = {theory_dc:.3f}): the leak's SNR in DC falls {snr_factor:.2f}-fold.")
if not lesson.quick:
    own_noise = training_noise((N, *shape), torch.Generator().manual_seed(4), offset_strength=offset)
    offset_own = draw("offset", x_T=own_noise)
    offset_plain = draw("offset")
    results["offset, own noise"], results["offset, plain noise"] = spread(offset_own), spread(offset_plain)
    grids += [offset_own[:12]]

# %% [markdown]
# ## 3. Fix two: zero terminal SNR, $v$-prediction, trailing spacing
#
# With $\bar\alpha_{999} = 0$ and $t_0 = 999$, pure noise is the exact training distribution at $t_0$.

# %%
zero_snr = draw("zero_snr")
results["zero SNR"] = spread(zero_snr)
grids += [zero_snr[:12]]
schedulers["zero_snr"].set_timesteps(STEPS)
zero_t0 = int(schedulers["zero_snr"].timesteps[0])
lesson.finding(f"Zero terminal SNR starts at t0 = {zero_t0} with alpha_bar = "
               f"{float(schedulers['zero_snr'].alphas_cumprod[zero_t0]):.3g}; its samples reach a brightness std "
               f"ratio of {results['zero SNR'][0]:.3f} against {results['pure noise'][0]:.3f} for the leaky model.")

# %% [markdown]
# ## 4. Fix three: a leak-aware $x_T$
#
# `LeakStats.fit` models the data's leak; `initial_noise` draws $x_T$ with it. The per-pixel model ("pixel")
# cannot do the job: each pixel's mean and variance across images say nothing about a brightness shared by all
# pixels of *one* image, so its DC variance is only the mean pixel variance. The "dct+pixel" model carries
# the low frequencies with their full covariance, the brightness among them.

# %%
stats = {kind: LeakStats.fit(data, kind=kind, n_components=3) for kind in ("pixel", "dct+pixel")}
leaky = {kind: draw("eps", leak=s) for kind, s in stats.items()}
results["leak, pixel"], results["leak, dct+pixel"] = spread(leaky["pixel"]), spread(leaky["dct+pixel"])
grids += [leaky["dct+pixel"][:12]]

# %% [markdown]
# ## 5. Steering the mean colour with the DC term
#
# The DC coefficient of channel $c$ is $\sqrt{HW}$ times its mean (`LeakStats.with_channel_mean` sets it), and
# the model reads it at $t_0$ as the image's mean. Setting every channel to $-0.6$ or $+0.6$ asks for dark or
# bright images; setting red up and blue down asks for a warm tint.

# %%
targets = (-0.6, 0.0, 0.6)
steered = {}
for value in targets:
    steer = stats["dct+pixel"]
    for channel in range(3):
        steer = steer.with_channel_mean(channel, value)
    steered[value] = draw("eps", leak=steer)
    grids += [steered[value][:12]]
steered_mean = {value: images.mean().item() for value, images in steered.items()}
warm = stats["dct+pixel"].with_channel_mean(0, 0.5).with_channel_mean(2, -0.5)
warm_images = draw("eps", leak=warm)
warm_tint = (warm_images[:, 0].mean() - warm_images[:, 2].mean()).item()
plain_tint = (pure[:, 0].mean() - pure[:, 2].mean()).item()
grids += [warm_images[:12]]
lesson.finding("Asking the leak for mean " + ", ".join(f"{v:+.1f}" for v in targets) + " gives samples of mean "
               + ", ".join(f"{steered_mean[v]:+.3f}" for v in targets)
               + f"; red +0.5 / blue -0.5 gives a red-minus-blue of {warm_tint:+.3f} (plain noise: {plain_tint:+.3f}).")

# %% [markdown]
# ## Side by side
#
# Rows: pure noise, true $x_{t_0}$, (full mode: offset noise with its own noise), zero SNR, leak-aware $x_T$,
# steered to $-0.6$, $0$, $+0.6$, warm tint. Then the brightness distributions against the data.

# %%
rows = ["pure noise", "true x_t0"] + (["offset, own noise"] if not lesson.quick else []) + [
    "zero SNR", "leak, dct+pixel", "steer -0.6", "steer 0", "steer +0.6", "warm"]
lesson.image_grid(torch.cat(grids), "side_by_side.png", "rows: " + ", ".join(rows), nrow=12)
fig, ax = plt.subplots(figsize=(7, 4))
luminance = metrics.image_brightness(data)["luminance"]
ax.hist(luminance.numpy(), bins=30, density=True, alpha=0.3, color="black", label="data")
for name, images in [("pure noise", pure), ("zero SNR", zero_snr), ("leak, dct+pixel", leaky["dct+pixel"])] + (
        [("offset, own noise", offset_own)] if not lesson.quick else []):
    values = metrics.image_brightness(images)["luminance"].numpy()
    ax.hist(values, bins=30, density=True, histtype="step", linewidth=1.5, label=f"{name} ({spread(images)[0]:.2f})")
ax.set(xlabel="per-image mean luminance", ylabel="density", title="Brightness of samples (std ratio in brackets)")
ax.legend(fontsize=8)
lesson.figure(fig, "brightness.png", f"per-image brightness of samples and data ({source})")
table = [dict(start=name, std_ratio=ratio, mean=mean) for name, (ratio, mean) in results.items()]
print(metrics.format_table(table))

# %% [markdown]
# ## Checks

# %%
ratio = {name: value[0] for name, value in results.items()}
stderr = math.sqrt(1 / (2 * N))  # relative standard error of a std from N Gaussian values (the 3-level data: less)
check("from pure noise the leaky model squeezes the brightness spread (std ratio below 0.92)",
      ratio["pure noise"] < 0.92, f"{ratio['pure noise']:.3f}")
check("started from the true distribution at t0 the same model keeps a wider spread than from pure noise",
      ratio["true x_t0"] > ratio["pure noise"] + 2 * stderr * ratio["pure noise"],
      f"{ratio['true x_t0']:.3f} vs {ratio['pure noise']:.3f}")
check("offset noise multiplies the DC noise power by 1 + s^2 H W (measured within 5%)",
      abs(measured_dc / theory_dc - 1) < 0.05, f"{measured_dc:.3f} vs {theory_dc:.3f}")
check("zero terminal SNR with v-prediction and trailing spacing widens the brightness spread",
      ratio["zero SNR"] > ratio["pure noise"] + 2 * stderr * ratio["pure noise"],
      f"{ratio['zero SNR']:.3f} vs {ratio['pure noise']:.3f}")
check("the leak-aware x_T (dct+pixel) widens the brightness spread, and more than the per-pixel leak",
      ratio["leak, dct+pixel"] > ratio["pure noise"] + 2 * stderr * ratio["pure noise"]
      and ratio["leak, dct+pixel"] > ratio["leak, pixel"],
      f"dct+pixel {ratio['leak, dct+pixel']:.3f}, pixel {ratio['leak, pixel']:.3f}, none {ratio['pure noise']:.3f}")
check("setting the leak's DC steers the mean brightness (ordered; -0.6 and +0.6 move it by more than 0.2)",
      steered_mean[-0.6] < steered_mean[0.0] - 0.2 and steered_mean[0.6] > steered_mean[0.0] + 0.2,
      ", ".join(f"{v:+.1f}: {steered_mean[v]:+.3f}" for v in targets))
if lesson.quick:
    check("with the exact denoiser, zero terminal SNR restores the data's spread (std ratio within 0.1 of 1)",
          abs(ratio["zero SNR"] - 1) < 0.1, f"{ratio['zero SNR']:.3f}")
else:
    check("the offset-noise model, sampled with its own noise, spreads brightness wider than the standard model",
          ratio["offset, own noise"] > ratio["pure noise"], f"{ratio['offset, own noise']:.3f} vs "
          f"{ratio['pure noise']:.3f} (offset model from plain noise: {ratio['offset, plain noise']:.3f})")
    check("a warm leak (red up, blue down) tints the samples warm", warm_tint > plain_tint + 0.05,
          f"red minus blue {warm_tint:+.3f}, plain {plain_tint:+.3f}")
lesson.finish()
