"""Lesson 2: training a DDPM in three minutes. Run `python docs/lessons/02_training.py [--quick]` from the
repository root, or open it as a notebook (jupytext percent format). Figures go to runs/lessons/02/."""

# %% [markdown]
# # Lesson 2: Training a DDPM in three minutes
#
# Training a diffusion model is regression. Draw an image $x_0$, a timestep $t$ uniformly from $\{0, \dots,
# T-1\}$ and noise $\epsilon \sim \mathcal{N}(0, I)$, build $x_t = \sqrt{\bar\alpha_t} x_0 + \sqrt{1 -
# \bar\alpha_t}\,\epsilon$ (lesson 1) and ask the network to undo it (Ho et al. 2020, arXiv:2006.11239,
# Algorithm 1 and eq. 14):
#
# $$
# L_\text{simple} = \mathbb{E}_{x_0, t, \epsilon} \left\| \epsilon - \epsilon_\theta(x_t, t) \right\|^2 .
# $$
#
# What the network outputs is a choice. Predicting the noise $\epsilon$ (Ho et al.), the clean image $x_0$, or
# the *velocity* $v = \sqrt{\bar\alpha_t}\,\epsilon - \sqrt{1 - \bar\alpha_t}\, x_0$ (Salimans & Ho 2022,
# arXiv:2202.00512, sec. 4) are equivalent at the optimum: each output converts into the others given $x_t$
# (`ldm_lite.predict_x0_and_eps`). They differ in how they *weight* errors. Write $e = \hat x_0 - x_0$ for the
# error of the implied clean image and $\mathrm{SNR} = \bar\alpha_t / (1 - \bar\alpha_t)$; then
#
# $$
# \|\hat\epsilon - \epsilon\|^2 = \mathrm{SNR}(t)\, \|e\|^2, \qquad
# \|\hat v - v\|^2 = (1 + \mathrm{SNR}(t))\, \|e\|^2, \qquad \|\hat x_0 - x_0\|^2 = \|e\|^2 ,
# $$
#
# so the three losses are one $x_0$-loss with weights $\mathrm{SNR}$, $1 + \mathrm{SNR}$ and 1 (Kingma & Gao
# 2023, arXiv:2303.00848, sec. 2 and their Table 1; Hang et al. 2023, arXiv:2303.09556, clip the weight at
# $\gamma$: min-SNR). The same identity, read the other way, says how an error of the *network output* reaches
# the image: an $\epsilon$-model off by $\delta$ moves $\hat x_0$ by $\delta / \sqrt{\mathrm{SNR}}$, 14.6 times
# $\delta$ at $t = 999$ of Stable Diffusion's schedule. That is why $\epsilon$-prediction struggles at high
# noise and why zero-terminal-SNR schedules need $v$ (lesson 4).
#
# This lesson trains tiny UNets (1.1M parameters) on the embedded $16 \times 16$ synthetic images (uniform
# brightness from near-black to near-white, plus stripes and a blob) and measures **which $t$ are hard**.
# The models go into a cache under `runs/lessons/cache`, keyed by a hash of their training config: the
# later lessons reuse them, and nothing retrains unless the config changes.

# %%
import shutil

import matplotlib
import torch

from ldm_lite.data import synthetic_brightness, to_float
from ldm_lite.oracle import brightness_mixture
from ldm_lite.schedulers import DDPMScheduler, from_config, predict_x0_and_eps
from ldm_lite.teaching import Lesson, cached_runs, lesson_config, load_cached, loss_per_bucket, training_log

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

lesson = Lesson(2, "Training a DDPM in three minutes")
check = lesson.check
NAMES = {"eps": "epsilon", "v": "v", "x0": "x0"}
if lesson.quick:  # a bounded run: one eps model, a few dozen steps; the exact denoiser shows the rest
    configs = {"eps": lesson_config("eps", steps=30, batch_size=16, synthetic_size=256, grids=2)}
else:
    configs = {kind: lesson_config(kind) for kind in NAMES}
NUM_HELD_OUT = 64 if lesson.quick else 256
SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)

# %% [markdown]
# ## 1. Train (or fetch from the cache)
#
# `ldm_lite.train` is the library's training loop: AdamW, a short warm-up, an EMA copy of the weights (decay
# 0.995 here; the EMA model is the one we sample), gradient clipping. The loop writes `metrics.jsonl` and,
# a few times during training, a grid of DDIM samples.

# %%
runs = cached_runs(configs)
models = {kind: load_cached(run) for kind, run in runs.items()}
for kind, run in runs.items():
    status = "trained now" if run.trained else "from the cache"
    print(f"{kind:>4}: {configs[kind].train.steps} steps, batch {configs[kind].train.batch_size}, "
          f"{run.seconds:.0f} s of training ({status}) -> {run.run_dir}")
logs = {kind: training_log(run) for kind, run in runs.items()}
fig, ax = plt.subplots(figsize=(6.5, 4))
for kind, log in logs.items():
    ax.semilogy([row["step"] for row in log], [row["loss"] for row in log], marker=".", label=f"{NAMES[kind]} model")
ax.set(xlabel="optimiser step", ylabel="training loss (own target)", title="Training loss")
ax.legend()
lesson.figure(fig, "training_loss.png", "training loss of each model (each in its own target's units)")

# %% [markdown]
# ## 2. Which timesteps are hard: the loss per bucket
#
# Averaging the loss over $t$ hides where it comes from. `metrics.loss_per_bucket` cuts $[0, T)$ into ten
# buckets and measures, on held-out images, the error of each model in all three parametrisations.
#
# First the *floor*. For data we know exactly, a mixture of Gaussians, the best possible denoiser is known in
# closed form (`ldm_lite.oracle`, the posterior mean $\mathbb{E}[x_0 \mid x_t]$), and its loss is the
# irreducible part: what even a perfect network cannot remove. The lessons' mixture has three brightness levels
# (dark, grey, bright) with white texture of std 0.1.

# %%
generator = torch.Generator().manual_seed(0)
scheduler = DDPMScheduler(**SCHEDULE)
oracle = brightness_mixture(scheduler.alphas_cumprod)
oracle_data, _ = oracle.sample_data(NUM_HELD_OUT, generator)
floor = loss_per_bucket(oracle, scheduler, oracle_data, num_buckets=10, generator=generator)
centres = floor["centres"]
fig, ax = plt.subplots(figsize=(6.5, 4))
for key, label in (("eps_mse", "epsilon loss"), ("v_mse", "v loss"), ("x0_mse", "x0 loss")):
    ax.semilogy(centres, floor[key], marker="o", label=label)
ax.set(xlabel="timestep bucket centre", ylabel="MSE per element", title="The exact denoiser's loss (the floor)")
ax.legend()
lesson.figure(fig, "loss_floor.png", "loss per timestep bucket of the exact denoiser of the brightness mixture")
hardest = {key: int(floor[key].argmax()) for key in ("eps_mse", "v_mse", "x0_mse")}
lesson.finding(f"Even the perfect denoiser's epsilon loss is largest in bucket {hardest['eps_mse']} (t around "
               f"{centres[hardest['eps_mse']]:.0f}: {floor['eps_mse'][hardest['eps_mse']]:.3g}) and smallest at "
               f"the noisiest bucket ({floor['eps_mse'][-1]:.3g}), while its x0 loss is largest at t around "
               f"{centres[hardest['x0_mse']]:.0f} ({floor['x0_mse'][hardest['x0_mse']]:.3g}): at low noise the "
               f"noise is hard to tell from texture, at high noise the image is hard to guess.")

# %% [markdown]
# Now the trained models, on held-out synthetic images (drawn with another seed than the training set). Each
# model's own loss is on the left; on the right, every model's error converted to $x_0$, the quantity a sampler
# actually uses.

# %%
held_out = to_float(synthetic_brightness(NUM_HELD_OUT, 16, seed=1).images)
per_bucket = {}
for kind, loaded in models.items():
    model_scheduler = from_config(loaded.scheduler_config)
    per_bucket[kind] = loss_per_bucket(loaded.unet, model_scheduler, held_out, num_buckets=10,
                                       generator=torch.Generator().manual_seed(1))
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
for kind, result in per_bucket.items():
    left.errorbar(centres, result["loss"], yerr=result["loss_stderr"], marker="o", capsize=2,
                  label=f"{NAMES[kind]} model")
    right.semilogy(centres, result["x0_mse"], marker="o", label=f"{NAMES[kind]} model")
left.set(xlabel="timestep bucket centre", ylabel="loss in the model's own target", title="Own loss per bucket")
right.set(xlabel="timestep bucket centre", ylabel="x0 MSE", title="Error of the implied x0")
left.legend()
lesson.figure(fig, "loss_per_bucket.png", "trained models: own loss and implied-x0 error per timestep bucket")
eps_loss = per_bucket["eps"]["loss"]
verdict = ("the low-noise end is the hard one, as for the exact denoiser" if eps_loss[0] > eps_loss[-1]
           else "unlike the exact denoiser, the high-noise end is harder")
lesson.finding(f"The trained epsilon model's loss is {eps_loss[0]:.3g} in the first bucket and {eps_loss[-1]:.3g} "
               f"in the last: {verdict}.")

# %% [markdown]
# ## 3. What each parametrisation learns at high noise
#
# At $t = 999$ the input is almost pure noise, so the best $x_0$ guess is nearly the data mean: a grey image of
# roughly the right brightness, because the DC band still leaks through (lesson 1). An $x_0$-model outputs that
# guess directly. An $\epsilon$-model outputs $\hat\epsilon \approx x_t$, and its $x_0$ is recovered as
# $(x_t - \sqrt{1 - \bar\alpha}\,\hat\epsilon) / \sqrt{\bar\alpha}$: a tiny error in $\hat\epsilon$, divided by
# $\sqrt{\bar\alpha_{999}} = 0.068$, becomes a large one in $\hat x_0$.
#
# The exact denoiser shows this without any training: we add the same small error $\delta$ to its output in
# each parametrisation and measure how far $\hat x_0$ moves. From the conversions, the factor is
# $\sqrt{1 - \bar\alpha}/\sqrt{\bar\alpha}$ for $\epsilon$, $\sqrt{1 - \bar\alpha}$ for $v$ and 1 for $x_0$.

# %%
delta = 0.05 * torch.randn(8, 3, 16, 16, generator=generator, dtype=torch.float64)
amplification = {}
probe_t = [10, 500, 999]
rows = []
for prediction_type in ("epsilon", "v_prediction", "sample"):
    exact = brightness_mixture(scheduler.alphas_cumprod, prediction_type=prediction_type)
    for t in probe_t:
        x0 = oracle_data[:8].double()
        x_t = scheduler.add_noise(x0, torch.randn(x0.shape, generator=generator, dtype=torch.float64),
                                  torch.tensor([t]))
        output = exact(x_t, torch.tensor([t]))
        a, b = float(scheduler.alphas_cumprod[t]) ** 0.5, float(1 - scheduler.alphas_cumprod[t]) ** 0.5
        clean, _ = predict_x0_and_eps(output, x_t, a, b, prediction_type)
        perturbed, _ = predict_x0_and_eps(output + delta, x_t, a, b, prediction_type)
        amplification[prediction_type, t] = ((perturbed - clean).norm() / delta.norm()).item()
        if t == 999:
            rows += [clean[:4], perturbed[:4]]
for t in probe_t:
    print(f"t = {t:>3}: x0 moves by " + ", ".join(f"{amplification[p, t]:.3g} x delta ({p})"
                                                   for p in ("epsilon", "v_prediction", "sample")))
lesson.image_grid(torch.cat(rows).float(), "high_noise_x0.png", "x0 estimates of the exact denoiser at t = 999 "
                  "(rows in pairs: exact, then with an output error of std 0.05) for epsilon, v and x0 outputs",
                  nrow=4)
x_999 = scheduler.add_noise(oracle_data.double(), torch.randn(oracle_data.shape, generator=generator,
                                                             dtype=torch.float64), torch.tensor([999]))
high_noise_x0 = brightness_mixture(scheduler.alphas_cumprod, prediction_type="sample")(x_999, torch.tensor([999]))
true_brightness, guessed_brightness = oracle_data.double().mean(dim=(1, 2, 3)), high_noise_x0.mean(dim=(1, 2, 3))
guess_rmse = (guessed_brightness - true_brightness).pow(2).mean().sqrt().item()
brightness_spread = true_brightness.std().item()
lesson.finding(f"At t = 999 the exact x0 guess gets each image's mean brightness within {guess_rmse:.3f} (RMS), "
               f"where the data's brightness spreads by {brightness_spread:.3f}: the leaked DC band still tells.")
lesson.finding(f"At t = 999 an output error moves x0 by {amplification['epsilon', 999]:.3g} times its size for an "
               f"epsilon model, {amplification['v_prediction', 999]:.3g} for v and 1 for x0; at t = 10 the epsilon "
               f"model damps it to {amplification['epsilon', 10]:.3g}.")

# %% [markdown]
# In the trained models the same arithmetic shows up as the $x_0$ error of the noisiest bucket (right panel
# above). Below: held-out images (row 1), their $x_{999}$ (row 2), and each model's $x_0$ estimate from it.

# %%
shown = held_out[:8]
t_top = torch.full((len(shown),), 999)
noisy = scheduler.add_noise(shown, torch.randn(shown.shape, generator=generator), t_top)
estimates = []
with torch.no_grad():
    for kind, loaded in models.items():
        model_scheduler = from_config(loaded.scheduler_config)
        output = loaded.unet(noisy, t_top, None)
        a, b = float(scheduler.alphas_cumprod[999]) ** 0.5, float(1 - scheduler.alphas_cumprod[999]) ** 0.5
        estimates.append(predict_x0_and_eps(output, noisy, a, b, model_scheduler.prediction_type)[0].clamp(-1, 1))
lesson.image_grid(torch.cat([shown, noisy.clamp(-1, 1), *estimates]), "trained_high_noise_x0.png",
                  "held-out x0, x_999, then the x0 estimate of the " + ", ".join(NAMES[k] for k in models)
                  + " model(s)", nrow=8)

# %% [markdown]
# ## 4. Samples over training
#
# The training loop drew DDIM samples (20 steps, fixed seed) a few times during training: blobs of the right
# brightness come first, stripes and blobs later. The low frequencies are learned first, the coarse-to-fine
# order of lesson 1 again.

# %%
grids = sorted((runs["eps"].run_dir / "samples").glob("step_*.png"))
for grid in grids:
    copy = lesson.path(f"eps_samples_{grid.stem}.png")
    shutil.copyfile(grid, copy)
    lesson.add_figure(copy, f"epsilon model, DDIM samples at training {grid.stem.replace('_', ' ')}")

# %% [markdown]
# ## Checks

# %%
check("the exact denoiser's epsilon loss is largest in the lowest-t bucket and its x0 loss in the highest",
      hardest["eps_mse"] == 0 and hardest["x0_mse"] == len(centres) - 1,
      f"argmax buckets: epsilon {hardest['eps_mse']}, x0 {hardest['x0_mse']} of {len(centres)}")
check("at t = 999 the exact denoiser's x0 guess still knows each image's brightness (the DC leak): its brightness "
      "error is below 0.8 x the spread of the data's brightness", guess_rmse < 0.8 * brightness_spread,
      f"RMS brightness error {guess_rmse:.3f}, data brightness std {brightness_spread:.3f}")
first, last = [row["loss"] for row in logs["eps"][:2]], [row["loss"] for row in logs["eps"][-2:]]
drop = sum(last) / sum(first)
check("training lowers the epsilon model's loss (last two logged values below 70% of the first two)", drop < 0.7,
      f"first {first[0]:.3g}, {first[1]:.3g}; last {last[0]:.3g}, {last[1]:.3g}; ratio {drop:.2f}")
eps_stderr = per_bucket["eps"]["loss_stderr"]
check("the trained epsilon model, like the exact denoiser, finds the lowest-t bucket harder than the highest",
      bool(eps_loss[0] - eps_loss[-1] > 2 * (eps_stderr[0] + eps_stderr[-1])),
      f"bucket 0: {eps_loss[0]:.3g} +- {per_bucket['eps']['loss_stderr'][0]:.2g}, last: {eps_loss[-1]:.3g}")
if not lesson.quick:
    top = {kind: per_bucket[kind]["x0_mse"][-1].item() for kind in per_bucket}
    check("in the noisiest bucket the epsilon model's implied x0 is the worst of the three", top["eps"] > max(
        top["v"], top["x0"]), ", ".join(f"{NAMES[k]} {v:.3g}" for k, v in top.items()))
    data_variance = held_out.var(dim=0).mean().item()
    check("in the noisiest bucket the x0 model beats guessing the data mean (MSE below the data variance)",
          top["x0"] < data_variance, f"x0 MSE {top['x0']:.3g}, data variance {data_variance:.3g}")
check("training taught the epsilon model the high-noise rule (x_t is almost all noise): in each of the five noisiest "
      "buckets its loss is below 0.25, a quarter of what predicting no noise scores", bool((eps_loss[5:] < 0.25).all()),
      "losses " + ", ".join(f"{v:.3f}" for v in eps_loss.tolist()))
lesson.finish()
