"""Exposure bias (Ning et al. 2023, "Elucidating the Exposure Bias in Diffusion Models", arXiv:2308.15321): the
norm of the predicted noise along sampling vs on forward-noised data, delta_t (sec. 4.2), and a scan for the
epsilon-scaling value that best matches the two eps-norm curves (sec. 5).

Images are (N, C, H, W), float in [-1, 1] or latents; results are dicts of tensors.
"""
import math

import torch
from tqdm.auto import tqdm

from ldm_lite.sampling import label_tensor, model_device, sample
from ldm_lite.schedulers.base import predict_x0_and_eps


def predicted_noise(model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar: float, prediction_type: str):
    """The model's epsilon estimate (B, C, H, W) at x_t, whatever it predicts (eps, v or x0); a learned-variance
    output (B, 2C, H, W) contributes its first C channels."""
    output = model_output[:, :x_t.shape[1]]
    _, eps = predict_x0_and_eps(output, x_t, math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar), prediction_type)
    return eps


def _per_image_norm(x: torch.Tensor) -> torch.Tensor:
    return x.double().flatten(1).norm(dim=1)


def _set_steps(scheduler, num_inference_steps):
    if num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps)
    return scheduler.timesteps


@torch.no_grad()
def forward_eps_norm(model, scheduler, x0: torch.Tensor, *, num_inference_steps: int | None = None,
                     generator: torch.Generator | None = None, batch_size: int = 64, class_labels=None,
                     progress: bool = True, autocast_dtype=None) -> dict:
    """Mean per-image L2 norm of the predicted noise on forward-noised data, at each sampled timestep
    (the training-time curve of Ning et al., Fig. 4). x0: (N, C, H, W) training images or latents.
    autocast_dtype: run the model under autocast, as `sample` does with the same argument.
    Returns {"timesteps" (S,), "eps_norm" (S,), "eps_norm_std" (S,)} (std over images)."""
    timesteps, device = _set_steps(scheduler, num_inference_steps), model_device(model)
    class_labels, norms = label_tensor(class_labels, len(x0), device), []
    for t in tqdm(timesteps.tolist(), desc="eps-norm (forward)", disable=not progress, leave=False):
        alpha_bar, step_norms = float(scheduler.alphas_cumprod[t]), []
        for start in range(0, len(x0), batch_size):
            batch = x0[start:start + batch_size].to(device, torch.float32)
            noise = torch.randn(batch.shape, generator=generator, dtype=batch.dtype).to(device)
            x_t = scheduler.add_noise(batch, noise, torch.tensor([t], device=device))
            labels = class_labels[start:start + batch_size] if class_labels is not None else None
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                output = model(x_t, torch.full((len(batch),), t, dtype=torch.long, device=device), labels)
            step_norms.append(_per_image_norm(predicted_noise(output.float(), x_t, alpha_bar,
                                                              scheduler.prediction_type)))
        norms.append(torch.cat(step_norms))
    norms = torch.stack(norms)  # (S, N)
    return {"timesteps": timesteps.clone(), "eps_norm": norms.mean(dim=1), "eps_norm_std": norms.std(dim=1)}


def sampling_trace(model, scheduler, x0: torch.Tensor, *, num_inference_steps: int | None = None, eps_scale=None,
                   seed: int = 0, batch_size: int = 64, class_labels=None, progress: bool = True,
                   **sample_kwargs) -> dict:
    """Sample from real data noised to the first step, x_T = sqrt(ab_t0) x0 + sqrt(1 - ab_t0) eps, and record
    along the chain (through `sample`'s callback):
      "eps_norm" (S,), "eps_norm_std" (S,): mean / std over images of the predicted-noise L2 norm at x_hat_t;
      "residual_std" (S,): std over samples of x_hat_t - sqrt(ab_t) x0, per element, averaged over elements
        (Ning et al. sec. 4.2); "timesteps" (S,); "samples" (N, C, H, W) the final x_hat_0.
    `seed` draws x_T's noise and seeds `sample`; extra keywords (step_options, autocast_dtype, ...) go to
    `ldm_lite.sampling.sample`.
    """
    timesteps, device = _set_steps(scheduler, num_inference_steps), model_device(model)
    x0 = x0.to(device, torch.float32)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed), dtype=x0.dtype).to(device)
    x_T = scheduler.add_noise(x0, noise, timesteps[:1].to(device))
    steps = len(timesteps)
    norms = torch.zeros(steps, len(x0), dtype=torch.float64)
    residual_sum = torch.zeros(steps, *x0.shape[1:], dtype=torch.float64)
    residual_sq = torch.zeros_like(residual_sum)

    def record(info):
        i, start, x_t = info["step_index"], info["batch_start"], info["x_t"]
        alpha_bar_t = float(scheduler.alphas_cumprod[info["timestep"]])
        eps = predicted_noise(info["model_output"], x_t, alpha_bar_t, scheduler.prediction_type)
        norms[i, start:start + len(x_t)] = _per_image_norm(eps).cpu()
        residual = (x_t.double() - math.sqrt(alpha_bar_t) * x0[start:start + len(x_t)].double()).cpu()
        residual_sum[i] += residual.sum(dim=0)
        residual_sq[i] += residual.pow(2).sum(dim=0)

    samples = sample(model, scheduler, len(x0), shape=tuple(x0.shape[1:]), eps_scale=eps_scale, seed=seed,
                     batch_size=batch_size, class_labels=class_labels, x_T=x_T, callback=record, progress=progress,
                     device=device, **sample_kwargs)
    n = len(x0)
    variance = (residual_sq - residual_sum.pow(2) / n) / (n - 1)  # unbiased, per element
    return {"timesteps": timesteps.clone(), "eps_norm": norms.mean(dim=1), "eps_norm_std": norms.std(dim=1),
            "residual_std": variance.clamp(min=0).sqrt().flatten(1).mean(dim=1), "samples": samples}


def exposure_bias(model, scheduler, x0: torch.Tensor, *, num_inference_steps: int | None = None, eps_scale=None,
                  seed: int = 0, batch_size: int = 64, class_labels=None, progress: bool = True,
                  **sample_kwargs) -> dict:
    """Exposure-bias curves of a model on data x0 (N, C, H, W), N >= 2 (Ning et al. 2023, sec. 4.2 and 5).

    Runs `forward_eps_norm` and `sampling_trace` (both seeded by `seed`) and returns, per sampled timestep:
      "timesteps", "alphas_cumprod" (S,); "eps_norm_forward", "eps_norm_sampling" (+ "_std"): the two curves;
      "residual_std" sigma_hat_t and "target_std" sqrt(1 - ab_t);
      "delta": delta_t = (sigma_hat_t - sqrt(1 - ab_t))^2;
      "delta_reference": delta_t of a sampler whose x_hat_t has the right marginal but is independent of x0:
        std sqrt(1 - ab_t + 2 ab_t v) per element, v the per-element variance of x0. Even a perfect model starts
        from x_T, which holds only sqrt(ab_t0) of x0, so delta_t grows toward t = 0 without any exposure bias: at
        sqrt(ab_t0) ~ 0 the perfect model sits on this reference; what x_T leaks about x0 (its brightness, with
        the usual schedules) keeps a good model below it. Compare delta_t between settings (e.g. eps scales).
      "samples": the final samples of the chain.
    """
    if x0.ndim != 4 or len(x0) < 2:
        raise ValueError(f"x0 must be (N, C, H, W) with N >= 2, got shape {tuple(x0.shape)}")
    forward = forward_eps_norm(model, scheduler, x0, num_inference_steps=num_inference_steps,
                               generator=torch.Generator().manual_seed(seed + 1), batch_size=batch_size,
                               class_labels=class_labels, progress=progress,
                               autocast_dtype=sample_kwargs.get("autocast_dtype"))
    trace = sampling_trace(model, scheduler, x0, eps_scale=eps_scale, seed=seed, batch_size=batch_size,
                           class_labels=class_labels, progress=progress, **sample_kwargs)
    alphas_cumprod = scheduler.alphas_cumprod[trace["timesteps"]].double()
    target = (1 - alphas_cumprod).sqrt()
    variance = x0.double().var(dim=0).flatten()  # (D,)
    reference = (1 - alphas_cumprod[:, None] + 2 * alphas_cumprod[:, None] * variance).sqrt().mean(dim=1)
    return {"timesteps": trace["timesteps"], "alphas_cumprod": alphas_cumprod,
            "eps_norm_forward": forward["eps_norm"], "eps_norm_forward_std": forward["eps_norm_std"],
            "eps_norm_sampling": trace["eps_norm"], "eps_norm_sampling_std": trace["eps_norm_std"],
            "residual_std": trace["residual_std"], "target_std": target,
            "delta": (trace["residual_std"] - target).pow(2), "delta_reference": (reference - target).pow(2),
            "samples": trace["samples"]}


def eps_norm_gap(sampling: torch.Tensor, forward: torch.Tensor) -> float:
    """Root-mean-square relative gap between two eps-norm curves (S,): sqrt(mean((sampling / forward - 1)^2))."""
    return float((sampling.double() / forward.double() - 1).pow(2).mean().sqrt())


def scan_eps_scale(model, scheduler, x0: torch.Tensor, candidates, *, num_inference_steps: int | None = None,
                   seed: int = 0, batch_size: int = 64, class_labels=None, progress: bool = True,
                   **sample_kwargs) -> dict:
    """Epsilon scaling b (lambda = b at every step; Ning et al. eq. 11) that best matches the eps-norm along
    sampling to the forward eps-norm. Each candidate reruns the chain from the same x_T and noises (`seed`),
    so only b differs; the forward curve is computed once.

    Returns {"candidates": [b], "gap": [eps_norm_gap per candidate], "best": b with the smallest gap,
    "forward": `forward_eps_norm` result, "traces": [`sampling_trace` result per candidate]}.
    """
    candidates = [float(b) for b in candidates]
    if not candidates or min(candidates) <= 0:
        raise ValueError(f"candidates must be a non-empty list of positive eps-scale values, got {candidates}")
    _set_steps(scheduler, num_inference_steps)
    forward = forward_eps_norm(model, scheduler, x0, generator=torch.Generator().manual_seed(seed + 1),
                               batch_size=batch_size, class_labels=class_labels, progress=progress,
                               autocast_dtype=sample_kwargs.get("autocast_dtype"))
    traces = [sampling_trace(model, scheduler, x0, eps_scale=b, seed=seed, batch_size=batch_size,
                             class_labels=class_labels, progress=progress, **sample_kwargs)
              for b in candidates]
    gaps = [eps_norm_gap(trace["eps_norm"], forward["eps_norm"]) for trace in traces]
    best = candidates[min(range(len(gaps)), key=gaps.__getitem__)]
    return {"candidates": candidates, "gap": gaps, "best": best, "forward": forward, "traces": traces}
