"""Training loop for pixel and latent diffusion: `train(config) -> run_dir`.

One step draws its batch and computes the loss of `ldm_lite.objective` (Ho et al. 2020, Algorithm 1, with the
configured bias fixes), then clips, steps AdamW and updates the EMA. Determinism: every step's batch comes from a
generator seeded by (seed, step) (`objective.draw_batch`) and the global torch RNG (dropout) is reseeded the same
way, so a resumed run replays the same batches and torchrun with 2 x B/2 matches 1 process with B (gradients are
averaged by DistributedDataParallel). The run's state and folder: `ldm_lite.training_state`; the budget and the
cosine horizon: `ldm_lite.training_budget`; quality while training: `ldm_lite.training_eval`; the loss log:
`ldm_lite.training_log`; torch.compile or not: `ldm_lite.compile_choice`.

Run folder: config.toml (resolved config), metrics.jsonl (one line per log interval), checkpoint.pt
(atomic: temp file, fsync, rename), samples/step_XXXXXXX.png (EMA model, DDIM).
"""
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ldm_lite import bf16_choice, runs
from ldm_lite.compile_choice import CompileProbe
from ldm_lite.config import Config
from ldm_lite.config_io import to_toml
from ldm_lite.data import InMemoryImages, brightness_terciles, load_dataset, save_image_grid
from ldm_lite.distributed import World, agree_max, init_world
from ldm_lite.latent_cache import cached_latents
from ldm_lite.models import UNet, unet_preset
from ldm_lite.objective import (diffusion_loss, draw_batch, loss_weights, step_seed,  # noqa: F401 (re-exported)
                                timestep_probabilities)
from ldm_lite.run_safety import FolderLock, StopRequest
from ldm_lite.sampling import sample
from ldm_lite.schedulers import DDPMScheduler, from_config
from ldm_lite.training_budget import HORIZON_PROBE, Budget, fixed_horizon, needs_horizon
from ldm_lite.training_eval import TrainingEvaluator, eval_record
from ldm_lite.training_log import Logger, TrainingDiverged, expected_steps  # noqa: F401 (re-exported)
from ldm_lite.training_state import TrainState, kept_config, new_state, open_run, start_run

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


# ----------------------------------------------------------------------------- optimisation schedules

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
    if config.train.precision == "auto":  # measured once; config.toml and the checkpoint keep the choice
        config = _measured_precision(config, model, dataset, world)
    state = new_state(config, model)
    state.data = data
    run_dir = start_run(config, state, checkpoint, world)
    if world.is_main and config.model.class_conditional:
        # label index -> name, for `python -m sample --class NAME` (folder names are not in the config)
        (run_dir / runs.CLASSES_FILE).write_text(json.dumps(list(dataset.class_names)))
    forward = torch.nn.parallel.DistributedDataParallel(model) if world.size > 1 else model
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
    """What a run trains with: config, processes, folder, data, VAE (latent runs), training scheduler, the model
    the current step calls (the model or its DDP wrapper, eager or compiled as `CompileProbe` chooses), the null
    label (None if unconditional) and the fp16 gradient scaler (None otherwise; its scale is not checkpointed and
    re-calibrates after a resume), the evaluator of run.eval_every (rank 0 only) and the training-timestep
    distribution (None: uniform). `config` is replaced when a budgeted cosine run fixes its horizon and when
    train.compile = "auto" settles."""
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
    bar = tqdm(total=expected_steps(state.step, t.steps, state.train_seconds, t.max_minutes), initial=state.step,
               desc="training", unit="step", disable=not (every.progress and world.is_main), dynamic_ncols=True)
    logger = Logger(run.run_dir, world, bar, t)
    budget, probe_started = Budget(run.config, state.train_seconds), None
    compile_probe = CompileProbe(run.forward, t.compile, world, state.step)
    if budget.exhausted():
        bar.close()
        print(f"{run.run_dir}: the run has used its budget (train.max_minutes={t.max_minutes}, "
              f"{budget.already / 60:.1f} min trained); raise --max-minutes to train further")
        return
    state.model.train()
    while state.step < t.steps:
        run.forward = compile_probe.model_for(state.step, t.steps - state.step, budget.limit - budget.spent())
        try:
            loss, grad_norm = train_step(run, state, weights)
        except Exception as error:  # torch.compile raises at a compiled model's first calls when it cannot compile
            if not compile_probe.compiling:
                raise
            compile_probe.failed(state.step, error)
            continue
        compile_probe.step_done()
        if compile_probe.choice is not None and run.config.train.compile == "auto":
            run.config = _settled_compile(run, compile_probe)
        logger.add(state.step - 1, loss)
        bar.update(1)
        step, lr = state.step, learning_rate(run.config, state.step - 1)
        horizon_from = compile_probe.settled_step  # the speed is measured once compiling no longer changes it
        if needs_horizon(run.config) and horizon_from is not None and step - horizon_from in HORIZON_PROBE:
            if step - horizon_from == HORIZON_PROBE[0]:
                probe_started = budget.spent()
            elif probe_started is not None:  # every process decays on one horizon, so their models stay identical
                per_step = agree_max((budget.spent() - probe_started) / (HORIZON_PROBE[1] - HORIZON_PROBE[0]), world)
                run.config = _fix_horizon(run, step, per_step, budget)
        # one process checks the clock every step; several agree on it at log steps (a collective), and on a
        # stop signal at every step (torchrun's agent kills the processes 30 s after forwarding one)
        check_clock = world.size == 1 or _due(step, every.log_every)
        out_of_time = check_clock and _decide(budget.exhausted(), world)
        interrupted = _decide(stop.signal_name is not None, world)
        last = out_of_time or step == t.steps
        save = last or interrupted or _due(step, every.checkpoint_every)
        if save or _due(step, every.log_every):
            logger.flush(step, lr, grad_norm, budget.total())  # raises TrainingDiverged before a NaN model is saved
        evaluate = every.eval_every and not interrupted and (_due(step, every.eval_every) or last)
        if evaluate and run.evaluator is not None:
            with budget.excluding():
                _evaluate(run, step, budget.total(), state.ema if state.ema is not None else state.model)
            logger.started = time.perf_counter()  # images_per_s counts training only
        if evaluate and world.size > 1:
            dist.barrier()  # the other processes wait for rank 0's evaluation
        if _due(step, every.sample_every) and world.is_main:
            model = state.ema if state.ema is not None else state.model
            write_sample_grid(run.config, model, run.vae, run.dataset.num_classes,
                              run.run_dir / "samples" / f"step_{step:07d}.png")
        if save and world.is_main:
            runs.atomic_save(state.payload(run.config, budget.total()), run.run_dir / runs.CHECKPOINT_NAME)
        if interrupted:
            bar.close()
            raise KeyboardInterrupt(f"{stop.signal_name or 'a signal to another process'} at step {step}: "
                                    f"checkpoint saved in {run.run_dir}; run the same command to resume")
        if out_of_time:
            bar.write(f"stopping at step {step}: train.max_minutes={t.max_minutes} reached "
                      f"({t.budget_clock} clock)")
            break
    state.train_seconds = budget.total()
    bar.close()


def _fix_horizon(run: Run, step: int, seconds_per_step: float, budget: Budget) -> Config:
    """The config with the cosine horizon the budget allows, the same in every process (the shortest: each one's
    budget clock started on its own), written to config.toml (rank 0)."""
    config = fixed_horizon(run.config, step, seconds_per_step, budget)
    horizon = -int(agree_max(-config.train.lr_horizon_steps, run.world))
    return _stored(run, dataclasses.replace(config, train=dataclasses.replace(config.train, lr_horizon_steps=horizon)))


def _settled_compile(run: Run, probe: CompileProbe) -> Config:
    """The config with train.compile = "auto" replaced by the probe's choice, said in one line and written to
    config.toml (rank 0), so the run's record shows what it trained with; a resume chooses again."""
    if run.world.is_main:
        tqdm.write(f"train.compile auto: {probe.choice} ({probe.reason})")
    return _stored(run, dataclasses.replace(run.config, train=dataclasses.replace(run.config.train,
                                                                                  compile=probe.choice)))


def _stored(run: Run, config: Config) -> Config:
    """`config`, written to the run's config.toml (rank 0): a choice made while training."""
    if run.world.is_main:
        runs.write_text(run.run_dir / runs.RUN_CONFIG_FILE, to_toml(kept_config(config)))
    return config


def _measured_precision(config: Config, model, dataset: InMemoryImages, world: World) -> Config:
    """train.precision "auto" resolved: bf16 where a training step measured at least bf16_choice.MIN_GAIN times
    faster under bf16 autocast than in float32 (the slowest process's gain decides), else fp32."""
    gain = bf16_choice.training_gain(model, tuple(dataset.images.shape[1:]), config.train.batch_size // world.size,
                                     world.device)
    gain = -agree_max(-gain, world)
    precision = bf16_choice.choose(gain)
    if world.is_main:
        print(f"train.precision auto: {precision} (a training step measured {gain:.2f}x faster under bf16 autocast)")
    return dataclasses.replace(config, train=dataclasses.replace(config.train, precision=precision))


def _evaluate(run: Run, step: int, train_seconds: float, model) -> None:
    """One evaluation of `model` (the EMA copy, else the model), logged to metrics.jsonl."""
    row = run.evaluator.evaluate(model, step, train_seconds)
    with open(run.run_dir / runs.METRICS_FILE, "a") as file:
        file.write(json.dumps(eval_record(row)) + "\n")
    tqdm.write(f"step {step}: KID {row.kid:.4f} +- {row.kid_std:.4f}, FID {row.fid:.2f} (n = {row.n}), "
               f"brightness std ratio {row.std_ratio:.2f}, {row.eval_seconds:.0f} s")


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _decide(flag: bool, world: World) -> bool:
    """Agree on a stop decision across processes (any process out of time stops all)."""
    return bool(agree_max(float(flag), world))
