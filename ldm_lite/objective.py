"""The training objective: what one step draws (images, labels, timesteps, noise) and the loss it minimises.

One step (Ho et al. 2020, arXiv:2006.11239, Algorithm 1, with the configured bias fixes):
    x0 ~ data, t ~ U{0..T-1} (or a log-normal density), eps ~ noise(config.noise)   (`ldm_lite.noise`)
    x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) (eps + gamma xi)     (input perturbation: gamma > 0 only in x_t)
    loss = mean_b w(t_b) |model(x_t, t, y) - target|^2       (target eps, v or x0; w = min-SNR weight or 1)

Determinism: every step draws its randomness for the *global* batch from a generator seeded by (seed, step), and
each of the world_size processes keeps its slice. So a run resumed from a checkpoint replays the same batches,
and 1 process with batch B matches torchrun with 2 x B/2.
"""
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ldm_lite.config import Config
from ldm_lite.data import InMemoryImages, to_float
from ldm_lite.distributed import World
from ldm_lite.noise import min_snr_weights, perturb_noise, training_noise
from ldm_lite.schedules import snr


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A distinct 63-bit seed for (seed, step, stream); streams separate the batch draws from dropout."""
    return (seed * 1_000_003 + step * 4 + stream) % (2 ** 63)


def timestep_probabilities(config: Config, alphas_cumprod: torch.Tensor) -> torch.Tensor | None:
    """Training-timestep distribution (T,) float64, or None for uniform t.

    lognormal: EDM's density of the noise level, ln sigma ~ N(P_mean, P_std^2) (Karras et al. 2022,
    arXiv:2206.00364, sec. 5 and Table 1), on the discrete VP schedule's sigma_t = sqrt((1 - ab_t) / ab_t): t gets the
    probability of the ln sigma interval it stands for, between the midpoints to its neighbours (the tails go to
    t = 0 and t = T - 1). With epsilon prediction this re-weights the objective toward the middle noise levels.
    """
    lognormal = config.diffusion.lognormal
    if lognormal is None:
        return None
    mean, std = lognormal
    ab = alphas_cumprod.double().clamp(1e-20, 1.0)
    log_sigma = 0.5 * (torch.log1p(-ab.clamp(max=1 - 1e-16)) - torch.log(ab))   # increasing in t
    edges = torch.cat([torch.tensor([-math.inf], dtype=torch.float64), (log_sigma[1:] + log_sigma[:-1]) / 2,
                       torch.tensor([math.inf], dtype=torch.float64)])
    cdf = torch.special.ndtr((edges - mean) / std)
    return (cdf[1:] - cdf[:-1]).clamp(min=0)


def loss_weights(config: Config, alphas_cumprod: torch.Tensor) -> torch.Tensor | None:
    """Per-timestep min-SNR-gamma weights (T,) float32, or None when min_snr is off."""
    d = config.diffusion
    if not d.min_snr:
        return None
    return min_snr_weights(snr(alphas_cumprod.double()), d.snr_gamma, d.prediction_type).float()


# ----------------------------------------------------------------------------- one step's batch and loss

@dataclass
class Batch:
    """One process's share of a step: x0 (b, C, H, W) float, labels (b,) or None, timesteps (b,),
    noise (b, C, H, W) (the target's eps) and input_noise (the eps that builds x_t)."""
    x0: torch.Tensor
    labels: torch.Tensor | None
    timesteps: torch.Tensor
    noise: torch.Tensor
    input_noise: torch.Tensor


@functools.lru_cache(maxsize=4)
def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The visiting order (N,) of epoch `epoch`: a fresh permutation per epoch."""
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(step_seed(seed, epoch, stream=3)))


def batch_indices(step: int, batch_size: int, num_items: int, seed: int) -> torch.Tensor:
    """Dataset indices (B,) of global batch `step`: consecutive slices of per-epoch permutations."""
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = positions // num_items, positions % num_items
    indices = torch.empty_like(positions)
    for epoch in epochs.unique().tolist():
        mask = epochs == epoch
        indices[mask] = epoch_permutation(num_items, seed, epoch)[offsets[mask]]
    return indices


def draw_batch(dataset: InMemoryImages, config: Config, step: int, world: World, null_label: int | None,
               t_probabilities: torch.Tensor | None = None) -> Batch:
    """Draw step `step`'s global batch from its own generator and keep this process's slice; t uniform, or drawn
    from `t_probabilities` (T,) (`timestep_probabilities`)."""
    train, noise_cfg = config.train, config.noise
    B, b = train.batch_size, train.batch_size // world.size
    g = torch.Generator().manual_seed(step_seed(train.seed, step))
    shape = (B,) + tuple(dataset.images.shape[1:])
    flip = torch.rand(B, generator=g) < 0.5 if config.data.random_flip else None
    if t_probabilities is None:
        timesteps = torch.randint(config.diffusion.num_train_timesteps, (B,), generator=g)
    else:
        timesteps = torch.multinomial(t_probabilities, B, replacement=True, generator=g)
    noise = training_noise(shape, g, offset_strength=noise_cfg.strength("offset_noise_strength"),
                           pyramid_discount=noise_cfg.strength("pyramid_discount"))
    input_noise = (perturb_noise(noise, noise_cfg.strength("input_perturbation_gamma"), g)
                   if noise_cfg.input_perturbation else noise)
    drop = torch.rand(B, generator=g) < config.model.null_label_prob
    mine = slice(world.rank * b, (world.rank + 1) * b)
    indices = batch_indices(step, B, len(dataset), train.seed)[mine]
    images, labels = dataset.batch(indices, flip[mine] if flip is not None else None)
    x0 = to_float(images) if images.dtype == torch.uint8 else images.float()
    if null_label is not None:
        labels = torch.where(drop[mine], torch.full_like(labels, null_label), labels).to(world.device)
    else:
        labels = None
    device = world.device
    return Batch(x0.to(device), labels, timesteps[mine].to(device), noise[mine].to(device),
                 input_noise[mine].to(device))


def diffusion_loss(model, scheduler, batch: Batch, weights: torch.Tensor | None,
                   autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean over the batch of the (min-SNR weighted) per-sample MSE between prediction and target; 0-dim."""
    x_t = scheduler.add_noise(batch.x0, batch.input_noise, batch.timesteps)
    if scheduler.prediction_type == "epsilon":
        target = batch.noise
    elif scheduler.prediction_type == "v_prediction":
        target = scheduler.get_velocity(batch.x0, batch.noise, batch.timesteps)
    else:
        target = batch.x0
    with torch.autocast(batch.x0.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        prediction = model(x_t, batch.timesteps, batch.labels)
    per_sample = F.mse_loss(prediction.float(), target, reduction="none").mean(dim=(1, 2, 3))
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device)[batch.timesteps]
    return per_sample.mean()
