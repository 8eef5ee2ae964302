"""The sampling loop, with the inference-time bias corrections: signal-leak initial noise and epsilon scaling.

- Signal leak (Everaert et al. 2024, "Exploiting the Signal-Leak Bias in Diffusion Models", arXiv:2309.15842):
  start from x_T = add_noise(leak, noise, t0) instead of pure noise, with the leak drawn from statistics of real
  images (`ldm_lite.leak.LeakStats`); t0 = scheduler.timesteps[0].
- Epsilon scaling (Ning et al. 2023, "Elucidating the Exposure Bias in Diffusion Models", arXiv:2308.15321):
  the x0 estimate uses eps / lambda_t; see `eps_scale_schedule` for their lambda_t = k t + b.
- Classifier-free guidance is a model wrapper (`ldm_lite.guidance.ClassifierFreeGuidance`), not a loop option.

Randomness: sample i draws everything (its x_T noise, then its leak, then each step's noise) from its own
generator seeded with `sample_seed(seed, i)` = (seed * 1_000_003 + i) mod 2^32, diffusers' list-of-generators convention. So an image depends on
(seed, i) only, not on the batch size, the number of processes or the rank.
"""
import inspect
import math
import warnings
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .schedulers.base import ZERO_SNR_ALPHA_BAR, randn_tensor


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` in a run seeded with `seed`: (seed * 1_000_003 + index) mod 2^32.

    Distinct for every index below 1,000,003 within a seed. 32 bits because torch's CPU generator (mt19937)
    keeps only the low 32 bits of a seed: wider seeds would collide silently.
    """
    return (int(seed) * 1_000_003 + int(index)) % 2 ** 32


def sample_generators(seed: int, start: int, count: int, device="cpu") -> list:
    """One torch.Generator per sample start .. start + count - 1, seeded by `sample_seed`."""
    return [torch.Generator(device).manual_seed(sample_seed(seed, i)) for i in range(start, start + count)]


def initial_noise(scheduler, shape, leak=None, generator=None, device=None, dtype=torch.float32):
    """x_T of shape (B, C, H, W) for the scheduler's first sampled timestep t0 = scheduler.timesteps[0].

    Without `leak`: init_noise_sigma * noise, diffusers' convention (1 for DDPM/DDIM; sqrt(sigma_max^2 + 1) or
    sigma_max for the sigma-parametrised samplers). With `leak` (a `LeakStats`, or leak images (B, C, H, W) or
    (C, H, W)): the forward process at the first step the sampler takes (`add_noise_at_first_step`: index 0 of
    its table, even where the first timestep repeats), with no extra factor, i.e. sqrt(ab[t0]) leak +
    sqrt(1 - ab[t0]) noise for DDPM/DDIM (Everaert et al. eq. 2) and leak + sigma_0 noise for Euler-type
    samplers: the same leak in each sampler's own units.
    generator: None, one torch.Generator, or a list of B (one per sample; each draws its noise, then its leak).
    """
    device = torch.device(device or "cpu")
    if isinstance(generator, (list, tuple)) and leak is not None:
        return torch.cat([initial_noise(scheduler, (1, *shape[1:]), _leak_row(leak, i), g, device, dtype)
                          for i, g in enumerate(generator)])
    noise = randn_tensor(tuple(shape), generator, device, dtype)
    if leak is None:
        return noise * scheduler.init_noise_sigma
    if scheduler.alpha_bar_at_first_step() <= ZERO_SNR_ALPHA_BAR:  # 0, or the sigma samplers' clamp of 0
        warnings.warn("the schedule has zero SNR at the first sampled timestep: a signal leak has no effect",
                      stacklevel=2)
    if isinstance(leak, torch.Tensor):
        leak_images = leak.expand(shape) if leak.dim() == 3 else leak
    else:
        leak.check_shape(tuple(shape[1:]))
        leak_images = leak.sample(shape[0], generator=generator, dtype=dtype)
    if tuple(leak_images.shape) != tuple(shape):
        raise ValueError(f"leak has shape {tuple(leak_images.shape)}, expected {tuple(shape)}")
    return scheduler.add_noise_at_first_step(leak_images.to(device, dtype), noise)


def _leak_row(leak, i):
    """Sample i's share of a leak: row i of a (B, C, H, W) tensor; a (C, H, W) tensor or LeakStats as they are."""
    return leak[i:i + 1] if isinstance(leak, torch.Tensor) and leak.dim() == 4 else leak


def eps_scale_schedule(eps_scale, num_steps: int, slope: float = 0.0, centred: bool = False) -> list:
    """Epsilon-scaling factors lambda in sampling order (entry 0 is the first, noisiest step).

    Ning et al. 2023 (arXiv:2308.15321, sec. 5; their gaussian_diffusion.py) use lambda_t = k t + b over the
    respaced step index t = 0 .. N-1, where t = N-1 is the noisiest step; so sampling step i (i = 0 first) gets
    lambda = k (N - 1 - i) + b, and a (k, b) pair copied from the paper gives the paper's schedule.
    centred=True: b is the mean lambda instead, b' = b - k (N - 1) / 2 (their centred form, b' = 1.011 - k (N-1)/2
    for b = 1.011). eps_scale: None (1.0), a float b, or a sequence of N values in sampling order (then slope
    must be 0). They report b = 1.017 for CIFAR-10 at 100, 50 and 20 steps. Every lambda must be > 0.
    """
    if eps_scale is None or isinstance(eps_scale, (int, float)):
        intercept = 1.0 if eps_scale is None else float(eps_scale)
        if centred:
            intercept -= slope * (num_steps - 1) / 2
        values = [slope * (num_steps - 1 - i) + intercept for i in range(num_steps)]
    else:
        values = [float(v) for v in eps_scale]
        if len(values) != num_steps or slope:
            raise ValueError(f"eps_scale must be a float (with an optional slope) or {num_steps} values, "
                             f"got {len(values)} values and slope {slope}")
    if min(values) <= 0:
        raise ValueError(f"epsilon scale must stay > 0, but lambda_t = {slope} * t + b reaches {min(values):.4g} "
                         f"within {num_steps} steps")
    return values


@dataclass(frozen=True)
class StartingNoise:
    """Where each batch starts: the caller's x_T (n, C, H, W), or x_T drawn by `initial_noise` with the signal
    `leak` (LeakStats, a tensor, or None for plain noise)."""
    x_T: torch.Tensor | None = None
    leak: object = None

    def draw(self, scheduler, start: int, shape: tuple, generators: list, device, dtype) -> torch.Tensor:
        """x_T of samples start .. start + len(generators) - 1, (B, C, H, W) for shape = (C, H, W)."""
        if self.x_T is not None:
            return self.x_T[start:start + len(generators)].to(device, dtype)
        return initial_noise(scheduler, (len(generators), *shape), self.leak, generators, device, dtype)


@dataclass(frozen=True)
class StepKeywords:
    """The keywords of every `scheduler.step` call besides (output, t, x): the run's options (eta,
    use_clipped_model_output), epsilon scaling's lambda per step (`eps_scales`, None when the step takes no
    eps_scale), and whether the step draws noise from each sample's generator."""
    options: dict
    eps_scales: tuple | None
    draws_noise: bool

    @classmethod
    def check(cls, scheduler, options: dict | None, eps_scales: list) -> "StepKeywords":
        """Checked once, before the loop, against `scheduler.step`: a ValueError names an option it does not take,
        or epsilon scaling (any lambda != 1) with a step that has no `eps_scale`."""
        accepted = inspect.signature(scheduler.step).parameters
        name = type(scheduler).__name__
        options = dict(options or {})
        refused = sorted(key for key in options if key not in accepted)
        if refused:
            raise ValueError(f"{name} takes no {', '.join(refused)} (its step takes: "
                             f"{', '.join(p for p in accepted if p not in ('model_output', 'timestep', 'sample'))})")
        if any(value != 1.0 for value in eps_scales) and "eps_scale" not in accepted:
            raise ValueError(f"epsilon scaling is not available with {name}; use DDIMScheduler or DDPMScheduler")
        return cls(options, tuple(eps_scales) if "eps_scale" in accepted else None, "generator" in accepted)

    def at_step(self, i: int, generators: list) -> dict:
        """The keywords of step i (0 = the first) of a batch whose samples draw from `generators`."""
        keywords = dict(self.options, generator=generators) if self.draws_noise else dict(self.options)
        if self.eps_scales is not None:
            keywords["eps_scale"] = self.eps_scales[i]
        return keywords


@torch.no_grad()
def sample(model, scheduler, n: int, *, shape=None, num_inference_steps: int | None = None, x_T=None, leak=None,
           class_labels=None, seed: int = 0, first_index: int = 0, batch_size: int = 64, eps_scale=None,
           step_options: dict | None = None,
           callback=None, on_batch=None, progress: bool = True, device=None, dtype=torch.float32,
           autocast_dtype=None):
    """Draw n samples (n, C, H, W) by running `scheduler` from x_T to x_0, batch after batch.

    model: callable (x (B, C, H, W), timesteps (B,), class_labels (B,) long or None) -> (B, C or 2C, H, W); an
      `ldm_lite` UNet, or a wrapper such as `ClassifierFreeGuidance`. Timesteps reach it as the scheduler gives
      them (fractional for Karras sigmas). shape: (C, H, W), default from `model.config`.
    num_inference_steps: set on the scheduler before every batch, which also resets a multistep scheduler's
      state; None takes the scheduler's current step count (its full list if set_timesteps was never called).
    x_T: (n, C, H, W) to start from; else drawn by `initial_noise` with `leak` (LeakStats or tensor).
    class_labels: (n,) long or one int for all. seed: sample i draws from `sample_seed(seed, first_index + i)`;
      first_index > 0 continues a run or draws one process's share (same images as one long run).
    eps_scale: lambda per step, a float or the list of `eps_scale_schedule`. step_options: per-run keywords of
      `scheduler.step` (eta, use_clipped_model_output); both are checked once, before the loop.
    callback(info): after every step, a dict with step_index, timestep, batch_start, x_t, model_output,
      pred_original_sample, prev_sample (the current batch); the analysis tools use it.
    on_batch(images (B, C, H, W), batch_start): receives each finished batch; then nothing is kept and the call
      returns None (long runs stream to disk).
    autocast_dtype: e.g. torch.bfloat16 to run the model under autocast; the scheduler step stays in `dtype`.
      One autocast context spans the whole call, so its low-precision copies of the weights are made once: the
      weights must not change during the call.
    """
    run = _prepare_run(model, scheduler, n, shape, num_inference_steps, class_labels, eps_scale, step_options,
                       device, dtype)
    starting_noise = StartingNoise(x_T, leak)
    outputs = []
    bar = tqdm(total=math.ceil(n / batch_size) * len(scheduler.timesteps), desc="sampling", disable=not progress,
               leave=False)
    # One autocast context around the whole loop keeps its low-precision copies of the weights from step to
    # step (leaving the outermost context drops them); the scheduler step runs with autocast off, in `dtype`.
    with torch.autocast(run.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            if run.num_inference_steps is not None and start > 0:
                scheduler.set_timesteps(run.num_inference_steps)  # a fresh state per batch
            generators = sample_generators(seed, first_index + start, count)
            with torch.autocast(run.device.type, enabled=False):
                x = starting_noise.draw(scheduler, start, run.shape, generators, run.device, dtype)
            x = _denoise_batch(model, scheduler, run, x, start, generators, callback, bar)
            if on_batch is not None:
                on_batch(x, start)
            else:
                outputs.append(x)
    bar.close()
    return torch.cat(outputs) if on_batch is None else None


@dataclass(frozen=True)
class _SamplingRun:
    """What every batch of a `sample` call shares, prepared and checked once."""
    shape: tuple  # (C, H, W)
    device: torch.device
    dtype: torch.dtype
    labels: torch.Tensor | None  # (n,) long
    keywords: StepKeywords
    num_inference_steps: int | None  # set again before every batch after the first


def _prepare_run(model, scheduler, n, shape, num_inference_steps, class_labels, eps_scale, step_options, device,
                 dtype) -> _SamplingRun:
    """Set the scheduler's steps and check the run's options against it, before any model call (see `sample`)."""
    if not hasattr(scheduler, "add_noise"):
        raise ValueError(f"{type(scheduler).__name__} inverts (x0 -> x_T); sampling needs a sampler")
    num_inference_steps = num_inference_steps or getattr(scheduler, "num_inference_steps", None)
    if num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps)
    config = getattr(model, "config", None)
    shape = tuple(shape or (config.in_channels, config.sample_size, config.sample_size))
    device = torch.device(device) if device is not None else model_device(model)
    keywords = StepKeywords.check(scheduler, step_options, eps_scale_schedule(eps_scale, len(scheduler.timesteps)))
    return _SamplingRun(shape, device, dtype, label_tensor(class_labels, n, device), keywords, num_inference_steps)


def _denoise_batch(model, scheduler, run: _SamplingRun, x, start: int, generators: list, callback, bar):
    """x_T (B, C, H, W) of samples start .. start + B - 1 -> x_0 (B, C, H, W): the model at every listed timestep
    (under the caller's autocast), then scheduler.step in run.dtype with autocast off; callback(info) after each
    step (see `sample`)."""
    labels = run.labels[start:start + len(x)] if run.labels is not None else None
    for i, t in enumerate(scheduler.timesteps):
        output = model(scheduler.scale_model_input(x, t), t.to(run.device).expand(len(x)), labels)
        with torch.autocast(run.device.type, enabled=False):
            output = output.to(run.dtype)
            step = scheduler.step(output, t, x, **run.keywords.at_step(i, generators))
            if callback is not None:
                callback(dict(step_index=i, timestep=t.item(), batch_start=start, x_t=x, model_output=output,
                              pred_original_sample=step.pred_original_sample, prev_sample=step.prev_sample))
        x = step.prev_sample
        bar.update(1)
    return x


class ModelWrapper:
    """Base of the model callables that wrap a UNet (guidance, the h-space probe): `sample` reads the wrapped
    model's config (the sample shape, the null label) and its parameters (the device) through it."""

    def __init__(self, unet):
        self.unet = unet

    @property
    def config(self):
        return self.unet.config

    def parameters(self):
        return self.unet.parameters()


def label_tensor(class_labels, n: int, device) -> torch.Tensor | None:
    """Class labels (n,) long on `device` from None, one int for all, or a sequence / tensor of n labels."""
    if class_labels is None:
        return None
    if isinstance(class_labels, int):
        return torch.full((n,), class_labels, dtype=torch.long, device=device)
    labels = torch.as_tensor(class_labels, dtype=torch.long, device=device)
    if labels.shape != (n,):
        raise ValueError(f"class_labels must be an int or have shape ({n},), got {tuple(labels.shape)}")
    return labels


def model_device(model) -> torch.device:
    """The device of the model's first parameter (the CPU for a parameterless callable)."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")
