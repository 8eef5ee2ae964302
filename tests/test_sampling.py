"""ldm_lite.sampling: signal-leak initial noise at the first sampled timestep, epsilon scaling against hand-computed
steps, and bit-for-bit equality with the plain sampler when lambda = 1."""
import math
import warnings

import pytest
import torch

from ldm_lite.generate import eps_scales
from ldm_lite.leak import LeakStats
from ldm_lite.sampling import initial_noise, sample
from ldm_lite.schedulers import DDIMScheduler, DDPMScheduler

SHAPE = (3, 8, 8)
SCALED_LINEAR = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SCHEDULER_CLASSES = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}


class TinyDenoiser(torch.nn.Module):
    """A fixed, timestep-dependent stand-in for a UNet: (B, 3, H, W), timesteps (B,) -> (B, 3, H, W)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, timesteps, class_labels=None):
        scale = (timesteps.float() / 1000).view(-1, 1, 1, 1)
        return torch.tanh(self.conv(x)) * 0.5 + scale * x


# ----------------------------------------------------------------------------- initial noise


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
@pytest.mark.parametrize("spacing, offset", [("leading", 1), ("trailing", 0), ("linspace", 0)])
def test_initial_noise_uses_the_first_sampled_timestep(name, spacing, offset):
    diffusers = pytest.importorskip("diffusers")
    config = dict(SCALED_LINEAR, timestep_spacing=spacing, steps_offset=offset)
    scheduler = SCHEDULER_CLASSES[name](**config)
    scheduler.set_timesteps(7)
    reference = getattr(diffusers, f"{name.upper()}Scheduler")(**config)
    reference.set_timesteps(7)
    t0 = int(scheduler.timesteps[0])
    assert t0 == int(reference.timesteps[0]) == {"leading": 853, "trailing": 999, "linspace": 999}[spacing]

    leak = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x_T = initial_noise(scheduler, (4, *SHAPE), leak=leak, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    alpha_bar = scheduler.alphas_cumprod.double()
    expected = alpha_bar[t0].sqrt() * leak.double() + (1 - alpha_bar[t0]).sqrt() * noise.double()
    torch.testing.assert_close(x_T.double(), expected, rtol=0, atol=1e-6)  # float32 rounding only
    # the test can tell neighbouring timesteps apart: 10 steps away the leak term moves by > 1e-3
    other = alpha_bar[t0 - 10].sqrt() * leak.double() + (1 - alpha_bar[t0 - 10]).sqrt() * noise.double()
    assert (other - expected).abs().max() > 1e-3


def test_initial_noise_without_leak_is_plain_randn():
    scheduler = DDIMScheduler(**SCALED_LINEAR)
    scheduler.set_timesteps(10)
    x_T = initial_noise(scheduler, (2, *SHAPE), generator=torch.Generator().manual_seed(3))
    assert torch.equal(x_T, torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(3)))


def test_initial_noise_draws_the_leak_from_statistics_after_the_noise():
    data = torch.rand(64, *SHAPE, generator=torch.Generator().manual_seed(5)) * 2 - 1
    stats = LeakStats.fit(data, kind="dct+pixel", n_components=3).with_channel_mean(1, 0.7)
    scheduler = DDPMScheduler(**SCALED_LINEAR, timestep_spacing="trailing")
    scheduler.set_timesteps(20)
    x_T = initial_noise(scheduler, (5, *SHAPE), leak=stats, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(5, *SHAPE, generator=generator)
    leak = stats.sample(5, generator=generator)
    ab = float(scheduler.alphas_cumprod[999])
    torch.testing.assert_close(x_T, math.sqrt(ab) * leak + math.sqrt(1 - ab) * noise, rtol=0, atol=1e-6)
    # the channel mean set on the statistics comes through, scaled by sqrt(alpha_bar[t0]) (noise mean ~ 0.02)
    shift = (x_T[:, 1] - math.sqrt(1 - ab) * noise[:, 1]).mean(dim=(-2, -1))
    torch.testing.assert_close(shift, torch.full((5,), 0.7 * math.sqrt(ab)), rtol=0, atol=1e-6)


def test_initial_noise_rejects_statistics_of_another_shape():
    stats = LeakStats.fit(torch.rand(8, 3, 4, 4) * 2 - 1, kind="pixel")
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match=r"\(3, 4, 4\).*\(3, 8, 8\)"):
        initial_noise(scheduler, (2, *SHAPE), leak=stats)


def test_zero_terminal_snr_warns_that_a_leak_has_no_effect():
    scheduler = DDIMScheduler(**SCALED_LINEAR, rescale_betas_zero_snr=True, prediction_type="v_prediction",
                              timestep_spacing="trailing")
    scheduler.set_timesteps(10)
    leak = torch.ones(2, *SHAPE)
    with pytest.warns(UserWarning, match="no effect"):
        x_T = initial_noise(scheduler, (2, *SHAPE), leak=leak, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x_T, torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0)))
    # leading spacing starts at 900 < 999, where alpha_bar > 0: no warning
    leading = DDIMScheduler(**SCALED_LINEAR, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    leading.set_timesteps(10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        initial_noise(leading, (2, *SHAPE), leak=leak)


# ----------------------------------------------------------------------------- epsilon scaling


def plain_sampler(model, scheduler, n, seed, eta=None):
    """The textbook loop: x_T = randn, then scheduler.step with the raw model output at every timestep."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *SHAPE, generator=generator)
    with torch.no_grad():
        for t in scheduler.timesteps:
            output = model(x, torch.full((n,), int(t)))
            kwargs = {} if eta is None else {"eta": eta}
            x = scheduler.step(output, t, x, generator=generator, **kwargs).prev_sample
    return x


@pytest.mark.parametrize("name, eta", [("ddpm", None), ("ddim", 0.0), ("ddim", 1.0)])
def test_eps_scale_one_reproduces_the_plain_sampler_bit_for_bit(name, eta):
    model = TinyDenoiser()
    scheduler = SCHEDULER_CLASSES[name](**SCALED_LINEAR)
    scheduler.set_timesteps(10)
    expected = plain_sampler(model, scheduler, 4, seed=0, eta=eta)
    kwargs = {} if eta is None else {"eta": eta}
    for eps_scale, slope in ((None, 0.0), (1.0, 0.0), ([1.0] * 10, 0.0)):
        ours = sample(model, scheduler, 4, shape=SHAPE, eps_scale=eps_scale, eps_scale_slope=slope, progress=False,
                      generator=torch.Generator().manual_seed(0), **kwargs)
        assert torch.equal(ours, expected), eps_scale


def hand_step(name, scheduler, x, output, t, prev_t, lam, noise):
    """One DDPM / DDIM (eta = 0) step with epsilon scaling, in float64 from the formulas (REFERENCES.md):
    x0 = (x_t - sqrt(1 - ab) eps / lam) / sqrt(ab), clipped to [-1, 1]; DDIM: sqrt(ab') x0 + sqrt(1 - ab') eps / lam;
    DDPM: the posterior mean (Ho et al. eq. 7) of the respaced chain plus sqrt(beta_tilde) z."""
    alphas_cumprod = scheduler.alphas_cumprod.double()
    x, output = x.double(), output.double()
    ab = alphas_cumprod[t]
    ab_prev = alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0, dtype=torch.float64)
    eps = output / lam
    x0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
    if name == "ddim":
        return ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
    beta = 1 - ab / ab_prev
    mean = ab_prev.sqrt() * beta / (1 - ab) * x0 + (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab) * x
    variance = ((1 - ab_prev) / (1 - ab) * beta).clamp(min=1e-20)
    return mean + variance.sqrt() * noise.double() if t > 0 else mean


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
@pytest.mark.parametrize("eps_scale,slope", [(1.017, 0.0), (1.03, -0.002)], ids=["constant", "k*i+b"])
def test_eps_scaling_matches_hand_computed_steps(name, eps_scale, slope):
    model, steps, n, seed = TinyDenoiser(), 10, 4, 0
    scheduler = SCHEDULER_CLASSES[name](**SCALED_LINEAR)
    scheduler.set_timesteps(steps)
    records = []
    sample(model, scheduler, n, shape=SHAPE, eps_scale=eps_scale, eps_scale_slope=slope, progress=False,
           generator=torch.Generator().manual_seed(seed), callback=records.append)
    lambdas = [slope * i + eps_scale for i in range(steps)]
    generator = torch.Generator().manual_seed(seed)  # replay the draws: x_T, then one noise per DDPM step t > 0
    torch.randn(n, *SHAPE, generator=generator)
    timesteps = scheduler.timesteps.tolist() + [-1]
    assert [r["step_index"] for r in records] == list(range(steps))
    for i, record in enumerate(records):
        t, prev_t = timesteps[i], timesteps[i + 1]
        noise = torch.randn(n, *SHAPE, generator=generator) if name == "ddpm" and t > 0 else None
        expected = hand_step(name, scheduler, record["x_t"], record["model_output"], t, prev_t, lambdas[i], noise)
        # float32 vs float64 (measured max 4.5e-7; the x0 estimate amplifies rounding by 1 / sqrt(ab) <= 15 here)
        torch.testing.assert_close(record["prev_sample"].double(), expected, rtol=0, atol=2e-6)
        unscaled = hand_step(name, scheduler, record["x_t"], record["model_output"], t, prev_t, 1.0, noise)
        assert (unscaled - expected).abs().max() > 5e-5, f"step {i}: lambda {lambdas[i]} had no visible effect"


def test_eps_scales_builds_k_i_plus_b_and_rejects_non_positive():
    assert eps_scales(1.0, 0.0, 3) == [1.0, 1.0, 1.0]
    assert eps_scales(1.03, -0.01, 3) == pytest.approx([1.03, 1.02, 1.01], abs=1e-12)
    assert eps_scales(1.0, 0.5, 2) == [1.0, 1.5]
    with pytest.raises(ValueError, match="must stay > 0"):
        eps_scales(1.0, -0.2, 10)


# ----------------------------------------------------------------------------- autocast


def test_autocast_covers_the_model_only_and_spans_the_loop():
    """bf16 autocast: the model runs under it (its bf16 output is cast back), the scheduler step and callback
    in float32 with autocast off, inside the one outer context that keeps the bf16 weight copies alive; the
    result equals entering autocast around each model call."""
    model = TinyDenoiser()
    seen = []

    def autocast_nesting() -> int:
        """How many autocast contexts are open (autocast drops its weight copies when this reaches 0)."""
        level = torch.autocast_increment_nesting() - 1
        torch.autocast_decrement_nesting()
        return level

    class Recording(torch.nn.Module):
        def forward(self, x, timesteps, class_labels=None):
            seen.append(("model", torch.is_autocast_enabled("cpu"), autocast_nesting()))
            return model.conv(x)  # bf16 under autocast

    def callback(info):
        seen.append(("step", torch.is_autocast_enabled("cpu"), autocast_nesting(), info["model_output"].dtype,
                     info["prev_sample"].dtype))

    scheduler = DDIMScheduler(**SCALED_LINEAR)
    out = sample(Recording(), scheduler, 2, shape=SHAPE, num_inference_steps=3,
                 generator=torch.Generator().manual_seed(0), progress=False, callback=callback,
                 autocast_dtype=torch.bfloat16)
    # the step is 2 deep: the loop's autocast and the autocast-off block inside it
    assert seen == [("model", True, 1), ("step", False, 2, torch.float32, torch.float32)] * 3
    assert autocast_nesting() == 0

    def per_call(x, timesteps, class_labels=None):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model.conv(x)

    expected = sample(per_call, scheduler, 2, shape=SHAPE, num_inference_steps=3,
                      generator=torch.Generator().manual_seed(0), progress=False)
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    float32 = sample(lambda x, t, y=None: model.conv(x), scheduler, 2, shape=SHAPE, num_inference_steps=3,
                     generator=torch.Generator().manual_seed(0), progress=False)
    assert not torch.equal(out, float32) and (out - float32).abs().max() < 0.1  # bf16 was used, and is close
