"""Lesson 6: the h-space. Run `python docs/lessons/06_hspace.py [--quick]` from the repository root, or open it as a
notebook (jupytext percent format). Figures go to runs/lessons/06/."""

# %% [markdown]
# # Lesson 6: The h-space
#
# A UNet squeezes its input through a bottleneck: after the down-sampling path, the *middle block* works on a
# small, wide feature map $h$ (here 64 channels at $4 \times 4$). Kwon et al. 2023 ("Diffusion Models Already
# Have a Semantic Latent Space", arXiv:2210.10960, sec. 3) call the space of these activations **h-space** and
# show that adding a fixed direction $\Delta h$ to $h$ during the early sampling steps changes attributes of the
# image (smile, age, style), consistently across images, while the rest of the sampling runs unchanged.
#
# Haas et al. 2024 ("Discovering Interpretable Directions in h-space of Diffusion Models", arXiv:2310.09912,
# sec. 3) find such directions *without labels*: sample many images, record $h$ at every step, and take the
# principal components of the concatenated $h$ vectors (one vector per image, all timesteps together). A
# direction then holds one slice per timestep, and an edit moves $h$ along it at every step by a number of
# standard deviations:
#
# $$
# h_t \leftarrow h_t + s\, \sigma_k\, d_k^{(t)} ,
# $$
#
# with $d_k$ the $k$-th principal direction and $\sigma_k$ the standard deviation of the projections on it.
# `ldm_lite.hspace` does all of it through the sampler's model callable (`HSpaceProbe`), replaying the same
# $x_T$ and step noise, so two runs differ only by the edit.
#
# The model is lesson 2's epsilon model (full mode, from the cache); quick mode trains a 30-step model of the
# same architecture, enough to have an h-space (its directions mean less). Our data vary mainly in brightness
# and in the orientation of stripes and the place of a blob, so the question is: which of these does each
# principal direction move?

# %%
import torch

from ldm_lite import hspace, plots
from ldm_lite.sampling import initial_noise
from ldm_lite.schedulers import from_config
from ldm_lite.teaching import Lesson, cached_runs, lesson_config, load_cached

lesson = Lesson(6, "The h-space")
check = lesson.check
if lesson.quick:
    config = lesson_config("eps", steps=30, batch_size=16, synthetic_size=256, grids=2)  # lesson 2's quick model
else:
    config = lesson_config("eps")
loaded = load_cached(cached_runs({"eps": config})["eps"])
unet = loaded.unet
N_CAPTURE = 32 if lesson.quick else 96
STEPS = 10 if lesson.quick else 20
SCALES = [-50.0, 0.0, 50.0]  # standard deviations; see section 2 for why so many
COMPONENTS = [0, 1, 2]
scheduler = from_config(loaded.scheduler_config, "ddim")

# %% [markdown]
# ## 1. Record h along sampling and find its principal directions
#
# `capture_h` samples with DDIM and records $h$ at every step: an array (steps, images, 64, 4, 4).
# `pca_all_timesteps` is Haas et al.'s joint PCA.

# %%
captured = hspace.capture_h(unet, scheduler, N_CAPTURE, num_inference_steps=STEPS, progress=False)
h = captured["h"]
print("h:", tuple(h.shape), "(steps, images, channels, height, width)")
directions = hspace.pca_all_timesteps(captured, num_components=5)
per_timestep = hspace.pca_per_timestep(captured, num_components=5)
explained = {"all timesteps": directions.explained}
explained.update({f"t = {t}": p.explained for t, p in list(per_timestep.items())[:: max(1, STEPS // 4)]})
lesson.add_figure(plots.plot_pca_explained(explained, lesson.path("pca_explained.png")),
                  "fraction of the h variance along each principal component (joint PCA and per timestep)")
lesson.finding(f"The first principal direction of h (all {STEPS} steps together) carries "
               f"{directions.explained[0]:.1%} of its variance across {N_CAPTURE} samples, the first five "
               f"{directions.explained.sum():.1%}.")

# %% [markdown]
# ## 2. Move along them
#
# Eight new starting points $x_T$; each row of the grid moves $h$ along one principal component, each column by
# $-50$, $0$ or $+50$ standard deviations, at every step; the middle column ($s = 0$) is the unedited sample.
# Fifty is far more than the few standard deviations Kwon et al. and Haas et al. use on large models, and on
# purpose: this tiny UNet has three resolution levels at $16 \times 16$ and its skip connections carry most of
# the image past the bottleneck, so its output hardly depends on $h$. The numbers below measure how little.

# %%
x_T = initial_noise(scheduler, (8, 3, 16, 16), generator=torch.Generator().manual_seed(5))
grid = hspace.edit_grid(unet, scheduler, directions, COMPONENTS, SCALES, x_T, num_inference_steps=STEPS,
                        progress=False)  # (components, scales, 8, 3, 16, 16)
lesson.add_figure(plots.plot_edit_grid(grid, lesson.path("edit_grid.png"), COMPONENTS, SCALES),
                  "h-space edits: rows principal components 0-2 (8 images each), columns -50, 0, +50 std")
brightness = grid.mean(dim=(3, 4, 5))  # (components, scales, 8): mean brightness of each edited image
change = (brightness[:, -1] - brightness[:, 0]).mean(dim=1)  # last scale minus first, per component
pixel_change = (grid[:, -1] - grid[:, 0]).abs().mean(dim=(1, 2, 3, 4))
for k, component in enumerate(COMPONENTS):
    lesson.finding(f"PC {component}: moving from {SCALES[0]:g} to {SCALES[-1]:+g} std changes the images by "
                   f"{pixel_change[k]:.3f} per pixel (mean absolute) and their mean brightness by {change[k]:+.3f}.")

# %% [markdown]
# Is a principal direction special, or would any push of the same size do as much? Fifty random directions, each
# scaled to the same norm as the $+50\sigma_0$ edit along $d_0$, applied to the first two starting points (all
# fifty in one batch), give the answer.

# %%
NUM_RANDOM = 50
generator = torch.Generator().manual_seed(11)
random_directions = torch.randn(NUM_RANDOM, directions.directions.shape[1], generator=generator, dtype=torch.float64)
random_directions *= SCALES[-1] * directions.std[0] / random_directions.norm(dim=1, keepdim=True)
per_step = random_directions.reshape(NUM_RANDOM, *directions.shape).float()  # (50, steps, C_mid, h, w)
probe_x_T = x_T[:2]
offsets = {t: per_step[:, i].repeat_interleave(len(probe_x_T), dim=0) for i, t in enumerate(directions.timesteps)}
unedited = hspace.sample_with_edit(unet, scheduler, probe_x_T, None, num_inference_steps=STEPS, progress=False)
random_edits = hspace.sample_with_edit(unet, scheduler, probe_x_T.repeat(NUM_RANDOM, 1, 1, 1), hspace.HEdit(offsets),
                                       num_inference_steps=STEPS, batch_size=NUM_RANDOM * len(probe_x_T),
                                       progress=False)
random_changes = (random_edits.reshape(NUM_RANDOM, *probe_x_T.shape) - unedited).abs().mean(dim=(1, 2, 3, 4))
pc0_change = (grid[0, -1, :2] - unedited).abs().mean().item()
beaten = (random_changes < pc0_change).double().mean().item()
h_size = h.flatten(2).norm(dim=2).mean().item()
step_move = SCALES[-1] * directions.std[0].item() / len(directions.timesteps) ** 0.5  # RMS share of one step
lesson.finding(f"An edit of the same size along PC 0 changes the images by {pc0_change:.4f} per pixel, more than "
               f"{beaten:.0%} of {NUM_RANDOM} random directions (their median {random_changes.median():.4f}, largest "
               f"{random_changes.max():.4f}); per step it moves h by {step_move:.3g} (root mean square), where |h| "
               f"is {h_size:.3g}.")

# %% [markdown]
# ## Checks

# %%
flat = h.transpose(0, 1).reshape(N_CAPTURE, -1).double()
centred = flat - flat.mean(dim=0)
projections = centred @ directions.directions.T
std_error = (projections.std(dim=0) / directions.std - 1).abs().max().item()
check("sigma_k is the standard deviation of the projections on direction k (within 1e-6 relative)",
      std_error < 1e-6, f"largest relative difference {std_error:.2g}")
check(f"a move along PC 0 changes the images more than at least 95% of {NUM_RANDOM} random moves of the same norm",
      beaten >= 0.95, f"PC 0: {pc0_change:.4f} per pixel, more than {beaten:.0%} of the random moves (median "
      f"{random_changes.median():.4f})")
lesson.finish()
