"""Training noise and loss weights: plain, offset and pyramid noise, input perturbation, min-SNR-gamma.

All noise functions draw from an explicit `torch.Generator` and return float32 (B, C, H, W).
Every option is a switch with the references' semantics; `training_noise` combines them.

The forward process itself (x_t = sqrt(ab) x0 + sqrt(1 - ab) eps) lives in the scheduler's `add_noise`.
"""
import torch
import torch.nn.functional as F


def training_noise(shape, generator: torch.Generator | None = None, device=None, offset_strength: float = 0.0,
                   pyramid_discount: float = 0.0) -> torch.Tensor:
    """The noise eps (B, C, H, W) a training step adds and (with epsilon prediction) regresses.

    Plain randn; pyramid noise instead when `pyramid_discount` > 0; plus an offset when `offset_strength` > 0.
    """
    if pyramid_discount > 0:
        noise = pyramid_noise(shape, pyramid_discount, generator, device)
    else:
        noise = torch.randn(shape, generator=generator, device=device)
    if offset_strength > 0:
        noise = add_offset_noise(noise, offset_strength, generator)
    return noise


def add_offset_noise(noise: torch.Tensor, strength: float = 0.1,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Offset noise (Guttenberg 2023, Crosslabs "Diffusion with offset noise"): noise + s * randn(B, C, 1, 1).

    The shared per-channel offset lets the model change an image's mean brightness, which plain noise
    almost never asks of it. With unit `noise`, each element has variance 1 + s^2 and the per-channel
    spatial mean has variance 1 / (H W) + s^2. The training target is this whole noise.
    """
    offset = torch.randn(noise.shape[:2] + (1, 1), generator=generator, device=noise.device)
    return noise + strength * offset


def perturb_noise(noise: torch.Tensor, gamma: float = 0.1, generator: torch.Generator | None = None) -> torch.Tensor:
    """Input perturbation (DDPM-IP, Ning et al. 2023, arXiv:2301.11706, Algorithm 1): noise + gamma * xi, xi ~ N(0, I).

    Only x_t is built from the perturbed noise; the target stays the clean `noise`, so the model learns
    to undo slightly-off inputs like the ones its own predictions produce at sampling time.
    """
    return noise + gamma * torch.randn(noise.shape, generator=generator, device=noise.device)


def pyramid_noise(shape, discount: float = 0.8, generator: torch.Generator | None = None, device=None,
                  max_levels: int = 10) -> torch.Tensor:
    """Multi-resolution ("pyramid") noise (Whitaker 2023, "Multi-Resolution Noise for Diffusion Model Training").

    noise = sum_i discount^i * upsample(randn at (H, W) / r^i), r ~ U(2, 4) drawn per level, bilinear
    upsampling, level 0 at full size; stops once a level would be 1 pixel or after `max_levels`. Each
    sample is then divided by its own standard deviation, so every sample has unit std over (C, H, W).
    """
    batch, channels, height, width = shape
    noise = torch.randn(shape, generator=generator, device=device)
    for level in range(1, max_levels):
        r = 2 + 2 * float(torch.rand((), generator=generator))
        size = (max(1, int(height / r ** level)), max(1, int(width / r ** level)))
        coarse = torch.randn((batch, channels, *size), generator=generator, device=device)
        noise += discount ** level * F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
        if size == (1, 1):
            break
    return noise / noise.std(dim=(1, 2, 3), keepdim=True)


def min_snr_weights(snr: torch.Tensor, gamma: float = 5.0, prediction_type: str = "epsilon") -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, arXiv:2303.09556), same shape as `snr`.

    The x0-space weight min(SNR, gamma) expressed for each parametrisation:
    epsilon: min(SNR, gamma) / SNR; sample (x0): min(SNR, gamma); v_prediction: min(SNR, gamma) / (SNR + 1).
    Guards: at SNR = 0 (zero terminal SNR) the epsilon weight takes its limit 1 instead of 0/0;
    at SNR = inf (alpha_bar = 1) the epsilon and v weights are 0 and the x0 weight is gamma.
    """
    if gamma <= 0:
        raise ValueError(f"min_snr_gamma must be > 0, got {gamma}")
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return torch.where(snr == 0, torch.ones_like(snr), clipped / snr)
    if prediction_type == "sample":
        return clipped
    if prediction_type == "v_prediction":
        return torch.where(torch.isinf(snr), torch.zeros_like(snr), clipped / (snr + 1))
    raise ValueError(f"prediction_type must be one of ('epsilon', 'v_prediction', 'sample'), got {prediction_type!r}")
