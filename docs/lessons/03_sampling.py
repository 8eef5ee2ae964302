"""Lesson 3: sampling, step by step. Run `python docs/lessons/03_sampling.py [--quick]` from the repository root,
or open it as a notebook (jupytext percent format). Figures go to runs/lessons/03/."""

# %% [markdown]
# # Lesson 3: Sampling, step by step
#
# A trained denoiser gives, at any $x_t$, an estimate of the clean image $\hat x_0(x_t, t)$ (and with it the
# noise $\hat\epsilon$). A *sampler* turns these estimates into a path from pure noise $x_T$ to an image. Three
# families, one model:
#
# - **DDPM, ancestral** (Ho et al. 2020, arXiv:2006.11239, eq. 6-7 and Algorithm 2): draw $x_{t'}$ from the
#   Gaussian posterior $q(x_{t'} \mid x_t, \hat x_0)$, with fresh noise at every step;
# - **DDIM** (Song et al. 2021, arXiv:2010.02502, eq. 12): the same marginals with a free amount of noise,
# $$
# x_{t'} = \sqrt{\bar\alpha_{t'}}\, \hat x_0 + \sqrt{1 - \bar\alpha_{t'} - \sigma_t^2}\ \hat\epsilon + \sigma_t z,
# \qquad \sigma_t = \eta \sqrt{\tfrac{1 - \bar\alpha_{t'}}{1 - \bar\alpha_t}}
# \sqrt{1 - \tfrac{\bar\alpha_t}{\bar\alpha_{t'}}},
# $$
#   where $\eta = 1$ is DDPM's posterior (Song et al. sec. 4.1) and $\eta = 0$ a deterministic map: a
#   first-order solver of the probability-flow ODE (their eq. 14);
# - **DPM-Solver++(2M)** (Lu et al. 2022, arXiv:2211.01095, Algorithm 2): a second-order multistep solver of the
#   same ODE in $\lambda = \log(\sqrt{\bar\alpha}/\sqrt{1 - \bar\alpha})$, reusing the previous $\hat x_0$, so
#   it costs one model call per step like DDIM but errs less at few steps.
#
# In quick mode the model is the exact denoiser of a Gaussian mixture (`ldm_lite.oracle`): three brightness
# levels with a little texture, so everything below is about the samplers, not about a model's mistakes. In
# full mode it is the epsilon model trained in lesson 2 (reused from the cache). All samplers use `trailing`
# spacing here, so that every step count starts from the same $t_0 = 999$ and the same $x_T$.

# %%
import math

import matplotlib
import torch

from ldm_lite import metrics
from ldm_lite.data import synthetic_brightness, to_float
from ldm_lite.oracle import GaussianMixtureDenoiser, brightness_mixture
from ldm_lite.sampling import initial_noise, sample
from ldm_lite.schedulers import from_config, predict_x0_and_eps
from ldm_lite.teaching import Lesson, cached_runs, lesson_config, load_cached

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

lesson = Lesson(3, "Sampling, step by step")
check = lesson.check
SAMPLERS = {"DDPM": "ddpm", "DDIM": "ddim", "DPM-Solver++(2M)": "dpmpp_2m"}
N = 64 if lesson.quick else 128
STEP_COUNTS = [5, 10, 20] if lesson.quick else [5, 10, 20, 50]
config = lesson_config("eps")
base = {**config.scheduler_config(), "timestep_spacing": "linspace", "steps_offset": 0}
if lesson.quick:
    alphas_cumprod = from_config(base, "ddim").alphas_cumprod
    model = brightness_mixture(alphas_cumprod)
    data, _ = model.sample_data(512, torch.Generator().manual_seed(1))
    source = "the exact denoiser of the brightness mixture"
else:
    loaded = load_cached(cached_runs({"eps": config})["eps"])
    model = loaded.unet
    data = to_float(synthetic_brightness(512, 16, seed=1).images)
    source = "the epsilon model of lesson 2"
shape = (3, 16, 16)
x_T = initial_noise(from_config(base, "ddim"), (N, *shape), generator=torch.Generator().manual_seed(0))


def run(alias, steps, eta=None, seed=0, record=False, **overrides):
    """Samples (N, C, H, W) from the shared x_T; with record, also x_t and the x0 estimate of image 0 per step."""
    scheduler = from_config(base, alias, **overrides)
    trace = {"x_t": [], "x0": []}

    def keep(info):  # DPM-Solver returns no x0 estimate (as diffusers), so convert the model output here
        alpha_bar = float(scheduler.alphas_cumprod[int(info["timestep"])])
        x0, _ = predict_x0_and_eps(info["model_output"][:1], info["x_t"][:1], alpha_bar ** 0.5,
                                   (1 - alpha_bar) ** 0.5, scheduler.prediction_type)
        trace["x_t"].append(info["x_t"][:1].clone())
        trace["x0"].append(x0)

    options = {"eta": eta} if eta is not None else None
    images = sample(model, scheduler, N, x_T=x_T, num_inference_steps=steps, seed=seed, progress=False,
                    step_options=options, callback=keep if record else None, batch_size=N)
    return (images, trace) if record else images


# %% [markdown]
# ## 1. The x0 estimate along the trajectory
#
# Ten steps of each sampler from the same $x_T$. For each: the current $x_t$ (upper row) and the model's
# estimate $\hat x_0$ at that step (lower row). The estimate starts as a blurry, mean-brightness guess and
# gains detail as the noise level falls: sampling decides coarse structure (brightness, layout) first and
# fine detail last, the reverse of lesson 1's forward process.

# %%
strips, final = [], {}
for name, alias in SAMPLERS.items():
    images, trace = run(alias, 10, record=True)
    final[name] = images
    strips += [torch.cat(trace["x_t"]).clamp(-1, 1), torch.cat(trace["x0"]).clamp(-1, 1)]
    x0_path = torch.cat(trace["x0"])
    moves = (x0_path[1:] - x0_path[:-1]).flatten(1).norm(dim=1)
    final[name + " moves"] = moves
lesson.image_grid(torch.cat(strips), "trajectories.png", "10 steps from one x_T; per sampler (DDPM, DDIM, "
                  "DPM-Solver++): x_t row, then x0-estimate row", nrow=10)
moves = final["DDIM moves"]
early, late = moves[: len(moves) // 2].sum().item(), moves[len(moves) // 2:].sum().item()
lesson.finding(f"With {source}, DDIM's x0 estimate travels {early:.3g} during the first five steps and {late:.3g} "
               f"during the last five: the image is mostly decided early.")

# %% [markdown]
# ## 2. What $\eta$ does
#
# Same $x_T$, DDIM with $\eta \in \{0, 0.5, 1\}$, each run twice with different step noise (seed 0 and seed 1).
# With $\eta = 0$ the two runs are identical: $x_T$ alone decides the image, which is what makes inversion
# (lesson 7) and interpolation possible. With $\eta > 0$ every step injects fresh noise, and the two runs part
# ways. At $\eta = 1$ DDIM's update *is* DDPM's: the same mean and variance, so with the same noise the two
# samplers take identical steps.

# %%
eta_rows, eta_gap = [], {}
for eta in (0.0, 0.5, 1.0):
    first, second = run("ddim", 20, eta=eta, seed=0), run("ddim", 20, eta=eta, seed=1)
    eta_gap[eta] = (first - second).abs().mean().item()
    eta_rows += [first[:8], second[:8]]
lesson.image_grid(torch.cat(eta_rows), "eta.png", "DDIM, 20 steps, from the same x_T: rows in pairs (seed 0, "
                  "seed 1) for eta = 0, 0.5, 1", nrow=8)
ddim_eta1 = run("ddim", 20, eta=1.0, seed=0, clip_sample=False)
ddpm_unclipped = run("ddpm", 20, seed=0, clip_sample=False)
eta1_gap = (ddim_eta1 - ddpm_unclipped).abs().max().item()
lesson.finding("Mean absolute difference between two seeds from the same x_T: "
               + ", ".join(f"eta {eta:g}: {gap:.3g}" for eta, gap in eta_gap.items())
               + f"; DDIM at eta 1 and DDPM (no clipping) differ by at most {eta1_gap:.2g}.")

# %% [markdown]
# ## 3. Solver order, where the answer is known
#
# DDIM ($\eta = 0$) and DPM-Solver++ are both numerical solvers of the probability-flow ODE, so they have an
# *order*: the error at the end should fall like $1/N$ (first order, DDIM) or $1/N^2$ (second order,
# DPM-Solver++(2M)) in the number of steps $N$. To see it we need the exact solution, and for Gaussian data
# $x_0 \sim \mathcal{N}(m, s^2 I)$ we have it. In the variable $x_\sigma = x_t / \sqrt{\bar\alpha_t} = x_0 +
# \sigma n$ with $\sigma_t = \sqrt{(1 - \bar\alpha_t) / \bar\alpha_t}$ (Karras et al. 2022, arXiv:2206.00364,
# eq. 4 without the VP scaling), the ODE moves each sample so that its standardised coordinate stays put:
#
# $$
# x_{\sigma_1} - m = (x_{\sigma_0} - m) \sqrt{\frac{s^2 + \sigma_1^2}{s^2 + \sigma_0^2}} .
# $$
#
# The exact denoiser of that Gaussian (`GaussianMixtureDenoiser` with one component) removes every model error,
# so what remains is the solver's own (float64, no clipping). Two details keep the comparison honest, as in
# the library's solver tests: both solvers stop at $t = 0$ instead of jumping to $\sigma = 0$ (that last jump is a
# first-order $x_0$ estimate in every solver and would hide the order), and the data are wide ($s = 3$, linear
# schedule), so the trajectory bends where a uniform grid in $t$ is fine in $\log$-SNR. We start from the exact
# marginal at $t = 999$.

# %%
order_config = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction_type="epsilon",
                    clip_sample=False, timestep_spacing="trailing", steps_offset=0)
solvers = {"DDIM": ("ddim", dict(set_alpha_to_one=False)),
           "DPM-Solver++(2M)": ("dpmpp_2m", dict(final_sigmas_type="sigma_min", lower_order_final=False))}
alphas_cumprod = from_config(order_config, "ddim").alphas_cumprod.double()
m, s = 0.3, 3.0
gaussian = GaussianMixtureDenoiser(torch.full((1, *shape), m), s, alphas_cumprod=alphas_cumprod)
sigma = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
x_sigma = m + (s ** 2 + sigma[999] ** 2).sqrt() * x_T.double()  # the exact marginal at t = 999
start = x_sigma * alphas_cumprod[999].sqrt()
exact = (m + (x_sigma - m) * ((s ** 2 + sigma[0] ** 2) / (s ** 2 + sigma[999] ** 2)).sqrt()) * alphas_cumprod[0].sqrt()
order_steps = [10, 20, 40]
solver_error = {}
for name, (alias, keywords) in solvers.items():
    for steps in order_steps:
        images = sample(gaussian, from_config(order_config, alias, **keywords), N, x_T=start,
                        num_inference_steps=steps, progress=False, dtype=torch.float64, batch_size=N)
        solver_error[name, steps] = (images - exact).pow(2).mean().sqrt().item()
orders = {name: [math.log2(solver_error[name, a] / solver_error[name, b]) for a, b in zip(order_steps, order_steps[1:])]
          for name in solvers}
fig, ax = plt.subplots(figsize=(6.5, 4))
for name in solvers:
    ax.loglog(order_steps, [solver_error[name, n] for n in order_steps], marker="o",
              label=f"{name} (orders {', '.join(f'{o:.2f}' for o in orders[name])})")
ax.set(xlabel="model calls", ylabel="RMS error against the exact ODE map", title="Solver order on Gaussian data")
ax.legend(fontsize=8)
lesson.figure(fig, "solver_order.png", "error of DDIM and DPM-Solver++(2M) against the closed-form ODE solution")
lesson.finding(f"Against the exact ODE map, each doubling of the steps divides DDIM's error by "
               + ", ".join(f"{2 ** o:.2f}" for o in orders["DDIM"]) + " and DPM-Solver++(2M)'s by "
               + ", ".join(f"{2 ** o:.2f}" for o in orders["DPM-Solver++(2M)"])
               + f"; at 10 calls their errors are {solver_error['DDIM', 10]:.3g} and "
               f"{solver_error['DPM-Solver++(2M)', 10]:.3g}.")

# %% [markdown]
# ## 4. Quality against the number of model calls, on the lesson's data
#
# Back to the lesson's model. Each sampler at 5 to 50 steps (one model call per step for all three), from the
# same $x_T$, scored with this project's bias metrics against the data: the per-image brightness (std ratio
# samples / data, below 1 meaning squeezed toward grey; `metrics.brightness_report`) and the radially
# averaged DCT power spectrum (mean |log10 ratio| over octave bands; `metrics.spectrum_report`). Few steps
# leave the fine bands wrong. The brightness spread is a different matter, set by where sampling starts
# (lesson 4) and by one default worth knowing: pixel-space DDPM and DDIM **clip** their $x_0$ estimate to
# $[-1, 1]$ at every step (`clip_sample`, on for pixel models as in diffusers; DPM-Solver++ has no such option).
# At high noise an epsilon model's $x_0$ estimate is its output error magnified 14.6 times (lesson 2); clipping
# it there cuts away the very brightness the model was guessing, step after step, so a trained epsilon model's
# samples shrink toward grey the more DDIM steps it takes. The row "DDIM, no clip" turns it off. (The exact
# denoiser's estimates stay inside $[-1, 1]$, so in quick mode clipping changes nothing.) The stochastic DDPM
# sampler, which keeps injecting noise, also forgets a wrong start faster than the deterministic ones (Karras
# et al. 2022, arXiv:2206.00364, sec. 4, on stochastic sampling correcting earlier errors).

# %%
rows = []
QUALITY = {**{name: (alias, {}) for name, alias in SAMPLERS.items()}, "DDIM, no clip": ("ddim", {"clip_sample": False})}
for name, (alias, overrides) in QUALITY.items():
    for steps in STEP_COUNTS:
        images = run(alias, steps, **overrides)
        brightness = metrics.brightness_report(images, data)["rows"][-1]
        spectrum = metrics.spectrum_report(images, data)["rows"]
        rows.append(dict(sampler=name, nfe=steps, brightness_std_ratio=brightness["std_ratio"],
                         brightness_w1=brightness["wasserstein"],
                         spectrum_log_error=sum(abs(r["log10_ratio"]) for r in spectrum) / len(spectrum)))
print(metrics.format_table(rows))
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for name in QUALITY:
    mine = [r for r in rows if r["sampler"] == name]
    nfe = [r["nfe"] for r in mine]
    axes[0].semilogx(nfe, [r["brightness_std_ratio"] for r in mine], marker="o", label=name)
    axes[1].semilogx(nfe, [r["spectrum_log_error"] for r in mine], marker="o", label=name)
axes[0].axhline(1.0, color="black", linestyle="--", linewidth=1)
axes[0].set(xlabel="model calls", ylabel="std ratio samples / data", title="Brightness spread")
axes[1].set(xlabel="model calls", ylabel="mean |log10 power ratio|", title="Spectrum error")
for ax in axes:
    ax.legend(fontsize=8)
lesson.figure(fig, "quality_vs_nfe.png", f"bias metrics against model calls ({source}, {N} samples, same x_T)")
table = {(r["sampler"], r["nfe"]): r for r in rows}
spectrum_errors = [table["DDIM, no clip", n]["spectrum_log_error"] for n in STEP_COUNTS]
lesson.finding(f"DDIM's (unclipped) spectrum error falls from {spectrum_errors[0]:.3g} at {STEP_COUNTS[0]} calls to "
               f"{spectrum_errors[-1]:.3g} at {STEP_COUNTS[-1]}; at {STEP_COUNTS[-1]} calls the brightness std "
               f"ratio is {table['DDPM', STEP_COUNTS[-1]]['brightness_std_ratio']:.3f} for DDPM, "
               f"{table['DDIM', STEP_COUNTS[-1]]['brightness_std_ratio']:.3f} for DDIM and "
               f"{table['DDIM, no clip', STEP_COUNTS[-1]]['brightness_std_ratio']:.3f} for DDIM without clipping.")

# %% [markdown]
# ## Checks

# %%
check("DDIM with eta = 1 takes the same steps as DDPM (same noise, no clipping)", eta1_gap < 1e-4,
      f"largest difference {eta1_gap:.2g}")
check("DDIM with eta = 0 is deterministic (two seeds give identical images), with eta = 1 it is not",
      eta_gap[0.0] == 0.0 and eta_gap[1.0] > 0.01, f"mean differences: eta 0 {eta_gap[0.0]:.3g}, eta 1 "
      f"{eta_gap[1.0]:.3g}")
check("the x0 estimate moves more during the first half of the steps than during the second", early > late,
      f"{early:.3g} vs {late:.3g} (DDIM, 10 steps)")
check("DDIM converges at first order (measured orders log2(e_N / e_2N) between 0.8 and 1.2)",
      all(0.8 < o < 1.2 for o in orders["DDIM"]), ", ".join(f"{o:.2f}" for o in orders["DDIM"]))
check("DPM-Solver++(2M) converges at second order (orders above 1.7) and beats DDIM at 10 model calls",
      all(o > 1.7 for o in orders["DPM-Solver++(2M)"])
      and solver_error["DPM-Solver++(2M)", 10] < solver_error["DDIM", 10],
      "orders " + ", ".join(f"{o:.2f}" for o in orders["DPM-Solver++(2M)"]) + f"; at 10 calls "
      f"{solver_error['DPM-Solver++(2M)', 10]:.3g} vs DDIM {solver_error['DDIM', 10]:.3g}")
check("more DDIM steps give a spectrum closer to the data's (unclipped DDIM, fewest vs most steps)",
      spectrum_errors[-1] < spectrum_errors[0], f"{spectrum_errors[0]:.3g} -> {spectrum_errors[-1]:.3g}")
clipped, unclipped = (table[name, STEP_COUNTS[-1]]["brightness_std_ratio"] for name in ("DDIM", "DDIM, no clip"))
if lesson.quick:
    check("with the exact denoiser, clipping the x0 estimate changes nothing (its estimates stay in [-1, 1])",
          abs(clipped - unclipped) < 1e-6, f"std ratio {clipped:.4f} with clipping, {unclipped:.4f} without")
else:
    check(f"clipping x0 at every DDIM step squeezes the epsilon model's brightness ({STEP_COUNTS[-1]} steps)",
          unclipped > clipped + 0.1, f"std ratio {clipped:.3f} with clipping, {unclipped:.3f} without")
lesson.finish()
