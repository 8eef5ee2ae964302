"""Lesson 5: exposure bias. Run `python docs/lessons/05_exposure_bias.py [--quick]` from the repository root, or
open it as a notebook (jupytext percent format). Figures go to runs/lessons/05/."""

# %% [markdown]
# # Lesson 5: Exposure bias
#
# A diffusion model is trained on inputs $x_t = \sqrt{\bar\alpha_t} x_0 + \sqrt{1 - \bar\alpha_t}\,\epsilon$
# built from *real* images, but sampled on its *own* $\hat x_t$, built from its earlier estimates. Whatever it
# got wrong at step $t$ is part of its input at step $t - 1$. This mismatch between training and sampling
# inputs is **exposure bias** (Ning et al. 2023, "Elucidating the Exposure Bias in Diffusion Models",
# arXiv:2308.15321; earlier Ning et al. 2023, arXiv:2301.11706, who fix it in training by perturbing the
# inputs).
#
# Two measurements make it visible (`ldm_lite.exposure.exposure_bias`):
#
# - **$\delta_t$** (Ning et al. sec. 4.2): start from real images $x_0$ noised to the first step and sample; at
#   each $t$, the spread over samples of $\hat x_t - \sqrt{\bar\alpha_t} x_0$ should be $\sqrt{1 -
#   \bar\alpha_t}$, as in training; $\delta_t = (\hat\sigma_t - \sqrt{1 - \bar\alpha_t})^2$ measures how far
#   it is. Even a perfect model drifts away from $x_0$ (it only sees $\sqrt{\bar\alpha_{t_0}}$ of it at the
#   start), so the library also gives a reference: the $\delta_t$ of a sampler that has forgotten $x_0$ entirely.
# - **the $\epsilon$-norm gap** (Ning et al. Fig. 4): the mean per-image norm $\|\epsilon_\theta(\hat x_t, t)\|$
#   along sampling against $\|\epsilon_\theta(x_t, t)\|$ on forward-noised training images. A model that meets
#   noisier-than-training inputs predicts larger noise.
#
# The fix needs no retraining. **Epsilon scaling** (Ning et al. eq. 11, sec. 5) divides the predicted noise by
# $\lambda_t \ge 1$ inside the sampler, $\hat x_0 = (x_t - \sqrt{1 - \bar\alpha_t}\ \epsilon_\theta / \lambda_t) /
# \sqrt{\bar\alpha_t}$, with $\lambda_t = k t + b$ over the step index $t = 0, \dots, N - 1$ where $t = N - 1$ is
# the *noisiest* step (their convention; `ldm_lite.eps_scale_schedule`). They report $b = 1.017$ for ADM on
# CIFAR-10 at 100, 50 and 20 steps. `exposure.scan_eps_scale` picks $b$ by matching the two $\epsilon$-norm
# curves.
#
# Where does the drift come from? Ning et al. (sec. 4) treat the network's prediction error as Gaussian noise on
# its output. We do exactly that with the exact denoiser of lesson 4's mixture: first with no error (there is
# then nothing to be exposed to), then with a Gaussian error of std $\gamma$ added to its $\epsilon$ output at
# every call: a stand-in for a trained network whose errors are known. In full mode the same measurements run on
# the trained epsilon model of the lesson cache.

# %%
import matplotlib
import torch

from ldm_lite import eps_scale_schedule, exposure, plots
from ldm_lite.data import synthetic_brightness, to_float
from ldm_lite.oracle import brightness_mixture
from ldm_lite.schedulers import from_config
from ldm_lite.teaching import Lesson, cached_runs, lesson_config, load_cached

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

lesson = Lesson(5, "Exposure bias")
check = lesson.check
N = 256 if lesson.quick else 128  # images per chain (the exact denoiser is cheap)
STEPS = 50
GAMMA = 0.3
CANDIDATES = [0.98, 0.99, 0.995, 1.0, 1.005, 1.01, 1.02]
config = lesson_config("eps")
scheduler_config = {**config.scheduler_config(), "clip_sample": False}  # clipping would mask the drift (lesson 3)


class NoisyDenoiser(torch.nn.Module):
    """The exact denoiser with Gaussian error of std `gamma` added to every epsilon output (fixed seed)."""

    def __init__(self, exact, gamma):
        super().__init__()
        self.exact, self.gamma, self.config = exact, gamma, exact.config
        self.generator = torch.Generator().manual_seed(7)

    def forward(self, x, timesteps, class_labels=None):
        output = self.exact(x, timesteps, class_labels)
        return output + self.gamma * torch.randn(output.shape, generator=self.generator, dtype=output.dtype)


scheduler = from_config(scheduler_config, "ddim")
exact = brightness_mixture(scheduler.alphas_cumprod)
oracle_data, _ = exact.sample_data(N, torch.Generator().manual_seed(1))
models = {"exact denoiser": (exact, oracle_data),
          f"exact + error {GAMMA:g}": (NoisyDenoiser(exact, GAMMA), oracle_data)}
if not lesson.quick:
    trained = load_cached(cached_runs({"eps": config})["eps"]).unet
    models["trained epsilon model"] = (trained, to_float(synthetic_brightness(N, 16, seed=1).images))

# %% [markdown]
# ## 1. The two curves, with and without model error
#
# DDIM with 50 steps, from real images noised to $t_0 = 981$. The left panels: $\|\epsilon_\theta\|$ along
# sampling and on forward-noised data; the right: $\delta_t$ and its no-memory reference.

# %%
curves, ratios = {}, {}
for name, (model, x0) in models.items():
    curves[name] = exposure.exposure_bias(model, scheduler, x0, num_inference_steps=STEPS, progress=False)
    slug = name.split()[0] if name.startswith("trained") else ("exact" if name == "exact denoiser" else "noisy")
    lesson.add_figure(plots.plot_exposure(curves[name], lesson.path(f"exposure_{slug}.png")),
                      f"eps-norm and delta_t along DDIM sampling: {name}")
    ratios[name] = curves[name]["eps_norm_sampling"] / curves[name]["eps_norm_forward"]
fig, ax = plt.subplots(figsize=(6.5, 4))
for name, ratio in ratios.items():
    ax.plot(curves[name]["timesteps"], ratio, marker=".", label=name)
ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
ax.set(xlabel="timestep t", ylabel="eps-norm ratio sampling / forward", title="The eps-norm gap")
ax.invert_xaxis()
ax.legend(fontsize=8)
lesson.figure(fig, "eps_norm_ratio.png", "eps-norm along sampling divided by the forward eps-norm, per model")
half = STEPS // 2
for name, ratio in ratios.items():
    lesson.finding(f"{name}: eps-norm ratio sampling / forward averages {ratio[:half].mean():.4f} over the first "
                   f"half of the steps and {ratio[half:-1].mean():.4f} over the second (last step "
                   f"{ratio[-1]:.3f}); delta_t at the last step {curves[name]['delta'][-1]:.3g} "
                   f"(no-memory reference {curves[name]['delta_reference'][-1]:.3g}).")

# %% [markdown]
# The last step stands apart in every curve: from $t = 21$ to $t = 1$ the sampler jumps across the noise levels
# where the fine texture is decided, so its $\hat x_1$ carries less texture-like noise than a forward-noised
# $x_1$, and the predicted noise is smaller. That is a property of the coarse final step, not of the model's
# errors; the scan below still counts it, as it is part of the curve.
#
# ## 2. Epsilon scaling and the value the scan picks
#
# `scan_eps_scale` reruns the chain from the same $x_T$ and noises for each candidate $b$ (constant $\lambda$)
# and keeps the one whose $\epsilon$-norm curve is closest to the forward curve (RMS relative gap over all steps,
# the last one included). Dividing $\epsilon_\theta$ by $\lambda > 1$ makes each $\hat x_0$ keep a little more
# of $x_t$, so less noise is removed per step and the later inputs, and with them the predicted noise, come out
# larger; $\lambda < 1$ does the opposite. Which way a model needs depends on the sign of its gap; for large
# image models Ning et al. find $\lambda$ slightly above 1 (1.017 for ADM on CIFAR-10). We also report the
# $\lambda$ that matches the second half of the steps alone (without the last), where a prediction error opens
# the gap.

# %%
late_gaps = {}
scans = {name: exposure.scan_eps_scale(model, scheduler, x0, CANDIDATES, num_inference_steps=STEPS, progress=False)
         for name, (model, x0) in models.items() if name != "exact denoiser"}
for name, scan in scans.items():
    slug = "trained" if name.startswith("trained") else "noisy"
    lesson.add_figure(plots.plot_eps_scale_scan(scan, lesson.path(f"scan_{slug}.png")), f"eps-scale scan: {name}")
    gaps = dict(zip(scan["candidates"], scan["gap"]))
    late_mean = {b: (trace["eps_norm"] / scan["forward"]["eps_norm"])[half:-1].mean().item()
                 for b, trace in zip(scan["candidates"], scan["traces"])}
    print(name, "second-half mean ratio per lambda:", {b: round(v, 4) for b, v in late_mean.items()})
    late = {b: abs(v - 1) for b, v in late_mean.items()}
    late_best = min(late, key=late.get)
    late_gaps[name] = (late, late_best)
    lesson.finding(f"{name}: the scan picks b = {scan['best']:g} (gap {gaps[scan['best']]:.4f} against "
                   f"{gaps[1.0]:.4f} without scaling); matching only the second half of the steps (without the "
                   f"last) would pick b = {late_best:g} (mean deviation {late[late_best]:.4f} against "
                   f"{late[1.0]:.4f}).")

# %% [markdown]
# ## 3. A schedule for lambda, in Ning et al.'s convention
#
# $\lambda_t = k t + b$ with $t$ the step index counted so that $t = N - 1$ is the first, noisiest step: a
# positive $k$ scales the early steps more. `eps_scale_schedule(b, N, slope=k)` returns the values in sampling
# order, so entry 0 is $k (N - 1) + b$ and the last entry is $b$. Below, three slopes around the scan's $b$ for
# the model with simulated error.

# %%
name = f"exact + error {GAMMA:g}"
model, x0 = models[name]
b = scans[name]["best"]
slopes = [-0.0002, 0.0, 0.0002]
schedule_gaps = {}
for k in slopes:
    lambdas = eps_scale_schedule(b, STEPS, slope=k)
    result = exposure.exposure_bias(model, scheduler, x0, num_inference_steps=STEPS, eps_scale=lambdas, progress=False)
    schedule_gaps[k] = exposure.eps_norm_gap(result["eps_norm_sampling"], result["eps_norm_forward"])
    print(f"k = {k:+.4f}: lambda from {lambdas[0]:.4f} (first step) to {lambdas[-1]:.4f} (last); "
          f"gap {schedule_gaps[k]:.4f}")
best_k = min(schedule_gaps, key=schedule_gaps.get)
lesson.finding(f"Around b = {b:g}, the slope k = {best_k:+g} gives the smallest gap ({schedule_gaps[best_k]:.4f}; "
               + ", ".join(f"k {k:+g}: {g:.4f}" for k, g in schedule_gaps.items()) + ").")

# %% [markdown]
# Does the value that matches the second half of the steps generalise? We apply it to fresh images of the same
# data (another seed), with the same simulated error, and measure the late eps-norm deviation with and without it.

# %%
late_b = late_gaps[name][1]
fresh_x0, _ = exact.sample_data(N // 2, torch.Generator().manual_seed(2))
fresh_late = {}
for value in (1.0, late_b):
    run = exposure.exposure_bias(NoisyDenoiser(exact, GAMMA), scheduler, fresh_x0, num_inference_steps=STEPS,
                                eps_scale=value, progress=False)
    fresh_late[value] = abs((run["eps_norm_sampling"] / run["eps_norm_forward"])[half:-1].mean().item() - 1)
lesson.finding(f"On fresh images, b = {late_b:g} takes the late eps-norm deviation of the model with error "
               f"{GAMMA:g} from {fresh_late[1.0]:.4f} to {fresh_late[late_b]:.4f}.")

# %% [markdown]
# ## Checks

# %%
exact_ratio = ratios["exact denoiser"][:-1]
check("without model error there is no exposure bias: the eps-norm along sampling is within 2% of the forward "
      "one at every step but the last", bool((exact_ratio - 1).abs().max() < 0.02),
      f"largest deviation {(exact_ratio - 1).abs().max().item():.4f}")
delta_ratio = curves["exact denoiser"]["delta"] / curves["exact denoiser"]["delta_reference"]
check("the exact denoiser stays below the no-memory delta_t reference at every step", bool((delta_ratio < 1).all()),
      f"largest ratio delta / reference {delta_ratio.max().item():.3g}")
noisy = ratios[name]
opened = noisy[half:-1].mean().item() - exact_ratio[half:].mean().item()
check(f"a prediction error of std {GAMMA:g} opens a gap: the late sampling eps-norm rises above the exact model's",
      opened > 0.005, f"second-half mean ratio {noisy[half:-1].mean():.4f} vs {exact_ratio[half:].mean():.4f}")
for model_name, scan in scans.items():
    means = [(trace["eps_norm"] / scan["forward"]["eps_norm"])[half:-1].mean().item() for trace in scan["traces"]]
    check(f"{model_name}: raising lambda raises the late sampling eps-norm (monotone over the candidates)",
          all(a < b for a, b in zip(means, means[1:])),
          ", ".join(f"{b:g}: {m:.4f}" for b, m in zip(scan["candidates"], means)))
check(f"epsilon scaling with the late-matching b = {late_b:g}, on fresh images, narrows the late eps-norm gap of "
      "the model with simulated error by at least 30%", fresh_late[late_b] < 0.7 * fresh_late[1.0],
      f"mean deviation over the second half {fresh_late[late_b]:.4f} with it, {fresh_late[1.0]:.4f} without")
if not lesson.quick:
    trained_ratio = ratios["trained epsilon model"]
    check("the small trained model shows exposure bias: its late sampling eps-norm exceeds the forward one",
          trained_ratio[half:-1].mean() > 1.005, f"second-half mean ratio {trained_ratio[half:-1].mean():.4f}")
    trained_scan = scans["trained epsilon model"]
    trained_gaps = dict(zip(trained_scan["candidates"], trained_scan["gap"]))
    check("epsilon scaling with the scanned value narrows the trained model's eps-norm gap by at least 30%",
          trained_gaps[trained_scan["best"]] < 0.7 * trained_gaps[1.0],
          f"b = {trained_scan['best']:g}: gap {trained_gaps[trained_scan['best']]:.4f} vs {trained_gaps[1.0]:.4f}")
lesson.finish()
