"""Noise schedules: betas, alphas_cumprod, zero-terminal-SNR rescaling, SNR helpers.

Notation (Ho et al. 2020, arXiv:2006.11239): beta_t is the variance added at step t,
alpha_t = 1 - beta_t and alpha_bar_t = prod_{s<=t} alpha_s (`alphas_cumprod`), so that
x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps  (Ho et al. eq. 4).

Schedules are computed in float32 with the same operations as diffusers (the cosine one in
float64, cast once, as diffusers does too). A model trained with diffusers saw exactly these
noise levels, and near alpha_bar = 0 the x0 estimate amplifies any rounding difference by
1 / sqrt(alpha_bar) (up to ~160x for the linear schedule), so "close" is not enough.
"""
import math

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")  # diffusers' spacings: every sampler takes them
# DDIM's quadratic spacing (Song et al. 2021, arXiv:2010.02502, App. D.2): diffusers lacks it, DDPM and DDIM take it
QUADRATIC_SPACING = "quadratic"
ALL_TIMESTEP_SPACINGS = TIMESTEP_SPACINGS + (QUADRATIC_SPACING,)


def _cosine_alpha_bar(t: float) -> float:
    """alpha_bar(t) of Nichol & Dhariwal 2021 (arXiv:2102.09672) eq. 17 without normalisation, t in [0, 1]."""
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def make_betas(beta_schedule: str = "linear", num_train_timesteps: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02, trained_betas=None) -> torch.Tensor:
    """Betas (T,) float32 for a named schedule, with diffusers' semantics.

    `linear` is not rescaled by 1000 / T; `scaled_linear` is linear in sqrt(beta) (Stable Diffusion);
    `squaredcos_cap_v2` is the improved-DDPM cosine schedule with beta capped at 0.999;
    `sigmoid` is sigmoid(linspace(-6, 6)) mapped to [beta_start, beta_end].
    `trained_betas` (a sequence of T floats) overrides the named schedule.
    """
    if trained_betas is not None:
        return torch.as_tensor(trained_betas, dtype=torch.float32)
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    T = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return torch.tensor([min(1 - _cosine_alpha_bar((i + 1) / T) / _cosine_alpha_bar(i / T), 0.999)
                             for i in range(T)], dtype=torch.float32)
    if beta_schedule == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float32)) * (beta_end - beta_start) + beta_start
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas (T,) so that the terminal SNR is exactly zero.

    Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps Are Flawed"
    (arXiv:2305.08891), Algorithm 1: shift sqrt(alpha_bar) so its last value is 0, then scale
    it so its first value is unchanged. The last beta becomes 1.
    """
    sqrt_ab = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alphas_cumprod = sqrt_ab ** 2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1 - alphas


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), shape (T,), same dtype as betas."""
    return torch.cumprod(1.0 - betas, dim=0)


def snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) per timestep, (T,). Infinite where alpha_bar = 1."""
    return alphas_cumprod / (1.0 - alphas_cumprod)


def make_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000, timestep_spacing: str = "leading",
                   steps_offset: int = 0) -> torch.Tensor:
    """The N sampled timesteps (N,) int64, in descending order (Lin et al. 2023, Table 2).

    `leading`: arange(N) * (T // N) + steps_offset (Stable Diffusion: 981 ... 1 for N = 50, offset 1);
    `trailing`: round(arange(T, 0, -T / N)) - 1 (999 ... 19 for N = 50);
    `linspace`: round(linspace(0, T - 1, N)) (999 ... 0);
    `quadratic`: int(linspace(0, sqrt(0.8 T), N) ** 2) + steps_offset, as the DDIM paper's code (Song et al. 2021,
    arXiv:2010.02502, App. D.2): 800 ... 0 for T = 1000, dense at low noise; defined up to
    `max_quadratic_steps(T)` steps (29 for T = 1000), beyond which int() repeats timesteps.
    """
    T, N = num_train_timesteps, num_inference_steps
    if not isinstance(N, int) or not 1 <= N <= T:
        raise ValueError(f"num_inference_steps must be an integer in [1, num_train_timesteps={T}], got {N!r}")
    if timestep_spacing == "leading":
        steps = torch.arange(N, dtype=torch.float64).mul(T // N).round() + steps_offset
        steps = steps.flip(0)
    elif timestep_spacing == "trailing":
        steps = torch.arange(T, 0, -T / N, dtype=torch.float64).round() - 1
    elif timestep_spacing == "linspace":
        steps = torch.linspace(0, T - 1, N, dtype=torch.float64).round().flip(0)
    elif timestep_spacing == QUADRATIC_SPACING:
        steps = (torch.linspace(0, math.sqrt(0.8 * T), N, dtype=torch.float64) ** 2).floor().flip(0) + steps_offset
        if len(steps.unique()) < N:
            raise ValueError(f"quadratic spacing repeats timesteps beyond {max_quadratic_steps(T)} steps of T = {T} "
                             f"(int(linspace(0, sqrt(0.8 T), N) ** 2)), got {N}; use fewer steps or another spacing")
    else:
        raise ValueError(f"timestep_spacing must be one of {ALL_TIMESTEP_SPACINGS}, got {timestep_spacing!r}")
    if steps.max() > T - 1 or steps.min() < 0:
        raise ValueError(f"steps_offset={steps_offset} moves timesteps outside [0, {T - 1}]")
    return steps.long()


def max_quadratic_steps(num_train_timesteps: int) -> int:
    """The most steps of quadratic spacing without a repeated timestep: floor(sqrt(0.8 T)) + 1 (its first gap,
    0.8 T / (N - 1)^2, must reach 1)."""
    return math.isqrt(int(0.8 * num_train_timesteps)) + 1


def default_steps_offset(timestep_spacing: str) -> int:
    """The steps_offset ldm_lite samples with: 1 for `leading`, as Stable Diffusion (t0 = 981 ... 1 for 50 of
    1000 steps), else 0. The one statement of this rule; sampling a trained run, the band analysis and the
    schedule table all use it."""
    return 1 if timestep_spacing == "leading" else 0


def signal_at_first_step(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> float:
    """sqrt(alpha_bar) at the first sampled timestep: how much of the image x_T still holds (the signal leak)."""
    return float(alphas_cumprod[int(timesteps[0])].double().sqrt())


# Common schedules by name: (make_betas keywords, zero terminal SNR rescale).
NAMED_SCHEDULES = {
    "linear": (dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02), False),
    "scaled_linear": (dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), False),
    "cosine": (dict(beta_schedule="squaredcos_cap_v2"), False),
    "sigmoid": (dict(beta_schedule="sigmoid", beta_start=1e-4, beta_end=0.02), False),
    "scaled_linear_zero_snr": (dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), True),
}


def named_alphas_cumprod(names=None, num_train_timesteps: int = 1000) -> dict:
    """{name: alphas_cumprod (T,) float64} for names in NAMED_SCHEDULES (all by default)."""
    names = list(NAMED_SCHEDULES) if names is None else list(names)
    result = {}
    for name in names:
        if name not in NAMED_SCHEDULES:
            raise ValueError(f"schedule must be one of {tuple(NAMED_SCHEDULES)}, got {name!r}")
        kwargs, zero_snr = NAMED_SCHEDULES[name]
        betas = make_betas(num_train_timesteps=num_train_timesteps, **kwargs)
        result[name] = alphas_cumprod_from_betas((rescale_zero_terminal_snr(betas) if zero_snr else betas).double())
    return result


def schedule_table(num_inference_steps: int = 50, num_train_timesteps: int = 1000) -> list[dict]:
    """Rows describing the signal leak of the named schedules at each spacing.

    Each row: schedule name, spacing, first timestep t0, sqrt(alpha_bar[t0]) and the terminal SNR
    at t = T - 1 (steps_offset by `default_steps_offset`). Used by `python -m analysis schedules`.
    The spacings are diffusers' (TIMESTEP_SPACINGS), which every sampler takes; quadratic spacing (DDPM and DDIM
    only) starts at t0 = int(0.8 T) whatever N and stops at `max_quadratic_steps(T)`, below the default 50.
    """
    rows = []
    for name, alphas_cumprod in named_alphas_cumprod(None, num_train_timesteps).items():
        for spacing in TIMESTEP_SPACINGS:
            offset = default_steps_offset(spacing)
            timesteps = make_timesteps(num_inference_steps, num_train_timesteps, spacing, offset)
            rows.append(dict(schedule=name, spacing=spacing, steps_offset=offset, first_timestep=int(timesteps[0]),
                             signal_at_first_step=signal_at_first_step(alphas_cumprod, timesteps),
                             terminal_snr=float(snr(alphas_cumprod)[-1])))
    return rows


def format_schedule_table(rows: list[dict]) -> str:
    """Plain-text table of `schedule_table` rows."""
    header = f"{'schedule':<24} {'spacing':<9} {'t0':>4} {'sqrt(ab[t0])':>13} {'terminal SNR':>13}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['schedule']:<24} {row['spacing']:<9} {row['first_timestep']:>4} "
                     f"{row['signal_at_first_step']:>13.4g} {row['terminal_snr']:>13.3e}")
    return "\n".join(lines)
