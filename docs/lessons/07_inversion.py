"""Lesson 7: inversion. Run `python docs/lessons/07_inversion.py [--quick]` from the repository root, or open it as a
notebook (jupytext percent format). Figures go to runs/lessons/07/."""

# %% [markdown]
# # Lesson 7: Inversion
#
# Editing a real image with a diffusion model starts by finding the noise that generates it: **inversion**.
# With $\eta = 0$ the DDIM update is an Euler step of an ODE in $\bar x = x / \sqrt{\bar\alpha}$ and $\sigma =
# \sqrt{(1 - \bar\alpha)/\bar\alpha}$ (Song et al. 2021, arXiv:2010.02502, eq. 13-14), and an ODE can be run
# backwards. Sec. 4.3 of the paper does exactly that, from clean to noisy, one listed timestep $s$ to the next
# $t > s$:
#
# $$
# \frac{x_t}{\sqrt{\bar\alpha_t}} = \frac{x_s}{\sqrt{\bar\alpha_s}} + (\sigma_t - \sigma_s)\,
# \epsilon_\theta(x_s, t),
# $$
#
# then samples back with DDIM on the same timesteps (`ldm_lite.inversion.invert`, `reconstruct`).
#
# **Why it is not exact.** The sampling step from $t$ to $s$ uses $\epsilon_\theta(x_t, t)$; the inversion step
# from $s$ to $t$ must use the same value to undo it, but $x_t$ is what it is computing, so it uses
# $\epsilon_\theta(x_s, t)$ instead. The two differ by how much the model's output changes over one step, so the
# round trip errs by $O(\text{step})$: first order, shrinking like $1/N$. When the output does not change along
# the path at all (data that are a single point, where the exact denoiser's $\hat\epsilon$ is the true noise),
# inversion is exact at any $N$.
#
# **The tricks for exact inversion** (text only; none is in the library yet):
#
# - **EDICT** (Wallace et al. 2023, arXiv:2211.12446) keeps two coupled copies $x, y$ of the sample and updates
#   each with the model evaluated on the *other*, followed by a mixing step with weight $p \approx 0.93$: affine
#   coupling layers as in normalising flows, so every step can be inverted exactly in closed form, at twice the
#   model calls.
# - **Null-text inversion** (Mokady et al. 2023, arXiv:2211.09794) keeps DDIM inversion but, under
#   classifier-free guidance, which makes the drift much worse, optimises the unconditional ("null") text
#   embedding at each step so that the guided sampling trajectory lands back on the inversion trajectory.
# - **Edit-friendly DDPM inversion** (Huberman-Spiegelglas et al. 2024, arXiv:2304.06140) gives up the
#   deterministic path: draw every $x_t$ *independently* from $q(x_t \mid x_0)$, then solve each DDPM step for
#   the noise $z_t$ that takes $x_t$ exactly to the drawn $x_{t-1}$. Replaying DDPM with these $z_t$ returns
#   $x_0$ exactly; the $z_t$ are not white Gaussian noise (they carry image structure), which is what makes them
#   good handles for edits.
#
# The last one needs nothing but the DDPM step, so we can run it below with the library's scheduler: its
# `step` takes `variance_noise`, the $z$ of Ho et al.'s Algorithm 2.
#
# Quick mode uses exact denoisers (lesson 4's brightness mixture and single points); full mode adds the
# trained epsilon model on held-out synthetic images and on real pictures it never saw.

# %%
import itertools
import math

import matplotlib
import torch

from ldm_lite.data import synthetic_brightness, to_float
from ldm_lite.inversion import reconstruct
from ldm_lite.oracle import GaussianMixtureDenoiser, brightness_mixture
from ldm_lite.schedulers import from_config
from ldm_lite.teaching import Lesson, cached_runs, lesson_config, lesson_images, load_cached

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

lesson = Lesson(7, "Inversion")
check = lesson.check
STEP_COUNTS = [10, 20, 40] if lesson.quick else [5, 10, 20, 40]
config = lesson_config("eps")
scheduler_config = {**config.scheduler_config(), "clip_sample": False}  # SD's leading spacing, offset 1
shape = (3, 16, 16)
generator = torch.Generator().manual_seed(0)

# %% [markdown]
# ## 1. DDIM inversion with the exact denoiser: error against the number of steps
#
# Eight images from the brightness mixture, inverted to $x_T$ and sampled back, in float64.

# %%
alphas_cumprod = from_config(scheduler_config, "ddim").alphas_cumprod
mixture = brightness_mixture(alphas_cumprod)
x0, _ = mixture.sample_data(8, generator, torch.float64)
errors = {}
for steps in STEP_COUNTS:
    result = reconstruct(mixture, x0, steps, scheduler_config)
    errors[steps] = result.error.mean().item()
    if steps == STEP_COUNTS[0]:
        coarse = result.reconstruction
orders = [math.log2(errors[a] / errors[b]) for a, b in zip(STEP_COUNTS, STEP_COUNTS[1:])]
# the first-order rate shows once the steps are small against the curvature of the path: on Gaussian data
# (one component, std 0.5) at 20, 40, 80 steps; the sharp three-level mixture needs many more steps to get there
gaussian = GaussianMixtureDenoiser(0.5 * torch.randn(1, *shape, generator=generator, dtype=torch.float64), 0.5,
                                   alphas_cumprod=alphas_cumprod)
gaussian_x0, _ = gaussian.sample_data(8, generator, torch.float64)
gaussian_errors = [reconstruct(gaussian, gaussian_x0, n, scheduler_config).error.mean().item() for n in (20, 40, 80)]
gaussian_orders = [math.log2(a / b) for a, b in zip(gaussian_errors, gaussian_errors[1:])]
lesson.image_grid(torch.cat([x0, coarse]).float(), "mixture_round_trip.png",
                  f"brightness-mixture images (row 1) and their DDIM round trip with {STEP_COUNTS[0]} steps (row 2)")
lesson.finding("Mean RMS round-trip error with the exact denoiser: " + ", ".join(f"{errors[n]:.3g} at {n} steps"
                                                                             for n in STEP_COUNTS)
               + "; measured orders " + ", ".join(f"{o:.2f}" for o in orders) + ". On Gaussian data: "
               + ", ".join(f"{e:.3g}" for e in gaussian_errors) + " at 20, 40, 80 steps (orders "
               + ", ".join(f"{o:.2f}" for o in gaussian_orders) + ").")

# %% [markdown]
# ## 2. When the model's output does not move, inversion is exact
#
# Data that are one single image $m$ (a mixture of one component with zero spread): the exact denoiser then
# returns the true noise $(x_t - \sqrt{\bar\alpha_t} m)/\sqrt{1 - \bar\alpha_t}$ whatever $x_t$ is, the same
# value at $x_s$ and at $x_t$, and the round trip has nothing left to get wrong (up to the rounding of the
# schedule's coefficients, which the library keeps in float32 for parity with diffusers).

# %%
point = x0[:1]
single = GaussianMixtureDenoiser(point, 0.0, alphas_cumprod=alphas_cumprod)
point_error = reconstruct(single, point, 20, scheduler_config).error.max().item()
lesson.finding(f"A single-image data set: the DDIM round trip with 20 steps returns x0 within {point_error:.2g}.")

# %% [markdown]
# ## 3. Edit-friendly DDPM inversion, exact by construction
#
# For the DDPM sampler with $N$ steps on timesteps $t_1 > \dots > t_N$: draw $x_{t_i} = \sqrt{\bar\alpha_{t_i}}
# x_0 + \sqrt{1 - \bar\alpha_{t_i}}\, \epsilon_i$ with independent $\epsilon_i$, and for each step solve
# $x_{t_{i+1}} = \mu_\theta(x_{t_i}) + \sigma_i z_i$ for $z_i$ (the mean and $\sigma_i$ are the scheduler's:
# one step with `variance_noise` 0 gives $\mu$, with 1 gives $\mu + \sigma_i$). Then run DDPM from $x_{t_1}$
# with these $z_i$ as `variance_noise`.

# %%
ddpm = from_config(scheduler_config, "ddpm")
ddpm.set_timesteps(20)
timesteps = ddpm.timesteps
noisy = [ddpm.add_noise(x0, torch.randn(x0.shape, generator=generator, dtype=torch.float64), t.reshape(1))
         for t in timesteps] + [x0]
noise_maps = []
for i, t in enumerate(timesteps):
    output = mixture(noisy[i], t)
    mean = ddpm.step(output, t, noisy[i], variance_noise=torch.zeros_like(x0)).prev_sample
    sigma = ddpm.step(output, t, noisy[i], variance_noise=torch.ones_like(x0)).prev_sample - mean
    noise_maps.append((noisy[i + 1] - mean) / sigma)


def ddpm_from(start, maps):
    """DDPM over `timesteps` from x_t1 = start (N, 3, 16, 16) with the given per-step noise maps."""
    x = start
    for t, z in zip(timesteps, maps):
        x = ddpm.step(mixture(x, t), t, x, variance_noise=z).prev_sample
    return x


friendly_error = (ddpm_from(noisy[0], noise_maps) - x0).abs().max().item()
map_std = [z.std().item() for z in noise_maps[:-1]]
lesson.finding(f"Edit-friendly DDPM inversion (20 steps) returns x0 within {friendly_error:.2g} (by construction); "
               f"its noise maps have std from {min(map_std):.3g} to {max(map_std):.3g} over the steps (white noise: "
               "1).")

# %% [markdown]
# What makes the maps useful for editing is what they carry. Start DDPM from *another* $x_{t_1}$ (fresh noise) and
# drive it with the maps: the brightness, decided early from $x_{t_1}$, follows the new start, but the texture
# (each image minus its per-channel mean) is the original's. White noise in their place gives an unrelated one.

# %%
other_start = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
white = [torch.randn(x0.shape, generator=generator, dtype=torch.float64) for _ in timesteps]


def texture(images):
    return images - images.mean(dim=(2, 3), keepdim=True)


texture_error = {name: (texture(ddpm_from(other_start, maps)) - texture(x0)).pow(2).mean().sqrt().item()
                 for name, maps in (("edit-friendly maps", noise_maps), ("white noise", white))}
lesson.finding("From another starting point, the texture's RMS error to x0 is " + ", ".join(
    f"{v:.3g} with {k}" for k, v in texture_error.items()) + ".")

# %% [markdown]
# ## 4. A trained model, on its own data and on real pictures (full mode)
#
# A trained network is smooth on the data it learned and less so elsewhere. The round trip with lesson 2's
# epsilon model, on held-out synthetic images and on real pictures (CIFAR-10 or COCO when `../shared/data`
# exists) at $16 \times 16$, twice: with the model's sampling settings, which clip $\hat x_0$ to $[-1, 1]$ at
# every step in both directions (pixel models do so by default, lesson 3), and without clipping. Clipping is not
# invertible: at high noise an epsilon model's $\hat x_0$ lies far outside $[-1, 1]$ (lesson 2), the inverse
# step clips it one way and the sampling step cannot know what was cut.

# %%
if not lesson.quick:
    loaded = load_cached(cached_runs({"eps": config})["eps"])
    pictures, source = lesson_images(8, 16)
    sets = {"held-out synthetic": to_float(synthetic_brightness(8, 16, seed=1).images), source: pictures}
    settings = {"clipped": loaded.scheduler_config, "unclipped": {**loaded.scheduler_config, "clip_sample": False}}
    trained_errors = {}
    for (name, images), (setting, model_config) in itertools.product(sets.items(), settings.items()):
        values = trained_errors[name, setting] = {}
        for steps in STEP_COUNTS:
            result = reconstruct(loaded.unet, images, steps, model_config)
            values[steps] = result.error.mean().item()
        if setting == "unclipped":
            lesson.image_grid(torch.cat([images, result.x_T.clamp(-1, 1), result.reconstruction.clamp(-1, 1)]),
                              f"trained_round_trip_{list(sets).index(name)}.png",
                              f"{name}: x0, its DDIM inversion x_T and the reconstruction ({STEP_COUNTS[-1]} steps, "
                              "no clipping)")
        lesson.finding(f"Trained model, {name}, {setting}: mean RMS round-trip error " + ", ".join(
            f"{values[n]:.3g} at {n} steps" for n in STEP_COUNTS) + ".")
fig, ax = plt.subplots(figsize=(6.5, 4))
ax.loglog(STEP_COUNTS, [errors[n] for n in STEP_COUNTS], marker="o", label="exact denoiser, mixture")
if not lesson.quick:
    for (name, setting), values in trained_errors.items():
        ax.loglog(STEP_COUNTS, [values[n] for n in STEP_COUNTS], marker="o", label=f"trained, {name}, {setting}")
ax.set(xlabel="DDIM steps (each way)", ylabel="mean RMS round-trip error", title="DDIM inversion error")
ax.legend(fontsize=8)
lesson.figure(fig, "inversion_error.png", "round-trip error against the number of steps")

# %% [markdown]
# ## Checks

# %%
check("the DDIM round trip improves with every doubling of the steps (exact denoiser)",
      all(errors[a] > errors[b] for a, b in zip(STEP_COUNTS, STEP_COUNTS[1:])),
      ", ".join(f"{n}: {errors[n]:.3g}" for n in STEP_COUNTS))
check("on Gaussian data the round-trip error shrinks at first order (orders at 20, 40, 80 steps within 0.8-1.25)",
      all(0.8 < o < 1.25 for o in gaussian_orders), ", ".join(f"{o:.2f}" for o in gaussian_orders))
check("DDIM with 20 steps and the exact denoiser of a single image recovers x0 within 1e-6 (float32 schedule)",
      point_error < 1e-6, f"{point_error:.2g}")
check("the edit-friendly noise maps carry x0's detail: from another starting point they reproduce its texture "
      "(RMS error below 0.1 x that of white noise)",
      texture_error["edit-friendly maps"] < 0.1 * texture_error["white noise"],
      ", ".join(f"{k}: {v:.3g}" for k, v in texture_error.items()))
check("its noise maps are not white noise: their std differs from 1 by more than 0.2 at every step but the last",
      all(abs(v - 1) > 0.2 for v in map_std), f"std {min(map_std):.3g} .. {max(map_std):.3g}")
if not lesson.quick:
    held_out = trained_errors["held-out synthetic", "unclipped"]
    check("without clipping, the trained model's round trip on its own kind of data improves with every doubling",
          all(held_out[a] > held_out[b] for a, b in zip(STEP_COUNTS, STEP_COUNTS[1:])),
          ", ".join(f"{n}: {held_out[n]:.3g}" for n in STEP_COUNTS))
    clipped = trained_errors["held-out synthetic", "clipped"][STEP_COUNTS[-1]]
    check(f"clipping x0 breaks the round trip: at {STEP_COUNTS[-1]} steps its error is over 3 times the unclipped one",
          clipped > 3 * held_out[STEP_COUNTS[-1]], f"{clipped:.3g} vs {held_out[STEP_COUNTS[-1]]:.3g}")
lesson.finish()
