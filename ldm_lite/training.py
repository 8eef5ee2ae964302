"""Training loop for pixel and latent diffusion: `train(config) -> run_dir`.

One step (Ho et al. 2020, arXiv:2006.11239, Algorithm 1, with the configured bias fixes):
    x0 ~ data, t ~ U{0..T-1}, eps ~ noise(config.noise)      (offset / pyramid noise, `ldm_lite.noise`)
    x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) (eps + gamma xi)     (input perturbation: gamma > 0 only in x_t)
    loss = mean_b w(t_b) |model(x_t, t, y) - target|^2       (target eps, v or x0; w = min-SNR weight or 1)

Determinism: every step draws its randomness for the *global* batch from a generator seeded by
(seed, step), and each of the world_size processes keeps its slice. So a run resumed from a checkpoint
replays the same batches, and 1 process with batch B matches torchrun with 2 x B/2 (gradients are
averaged by DistributedDataParallel). The global torch RNG (dropout) is reseeded the same way.

Run folder: config.toml (resolved config), metrics.jsonl (one line per log interval), checkpoint.pt
(atomic: temp file, fsync, rename), samples/step_XXXXXXX.png (EMA model, DDIM).
"""
import copy
import dataclasses
import functools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from ldm_lite import runs
from ldm_lite.config import Config, to_toml
from ldm_lite.distributed import World, init_world
from ldm_lite.data import InMemoryImages, brightness_terciles, load_dataset, save_image_grid, to_float
from ldm_lite.latents import encode_latents
from ldm_lite.models import UNet, unet_preset
from ldm_lite.noise import min_snr_weights, perturb_noise, training_noise
from ldm_lite.run_safety import FolderLock, StopRequest
from ldm_lite.sampling import sample
from ldm_lite.schedulers import DDPMScheduler, from_config
from ldm_lite.schedules import snr
from ldm_lite.training_budget import HORIZON_PROBE, Budget, fixed_horizon, needs_horizon, with_stored_horizon
from ldm_lite.training_eval import TrainingEvaluator, eval_record

LATENT_CACHE_FORMAT = "ldm_lite.latents.v1"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stopped and the last good checkpoint was kept."""


# ----------------------------------------------------------------------------- processes

def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A distinct 63-bit seed for (seed, step, stream); streams separate the batch draws from dropout."""
    return (seed * 1_000_003 + step * 4 + stream) % (2 ** 63)


# ----------------------------------------------------------------------------- data and model

def prepare_data(config: Config, world: World, run_dir: Path) -> tuple[InMemoryImages, object]:
    """The training set in memory (uint8 images, or float latents with a VAE) and the VAE or None."""
    data = config.data
    dataset = load_dataset(data.source, data.resolution, data.center_crop, data.download, data.synthetic_size,
                           max_images=data.max_images, progress=config.run.progress and world.is_main)
    if data.labels == "brightness":
        dataset = brightness_terciles(dataset)
    if not config.latent.vae:
        return dataset, None
    return cached_latents(dataset, config, run_dir, world)


def cached_latents(dataset: InMemoryImages, config: Config, run_dir: Path, world: World):
    """(dataset of VAE latents, VAE): encode the images once and keep the latents in a safetensors cache.

    The cache records the VAE identity (architecture, scaling and weights), the scaling/shift factors and a
    hash of the images; it is rebuilt only when one of these changes. With random_flip the mirrored images
    are encoded too, since the latent of a mirrored image is not exactly the mirrored latent.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file
    from ldm_lite.models.vae_loading import load_vae
    vae = load_vae(config.latent.vae, dtype=torch.float32).to(world.device).eval()
    path = Path(config.latent.cache) if config.latent.cache else run_dir / "latents.safetensors"
    key = {"format": LATENT_CACHE_FORMAT, "vae": vae.identity(), "scaling_factor": repr(vae.scaling_factor),
           "shift_factor": repr(vae.shift_factor), "images": runs.tensor_digest(dataset.images),
           "mirrored": str(config.data.random_flip)}
    if world.is_main and not _cache_matches(path, key, safe_open):
        tensors = {"latents": _encode(vae, dataset.images, config, world, "encoding latents"),
                   "labels": dataset.labels}
        if config.data.random_flip:
            tensors["mirrored"] = _encode(vae, dataset.images.flip(-1), config, world, "encoding mirrored")
        path.parent.mkdir(parents=True, exist_ok=True)
        with runs.written_then_renamed(path) as partial:
            save_file(tensors, str(partial), metadata={**key, "class_names": json.dumps(dataset.class_names)})
    if world.size > 1:
        dist.barrier()
    with safe_open(str(path), framework="pt") as file:
        mirrored = file.get_tensor("mirrored") if config.data.random_flip else None
        latents = InMemoryImages(file.get_tensor("latents"), file.get_tensor("labels"), dataset.class_names, mirrored)
    return latents, vae


def _cache_matches(path: Path, key: dict, safe_open) -> bool:
    """Whether the latent cache at `path` holds `key`'s latents; False when it is missing or stale.

    A file there that is not an ldm_lite latent cache (no format tag, or the keys of earlier caches) is never
    replaced: latent.cache may point anywhere, so a typo must not overwrite someone's file.
    """
    if not path.exists():
        return False
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
    except Exception:
        metadata = None
    legacy = metadata is not None and {"vae", "images", "mirrored"} <= set(metadata) and "format" not in metadata
    if metadata is None or not (metadata.get("format") == LATENT_CACHE_FORMAT or legacy):
        raise ValueError(f"latent.cache {str(path)!r} exists and is not an ldm_lite latent cache; refusing to "
                         "overwrite it (choose another latent.cache path or delete the file)")
    return all(metadata.get(k) == v for k, v in key.items() if k != "format")


def _encode(vae, images: torch.Tensor, config: Config, world: World, desc: str) -> torch.Tensor:
    """uint8 images (N, 3, H, W) -> scaled latents (N, C_lat, H/f, W/f) float32 (posterior mode)."""
    return encode_latents(vae, images, config.latent.encode_batch_size, config.run.progress and world.is_main, desc)


def build_model(config: Config, dataset: InMemoryImages) -> UNet:
    """A UNet preset sized to the data; class-conditional models get one class per dataset label."""
    channels, size = dataset.images.shape[1], dataset.images.shape[-1]
    overrides = dict(in_channels=channels, sample_size=size,
                     num_classes=dataset.num_classes if config.model.class_conditional else None)
    for key in ("dropout", "base_channels", "num_res_blocks"):
        if getattr(config.model, key) is not None:
            overrides[key] = getattr(config.model, key)
    unet_config = unet_preset(config.model.preset, **overrides)
    if size % 2 ** (len(unet_config.channel_mult) - 1):
        raise ValueError(f"data.resolution {size} must be divisible by {2 ** (len(unet_config.channel_mult) - 1)} "
                         f"for model.preset {config.model.preset!r}")
    return UNet(unet_config)


def make_scheduler(config: Config, name: str = "ddpm", **overrides):
    """A scheduler with the run's schedule and prediction type (DDPM for training, DDIM for sample grids)."""
    return from_config(config, name, **overrides)


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


# ----------------------------------------------------------------------------- one step

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


def learning_rate(config: Config, step: int) -> float:
    """Linear warmup over train.warmup_steps (Ho et al. use 5,000), then constant, or with lr_schedule = cosine
    lr (1 + cos(pi s / H)) / 2 at step s of the horizon H = train.lr_horizon_steps (or train.steps while it is 0),
    and 0 past it (Loshchilov & Hutter 2017, arXiv:1608.03983, without restarts)."""
    t = config.train
    lr = t.lr * min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else t.lr
    if t.lr_schedule == "cosine":
        horizon = t.lr_horizon_steps or t.steps
        lr *= 0.5 * (1 + math.cos(math.pi * min(step, horizon) / horizon))
    return lr


def ema_decay(config: Config, step: int) -> float:
    """EMA decay at update `step` (0-based).

    decay: min(decay, (1 + step) / (10 + step)) with ema_warmup, so early averages do not remember the random
    initialisation. power: EDM2's power-function EMA (Karras et al. 2024, arXiv:2312.02696, eq. 3),
    beta_t = (1 - 1/t)^(gamma + 1) at t = step + 1: the average weighs the past as t^gamma, so its length grows
    with the run and needs no horizon."""
    t = config.train
    if t.ema_kind == "power":
        return (1 - 1 / (step + 1)) ** (t.power_ema_gamma + 1)
    return min(t.ema_decay, (1 + step) / (10 + step)) if t.ema_warmup else t.ema_decay


@torch.no_grad()
def update_ema(ema_params: list, params: list, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * param, for every parameter at once."""
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


# ----------------------------------------------------------------------------- checkpoints

@dataclass
class TrainState:
    """Everything a step changes: the model, its EMA copy (or None), the optimizer, the step count and the
    training time so far on the budget's clock (all invocations, evaluations excluded)."""
    model: UNet
    ema: UNet | None
    optimizer: torch.optim.Optimizer
    step: int = 0
    train_seconds: float = 0.0
    data: dict | None = None  # `data_record` of the training data, checked on resume (`check_data`)

    def payload(self, config: Config, train_seconds: float | None = None) -> dict:
        """The checkpoint; train_seconds: the training time to record, when it differs from the stored one."""
        return {**runs.checkpoint_payload(config, self.model, self.ema, self.optimizer, self.step), "data": self.data,
                "train_seconds": self.train_seconds if train_seconds is None else train_seconds}

    def restore(self, checkpoint: dict, config: Config, path: Path) -> None:
        """Load a checkpoint trained with the same settings (ValueError naming the differing keys otherwise)."""
        runs.check_resume(checkpoint, config, path)
        self.model.load_state_dict(checkpoint["model"])
        if self.ema is not None:
            self.ema.load_state_dict(checkpoint["ema"] if checkpoint["ema"] is not None else checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.step = int(checkpoint["step"])
        self.train_seconds = float(checkpoint.get("train_seconds", 0.0))
        if "rng" in checkpoint and "torch" in checkpoint["rng"]:
            torch.set_rng_state(checkpoint["rng"]["torch"])


def new_state(config: Config, model: UNet) -> TrainState:
    t = config.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                  weight_decay=t.weight_decay, fused=True)  # fused: 4x faster than the default on CPU
    ema = copy.deepcopy(model).requires_grad_(False).eval() if t.ema_decay > 0 else None
    return TrainState(model, ema, optimizer)


def open_run(config: Config, world: World) -> tuple[Config, dict | None]:
    """Create run.out and return (config, the checkpoint to resume from or None for a new run); a resumed cosine
    run keeps the learning-rate horizon it stored.

    With run.fresh an existing checkpoint and log are deleted first. A checkpoint trained with other settings
    is refused (`runs.check_resume`) before any data is loaded.
    """
    run_dir = Path(config.run.out)
    path = run_dir / runs.CHECKPOINT_NAME
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        leftover = path.with_name(path.name + ".tmp")
        if leftover.exists():  # a save interrupted by a crash; checkpoint.pt is the last good one
            leftover.unlink()
        if config.run.fresh:
            for name in (runs.CHECKPOINT_NAME, runs.METRICS_FILE):
                (run_dir / name).unlink(missing_ok=True)
    if world.size > 1:
        dist.barrier()
    if not path.exists():
        return config, None
    if not config.run.resume:
        raise ValueError(f"{str(run_dir)!r} already holds a checkpoint; pass --run.resume=true to continue it, "
                         "--fresh to start over, or choose another --out")
    checkpoint = runs.load_checkpoint(path)
    config = with_stored_horizon(config, checkpoint["config"])
    runs.check_resume(checkpoint, config, path)
    return config, checkpoint


def start_run(config: Config, state: TrainState, checkpoint: dict | None, world: World) -> Path:
    """Restore the checkpoint into `state` and write config.toml and the trimmed log (rank 0)."""
    run_dir = Path(config.run.out)
    if checkpoint is not None:
        state.restore(checkpoint, config, run_dir / runs.CHECKPOINT_NAME)
    if world.is_main:
        (run_dir / runs.RUN_CONFIG_FILE).write_text(to_toml(_kept(config)))
        _truncate_metrics(run_dir / runs.METRICS_FILE, state.step)
    return run_dir


def _kept(config: Config) -> Config:
    """The config as config.toml keeps it: fresh and allow_data_change are one-off requests, so a config.toml
    reused later must not delete this run or accept other data silently."""
    return dataclasses.replace(config, run=dataclasses.replace(config.run, fresh=False, allow_data_change=False))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be written again).

    An incomplete last line (the process was killed while writing it) is dropped with a warning; a damaged line
    anywhere else is refused in one line naming the file and the line.
    """
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record_step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            if number < len(lines):
                raise ValueError(f"{str(path)!r} line {number} is damaged ({line[:40]!r}); repair or delete the "
                                 "file to resume") from None
            print(f"warning: {str(path)!r}: dropped its incomplete last line (written when the run was "
                  "killed)", file=sys.stderr)
            continue
        if record_step <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


# ----------------------------------------------------------------------------- sample grids

@torch.no_grad()
def write_sample_grid(config: Config, model: UNet, vae, num_classes: int, path: Path) -> None:
    """A PNG grid from `model`: one row per class (up to 10) plus one unconditional row, or 4 unconditional rows.

    DDIM with the schedule `python -m sample` uses for this run, and a fixed seed, so grids of successive
    steps are comparable.
    """
    per_row = config.run.samples_per_class
    conditional = model.config.num_classes is not None
    rows = list(range(min(num_classes, 10))) + [model.config.num_classes] if conditional else [None] * 4
    labels = torch.tensor([r for r in rows for _ in range(per_row)]) if conditional else None
    scheduler = from_config(config)
    was_training = model.training
    model.eval()
    images = sample(model, scheduler, per_row * len(rows), num_inference_steps=config.run.sample_steps,
                    class_labels=labels, seed=config.train.seed, progress=False)
    model.train(was_training)
    if vae is not None:
        images = vae.from_latents(images.to(next(vae.parameters()).device)).clamp(-1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image_grid(images.cpu(), path, nrow=per_row)


# ----------------------------------------------------------------------------- the loop

class Logger:
    """Collects per-step losses as tensors (no host sync) and, every log interval, checks them for
    NaN/inf, writes one metrics.jsonl line and updates the progress bar."""

    def __init__(self, run_dir: Path, world: World, bar, batch_size: int):
        self.path, self.world, self.bar, self.batch_size = run_dir / runs.METRICS_FILE, world, bar, batch_size
        self.losses, self.first_step, self.started = [], 0, time.perf_counter()

    def add(self, step: int, loss: torch.Tensor) -> None:
        if not self.losses:
            self.first_step = step
        self.losses.append(loss.detach())

    def flush(self, step: int, lr: float, grad_norm) -> dict | None:
        """Write the interval ending at `step` (1-based count of finished steps); raise on a non-finite loss."""
        if not self.losses:
            return None
        losses = torch.stack(self.losses).float()
        if self.world.size > 1:
            dist.all_reduce(losses)
            losses /= self.world.size
        values = losses.tolist()
        for i, value in enumerate(values):
            if not math.isfinite(value):
                raise TrainingDiverged(f"loss became {value} at step {self.first_step + i + 1}; stopped without "
                                       f"saving; the last good checkpoint is kept in {self.path.parent}")
        elapsed = time.perf_counter() - self.started
        record = {"step": step, "loss": sum(values) / len(values), "lr": lr,
                  "grad_norm": float(grad_norm) if grad_norm is not None else None,
                  "images_per_s": len(values) * self.batch_size / max(elapsed, 1e-9), "time": time.time()}
        if self.world.is_main:
            with open(self.path, "a") as file:
                file.write(json.dumps(record) + "\n")
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}", refresh=False)
        self.losses, self.started = [], time.perf_counter()
        return record


def train(config: Config) -> Path:
    """Train a UNet as `config` says; returns the run folder. Resumes from <run.out>/checkpoint.pt if present.

    Stops after train.steps steps or train.max_minutes of wall time (checkpointing then), raises
    TrainingDiverged on a NaN/inf loss (keeping the last good checkpoint). Under torchrun each process
    calls this; train.batch_size is the global batch.
    """
    started_group = not dist.is_initialized()
    world = init_world()
    threads = torch.get_num_threads()
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    try:
        with FolderLock(config.run.out, enabled=world.is_main):  # one training per run folder
            return _train(config, world)
    finally:
        torch.set_num_threads(threads)
        if started_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(config: Config, world: World) -> Path:
    if config.train.batch_size % world.size:
        raise ValueError(f"train.batch_size {config.train.batch_size} must be divisible by the number of "
                         f"processes {world.size}")
    config, checkpoint = open_run(config, world)
    if checkpoint is not None and int(checkpoint["step"]) >= config.train.steps:
        print(f"{config.run.out}: the run is finished (step {int(checkpoint['step'])} of train.steps = "
              f"{config.train.steps}); raise --steps to train further")
        return Path(config.run.out)
    dataset, vae = prepare_data(config, world, Path(config.run.out))
    # before a class change breaks the restore
    data = runs.check_data(checkpoint, runs.data_record(dataset), config, world.is_main)
    torch.manual_seed(config.train.seed)  # identical initial weights in every process
    model = build_model(config, dataset).to(world.device)
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    state = new_state(config, model)
    state.data = data
    run_dir = start_run(config, state, checkpoint, world)
    if world.is_main and config.model.class_conditional:
        # label index -> name, for `python -m sample --class NAME` (folder names are not in the config)
        (run_dir / runs.CLASSES_FILE).write_text(json.dumps(list(dataset.class_names)))
    forward = torch.nn.parallel.DistributedDataParallel(model) if world.size > 1 else model
    if config.train.compile:
        forward = torch.compile(forward)
    scaler = torch.amp.GradScaler(world.device.type) if config.train.precision == "fp16" else None
    evaluator = TrainingEvaluator(config, dataset, world.device, config.run.progress) \
        if config.run.eval_every and world.is_main else None
    run = Run(config, world, run_dir, dataset, vae, make_scheduler(config), forward,
              null_label=dataset.num_classes if config.model.class_conditional else None, scaler=scaler,
              evaluator=evaluator)
    with StopRequest() as stop:
        _loop(run, state, stop)
    return run_dir


@dataclass
class Run:
    """What stays fixed during a run: config, processes, folder, data, VAE (latent runs), training scheduler,
    the model as called for training (DDP / compiled wrapper), the null label (None if unconditional) and the
    fp16 gradient scaler (None otherwise; its scale is not checkpointed and re-calibrates after a resume), the
    evaluator of run.eval_every (rank 0 only) and the training-timestep distribution (None: uniform).
    `config` is replaced once when a budgeted cosine run fixes its horizon."""
    config: Config
    world: World
    run_dir: Path
    dataset: InMemoryImages
    vae: object
    scheduler: DDPMScheduler
    forward: torch.nn.Module
    null_label: int | None
    scaler: torch.amp.GradScaler | None = None
    evaluator: TrainingEvaluator | None = None
    t_probabilities: torch.Tensor | None = None

    def __post_init__(self):
        self.t_probabilities = timestep_probabilities(self.config, self.scheduler.alphas_cumprod)


AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def train_step(run: Run, state: TrainState, weights: torch.Tensor | None):
    """One optimisation step at state.step: loss, backward, clip, AdamW, EMA. Returns (loss, grad norm or None).

    fp16 scales the loss (run.scaler) so small gradients do not underflow; steps with inf/nan gradients are
    skipped by the scaler and the scale lowered, as torch.amp does.
    """
    t, step = run.config.train, state.step
    torch.manual_seed(step_seed(t.seed * 131 + run.world.rank, step, stream=1))  # dropout masks
    batch = draw_batch(run.dataset, run.config, step, run.world, run.null_label, run.t_probabilities)
    for group in state.optimizer.param_groups:
        group["lr"] = learning_rate(run.config, step)
    loss = diffusion_loss(run.forward, run.scheduler, batch, weights, AUTOCAST_DTYPES[t.precision])
    state.optimizer.zero_grad(set_to_none=True)
    scaler = run.scaler
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(state.optimizer)
    params = list(state.model.parameters())
    grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip, foreach=True) if t.grad_clip > 0 else None
    if scaler is not None:
        scaler.step(state.optimizer)
        scaler.update()
    else:
        state.optimizer.step()
    if state.ema is not None:
        update_ema(list(state.ema.parameters()), params, ema_decay(run.config, step))
    state.step = step + 1
    return loss.detach(), grad_norm


def _loop(run: Run, state: TrainState, stop: StopRequest) -> None:
    """Steps until train.steps or the time budget; logs, evaluations, sample grids and checkpoints at their
    intervals (an evaluation also when the run stops, unless it just had one). After SIGINT / SIGTERM (`stop`) it
    finishes the step, saves a checkpoint and raises KeyboardInterrupt."""
    t, every, world = run.config.train, run.config.run, run.world
    weights = loss_weights(run.config, run.scheduler.alphas_cumprod)
    bar = tqdm(total=t.steps, initial=state.step, desc="training", unit="step",
               disable=not (every.progress and world.is_main), dynamic_ncols=True)
    logger = Logger(run.run_dir, world, bar, t.batch_size)
    budget, first_step, probe_started = Budget(run.config), state.step, None
    state.model.train()
    while state.step < t.steps:
        loss, grad_norm = train_step(run, state, weights)
        logger.add(state.step - 1, loss)
        bar.update(1)
        step, lr = state.step, learning_rate(run.config, state.step - 1)
        if needs_horizon(run.config) and step - first_step in HORIZON_PROBE:
            if step - first_step == HORIZON_PROBE[0]:
                probe_started = budget.spent()
            else:
                run.config = _fix_horizon(run, step, (budget.spent() - probe_started) / (HORIZON_PROBE[1] -
                                                                                      HORIZON_PROBE[0]), budget)
        # one process checks the clock and signals every step; several agree on them at log steps (collectives)
        check_clock = world.size == 1 or _due(step, every.log_every)
        out_of_time = check_clock and _decide(budget.exhausted(), world)
        interrupted = check_clock and _decide(stop.signal_name is not None, world)
        last = out_of_time or step == t.steps
        save = last or interrupted or _due(step, every.checkpoint_every)
        if save or _due(step, every.log_every):
            logger.flush(step, lr, grad_norm)  # raises TrainingDiverged before a NaN model could be saved
        evaluate = every.eval_every and not interrupted and (_due(step, every.eval_every) or last)
        if evaluate and run.evaluator is not None:
            with budget.excluding():
                _evaluate(run, state, budget, step)
        if evaluate and world.size > 1:
            dist.barrier()  # the other processes wait for rank 0's evaluation
        if _due(step, every.sample_every) and world.is_main:
            model = state.ema if state.ema is not None else state.model
            write_sample_grid(run.config, model, run.vae, run.dataset.num_classes,
                              run.run_dir / "samples" / f"step_{step:07d}.png")
        if save and world.is_main:
            runs.atomic_save(state.payload(run.config, state.train_seconds + budget.spent()),
                             run.run_dir / runs.CHECKPOINT_NAME)
        if interrupted:
            bar.close()
            raise KeyboardInterrupt(f"{stop.signal_name or 'a signal to another process'} at step {step}: "
                                    f"checkpoint saved in {run.run_dir}; run the same command to resume")
        if out_of_time:
            bar.write(f"stopping at step {step}: train.max_minutes={t.max_minutes} reached "
                      f"({t.budget_clock} clock)")
            break
    state.train_seconds += budget.spent()
    bar.close()


def _fix_horizon(run: Run, step: int, seconds_per_step: float, budget: Budget) -> Config:
    """The config with the cosine horizon the budget allows, written to config.toml (rank 0)."""
    config = fixed_horizon(run.config, step, seconds_per_step, budget)
    if run.world.is_main:
        (run.run_dir / runs.RUN_CONFIG_FILE).write_text(to_toml(_kept(config)))
    return config


def _evaluate(run: Run, state: TrainState, budget: Budget, step: int) -> None:
    """One evaluation of the EMA model (the model itself without EMA), logged to metrics.jsonl."""
    model = state.ema if state.ema is not None else state.model
    row = run.evaluator.evaluate(model, step, state.train_seconds + budget.spent())
    with open(run.run_dir / runs.METRICS_FILE, "a") as file:
        file.write(json.dumps(eval_record(row)) + "\n")
    tqdm.write(f"step {step}: KID {row.kid:.4f} +- {row.kid_std:.4f}, FID {row.fid:.2f} (n = {row.n}), "
               f"brightness std ratio {row.std_ratio:.2f}, {row.eval_seconds:.0f} s")


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _decide(flag: bool, world: World) -> bool:
    """Agree on a stop decision across processes (any process out of time stops all)."""
    if world.size == 1:
        return flag
    value = torch.tensor([float(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
