"""The exact denoiser for Gaussian-mixture data: what a perfectly trained diffusion model outputs, with no training.

Data x0 ~ sum_k w_k N(m_k, s_k^2 I), with m_k a (C, H, W) mean image and s_k a scalar. The forward process
x_t = a x0 + b eps (a = sqrt(ab_t), b = sqrt(1 - ab_t); Ho et al. 2020, arXiv:2006.11239, eq. 4) keeps it a
mixture, of N(a m_k, v_k I) with v_k = a^2 s_k^2 + b^2. Bayes' rule within each component (a Gaussian prior
with a Gaussian likelihood) and the responsibilities r_k of the components give
    E[x0 | x_t] = sum_k r_k(x_t) (m_k + a s_k^2 / v_k (x_t - a m_k)),
    r_k(x_t) = softmax_k(log w_k - D/2 log v_k - |x_t - a m_k|^2 / (2 v_k)),    D = C H W,
and the optimal epsilon, v and x0 predictions follow linearly: eps = (x_t - a E[x0|x_t]) / b,
v = a eps - b E[x0|x_t] (Salimans & Ho 2022, arXiv:2202.00512).

Computation is in float64 whatever the input dtype (the output is cast back), so float64 inputs get float64
accuracy. `brightness_mixture` builds the lessons' data set: images of uniform brightness with a little texture,
whose per-image brightness a leaky schedule cannot fully reproduce from pure noise (the signal-leak bias).
"""
import math
from types import SimpleNamespace

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def alpha_bar_at(timesteps, alphas_cumprod, interpolation_type: str = "log_linear"):
    """alpha_bar (B,) float64 at timesteps (B,) that may be fractional (Euler and Karras samplers give them).

    Between integer timesteps sigma = sqrt((1 - ab) / ab) is interpolated as the sampler that made the timesteps
    did, so a model called at t sees the sampler's noise level (pass `scheduler.timestep_interpolation`):
    "log_linear" interpolates log sigma, the inverse of the sigma-to-timestep map of Karras and exponential sigmas
    (diffusers' `_sigma_to_t`); "linear" interpolates sigma, as Euler and Euler ancestral do at fractional
    `linspace` timesteps (the two differ by up to 1.9e-4 relative there). At integer timesteps the table value
    itself is returned, bit for bit. alphas_cumprod: (T,) table; timesteps in [0, T - 1].
    """
    if interpolation_type not in ("linear", "log_linear"):
        raise ValueError(f"interpolation_type must be 'linear' or 'log_linear', got {interpolation_type!r}")
    table = torch.as_tensor(alphas_cumprod).to(torch.float64)
    t = torch.as_tensor(timesteps, device=table.device).to(torch.float64).reshape(-1)
    last = len(table) - 1
    if (t < 0).any() or (t > last).any():
        raise ValueError(f"timesteps must lie in [0, {last}], got {t.min().item()} .. {t.max().item()}")
    low = t.floor().long()
    high = (low + 1).clamp(max=last)
    weight = t - low
    log_sigma = 0.5 * (torch.log1p(-table) - torch.log(table))  # +inf where ab = 0 (zero terminal SNR)
    if interpolation_type == "linear":
        sigma = log_sigma.exp()
        log_interpolated = torch.log(sigma[low] + weight * (sigma[high] - sigma[low]))
    else:
        log_interpolated = log_sigma[low] + weight * (log_sigma[high] - log_sigma[low])
    return torch.where(weight == 0, table[low], torch.sigmoid(-2 * log_interpolated))  # 1 / (1 + sigma^2)


def mixture_posterior_mean(x_t, alpha_bar, means, stds, weights, allowed=None):
    """E[x0 | x_t] (B, C, H, W) for x0 ~ sum_k w_k N(m_k, s_k^2 I) (module docstring), in x_t's dtype.

    x_t: (B, C, H, W); alpha_bar: (B,) in [0, 1); means: (K, C, H, W); stds: (K,) >= 0; weights: (K,) > 0,
    summing to 1; allowed: optional (B, K) bool, the components each sample may come from (a class label).
    Responsibilities use log-sum-exp (softmax of log terms), so they stay finite for any |x_t|.
    """
    batch, dims = x_t.shape[0], x_t[0].numel()
    x = x_t.reshape(batch, dims)
    m = means.reshape(-1, dims)  # (K, D)
    a = alpha_bar.sqrt().reshape(batch, 1)  # (B, 1)
    b_squared = (1 - alpha_bar).reshape(batch, 1)
    variance = a ** 2 * stds ** 2 + b_squared  # v_k, (B, K)
    # |x_t - a m_k|^2 expanded (a matmul instead of a (B, K, D) difference); clamped against rounding below 0
    squared_distance = ((x * x).sum(1, keepdim=True) - 2 * a * (x @ m.T) + a ** 2 * (m * m).sum(1)).clamp(min=0)
    log_r = torch.log(weights) - 0.5 * dims * torch.log(variance) - squared_distance / (2 * variance)
    if allowed is not None:
        log_r = log_r.masked_fill(~allowed, -math.inf)
    r = torch.softmax(log_r, dim=1)  # (B, K)
    # m_k + a s_k^2 / v_k (x - a m_k) = (b^2 / v_k) m_k + (a s_k^2 / v_k) x
    mean_weight = r * b_squared / variance  # (B, K)
    sample_weight = (r * a * stds ** 2 / variance).sum(1, keepdim=True)  # (B, 1)
    posterior = mean_weight @ m + sample_weight * x
    return posterior.reshape(x_t.shape)


class GaussianMixtureDenoiser(torch.nn.Module):
    """The exact model for x0 ~ sum_k w_k N(m_k, s_k^2 I): call it like a UNet, model(x_t, timesteps, labels).

    means: (K, C, H, W) mean images, or (K,) brightness levels with `shape` = (C, H, W); stds: (K,) or one
    float; weights: (K,), default uniform (normalised here). alphas_cumprod: the (T,) schedule the model "was
    trained" with (e.g. `scheduler.alphas_cumprod`). prediction_type: "epsilon", "v_prediction" or "sample".
    interpolation_type: how fractional timesteps map to noise levels (`alpha_bar_at`); pass the sampler's
    `scheduler.timestep_interpolation` so that the denoiser is exact at the sampler's own sigmas.
    config: in_channels, sample_size (H, or (H, W) if not square), num_classes = K: label k < K conditions on
    component k, label K (the null label) means the whole mixture, so `ldm_lite.sampling.sample` and
    classifier-free guidance can drive it. Holds no parameters; its tensors follow the input's device.
    """

    def __init__(self, means, stds, weights=None, *, alphas_cumprod, prediction_type: str = "epsilon",
                 shape=None, interpolation_type: str = "log_linear"):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim == 1:
            if shape is None:
                raise ValueError("brightness levels (K,) need shape=(C, H, W)")
            means = means.reshape(-1, 1, 1, 1).expand(-1, *shape).clone()
        if means.ndim != 4:
            raise ValueError(f"means must be (K, C, H, W) or (K,), got shape {tuple(means.shape)}")
        count = means.shape[0]
        stds = torch.as_tensor(stds, dtype=torch.float64).reshape(-1).expand(count).clone()
        weights = (torch.ones(count, dtype=torch.float64) if weights is None
                   else torch.as_tensor(weights, dtype=torch.float64).reshape(-1))
        if weights.shape != (count,) or (weights <= 0).any() or (stds < 0).any():
            raise ValueError(f"need {count} positive weights and stds >= 0, got weights {weights.tolist()}, "
                             f"stds {stds.tolist()}")
        self.means, self.stds, self.weights = means, stds, weights / weights.sum()
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod).to(torch.float64)
        self.prediction_type, self.interpolation_type = prediction_type, interpolation_type
        channels, height, width = means.shape[1:]
        self.config = SimpleNamespace(in_channels=channels, sample_size=height if height == width else (height, width),
                                      num_classes=count, prediction_type=prediction_type)

    def forward(self, sample, timesteps, class_labels=None):
        """The optimal `prediction_type` output (B, C, H, W) at x_t = sample (B, C, H, W), in sample's dtype.

        timesteps: a scalar or (B,), integer or fractional (see `alpha_bar_at`); class_labels: None or (B,) long
        in [0, K] (K: the whole mixture).
        """
        x = sample.to(torch.float64)
        alpha_bar = alpha_bar_at(timesteps, self.alphas_cumprod.to(x.device), self.interpolation_type)
        alpha_bar = alpha_bar.expand(x.shape[0]) if alpha_bar.numel() == 1 else alpha_bar
        if alpha_bar.shape != (x.shape[0],):
            raise ValueError(f"timesteps must be a scalar or ({x.shape[0]},), got {alpha_bar.numel()} values")
        x0 = self.posterior_mean(x, alpha_bar, class_labels)
        if self.prediction_type == "sample":
            return x0.to(sample.dtype)
        a = alpha_bar.sqrt().reshape(-1, 1, 1, 1)
        b = (1 - alpha_bar).sqrt().reshape(-1, 1, 1, 1)
        eps = (x - a * x0) / b
        output = eps if self.prediction_type == "epsilon" else a * eps - b * x0
        return output.to(sample.dtype)

    def posterior_mean(self, x_t, alpha_bar, class_labels=None):
        """E[x0 | x_t] (B, C, H, W) at alpha_bar (B,), optionally given class labels (B,) (see forward)."""
        device, dtype = x_t.device, x_t.dtype
        allowed = None
        if class_labels is not None:
            labels = torch.as_tensor(class_labels, device=device).long().reshape(-1, 1)
            count = len(self.weights)
            if (labels < 0).any() or (labels > count).any():
                raise ValueError(f"class labels must lie in [0, {count}] ({count}: the whole mixture)")
            allowed = (labels == torch.arange(count, device=device)) | (labels == count)
        return mixture_posterior_mean(x_t, alpha_bar.to(device, dtype), self.means.to(device, dtype),
                                      self.stds.to(device, dtype), self.weights.to(device, dtype), allowed)

    # ---- the data --------------------------------------------------------------------------------
    def sample_data(self, n: int, generator=None, dtype=torch.float32):
        """n draws of x0: (images (n, C, H, W), components (n,) long). CPU generator or None."""
        components = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn((n, *self.means.shape[1:]), generator=generator, dtype=torch.float64)
        images = self.means[components] + self.stds[components].reshape(-1, 1, 1, 1) * noise
        return images.to(dtype), components

    def data_mean(self):
        """Exact E[x0] per element, (C, H, W) float64."""
        return torch.einsum("k,kchw->chw", self.weights, self.means)

    def data_variance(self):
        """Exact Var[x0] per element, (C, H, W) float64: sum_k w_k (s_k^2 + m_k^2) - E[x0]^2."""
        variances = self.stds.reshape(-1, 1, 1, 1) ** 2
        second_moment = torch.einsum("k,kchw->chw", self.weights, self.means ** 2 + variances)
        return second_moment - self.data_mean() ** 2

    def brightness_statistics(self):
        """Exact (mean, std) of an image's brightness, the mean of x0 over (C, H, W): component k gives
        mean(m_k) + s_k / sqrt(D) z, so Var = sum_k w_k (mean(m_k)^2 + s_k^2 / D) - mean^2."""
        dims = self.means[0].numel()
        levels = self.means.reshape(len(self.weights), -1).mean(1)
        mean = (self.weights * levels).sum()
        variance = (self.weights * (levels ** 2 + self.stds ** 2 / dims)).sum() - mean ** 2
        return mean.item(), variance.clamp(min=0).sqrt().item()


def brightness_mixture(alphas_cumprod, shape=(3, 16, 16), levels=(-0.6, 0.0, 0.6), texture_std: float = 0.1,
                       weights=None, prediction_type: str = "epsilon",
                       interpolation_type: str = "log_linear") -> GaussianMixtureDenoiser:
    """The lessons' data set: images of uniform brightness `levels` (dark, grey, bright) plus white texture of
    std `texture_std`, as an exact denoiser. Brightness std of the data: about 0.49 for the defaults."""
    return GaussianMixtureDenoiser(torch.tensor(levels, dtype=torch.float64), texture_std, weights,
                                   alphas_cumprod=alphas_cumprod, prediction_type=prediction_type, shape=shape,
                                   interpolation_type=interpolation_type)
