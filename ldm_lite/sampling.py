"""Sampling loop with the inference-time bias corrections: signal-leak initial noise and epsilon scaling.

- Signal leak (Everaert et al. 2024, "Exploiting the Signal-Leak Bias in Diffusion Models", arXiv:2309.15842):
  start from x_T = sqrt(ab[t0]) leak + sqrt(1 - ab[t0]) noise, t0 = scheduler.timesteps[0], with the leak drawn
  from statistics of real images (`ldm_lite.leak.LeakStats`) instead of being absent.
- Epsilon scaling (Ning et al. 2023, "Elucidating the Exposure Bias in Diffusion Models", arXiv:2308.15321):
  the x0 estimate uses eps / lambda_i, lambda_i = k i + b over the step index i (constant b when k = 0).
- Classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598): eps = eps_null + w (eps_cond - eps_null).
"""
import math
import warnings

import torch
from tqdm.auto import tqdm


def initial_noise(scheduler, shape, leak=None, generator=None, device=None, dtype=torch.float32):
    """x_T of shape (B, C, H, W) for the scheduler's first sampled timestep t0 = scheduler.timesteps[0].

    Without `leak`: standard normal noise. With `leak` (a `LeakStats`, or a tensor (B, C, H, W) / (C, H, W) of
    leak images): sqrt(ab[t0]) * leak + sqrt(1 - ab[t0]) * noise (Everaert et al. eq. 2). The result is a plain
    tensor, usable as `latents=` in other pipelines.
    """
    noise = torch.randn(shape, generator=generator, dtype=dtype).to(device or "cpu")
    if leak is None:
        return noise
    alpha_bar = float(scheduler.alphas_cumprod[int(scheduler.timesteps[0])])
    if alpha_bar == 0.0:
        warnings.warn("the schedule has zero SNR at the first sampled timestep: a signal leak has no effect",
                      stacklevel=2)
    if isinstance(leak, torch.Tensor):
        leak_images = leak.expand(shape) if leak.dim() == 3 else leak
    else:
        leak.check_shape(tuple(shape[1:]))
        leak_images = leak.sample(shape[0], generator=generator, dtype=dtype)
    if tuple(leak_images.shape) != tuple(shape):
        raise ValueError(f"leak has shape {tuple(leak_images.shape)}, expected {tuple(shape)}")
    return math.sqrt(alpha_bar) * leak_images.to(noise.device, dtype) + math.sqrt(1.0 - alpha_bar) * noise


def eps_scale_schedule(eps_scale, num_steps: int, slope: float = 0.0) -> list:
    """lambda_i = slope * i + eps_scale for the step index i = 0 .. N-1 (i = 0 is the first, noisiest step).

    eps_scale: None (1.0), a float b, or a sequence of N values (then `slope` must be 0). Ning et al. report
    b = 1.017 for CIFAR-10 at 100 steps. Every lambda must be > 0.
    """
    if eps_scale is None or isinstance(eps_scale, (int, float)):
        intercept = 1.0 if eps_scale is None else float(eps_scale)
        values = [slope * i + intercept for i in range(num_steps)]
    else:
        values = [float(v) for v in eps_scale]
        if len(values) != num_steps or slope:
            raise ValueError(f"eps_scale must be a float (with an optional slope) or {num_steps} values, "
                             f"got {len(values)} values and slope {slope}")
    if min(values) <= 0:
        raise ValueError(f"epsilon scale must stay > 0, but lambda_i = {slope} * i + b reaches {min(values):.4g} "
                         f"within {num_steps} steps")
    return values


def _denoise(model, x, t, class_labels, guidance, null_label):
    """Model output (B, C', H, W) at x_t, with classifier-free guidance when `guidance` is set."""
    timesteps = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
    if guidance is None or class_labels is None:
        return model(x, timesteps, class_labels)
    nulls = torch.full_like(class_labels, null_label)
    both = model(torch.cat([x, x]), torch.cat([timesteps, timesteps]), torch.cat([class_labels, nulls]))
    conditional, unconditional = both.chunk(2)
    return unconditional + guidance * (conditional - unconditional)


@torch.no_grad()
def sample(model, scheduler, n: int, *, shape=None, num_inference_steps: int | None = None, leak=None,
           eps_scale=None, eps_scale_slope: float = 0.0, guidance: float | None = None, class_labels=None,
           generator=None, batch_size: int = 64, eta: float = 0.0, x_T=None, callback=None, progress: bool = True,
           device=None, dtype=torch.float32, autocast_dtype=None):
    """Draw n samples (n, C, H, W) by running `scheduler` from x_T to x_0.

    model: callable (x (B, C, H, W), timesteps (B,) long, class_labels (B,) long or None) -> (B, C or 2C, H, W);
      an `ldm_lite` UNet works directly. shape: (C, H, W), default from `model.config`.
    num_inference_steps: calls `scheduler.set_timesteps` when given, else uses the scheduler's current list.
    leak: `LeakStats` or leak tensor for the signal-leak initial noise (see `initial_noise`).
    eps_scale, eps_scale_slope: epsilon scaling lambda_i = slope * i + b, see `eps_scale_schedule`.
    guidance: classifier-free guidance weight w.
    class_labels: (n,) long or an int for all; the null label (model.config.num_classes) means unconditional.
    generator: seeds x_T and every step's noise, batch after batch: same seed, same images.
    x_T: (n, C, H, W) to start from instead of drawing it. eta: DDIM only.
    callback(info): called after every step with a dict: step_index, timestep, batch_start, x_t, model_output,
      pred_original_sample, prev_sample (tensors of the current batch); used by the analysis tools.
    autocast_dtype: e.g. torch.bfloat16 to run the model under autocast; the scheduler step stays in `dtype`.
      One autocast context spans the whole call, so its low-precision copies of the weights are made once:
      the weights must not change during the call (e.g. from a callback).
    """
    if num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps)
    config = getattr(model, "config", None)
    shape = tuple(shape or (config.in_channels, config.sample_size, config.sample_size))
    device = torch.device(device) if device is not None else _model_device(model)
    labels = _labels(class_labels, n, device)
    lambdas = eps_scale_schedule(eps_scale, len(scheduler.timesteps), eps_scale_slope)
    step_kwargs = {"eta": eta} if _takes_eta(scheduler) else {}
    null_label = getattr(config, "num_classes", None)
    outputs = []
    steps_total = math.ceil(n / batch_size) * len(scheduler.timesteps)
    bar = tqdm(total=steps_total, desc="sampling", disable=not progress, leave=False)
    # One autocast context around the whole loop keeps its low-precision copies of the weights from step to
    # step (leaving the outermost context drops them); the scheduler step runs with autocast off, in `dtype`.
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            x = (x_T[start:start + count].to(device, dtype) if x_T is not None else
                 initial_noise(scheduler, (count, *shape), leak, generator, device, dtype))
            batch_labels = labels[start:start + count] if labels is not None else None
            for i, t in enumerate(scheduler.timesteps):
                output = _denoise(model, x, t, batch_labels, guidance, null_label)
                with torch.autocast(device.type, enabled=False):
                    output = output.to(dtype)
                    step = scheduler.step(output, t, x, generator=generator, eps_scale=lambdas[i], **step_kwargs)
                    if callback is not None:
                        callback(dict(step_index=i, timestep=int(t), batch_start=start, x_t=x, model_output=output,
                                      pred_original_sample=step.pred_original_sample, prev_sample=step.prev_sample))
                x = step.prev_sample
                bar.update(1)
            outputs.append(x)
    bar.close()
    return torch.cat(outputs)


def _labels(class_labels, n, device):
    if class_labels is None:
        return None
    if isinstance(class_labels, int):
        return torch.full((n,), class_labels, dtype=torch.long, device=device)
    labels = torch.as_tensor(class_labels, dtype=torch.long, device=device)
    if labels.shape != (n,):
        raise ValueError(f"class_labels must be an int or have shape ({n},), got {tuple(labels.shape)}")
    return labels


def _takes_eta(scheduler) -> bool:
    import inspect
    return "eta" in inspect.signature(scheduler.step).parameters


def _model_device(model):
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")
