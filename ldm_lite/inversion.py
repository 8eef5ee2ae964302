"""DDIM inversion x0 -> x_T and the round trip x0 -> x_T -> x0', as a teaching and editing tool.

Song, Meng & Ermon 2021 ("Denoising Diffusion Implicit Models", arXiv:2010.02502), eq. 13: with eta = 0 the DDIM
update is an Euler step of the ODE of eq. 14 in x / sqrt(ab) and sigma = sqrt((1 - ab) / ab). Sec. 4.3
("reconstruction from latent space") runs it from clean to noisy, from timestep s to the next listed t > s:

    x_t / sqrt(ab_t) = x_s / sqrt(ab_s) + (sigma_t - sigma_s) eps_theta(x_s, t)                      (eq. 13)
    i.e. x_t = sqrt(ab_t) x0_hat + sqrt(1 - ab_t) eps_theta,  x0_hat = (x_s - sqrt(1 - ab_s) eps_theta) / sqrt(ab_s),

starting from x0 itself (ab = 1, sigma = 0). The model is asked about x_s at the target timestep t (the point x_t
is not known yet), so inverting then sampling returns x0 only in the limit of many steps: the round-trip error
is first order in the step size for a smooth denoiser. `reconstruct` measures it. Schedules are the model's
(`LoadedModel.scheduler_config`): the inverse `DDIMInverseScheduler` and the `DDIMScheduler` that samples back
share their timesteps, one list being the other reversed. Tensors are (N, C, H, W): images in [-1, 1] or latents.
"""
from typing import NamedTuple

import torch

from ldm_lite.sampling import label_tensor, sample
from ldm_lite.schedulers import from_config


class Reconstruction(NamedTuple):
    """x_T (N, C, H, W) from `invert`, the DDIM reconstruction (N, C, H, W) sampled back from it, and the RMS
    reconstruction error per image (N,): sqrt(mean over C, H, W of (reconstruction - x0)^2)."""
    x_T: torch.Tensor
    reconstruction: torch.Tensor
    error: torch.Tensor


def _epsilon_half(output: torch.Tensor, channels: int) -> torch.Tensor:
    """The prediction half of a learned-variance output (B, 2C, H, W); DDIM uses no variance."""
    return output[:, :channels] if output.shape[1] == 2 * channels else output


@torch.no_grad()
def invert(model, inverse_scheduler, x0: torch.Tensor, num_inference_steps: int, class_labels=None,
           batch_size: int = 64, callback=None) -> torch.Tensor:
    """Deterministic DDIM inversion (module docstring, Song et al. 2021 eq. 13 run from clean to noisy): x_T.

    model: callable (x (B, C, H, W), timesteps (B,), class_labels (B,) or None) -> (B, C or 2C, H, W), as for
      `ldm_lite.sampling.sample` (a UNet, `ClassifierFreeGuidance`, an oracle). inverse_scheduler: a
      `DDIMInverseScheduler`; its timesteps ascend. x0: (N, C, H, W) clean images or latents, in the model's
      space and the dtype the loop runs in. class_labels: None, one int, or (N,) long.
    callback(info): after every step, a dict with step_index, timestep, batch_start, x (the sample before the
      step), model_output, pred_original_sample and next_sample (the noisier one).
    Returns x_T (N, C, H, W) in x0's dtype, at timestep inverse_scheduler.timesteps[-1].
    """
    if x0.ndim != 4:
        raise ValueError(f"x0 must be (N, C, H, W), got shape {tuple(x0.shape)}")
    inverse_scheduler.set_timesteps(num_inference_steps)
    labels = label_tensor(class_labels, len(x0), x0.device)
    outputs = []
    for start in range(0, len(x0), batch_size):
        x = x0[start:start + batch_size]
        batch_labels = labels[start:start + batch_size] if labels is not None else None
        for i, t in enumerate(inverse_scheduler.timesteps):  # t_1 < t_2 < ... < t_N
            output = _epsilon_half(model(x, t.expand(len(x)), batch_labels), x.shape[1]).to(x.dtype)
            step = inverse_scheduler.step(output, t, x)  # x at t_{i-1} (x0 first) -> x at t_i, eq. 13
            if callback is not None:
                callback(dict(step_index=i, timestep=int(t), batch_start=start, x=x, model_output=output,
                              pred_original_sample=step.pred_original_sample, next_sample=step.prev_sample))
            x = step.prev_sample
        outputs.append(x)
    return torch.cat(outputs)


def schedulers_for(scheduler_config) -> tuple:
    """(DDIMInverseScheduler, DDIMScheduler) of one schedule, from a diffusers-style config (dict or path, as
    `ldm_lite.schedulers.from_config` reads), whatever sampler its `_class_name` names."""
    return from_config(scheduler_config, "DDIMInverseScheduler"), from_config(scheduler_config, "DDIMScheduler")


def rms_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sqrt(mean over (C, H, W) of (a - b)^2) for (N, C, H, W) tensors -> (N,)."""
    return (a - b).pow(2).flatten(1).mean(1).sqrt()


@torch.no_grad()
def reconstruct(model, x0: torch.Tensor, steps: int, scheduler_config, class_labels=None,
                batch_size: int = 64) -> Reconstruction:
    """Invert x0 (N, C, H, W) in `steps` DDIM steps, sample back with DDIM (eta = 0) on the same timesteps
    reversed, and measure the RMS error per image. 2 * steps model calls per image.

    scheduler_config: the model's schedule (`LoadedModel.scheduler_config`, a dict or a scheduler_config.json);
    both schedulers are built from it, so they share alphas_cumprod, spacing, offset and x0 clipping (a pixel
    model's schedule clips x0_hat to [-1, 1] in both directions, as its sampling does).
    The loop runs in x0's dtype and on x0's device, which must be the model's (float64 x0 with an oracle gives
    float64 accuracy).
    """
    inverse, sampler = schedulers_for(scheduler_config)
    x_T = invert(model, inverse, x0, steps, class_labels, batch_size)
    sampler.set_timesteps(steps)
    if not torch.equal(sampler.timesteps, inverse.timesteps.flip(0)):  # e.g. a linspace spacing in one only
        raise ValueError(f"the DDIM and inverse DDIM timesteps differ for this schedule ({steps} steps)")
    back = sample(model, sampler, len(x0), shape=tuple(x0.shape[1:]), num_inference_steps=steps, x_T=x_T,
                  class_labels=class_labels, batch_size=batch_size, progress=False, device=x0.device, dtype=x0.dtype)
    return Reconstruction(x_T, back, rms_per_image(back, x0))


__all__ = ["Reconstruction", "invert", "reconstruct", "rms_per_image", "schedulers_for"]
